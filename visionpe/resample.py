"""Resampling of tabulated position parameters to a new grid (pure torch; timm-compatible numerics)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import as_grid

__all__ = ["resample_grid_table", "resample_offset_table", "offset_grid"]


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


def offset_grid(grid) -> tuple[int, int]:
    """The ``(2h-1, 2w-1)`` grid of relative offsets (query minus key) between the cells of an ``(h, w)`` grid."""
    h, w = as_grid(grid, "grid", ndim=(2,))
    return 2 * h - 1, 2 * w - 1


def resample_offset_table(table: torch.Tensor, new_grid, old_grid, num_extra_rows: int = 0,
                          mode: str = "bicubic", antialias: bool = False) -> torch.Tensor:
    """Resample a relative-offset table of an ``old_grid`` ``(h, w)`` to ``new_grid`` ``(h', w')``.

    ``table`` is ``((2h-1)(2w-1) + E, C)``: one row per offset, row-major on :func:`offset_grid`, followed by
    ``E = num_extra_rows`` rows that are not offsets (e.g. the prefix-token rows of a BEiT-style table), kept as
    they are. The offset rows are interpolated as a ``(2h-1, 2w-1)`` image with ``C`` channels to
    ``(2h'-1, 2w'-1)``, so offsets are stretched, not extended: Swin/BEiT practice, the interpolation of timm's
    ``resize_rel_pos_bias_table`` (bicubic, ``align_corners=False``, no antialiasing). Runs in float32 through
    :func:`resample_grid_table` and is cast back. Returns ``((2h'-1)(2w'-1) + E, C)``; ``table`` itself when
    the grid is unchanged.
    """
    if not isinstance(table, torch.Tensor) or table.ndim != 2:
        raise ValueError(f"table must be ((2h-1)(2w-1) + extra rows, C); got "
                         f"{tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__}")
    if isinstance(num_extra_rows, bool) or not isinstance(num_extra_rows, int) or num_extra_rows < 0:
        raise ValueError(f"num_extra_rows must be an int >= 0; got {num_extra_rows!r}")
    new_off, old_off = offset_grid(new_grid), offset_grid(old_grid)
    n_off = old_off[0] * old_off[1]
    if table.shape[0] != n_off + num_extra_rows:
        raise ValueError(f"table has {table.shape[0]} rows but old_grid {tuple(old_grid)} has {n_off} offsets, plus "
                         f"{num_extra_rows} extra rows: {n_off + num_extra_rows}")
    if new_off == old_off:
        return table
    rel = resample_grid_table(table[:n_off].unsqueeze(0), new_off, old_off, 0, mode=mode, antialias=antialias)[0]
    return torch.cat([rel, table[n_off:]], dim=0) if num_extra_rows else rel
