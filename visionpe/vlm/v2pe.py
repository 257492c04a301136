"""V2PE positions (Ge et al., arXiv 2412.09616; official ``OpenGVLab/V2PE`` ``get_rope_pos_id``).

1-D RoPE where visual tokens advance by ``delta <= 1``. With an integer counter ``c = -1``:

* text (markers ``<img>``/``</img>`` included): ``c += 1``, position ``c``;
* a visual run of ``N`` tokens (all tiles and the thumbnail of one image share one delta): token
  ``k = 1..N`` at ``c + k * delta``; then ``c = ceil(c + N * delta)``;
* padding: position 1, the counter does not move; decoding continues at ``c + 1, c + 2, ...``.

Positions are float64 (exact: ``c + k * delta`` is a dyadic rational for every official delta). The
official float32 arange holds multiples of 1/256 only below 2**16 (beyond that it drops or merges
positions); angles are computed in float32 when that is exact, else in float64
(:func:`~visionpe.vlm.tables.rotary_cos_sin`).

Choosing delta (``delta=``): a number in (0, 1]; one value per visual run; ``"random"`` (training: every
run draws uniformly from ``{1, 1/2, ..., 1/256}``); or ``"auto"`` (our inference rule, not in the official
code): per sequence, the largest delta of that set whose positions fit ``max_positions``
(``n_text + sum_j ceil(N_j * delta) <= max_positions``, the trained window, e.g. 32768 for V2PE-32K).
"""
from __future__ import annotations

import torch

from ._units import expand_units
from .common import per_vision_block
from .layout import PAD, TEXT, VLMLayout
from .positions import VLMPositions
from .tables import SingleAxis

__all__ = ["v2pe_positions", "V2PE_DELTAS", "delta_from_stride", "choose_delta"]

V2PE_DELTAS = tuple(1.0 / 2 ** i for i in range(9))  # strides {1..256} / 256 tokens per tile


def delta_from_stride(stride: int, tokens_per_tile: int = 256) -> float:
    """The official parameterisation: a tile may use ``stride`` positions, ``delta = stride / tokens_per_tile``."""
    if stride <= 0 or tokens_per_tile <= 0 or stride > tokens_per_tile:
        raise ValueError(f"need 0 < stride <= tokens_per_tile; got stride={stride}, tokens_per_tile={tokens_per_tile}")
    return stride / tokens_per_tile


def choose_delta(layout: VLMLayout, max_positions: int, candidates=V2PE_DELTAS) -> torch.Tensor:
    """``(B,)`` float64: per sequence the largest candidate delta whose positions fit ``max_positions``."""
    tb = layout.table
    cand = torch.tensor(sorted((float(c) for c in candidates), reverse=True), dtype=torch.float64)
    vis = tb.is_vision
    n = tb.n.to(torch.float64)
    text = tb.per_sequence_sum(torch.where(tb.kind == TEXT, n, torch.zeros_like(n)))
    need = torch.ceil(n[None, :] * cand[:, None]) * vis.to(torch.float64)  # (C, S)
    total = text[None, :] + torch.stack([tb.per_sequence_sum(row) for row in need])  # (C, B), C <= 9
    fits = total <= max_positions
    if not bool(fits.any(0).all()):
        b = int((~fits.any(0)).nonzero()[0, 0])
        raise ValueError(f"sequence {b} needs {int(total[-1, b])} positions even with delta={cand[-1].item()}, "
                         f"more than max_positions={max_positions}")
    first = fits.to(torch.int64).argmax(0)  # candidates are sorted descending
    return cand[first]


def v2pe_positions(layout: VLMLayout, delta=1.0, *, max_positions: int | None = None,
                   candidates=V2PE_DELTAS, generator: torch.Generator | None = None, theta: float = 1_000_000.0,
                   dtype: torch.dtype = torch.float64) -> VLMPositions:
    """V2PE positions ``(1, B, L)`` (float64 by default). ``delta``: see the module docstring.

    Raises ``ValueError`` for a delta outside (0, 1].
    """
    tb = layout.table
    vis = tb.is_vision
    if isinstance(delta, str) and delta == "auto":
        if max_positions is None:
            raise ValueError("delta='auto' needs max_positions (the trained context window)")
        d = torch.ones(tb.num_segments, dtype=torch.float64)
        d[vis] = choose_delta(layout, max_positions, candidates)[tb.seq][vis]
    else:
        d = per_vision_block(tb, delta, "delta", low=0.0, low_open=True, high=1.0, choices=candidates,
                             generator=generator)
    f64 = torch.float64
    n = tb.n.to(f64)
    real = tb.kind != PAD
    adv = torch.where(vis, torch.ceil(n * d), torch.where(real, n, torch.zeros_like(n)))
    base = tb.segmented_exclusive_cumsum(adv) - 1  # the counter c before each segment
    value = torch.where(vis, base + d, base + 1)[None]
    pos, pad = expand_units(tb.n, value, [torch.where(vis, d, torch.ones_like(d))], tb.batch_size * tb.length,
                            integer=False, dtype=dtype, fill_units=~real, fill_value=1.0)
    nxt = tb.per_sequence_sum(adv)  # c_final + 1
    return VLMPositions(scheme="v2pe", positions=pos.view(1, tb.batch_size, tb.length), axes=("p",),
                        rope_delta=nxt - tb.length, padding_mask=~pad.view(tb.batch_size, tb.length), allocation=SingleAxis(),
                        theta=float(theta))
