"""Token geometry that travels with the tokens.

A :class:`Layout` says how a token sequence of length ``N`` is built: ``num_prefix_tokens`` tokens that
have no grid position (class, distillation, register tokens) followed by the patch tokens of a grid
``(h, w)`` or ``(t, h, w)`` in row-major order. Encoders read the grid from here; nobody re-derives it
from ``sqrt(N)``.

The object is frozen and hashable, so encoders use it (plus device) as the key of their index caches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Layout", "as_grid"]


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
        if isinstance(g, bool) or not isinstance(g, int):
            try:
                import torch
                if isinstance(g, torch.Tensor) and g.numel() == 1 and not g.is_floating_point():
                    g = int(g)
            except ImportError:  # pragma: no cover
                pass
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

    def with_grid(self, grid: Sequence[int]) -> "Layout":
        return Layout(tuple(grid), self.num_prefix_tokens)

    def __repr__(self) -> str:
        return f"Layout(grid={self.grid}, num_prefix_tokens={self.num_prefix_tokens})"
