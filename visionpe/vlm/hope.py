"""HoPE positions (Li et al., arXiv 2505.20444; official ``hrlics/HoPE`` ``get_dynamic_rope_index``).

Diagonal layout with Dynamic Temporal Scaling, counter ``next`` (float):

* text: ``next + k`` on t, h, w; ``next += n``;
* vision block ``(T, H, W)`` at ``base``: ``t = base + gamma * f``, ``h = t + r - floor((H-1)/2)``,
  ``w = t + c - floor((W-1)/2)``; then ``next = base + gamma * (T-1) + 1`` (the temporal row's max + 1; the
  last frame's h/w values may exceed it and overlap the following text, as in the official code).

``gamma`` is drawn per vision block from ``{0.5, 0.75, 1, 1.25, 1.5}`` in training (``gamma="random"``)
and fixed at inference (paper: 1.5 for long-video understanding, 0.75 for V-NIAH retrieval).
Frequencies: Hybrid Frequency Allocation (:class:`~visionpe.vlm.tables.Hybrid`): the 48 highest alternate
h/w, the 16 lowest are zero frequencies (``temporal_frequencies="t"`` instead reads the t row: the HoPE
repo's VideoRoPE baseline, used there with ``gamma=2``).

Decoding: the released generate path never stores ``rope_deltas`` and puts every decoded token at 0; we
continue at ``next`` (``decode="continue"``, the spec's recommendation); ``decode="zeros"`` reproduces the
release for comparison only.
"""
from __future__ import annotations

import torch

from ._checks import short_repr
from ._units import expand_units
from .common import RowUnits, per_vision_block, reject_tiles
from .layout import TEXT, VLMLayout
from .positions import VLMPositions
from .tables import Hybrid

__all__ = ["hope_positions", "HOPE_TRAIN_GAMMAS"]

HOPE_TRAIN_GAMMAS = (0.5, 0.75, 1.0, 1.25, 1.5)


def hope_positions(layout: VLMLayout, gamma=1.0, *, gamma_choices=HOPE_TRAIN_GAMMAS,
                   generator: torch.Generator | None = None, temporal_frequencies: str = "zero",
                   sections=(16, 24, 24), decode: str = "continue", theta: float = 1_000_000.0,
                   dtype: torch.dtype = torch.float64) -> VLMPositions:
    """HoPE positions ``(3, B, L)`` (t, h, w), float64 by default (fractional for non-integer gamma).

    Args:
        gamma: temporal scale > 0: a number, one value per vision block (layout order), or ``"random"``
            (training: each block draws from ``gamma_choices`` with ``generator``).
        temporal_frequencies: ``"zero"`` (HoPE) or ``"t"`` (VideoRoPE baseline of the HoPE repo).
        decode: ``"continue"`` or ``"zeros"`` (module docstring).
    """
    if decode not in ("continue", "zeros"):
        raise ValueError(f"decode must be 'continue' or 'zeros'; got {short_repr(decode)}")
    allocation = Hybrid(tuple(sections), temporal_frequencies)
    tb = layout.table
    reject_tiles(tb, "hope")
    g = per_vision_block(tb, gamma, "gamma", low=0.0, low_open=True, choices=gamma_choices, generator=generator)
    f64 = torch.float64
    n = tb.n.to(f64)
    adv = torch.where(tb.is_vision, g * (tb.t - 1).to(f64) + 1, torch.where(tb.kind == TEXT, n, torch.zeros_like(n)))
    base = tb.segmented_exclusive_cumsum(adv)
    u = RowUnits(tb)
    zero = torch.zeros_like(base[u.seg])
    tt = base[u.seg] + torch.where(u.vis, g[u.seg] * u.f.to(f64), zero)
    ch = torch.div(u.H - 1, 2, rounding_mode="floor").to(f64)
    cw = torch.div(u.W - 1, 2, rounding_mode="floor").to(f64)
    value = torch.stack([tt, tt + torch.where(u.vis, u.r.to(f64) - ch, zero), tt - torch.where(u.vis, cw, zero)])
    ramp = (~u.vis).to(f64)  # text advances on t and h too; vision rows only along w
    pos, pad = expand_units(u.length, value, [ramp, ramp, 1.0], tb.batch_size * tb.length, integer=False,
                            dtype=dtype, fill_units=u.pad, fill_value=1.0)
    nxt = tb.per_sequence_sum(adv)
    return VLMPositions(scheme="hope", positions=pos.view(3, tb.batch_size, tb.length), axes=("t", "h", "w"),
                        rope_delta=nxt - tb.length, padding_mask=~pad.view(tb.batch_size, tb.length), allocation=allocation,
                        theta=float(theta), decode=decode)
