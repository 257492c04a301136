"""VRoPE positions (Liu et al., arXiv 2502.11664; official ``johncaged/VRoPE`` index generator).

Four mirrored diagonal arrangements per vision frame, in the official **code order**
``c0 = r + c``, ``c1 = r + (W-1-c)``, ``c2 = (H-1-r) + c``, ``c3 = (H-1-r) + (W-1-c)``, each offset by
``base + f * (H + W - 1)``; text keeps one index on all four; a block advances the running index by
``T * (H + W - 1)`` (Temporal Centered Arrangement: every frame's centre lies on the text axis and frames
advance by a constant stride). Frequency ``j`` reads arrangement ``j % 4``.

``channel_order="paper"`` uses the paper's Eq. 9 order ``[v1, v2, v3, v4]`` = code ``[c0, c2, c3, c1]``
instead (the same four arrangements, channels 1-3 permuted); the default ``"code"`` is what the released
index generator produces.
"""
from __future__ import annotations

import torch

from ._checks import short_repr
from ._units import expand_units
from .common import RowUnits, reject_tiles
from .layout import TEXT, VLMLayout
from .positions import VLMPositions
from .tables import Cyclic

__all__ = ["vrope_positions", "VROPE_ORDERS"]

VROPE_ORDERS = {"code": (0, 1, 2, 3), "paper": (0, 2, 3, 1)}


def vrope_positions(layout: VLMLayout, *, channel_order: str = "code", theta: float = 1_000_000.0,
                    dtype: torch.dtype | None = None) -> VLMPositions:
    """VRoPE positions ``(4, B, L)`` (arrangements c0..c3 in code order); padded slots hold 1.

    ``theta`` is the backbone's (the paper's Qwen2 backbones: 1e6; Vicuna: 1e4).
    """
    if channel_order not in VROPE_ORDERS:
        raise ValueError(f"channel_order must be one of {sorted(VROPE_ORDERS)}; got {short_repr(channel_order)}")
    tb = layout.table
    reject_tiles(tb, "vrope")
    f64 = torch.float64
    stride = (tb.h + tb.w - 1).to(f64)
    n = tb.n.to(f64)
    adv = torch.where(tb.is_vision, tb.t.to(f64) * stride,
                      torch.where(tb.kind == TEXT, n, torch.zeros_like(n)))
    base = tb.segmented_exclusive_cumsum(adv)
    u = RowUnits(tb)
    fb = base[u.seg] + torch.where(u.vis, u.f.to(f64) * stride[u.seg], torch.zeros_like(base[u.seg]))
    r = u.r.to(f64)
    rr = (u.H - 1).to(f64) - r
    wl = (u.W - 1).to(f64)
    zero = torch.zeros_like(fb)
    value = torch.stack([fb + torch.where(u.vis, r, zero), fb + torch.where(u.vis, r + wl, zero),
                         fb + torch.where(u.vis, rr, zero), fb + torch.where(u.vis, rr + wl, zero)])
    down = torch.where(u.vis, -torch.ones_like(fb), torch.ones_like(fb))  # c1, c3 run right-to-left
    pos, pad = expand_units(u.length, value, [1.0, down, 1.0, down], tb.batch_size * tb.length, integer=True,
                            dtype=dtype, fill_units=u.pad, fill_value=1.0)
    nxt = tb.per_sequence_sum(adv)
    return VLMPositions(scheme="vrope", positions=pos.view(4, tb.batch_size, tb.length),
                        axes=("c0", "c1", "c2", "c3"), rope_delta=nxt - tb.length, padding_mask=~pad.view(tb.batch_size, tb.length),
                        allocation=Cyclic(VROPE_ORDERS[channel_order]), theta=float(theta))
