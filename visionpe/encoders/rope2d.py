"""2D (and 3D) RoPE for ViTs: ``rope_axial`` (fixed axial frequencies) and ``rope_mixed`` (learnable
per-block, per-head frequencies mixing both axes, RoPE-ViT, Heo et al. 2024).

Both go through the shared rotary core (``visionpe.rotary``); they only differ in the frequency matrix.
Conventions match timm's ``RotaryEmbeddingCat``/``RotaryEmbeddingMixed`` as used by the RoPE-ViT models:
interleaved channel pairs, integer patch coordinates, ``xy`` coordinate order (x drives the first half of
the frequencies), prefix tokens not rotated.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..base import PositionEncoder, register_encoder
from ..layout import Layout, grid_positions
from ..rotary import axial_freq_matrix, check_rotary_dim, inv_freq, rotary_angles, rotate_interleaved, rotation_table

__all__ = ["RopeAxial", "RopeMixed", "init_mixed_freqs"]


class _GridRope(PositionEncoder):
    """Shared plumbing: coordinates per layout, identity rows for prefix tokens, q/k rotation."""

    hooks = frozenset({"rotate"})

    def __init__(self, dim: int, num_heads: int, depth: int, grid_size: Sequence[int], num_prefix_tokens: int,
                 xy: bool):
        super().__init__(dim, num_heads, depth, grid_size, num_prefix_tokens)
        self.xy = xy

    def positions(self, layout: Layout, device) -> torch.Tensor:
        """``(h*w, A)`` float32 patch coordinates of ``layout`` (cached)."""
        return self.table_cache.get("positions", layout.grid, device, torch.float32,
                                    lambda: grid_positions(layout.grid, device=device, xy=self.xy))

    def _rotate_with(self, q: torch.Tensor, k: torch.Tensor, table) -> tuple[torch.Tensor, torch.Tensor]:
        return rotate_interleaved(q, table), rotate_interleaved(k, table)


@register_encoder("rope_axial", "2D RoPE, axial frequencies (RoPE-ViT Axial, theta 100); any grid, 2D or 3D")
class RopeAxial(_GridRope):
    """Axial RoPE: each grid axis drives ``head_dim / (2A)`` channel pairs with bands
    ``theta ** (-i / nb)``.

    Args:
        theta: base (RoPE-ViT uses 100 for ViTs; LLM-style 10000 also works).
        xy: x (width) coordinate drives the first bands, as timm ``grid_indexing='xy'`` (RoPE-ViT).
    """

    def __init__(self, dim: int, num_heads: int = 1, depth: int = 1, grid_size: Sequence[int] = (14, 14),
                 num_prefix_tokens: int = 1, theta: float = 100.0, xy: bool = True):
        super().__init__(dim, num_heads, depth, grid_size, num_prefix_tokens, xy)
        axes = len(self.grid_size)
        check_rotary_dim(self.head_dim, 2 * axes, f"rope_axial on a {axes}D grid")
        self.theta = theta
        bands = inv_freq(self.head_dim // (2 * axes), theta)
        #: ``(A, head_dim/2)`` fixed frequencies: derived from ``theta``, not state (no buffer), so it stays a
        #: float32 CPU tensor whatever ``.to()`` does; tables copy it to their device
        self.freq_matrix = axial_freq_matrix(bands, axes)

    def table(self, layout: Layout, device):
        """Rotation table ``(P + N, head_dim/2)`` (complex, or cos/sin under compile); prefix rows identity."""
        if layout.ndim != self.freq_matrix.shape[0]:
            raise ValueError(f"rope_axial was built for {self.freq_matrix.shape[0]}D grids; "
                             f"layout grid is {layout.grid}")
        return self.table_cache.get("rotation", layout, device, torch.float32, lambda: rotation_table(
            rotary_angles(self.positions(layout, device), self.freq_matrix), layout.num_prefix_tokens))

    def rotate(self, q: torch.Tensor, k: torch.Tensor, layout: Layout,
               block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        layout.check(q.shape[-2], "q")
        return self._rotate_with(q, k, self.table(layout, q.device))


def init_mixed_freqs(head_dim: int, depth: int, num_heads: int, theta: float = 10.0,
                     random_rotation: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """RoPE-Mixed init ``(2, depth, num_heads, head_dim/2)``: magnitudes ``theta ** (-4i / head_dim)``,
    rotated by a random angle per block and head (x and y components), as in RoPE-ViT."""
    mag = 1.0 / (theta ** (torch.arange(0, head_dim, 4, dtype=torch.float32) / head_dim))
    if random_rotation:
        ang = torch.rand(depth, num_heads, 1, generator=generator) * 2 * math.pi
    else:
        ang = torch.zeros(depth, num_heads, 1)
    fx = torch.cat([mag * torch.cos(ang), mag * torch.cos(ang + math.pi / 2)], dim=-1)
    fy = torch.cat([mag * torch.sin(ang), mag * torch.sin(ang + math.pi / 2)], dim=-1)
    return torch.stack([fx, fy], dim=0)


@register_encoder("rope_mixed", "2D RoPE with learnable per-block, per-head mixed frequencies (RoPE-ViT Mixed)")
class RopeMixed(_GridRope):
    """RoPE-Mixed: angle of pair ``f`` in head ``h`` of block ``b`` is ``x * Fx[b,h,f] + y * Fy[b,h,f]``.

    The parameter ``freqs`` has timm's layout ``(2, depth, num_heads, head_dim/2)`` so RoPE-ViT/timm
    checkpoints load unchanged (``rope.freqs`` -> ``pe.freqs``).
    """

    def __init__(self, dim: int, num_heads: int = 1, depth: int = 1, grid_size: Sequence[int] = (14, 14),
                 num_prefix_tokens: int = 1, theta: float = 10.0, xy: bool = True):
        super().__init__(dim, num_heads, depth, grid_size, num_prefix_tokens, xy)
        if len(self.grid_size) != 2:
            raise ValueError(f"rope_mixed is defined for 2D grids (h, w); got grid_size={self.grid_size}")
        check_rotary_dim(self.head_dim, 4, "rope_mixed")
        self.theta = theta
        self.freqs = nn.Parameter(init_mixed_freqs(self.head_dim, depth, num_heads, theta))

    def table(self, layout: Layout, block: int, device):
        """``(heads, P + N, head_dim/2)`` rotation table of block ``block`` (recomputed: freqs learn)."""
        if layout.ndim != 2:
            raise ValueError(f"rope_mixed needs a 2D layout grid; got {layout.grid}")
        w = self.freqs[:, block].transpose(0, 1)  # (heads, 2, F)
        ang = rotary_angles(self.positions(layout, device), w)  # (heads, N, F)
        return rotation_table(ang, layout.num_prefix_tokens)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, layout: Layout,
               block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        layout.check(q.shape[-2], "q")
        return self._rotate_with(q, k, self.table(layout, block, q.device))

    def _prune_own_blocks(self, depth: int) -> None:
        if depth < self.freqs.shape[1]:
            with torch.no_grad():
                kept = self.freqs[:, :depth].clone()
            self.freqs = nn.Parameter(kept, requires_grad=self.freqs.requires_grad)

    def no_weight_decay(self) -> set:
        return {"freqs"}

    def block_param_index(self, name: str) -> int | str | None:
        # one tensor spans every block: it cannot be split across layer-decay groups, so it joins the
        # last group (full learning rate), as timm does for RoPE-ViT's rope.freqs
        return "last" if name == "freqs" else None
