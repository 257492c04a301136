"""Vectorised expansion of piecewise-linear position runs ("units") to per-token positions.

Every scheme here describes its positions as a list of *units* in token order: a unit of ``len`` tokens
has, on every axis ``a``, the positions ``value[a] + slope[a] * j`` for ``j = 0..len-1``. A text segment is
one unit (slope 1 on every axis), a vision block is one unit per row (slope 0 on the row/frame axes, 1 or
-1 on column axes), V2PE's visual run is one unit of slope ``delta``, a CCA row is three units (rising,
flat, falling ring index). Units are built with a handful of ops over segments/rows; the only work per
token is one ``repeat_interleave`` of the unit index and one gather + add per axis.
"""
from __future__ import annotations

import torch

from .layout import SegmentTable

_EXACT_F32 = 2 ** 24


def split_rows(tb: SegmentTable, units_per_seg: torch.Tensor, rows_h: torch.Tensor):
    """Unit bookkeeping: each segment ``s`` gets ``units_per_seg[s]`` units.

    Returns ``(unit_seg, q, f, r)``: the segment of each unit, its index inside the segment and, for
    vision rows, the frame ``f = q // H`` and row ``r = q % H`` (``rows_h[s] = H``; 1 for text units).
    """
    S = tb.num_segments
    U = int(units_per_seg.sum())
    unit_seg = torch.repeat_interleave(torch.arange(S), units_per_seg, output_size=U)
    first = torch.cumsum(units_per_seg, 0) - units_per_seg
    q = torch.arange(U) - first[unit_seg]
    hh = rows_h[unit_seg]
    f = torch.div(q, hh, rounding_mode="floor")
    return unit_seg, q, f, q - f * hh


def expand_units(unit_len: torch.Tensor, value: torch.Tensor, slope, num_tokens: int, *,
                 integer: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-token positions ``(A, N)`` from units.

    Args:
        unit_len: ``(U,)`` int64 token count per unit (0 allowed); sums to ``num_tokens``.
        value: ``(A, U)`` float64 position of each unit's first token.
        slope: ``(A, U)`` float64 increment per token, or a list of ``A`` python floats (one per axis).
        integer: the values and slopes are integers, so float32 is exact below 2**24.
        dtype: output dtype; ``None`` = float32 when provably exact (integer positions and offsets below
            2**24), else float64.
    """
    A, U = value.shape
    start = (torch.cumsum(unit_len, 0) - unit_len).to(torch.float64)
    const = not isinstance(slope, torch.Tensor)
    slope_t = torch.tensor(slope, dtype=torch.float64)[:, None].expand(A, U) if const else slope
    off = value - slope_t * start
    if dtype is None:
        bound = max(float(off.abs().max()) if U else 0.0, float(num_tokens))
        dtype = torch.float32 if integer and bound + num_tokens < _EXACT_F32 else torch.float64
    off = off.to(dtype)
    uot = torch.repeat_interleave(torch.arange(U), unit_len, output_size=num_tokens)
    idx = torch.arange(num_tokens, dtype=dtype)
    out = torch.empty(A, num_tokens, dtype=dtype)
    for a in range(A):  # loop over axes (<= 4)
        base = off[a].index_select(0, uot)
        if const:
            s = float(slope[a])
            if s == 0.0:
                out[a] = base
            elif s == 1.0:
                torch.add(base, idx, out=out[a])
            else:
                torch.add(base, idx, alpha=s, out=out[a])
        else:
            torch.addcmul(base, slope[a].to(dtype).index_select(0, uot), idx, out=out[a])
    return out
