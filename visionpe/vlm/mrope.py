"""M-RoPE positions: Qwen2-VL, Qwen2.5-VL (absolute time) and Qwen3-VL (interleaved sections).

Rules (spec ``vlm_rope.md`` section 1), with a counter ``next`` per sequence starting at 0:

* text run of ``n``: ``(next + k)`` on t, h, w; ``next += n``;
* vision block ``(T, H, W)`` at ``base = next``: token ``(f, r, c)`` gets ``(base + tid(f), base + r, base + c)``
  with ``tid(f) = f`` (Qwen2-VL) or ``trunc(f * seconds_per_frame * tokens_per_second)`` (Qwen2.5-VL videos;
  computed in float32 in the reference's operation order); then ``next = block max + 1``;
* Qwen3-VL: a video is ``T`` blocks of one frame each, ``(base_f, base_f + r, base_f + c)`` with
  ``base_f = base + f * max(H, W)`` (the released model puts timestamp text between frames; a ``Video`` segment
  here means frames with nothing between them); ``next = base + T * max(H, W)``;
* padding keeps the fill value (1; 0 under ``compat="transformers5"``) and does not advance;
* ``rope_delta = max(all positions) + 1 - L`` with the padded length ``L``.

``compat`` reproduces other transformers releases for loading checkpoints trained with them:

* ``"reference"`` (default): transformers 4.45-4.51 and the Qwen team's code;
* ``"transformers4.57"``: Qwen2.5-VL casts ``seconds_per_frame`` to int before multiplying (0.5 -> 0);
  for a batch without any vision block, ``rope_delta`` takes the max over the padded row including the
  fill value 1 (a left-padded row with one real token gets ``2 - L``, not ``1 - L``);
* ``"transformers5"``: text after a vision block resumes at ``base + max(H, W)`` (temporal extent ignored;
  a likely regression, spec 1.5), ``rope_delta`` still from the global max, padded slots 0; HF 5.x
  ``generate`` then continues from the last prompt token + 1 (not from ``L + rope_delta``), which
  ``decode_start`` records.
"""
from __future__ import annotations

import torch

from ._checks import short_repr
from ._units import expand_units
from .common import RowUnits, reject_tiles
from .layout import PAD, TEXT, VIDEO, VLMLayout
from .positions import VLMPositions
from .tables import Sections

__all__ = ["mrope_positions", "MROPE_VARIANTS", "MROPE_COMPAT"]

MROPE_VARIANTS = {
    # variant: (sections, interleaved, theta)
    "qwen2vl": ((16, 24, 24), False, 1_000_000.0),
    "qwen25vl": ((16, 24, 24), False, 1_000_000.0),
    "qwen3vl": ((24, 20, 20), True, 5_000_000.0),
}
MROPE_COMPAT = ("reference", "transformers4.57", "transformers5")


def _temporal_ids(f: torch.Tensor, seconds: torch.Tensor, is_video: torch.Tensor, variant: str, compat: str,
                  tokens_per_second: float) -> torch.Tensor:
    """Temporal offset ``tid(f)`` (float64 holding integers) for frame ``f`` of a block."""
    if variant != "qwen25vl":
        return f.to(torch.float64)
    spg = seconds.to(torch.float32)  # HF holds second_per_grid_ts as a float32 tensor
    if compat == "transformers4.57":
        tid = f * torch.trunc(spg).to(torch.int64) * int(tokens_per_second)
    elif compat == "transformers5":
        interval = spg * float(tokens_per_second)  # tokens_per_second * second_per_grid_t, in float32
        tid = torch.trunc(f.to(torch.float32) * interval)
    else:
        tid = torch.trunc((f.to(torch.float32) * spg) * float(tokens_per_second))
    return torch.where(is_video, tid.to(torch.float64), f.to(torch.float64))  # images: T = 1, tid = 0


