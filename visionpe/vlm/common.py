"""Helpers shared by the position schemes: row units, per-vision-block parameters, result assembly."""
from __future__ import annotations

from typing import Sequence

import torch

from ._checks import short_repr
from ._units import split_rows
from .layout import IMAGE, PAD, TEXT, VIDEO, SegmentTable

__all__ = ["RowUnits", "row_units", "per_vision_block", "reject_tiles", "TEXT", "IMAGE", "VIDEO", "PAD"]


class RowUnits:
    """Vision blocks split into rows (``W`` tokens each, frame ``f``, row ``r``), text/padding one unit each.

    Attributes (``U`` units): ``seg`` segment of each unit, ``f``, ``r``, ``length`` tokens, ``vis`` / ``text``
    / ``pad`` bool kind masks, plus per-unit copies ``H``, ``W``, ``T`` of the segment grid.
    """

    def __init__(self, tb: SegmentTable, frames_per_segment: torch.Tensor | None = None):
        vis = tb.is_vision
        frames = tb.t * tb.tiles if frames_per_segment is None else frames_per_segment
        one = torch.ones_like(tb.n)
        per_seg = torch.where(vis, frames * tb.h, one)
        u = split_rows(per_seg, {"rows_h": torch.where(vis, tb.h, one), "vis": vis, "text": tb.kind == TEXT,
                                 "pad": tb.kind == PAD, "H": tb.h, "W": tb.w, "T": tb.t, "n": tb.n})
        self.seg, self.q, self.f, self.r = u["seg"], u["q"], u["f"], u["r"]
        self.vis, self.text, self.pad = u["vis"], u["text"], u["pad"]
        self.H, self.W, self.T = u["H"], u["W"], u["T"]
        self.length = torch.where(self.vis, self.W, u["n"])


def reject_tiles(tb: SegmentTable, scheme: str) -> None:
    """Tiles (InternVL) have no 3-D geometry for spatial schemes: refuse rather than guess."""
    bad = (tb.kind == IMAGE) & (tb.tiles > 1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{scheme} needs images as one h x w grid; segment {i} is an image of "
                         f"{int(tb.tiles[i])} tiles (tiles are an InternVL/V2PE notion: use v2pe or rope1d)")


def per_vision_block(tb: SegmentTable, value, name: str, *, low: float, low_open: bool, high: float | None = None,
                     choices: Sequence[float] | None = None, generator: torch.Generator | None = None,
                     ) -> torch.Tensor:
    """``(S,)`` float64 parameter per segment from a scalar, one value per vision block, or ``"random"``.

    ``"random"`` draws each vision block's value uniformly from ``choices`` with ``generator``. Values are
    validated against ``(low, high]`` (``low_open``) and raise ``ValueError`` naming ``name`` otherwise.
    """
    vis = tb.is_vision
    nv = int(vis.sum())
    if isinstance(value, str):
        if value != "random":
            raise ValueError(f"{name} must be a number, a sequence with one value per vision block, or 'random'; "
                             f"got {short_repr(value)}")
        pool = torch.tensor([float(c) for c in choices], dtype=torch.float64)
        vals = pool[torch.randint(len(pool), (nv,), generator=generator)]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        vals = torch.full((nv,), float(value), dtype=torch.float64)
    else:
        vals = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
        if vals.numel() != nv:
            raise ValueError(f"{name} has {vals.numel()} values but the layout has {nv} vision blocks "
                             f"(pass one value per image/video, or a single number)")
    bad_low = (vals <= low) if low_open else (vals < low)
    bad = bad_low | ~torch.isfinite(vals)
    if high is not None:
        bad |= vals > high
    if bool(bad.any()):
        v = vals[bad][0].item()
        rng = f"({low}, {high}]" if high is not None else (f"> {low}" if low_open else f">= {low}")
        raise ValueError(f"{name} must be {rng}; got {v}")
    out = torch.ones(tb.num_segments, dtype=torch.float64)
    out[vis] = vals
    return out

