"""Resampling of tabulated position parameters to a new grid (pure torch; timm-compatible numerics)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import as_grid

__all__ = ["resample_grid_table"]


def resample_grid_table(table: torch.Tensor, new_grid, old_grid, num_prefix_tokens: int = 0,
                        mode: str = "bicubic", antialias: bool = True,
                        align_corners: bool | None = None) -> torch.Tensor:
    """Resample a ``(B, P + h*w, C)`` table laid out on grid ``old_grid`` to ``new_grid``.

    The first ``num_prefix_tokens`` rows (class/register tokens) are kept as they are. Interpolation runs
    in float32 and the result is cast back, matching timm's ``resample_abs_pos_embed``. Returns ``table``
    itself when the grid is unchanged.
    """
    new_grid = as_grid(new_grid, "new_grid", ndim=(2,))
    old_grid = as_grid(old_grid, "old_grid", ndim=(2,))
    if table.ndim != 3:
        raise ValueError(f"table must be (B, prefix + h*w, C); got shape {tuple(table.shape)}")
    expected = num_prefix_tokens + old_grid[0] * old_grid[1]
    if table.shape[1] != expected:
        raise ValueError(f"table has {table.shape[1]} rows but old_grid {old_grid} with {num_prefix_tokens} "
                         f"prefix rows needs {expected}")
    if new_grid == old_grid:
        return table
    prefix, grid_rows = table[:, :num_prefix_tokens], table[:, num_prefix_tokens:]
    b, _, c = grid_rows.shape
    x = grid_rows.float().reshape(b, old_grid[0], old_grid[1], c).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=new_grid, mode=mode, align_corners=align_corners, antialias=antialias)
    x = x.permute(0, 2, 3, 1).reshape(b, -1, c).to(table.dtype)
    return torch.cat([prefix, x], dim=1) if num_prefix_tokens else x