def mrope_positions(layout: VLMLayout, variant: str = "qwen2vl", *, tokens_per_second: float = 2,
                    compat: str = "reference", sections=None, theta: float | None = None,
                    dtype: torch.dtype | None = None) -> VLMPositions:
    """M-RoPE positions ``(3, B, L)`` (t, h, w) for ``layout``.

    Args:
        variant: ``"qwen2vl"``, ``"qwen25vl"`` or ``"qwen3vl"``.
        tokens_per_second: Qwen2.5-VL temporal scale; the released checkpoints use 2 (the transformers
            config default is 4: always take it from the checkpoint).
        compat: ``"reference"``, ``"transformers4.57"`` or ``"transformers5"`` (module docstring).
        sections, theta: override the variant's frequency sections / RoPE base.
        dtype: positions dtype; default float32 when exact (integers below 2**24), else float64.
    """
    if variant not in MROPE_VARIANTS:
        raise ValueError(f"unknown mrope variant {short_repr(variant)}; expected one of {sorted(MROPE_VARIANTS)}")
    if compat not in MROPE_COMPAT:
        raise ValueError(f"compat must be one of {MROPE_COMPAT}; got {short_repr(compat)}")
    if not (isinstance(tokens_per_second, (int, float)) and tokens_per_second > 0):
        raise ValueError(f"tokens_per_second must be > 0; got {short_repr(tokens_per_second)}")
    secs, interleaved, default_theta = MROPE_VARIANTS[variant]
    tb = layout.table
    reject_tiles(tb, "mrope")
    vis = tb.is_vision
    is_video = tb.kind == VIDEO
    H, W, T = tb.h, tb.w, tb.t
    M = torch.maximum(H, W)
    f64 = torch.float64

    # -- per segment: how far the counter advances, and the largest position (for rope_delta) --------
    last_tid = _temporal_ids(T - 1, tb.seconds, is_video, variant, compat, tokens_per_second)
    if variant == "qwen3vl":
        span = ((T - 1) * M + M - 1).to(f64)  # last frame block's max, relative to base
        vis_adv = (T * M).to(f64)
    else:
        span = torch.maximum(last_tid, (M - 1).to(f64))
        vis_adv = M.to(f64) if compat == "transformers5" else span + 1
    n = tb.n.to(f64)
    adv = torch.where(vis, vis_adv, torch.where(tb.kind == TEXT, n, torch.zeros_like(n)))
    base = tb.segmented_exclusive_cumsum(adv)
    seg_max = torch.where(vis, base + span, torch.where(tb.kind == TEXT, base + n - 1, torch.full_like(n, -1.0)))
    seq_max = tb.per_sequence_max(seg_max, empty=-1.0)
    if compat == "transformers4.57" and not bool(vis.any()):
        # 4.57's text-only branch takes the max over the padded row, fill value 1 included: a padded row
        # with a single real token (position 0) gets max 1, not 0
        padded = tb.per_sequence_sum((tb.kind == PAD).to(f64)) > 0
        seq_max = torch.where(padded, seq_max.clamp(min=1.0), seq_max)
    rope_delta = seq_max + 1 - tb.length

    # -- per row unit: first-token positions and slopes -------------------------------------------------
    u = RowUnits(tb)
    b = base[u.seg]
    fill = 0.0 if compat == "transformers5" else 1.0
    if variant == "qwen3vl":
        frame_off = (u.f * torch.maximum(u.H, u.W)).to(f64)
        tid = frame_off
    else:
        frame_off = torch.zeros_like(b)
        tid = _temporal_ids(u.f, tb.seconds[u.seg], is_video[u.seg], variant, compat, tokens_per_second)
    # text and padding units have f = r = 0 (one unit per segment), so no masking is needed here
    value = torch.stack([b + tid, b + frame_off + u.r.to(f64), b + frame_off])
    ramp = (~u.vis).to(f64)  # text advances on t and h too; vision rows only along w
    pos, pad = expand_units(u.length, value, [ramp, ramp, 1.0], tb.batch_size * tb.length, integer=True,
                            dtype=dtype, fill_units=u.pad, fill_value=fill)
    decode_start = None
    if compat == "transformers5":  # HF 5.x generate: last prompt token + 1 on each axis
        last_tid = torch.where(is_video, last_tid, torch.zeros_like(last_tid))
        if variant == "qwen3vl":
            fo = ((T - 1) * M).to(f64)
            last = torch.stack([fo, fo + (H - 1).to(f64), fo + (W - 1).to(f64)])
        else:
            last = torch.stack([last_tid, (H - 1).to(f64), (W - 1).to(f64)])
        last = base + torch.where(vis, last, (n - 1).expand(3, -1))
        seg_idx = torch.arange(tb.num_segments, dtype=f64)
        last_seg = tb.per_sequence_max(torch.where(tb.kind == PAD, torch.full_like(n, -1.0), seg_idx), -1.0).long()
        decode_start = last[:, last_seg.clamp(min=0)] + 1
        decode_start[:, last_seg < 0] = 0.0
    return VLMPositions(
        scheme="mrope", positions=pos.view(3, tb.batch_size, tb.length), axes=("t", "h", "w"),
        rope_delta=rope_delta, padding_mask=~pad.view(tb.batch_size, tb.length),
        allocation=Sections(tuple(secs if sections is None else sections), interleaved),
        theta=default_theta if theta is None else float(theta), decode_start=decode_start)
