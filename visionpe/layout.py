"""Token geometry that travels with the tokens.

A :class:`Layout` says how a token sequence of length ``N`` is built: ``num_prefix_tokens`` tokens that
have no grid position (class, distillation, register tokens) followed by the patch tokens of a grid
``(h, w)`` or ``(t, h, w)`` in row-major order. Encoders read the grid from here; nobody re-derives it
from ``sqrt(N)``.

The object is frozen and hashable; encoders key their derived tables on it (:mod:`visionpe.cache`).

Grid indexing lives here too, in one place: :func:`grid_positions` (the integer coordinates of every
patch) and :func:`relative_offsets` (query-minus-key coordinate offsets of every patch pair), which the
rotary, sin-cos, Fourier, relative-bias and iRPE encoders all build on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["Layout", "as_grid", "grid_positions", "relative_offsets"]


def as_grid(grid: Sequence[int] | int, name: str = "grid", ndim: Sequence[int] = (2, 3)) -> tuple[int, ...]:
    """Validate a grid shape and return it as a tuple of positive ints.

    Args:
        grid: ``(h, w)`` or ``(t, h, w)``. A bare int is rejected: square grids are never assumed.
        name: argument name used in error messages.
        ndim: accepted numbers of axes.
    """
    if isinstance(grid, bool) or isinstance(grid, int):
        raise TypeError(f"{name} must be a tuple of {' or '.join(map(str, ndim))} ints such as (h, w); "
                        f"got the int {grid!r} (square grids are never assumed)")
    try:
        grid = tuple(grid)
    except TypeError:
        raise TypeError(f"{name} must be a tuple of ints such as (h, w); got {type(grid).__name__}") from None
    if len(grid) not in ndim:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} axes; got {len(grid)}: {grid}")
    out = []
    for g in grid:
        if isinstance(g, torch.Tensor) and g.numel() == 1 and not g.is_floating_point():
            g = int(g)
        if isinstance(g, bool) or not isinstance(g, int):
            raise TypeError(f"{name} must contain ints; got {grid}")
        if g <= 0:
            raise ValueError(f"{name} must be non-empty, every axis >= 1; got {grid}")
        out.append(g)
    return tuple(out)


@dataclass(frozen=True)
class Layout:
    """Geometry of one token sequence: ``num_prefix_tokens`` prefix tokens, then a grid of patches.

    Attributes:
        grid: ``(h, w)`` or ``(t, h, w)``; patches are stored row-major (last axis fastest).
        num_prefix_tokens: tokens before the patches that have no grid position.
    """

    grid: tuple[int, ...]
    num_prefix_tokens: int = 0

    def __post_init__(self):
        object.__setattr__(self, "grid", as_grid(self.grid, "grid"))
        n = self.num_prefix_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"num_prefix_tokens must be an int >= 0; got {n!r}")

    @property
    def ndim(self) -> int:
        """Number of grid axes (2 for images, 3 for videos)."""
        return len(self.grid)

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid)

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    def check(self, num_tokens: int, name: str = "x") -> None:
        """Raise ``ValueError`` (with both numbers) if ``num_tokens`` does not match this layout."""
        if num_tokens != self.num_tokens:
            raise ValueError(
                f"{name} has {num_tokens} tokens but the layout expects {self.num_tokens} "
                f"= {self.num_prefix_tokens} prefix + {'x'.join(map(str, self.grid))} grid "
                f"({self.num_patches} patches)")

    def __repr__(self) -> str:
        return f"Layout(grid={self.grid}, num_prefix_tokens={self.num_prefix_tokens})"


def grid_positions(grid: Sequence[int], *, device=None, dtype: torch.dtype = torch.float32, offset: float = 0.0,
                   xy: bool = False) -> torch.Tensor:
    """Integer coordinates of a row-major grid as ``(N, A)``, ``N = prod(grid)``, ``A = len(grid)``.

    Column ``a`` is the index along grid axis ``a`` (row before column; last axis fastest), plus ``offset``.
    ``xy=True`` swaps the first two columns: timm's ``grid_indexing='xy'`` coordinate order (x first) for
    RoPE-ViT. Integer ``dtype`` (with ``offset=0``) gives exact index arithmetic.
    """
    axes = [torch.arange(s, device=device, dtype=torch.int64).to(dtype) for s in grid]
    if offset:
        axes = [a + offset for a in axes]
    pos = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))
    if xy and len(grid) >= 2:
        pos = pos[:, [1, 0] + list(range(2, len(grid)))]
    return pos


def relative_offsets(grid: Sequence[int], *, device=None) -> torch.Tensor:
    """Coordinate offsets of every patch pair, query minus key: ``(A, N, N)`` int64.

    ``out[a, i, j] = pos[i, a] - pos[j, a]`` with :func:`grid_positions`; add ``grid[a] - 1`` to index a
    table of ``2 * grid[a] - 1`` offsets along axis ``a``.
    """
    pos = grid_positions(grid, device=device, dtype=torch.int64)        # (N, A)
    return (pos[:, None, :] - pos[None, :, :]).permute(2, 0, 1)
