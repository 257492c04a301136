"""Vectorised expansion of piecewise-linear position runs ("units") to per-token positions.

Every scheme here describes its positions as a list of *units* in token order: a unit of ``len`` tokens
has, on every axis ``a``, the positions ``value[a] + slope[a] * j`` for ``j = 0..len-1``. A text segment is
one unit (slope 1 on every axis), a vision block is one unit per row (slope 0 on the row/frame axes, 1 or
-1 on column axes), V2PE's visual run is one unit of slope ``delta``, a CCA row is three units (rising,
flat, falling ring index). Units are built with a handful of ops over segments/rows; the only work per
token is one ``repeat_interleave`` of the unit index and one gather + add per axis.
"""
from __future__ import annotations

import numpy as np
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


_ARANGE: dict = {}


def _arange(n: int, dtype) -> np.ndarray:
    """``arange(n)`` as a read-only view of a cached, growing buffer (one per dtype)."""
    buf = _ARANGE.get(dtype)
    if buf is None or buf.size < n:
        buf = np.arange(max(n, 1 << 16), dtype=dtype)
        buf.flags.writeable = False
        _ARANGE[dtype] = buf
    return buf[:n]


def expand_units(unit_len: torch.Tensor, value: torch.Tensor, slope, num_tokens: int, *,
                 integer: bool, dtype: torch.dtype | None = None, fill_units: torch.Tensor | None = None,
                 fill_value: float = 1.0):
    """Per-token positions ``(A, N)`` from units.

    Args:
        unit_len: ``(U,)`` int64 token count per unit (0 allowed); sums to ``num_tokens``.
        value: ``(A, U)`` float64 position of each unit's first token.
        slope: per axis, the increment per token: a python float (every unit) or a ``(U,)`` float64 tensor;
            axes given the same tensor object share the ``slope * index`` product.
        integer: the values and slopes are integers, so float32 is exact below 2**24.
        dtype: output dtype; ``None`` = float32 when provably exact (integer positions and offsets below
            2**24), else float64.
        fill_units: optional ``(U,)`` bool: units (padding) whose tokens all get ``fill_value`` on every axis,
            whatever ``value``/``slope`` say.

    Returns:
        ``(A, N)`` positions, and the ``(N,)`` bool token mask of ``fill_units`` (None without them).

    The per-token work is ``numpy.repeat`` (which writes the repeated values directly, without the per-token
    index ``torch.repeat_interleave`` builds) plus one add per axis; axes that share a slope pattern share
    the ``slope * index`` product.
    """
    A, U = value.shape
    if len(slope) != A:
        raise ValueError(f"slope needs one entry per axis ({A}); got {len(slope)}")
    start = (torch.cumsum(unit_len, 0) - unit_len).to(torch.float64)
    off = torch.stack([value[a] - slope[a] * start for a in range(A)]) if U else value
    if dtype is None:
        bound = float(off.abs().max()) if U else 0.0
        dtype = torch.float32 if integer and bound + 2 * num_tokens < _EXACT_F32 else torch.float64
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64; got {dtype}")
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    reps = unit_len.numpy()
    off_np = off.numpy().astype(np_dtype)
    idx = _arange(num_tokens, np_dtype)
    out = np.empty((A, num_tokens), dtype=np_dtype)
    ramps: dict = {}
    for a in range(A):  # loop over axes (<= 4)
        sa = slope[a]
        key = id(sa) if isinstance(sa, torch.Tensor) else float(sa)
        if key not in ramps:  # axes given the same slope object share the product
            if isinstance(sa, torch.Tensor):
                ramps[key] = np.repeat(sa.numpy().astype(np_dtype), reps) * idx
            else:
                ramps[key] = None if sa == 0 else (idx if sa == 1 else idx * np_dtype(sa))
        ramp = ramps[key]
        if ramp is None:
            out[a] = np.repeat(off_np[a], reps)
        else:
            np.add(np.repeat(off_np[a], reps), ramp, out=out[a])
    fill_mask = None
    if fill_units is not None:
        fill_mask = np.repeat(fill_units.numpy(), reps)
        if fill_units.any():
            out[:, fill_mask] = fill_value
        fill_mask = torch.from_numpy(fill_mask)
    return torch.from_numpy(out), fill_mask
