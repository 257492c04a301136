"""The result every position scheme returns (:class:`VLMPositions`, with the decode continuation) and the
mask helper of schemes whose attention is causal on positions (CCA). The scheme registry is
:mod:`visionpe.vlm.schemes`, which imports the scheme modules (they import this one, never the reverse)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .tables import FreqAllocation, rotary_cos_sin

__all__ = ["VLMPositions", "causal_mask_from_positions"]


@dataclass(frozen=True, eq=False)  # holds tensors: compare fields explicitly
class VLMPositions:
    """Positions of a batch of multimodal sequences under one scheme.

    Attributes:
        scheme: scheme name (``"mrope"``, ...).
        positions: ``(A, B, L)`` float positions (float32 when provably exact, else float64; padded slots
            hold the reference code's fill value and are masked anyway).
        axes: names of the ``A`` axes.
        rope_delta: ``(B,)`` float64, HF's ``rope_deltas``: decoding continues at
            ``next_position = L + rope_delta`` (the first generated token), one more per step.
        padding_mask: ``(B, L)`` bool, True for real tokens.
        allocation: which axis each rotary frequency reads (and which are zero frequencies).
        theta: the RoPE base of the models the scheme comes from (override freely).
        attention_mask: ``(B, L, L)`` bool (True = may attend; rows are queries) when the scheme has its own
            mask (CCA), else None (plain causal + padding).
        decode: ``"continue"`` (every axis at ``next_position + step``) or ``"zeros"`` (HoPE's released
            generate path: every decoded token at 0; kept only to reproduce that code).
        decode_start: optional ``(A, B)`` float64 position of the first generated token per axis, when it is
            not ``L + rope_delta`` on every axis (M-RoPE ``compat="transformers5"``: HF 5.x ``generate``
            continues from the last prompt token + 1 while its ``rope_deltas`` use the global maximum).
    """
    scheme: str
    positions: torch.Tensor
    axes: tuple
    rope_delta: torch.Tensor
    padding_mask: torch.Tensor
    allocation: FreqAllocation
    theta: float
    attention_mask: torch.Tensor | None = None
    decode: str = "continue"
    decode_start: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.positions.shape[1]

    @property
    def length(self) -> int:
        return self.positions.shape[2]

    @property
    def next_position(self) -> torch.Tensor:
        """``(B,)`` float64 position of the first generated token (axis 0)."""
        return self.rope_delta + self.length if self.decode_start is None else self.decode_start[0]

    def decode_positions(self, num_tokens: int, past_length: int | None = None) -> torch.Tensor:
        """Positions ``(A, B, num_tokens)`` (float64) of tokens appended after ``past_length`` cached tokens.

        ``past_length`` defaults to the prompt length ``L``; every axis gets
        ``past_length + j + rope_delta`` (HF's ``cache_position + rope_deltas``; per axis from
        ``decode_start`` when set), or 0 for ``decode="zeros"``.
        """
        past = self.length if past_length is None else int(past_length)
        if past < self.length:
            raise ValueError(f"past_length={past} is shorter than the prompt ({self.length} tokens)")
        A, B = self.positions.shape[:2]
        start = (self.rope_delta + self.length).expand(A, B) if self.decode_start is None else self.decode_start
        steps = torch.arange(past - self.length, past - self.length + num_tokens, dtype=torch.float64)
        pos = start[:, :, None] + steps
        return torch.zeros_like(pos) if self.decode == "zeros" else pos

    def cos_sin(self, head_dim: int, theta: float | None = None, **kwargs):
        """``(cos, sin)`` of shape ``(B, L, head_dim / 2)``; see :func:`~visionpe.vlm.tables.rotary_cos_sin`."""
        return rotary_cos_sin(self.positions, self.allocation, head_dim, self.theta if theta is None else theta,
                              **kwargs)


def causal_mask_from_positions(positions: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """``(B, L, L)`` bool mask ``allowed[b, q, k] = pos[b, k] <= pos[b, q]`` on real keys.

    With strictly increasing positions this is the ordinary causal mask; with CCA's tied ring positions it is
    exactly the concentric causal mask (spec: the whole CCA mask is "causal on position ids"). Padded query
    rows may attend to themselves only, so attention never sees an all-masked row.
    """
    p = positions
    allowed = (p[:, None, :] <= p[:, :, None]) & padding_mask[:, None, :]
    eye = torch.eye(p.shape[-1], dtype=torch.bool)
    return torch.where(padding_mask[:, :, None], allowed, eye)
