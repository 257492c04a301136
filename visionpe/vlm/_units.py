"""Vectorised expansion of piecewise-linear position runs ("units") to per-token positions.

Every scheme here describes its positions as a list of *units* in token order: a unit of ``len`` tokens
has, on every axis ``a``, the positions ``value[a] + slope[a] * j`` for ``j = 0..len-1``. A text segment is
one unit (slope 1 on every axis), a vision block is one unit per row (slope 0 on the row/frame axes, 1 or
-1 on column axes), V2PE's visual run is one unit of slope ``delta``, a CCA row is three units (rising,
flat, falling ring index). Units are built with a handful of array ops over segments/rows (never a Python
loop over tokens or frames); the only work per token is one ``numpy.repeat`` of the unit offsets and one
add per axis.
"""
from __future__ import annotations

import numpy as np
import torch


from ..rotary import EXACT_F32 as _EXACT_F32


def split_rows(units_per_seg: torch.Tensor, columns: dict) -> dict:
    """Unit bookkeeping: segment ``s`` gets ``units_per_seg[s]`` units (one per vision row, one per text run).

    Args:
        units_per_seg: ``(S,)`` int64.
        columns: per-segment ``(S,)`` tensors to copy onto every unit of the segment; must contain ``"rows_h"``
            (rows per frame ``H``; 1 for text/padding).
    Returns:
        ``{"seg", "q", "f", "r"}`` plus every column, each ``(U,)``: the unit's segment, its index inside the
        segment, frame ``f = q // H`` and row ``r = q % H``. numpy ``repeat`` keeps this cheap for ~1e4 units.
    """
    ups = units_per_seg.numpy()
    U = int(ups.sum())
    out = {k: torch.from_numpy(np.repeat(v.numpy(), ups)) for k, v in columns.items()}
    out["seg"] = torch.from_numpy(np.repeat(np.arange(ups.size), ups))
    q = np.arange(U) - np.repeat(np.cumsum(ups) - ups, ups)
    hh = out["rows_h"].numpy()
    f = q // hh
    out["q"], out["f"], out["r"] = torch.from_numpy(q), torch.from_numpy(f), torch.from_numpy(q - f * hh)
    return out


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
    out = np.repeat(off.numpy().astype(np_dtype), reps, axis=1)  # (A, N): every axis in one call
    idx = _arange(num_tokens, np_dtype)
    ramps: dict = {}
    for a in range(A):  # loop over axes (<= 4)
        sa = slope[a]
        key = id(sa) if isinstance(sa, torch.Tensor) else float(sa)
        if key not in ramps:  # axes given the same slope object share the product
            if isinstance(sa, torch.Tensor):
                ramp = np.repeat(sa.numpy().astype(np_dtype), reps)
                ramps[key] = np.multiply(ramp, idx, out=ramp)
            else:
                ramps[key] = None if sa == 0 else (idx if sa == 1 else idx * np_dtype(sa))
        if ramps[key] is not None:
            out[a] += ramps[key]
    fill_mask = None
    if fill_units is not None:
        fill_mask = np.repeat(fill_units.numpy(), reps)
        if fill_units.any():
            np.copyto(out, np_dtype(fill_value), where=fill_mask[None])
        fill_mask = torch.from_numpy(fill_mask)
    return torch.from_numpy(out), fill_mask
