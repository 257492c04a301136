"""Plain 1-D RoPE positions for a multimodal sequence: the LLM baseline (every token +1, vision included)."""
from __future__ import annotations

import torch

from ._units import expand_units
from .layout import PAD, VLMLayout
from .positions import VLMPositions
from .tables import SingleAxis

__all__ = ["rope1d_positions"]


def rope1d_positions(layout: VLMLayout, *, theta: float = 10000.0, dtype: torch.dtype | None = None) -> VLMPositions:
    """Positions ``(1, B, L)``: real tokens numbered ``0, 1, ...`` (HF's ``cumsum(attention_mask) - 1``),
    padded slots 1 (HF's fill), ``rope_delta = count - L`` so decoding continues at the token count."""
    tb = layout.table
    real = tb.kind != PAD
    n = tb.n.to(torch.float64)
    adv = torch.where(real, n, torch.zeros_like(n))
    base = tb.segmented_exclusive_cumsum(adv)
    pos, pad = expand_units(tb.n, base[None], [1.0], tb.batch_size * tb.length, integer=True, dtype=dtype,
                            fill_units=~real, fill_value=1.0)
    count = tb.per_sequence_sum(adv)
    return VLMPositions(scheme="rope1d", positions=pos.view(1, tb.batch_size, tb.length), axes=("p",),
                        rope_delta=count - tb.length, padding_mask=~pad.view(tb.batch_size, tb.length), allocation=SingleAxis(),
                        theta=float(theta))
