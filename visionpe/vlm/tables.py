"""Frequency allocations and rotary tables for multimodal positions (built on :mod:`visionpe.rotary`).

A scheme's positions are ``(A, B, L)`` (one row per axis). An *allocation* says which axis each of the
``F = head_dim / 2`` rotary frequencies reads (or that it is a zero frequency); the rotary core turns both
into per-frequency ``cos``/``sin`` of shape ``(B, L, F)`` and rotates q/k in the LLM ("rotate_half")
pairing: frequency ``f`` rotates channels ``(f, f + F)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from visionpe import rotary

from ._checks import short_repr

__all__ = ["FreqAllocation", "SingleAxis", "Sections", "Cyclic", "Hybrid", "rotary_cos_sin",
           "apply_multimodal_rotary", "per_channel"]


class FreqAllocation:
    """Base class: ``axis_of_freq(num_freqs)`` -> ``(F,)`` int64, ``-1`` for a zero frequency."""

    num_axes: int = 1

    def axis_of_freq(self, num_freqs: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class SingleAxis(FreqAllocation):
    """Every frequency reads axis 0 (1-D RoPE, V2PE, CCA)."""
    num_axes: int = 1

    def axis_of_freq(self, num_freqs: int) -> torch.Tensor:
        return torch.zeros(num_freqs, dtype=torch.int64)


@dataclass(frozen=True)
class Sections(FreqAllocation):
    """M-RoPE: ``sections`` frequencies per axis (t, h, w), chunked (Qwen2/2.5-VL) or interleaved (Qwen3-VL)."""
    sections: tuple = (16, 24, 24)
    interleaved: bool = False

    @property
    def num_axes(self) -> int:
        return len(self.sections)

    def axis_of_freq(self, num_freqs: int) -> torch.Tensor:
        return rotary.section_axes(self.sections, self.interleaved, num_freqs=num_freqs)


@dataclass(frozen=True)
class Cyclic(FreqAllocation):
    """Frequency ``f`` reads axis ``order[f % len(order)]`` (VRoPE)."""
    order: tuple = (0, 1, 2, 3)

    @property
    def num_axes(self) -> int:
        return max(self.order) + 1

    def axis_of_freq(self, num_freqs: int) -> torch.Tensor:
        return rotary.cyclic_axes(num_freqs, self.order)


@dataclass(frozen=True)
class Hybrid(FreqAllocation):
    """HoPE: the ``sections[1] + sections[2]`` highest frequencies alternate h (even) / w (odd); the
    ``sections[0]`` lowest are zero frequencies (``temporal="zero"``, HoPE) or read t (``"t"``, the HoPE
    repo's VideoRoPE baseline)."""
    sections: tuple = (16, 24, 24)
    temporal: str = "zero"
    num_axes: int = 3

    def __post_init__(self):
        if self.temporal not in ("zero", "t"):
            raise ValueError(f"temporal must be 'zero' or 't'; got {short_repr(self.temporal)}")
        if len(self.sections) != 3 or self.sections[1] != self.sections[2]:
            raise ValueError(f"HoPE sections must be (temporal, s, s) with equal h and w counts; got {self.sections}")

    def axis_of_freq(self, num_freqs: int) -> torch.Tensor:
        total = sum(self.sections)
        if total != num_freqs:
            raise ValueError(f"HoPE sections {tuple(self.sections)} sum to {total} rotary frequencies but "
                             f"head_dim={2 * num_freqs} has {num_freqs} (head_dim / 2)")
        return rotary.hybrid_axes(self.sections[1] + self.sections[2], self.sections[0],
                                  temporal_axis=-1 if self.temporal == "zero" else 0)


def rotary_cos_sin(positions: torch.Tensor, allocation: FreqAllocation, head_dim: int, theta: float, *,
                   angle_dtype: torch.dtype | None = None, out_dtype: torch.dtype = torch.float32):
    """Per-frequency rotary tables for multimodal positions.

    Args:
        positions: ``(A, B, L)`` (or ``(A, L)``) positions, ``A = allocation.num_axes``.
        allocation: which axis each frequency reads.
        head_dim: channels per head; must be even and fit the allocation (sections must sum to
            ``head_dim / 2``), else ``ValueError``.
        theta: RoPE base.
        angle_dtype: ``None`` = float32 when every position is exact in float32 (bit-identical to the
            reference ``position.float() * inv_freq``), float64 otherwise (positions beyond 2**24, V2PE
            fractions at large offsets).
    Returns:
        ``(cos, sin)``, each ``(B, L, F)`` (or ``(L, F)``) in ``out_dtype``.
    """
    rotary.check_rotary_dim(head_dim, 2, "multimodal RoPE")
    if positions.shape[0] != allocation.num_axes:
        raise ValueError(f"positions have {positions.shape[0]} axes (shape {tuple(positions.shape)}) but the "
                         f"allocation {allocation} expects {allocation.num_axes}")
    num_freqs = head_dim // 2
    axes = allocation.axis_of_freq(num_freqs)
    freqs = rotary.inv_freq(num_freqs, theta, device=positions.device)
    ang = rotary.angles_from_axes(positions, freqs, axes, dtype=angle_dtype)
    return ang.cos().to(out_dtype), ang.sin().to(out_dtype)


def per_channel(table: torch.Tensor) -> torch.Tensor:
    """Per-frequency ``(..., F)`` -> the HF per-channel layout ``(..., 2F)`` = ``cat(t, t)``."""
    return rotary.expand_layout(table, interleaved=False)


def apply_multimodal_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q and k (``(B, H, L, D)``; or ``(L, D)`` with ``(L, D/2)`` tables) in the rotate_half pairing.

    ``cos``/``sin`` are ``(B, L, D/2)`` from :func:`rotary_cos_sin`; they broadcast over heads.
    Returns ``(q_rot, k_rot)`` in the inputs' dtypes.
    """
    if q.ndim == 4:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (rotary.apply_rotary(q, cos, sin, interleaved=False),
            rotary.apply_rotary(k, cos, sin, interleaved=False))
