"""Conversion between a :class:`~visionpe.vlm.VLMLayout` and the tensors of an HF Qwen-VL processor.

* :func:`layout_from_token_types`: HF ``mm_token_type_ids`` + grids (+ attention mask) -> layout, vectorised
  over tokens (one comparison and one scan per token, no Python loop); ``VLMLayout.from_token_types`` is
  the same function.
* :func:`hf_rope_inputs`: layout -> the tensors HF's Qwen-VL ``get_rope_index`` takes.

Neither needs transformers installed.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ._checks import preview
from .layout import IMAGE, PAD, TEXT, VIDEO, SegmentTable, VLMLayout, _pos_int

__all__ = ["layout_from_token_types", "hf_rope_inputs"]


def _int_tensor(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor; got dtype {t.dtype}")
    return t.to(torch.int64).cpu()


def _grid(name: str, g, m: int) -> torch.Tensor:
    """A validated ``(n, 3)`` int64 grid: entries >= 1, spatial sizes divisible by ``m``."""
    if g is None:
        return torch.zeros(0, 3, dtype=torch.int64)
    g = _int_tensor(g, name)
    if g.ndim != 2 or g.shape[1] != 3:
        raise ValueError(f"{name} must have shape (num, 3) = (t, H, W) per row; got {tuple(g.shape)}")
    bad = (g < 1).any(1).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"{name} entries must be >= 1; row {i} is {tuple(g[i].tolist())} "
                         f"({bad.shape[0]} bad row(s))")
    bad = ((g[:, 1:] % m) != 0).any(1).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"{name} spatial sizes must be divisible by spatial_merge_size={m}; row {i} is "
                         f"{tuple(g[i].tolist())} ({bad.shape[0]} bad row(s))")
    return g


def layout_from_token_types(mm_token_type_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                            video_grid_thw: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                            second_per_grid_ts: torch.Tensor | Sequence[float] | None = None, *,
                            spatial_merge_size: int = 2, split_video_frames: bool = False) -> VLMLayout:
    """Layout from HF Qwen-VL processor outputs, vectorised over tokens.

    Args:
        mm_token_type_ids: ``(B, L)`` integer, 0 text, 1 image, 2 video (markers are text).
        image_grid_thw, video_grid_thw: ``(n, 3)`` integer raw patch grids ``(t, H, W)`` (entries >= 1) in
            order of appearance over the whole batch; the LLM grid is ``(t, H/m, W/m)`` with
            ``m = spatial_merge_size``.
        attention_mask: ``(B, L)``; zeros become :class:`~visionpe.vlm.Padding`.
        second_per_grid_ts: ``(num_videos,)`` seconds per temporal step (default 1.0, as HF).
        split_video_frames: Qwen3-VL: every temporal step of a video is its own run (separated by
            timestamp text), so each video grid row stands for ``t`` runs of one frame.

    Raises ``ValueError`` for a token type other than 0/1/2, a grid entry below 1, a spatial size not
    divisible by ``m``, a number of runs different from the number of grid rows, or a run whose token count
    does not match its grid; ``TypeError`` for non-integer ids or grids. Messages quote at most a few values.
    """
    types = _int_tensor(mm_token_type_ids, "mm_token_type_ids")
    if types.ndim != 2:
        raise ValueError(f"mm_token_type_ids must be (batch, length); got shape {tuple(types.shape)}")
    B, L = types.shape
    tnp = types.numpy()
    bad = (tnp < 0) | (tnp > VIDEO)
    if bad.any():
        raise ValueError(f"mm_token_type_ids must hold 0 (text), 1 (image) or 2 (video) per token (the "
                         f"processor's mm_token_type_ids, not input_ids); {int(bad.sum())} of {tnp.size} tokens "
                         f"hold other values: {preview(np.unique(tnp[bad]))}")
    if attention_mask is not None:
        am = torch.as_tensor(attention_mask)
        if am.shape != types.shape:
            raise ValueError(f"attention_mask must have shape {tuple(types.shape)}; got {tuple(am.shape)}")
        tnp = np.where(am.detach().cpu().numpy() != 0, tnp, PAD)
    m = _pos_int(spatial_merge_size, "spatial_merge_size")
    img_grid = _grid("image_grid_thw", image_grid_thw, m)
    vid_grid = _grid("video_grid_thw", video_grid_thw, m)
    nv = vid_grid.shape[0]
    if second_per_grid_ts is None:
        spg = torch.ones(nv, dtype=torch.float64)
    else:
        spg = torch.as_tensor(second_per_grid_ts, dtype=torch.float64).reshape(-1).cpu()
        if spg.numel() != nv:
            raise ValueError(f"second_per_grid_ts has {spg.numel()} values but there are {nv} videos")
        bad_s = (spg <= 0) | ~torch.isfinite(spg)
        if bool(bad_s.any()):
            raise ValueError(f"second_per_grid_ts must be finite and > 0; got {int(bad_s.sum())} bad value(s): "
                             f"{preview(spg[bad_s])}")
    if split_video_frames and nv:
        reps = vid_grid[:, 0]
        spg = torch.repeat_interleave(spg, reps)
        vid_grid = torch.repeat_interleave(vid_grid, reps, dim=0)
        vid_grid[:, 0] = 1

    # runs of equal type: the per-token work is one comparison and one scan (numpy, no Python loop)
    flat = tnp.reshape(-1)
    starts_np = np.union1d(np.flatnonzero(flat[1:] != flat[:-1]) + 1, np.arange(0, flat.size, L))
    starts = torch.from_numpy(starts_np.astype(np.int64))
    kind = torch.from_numpy(flat[starts_np].astype(np.int64))
    n = torch.diff(starts, append=torch.tensor([flat.size]))
    S = starts.numel()
    t = torch.ones(S, dtype=torch.int64)
    h = torch.ones(S, dtype=torch.int64)
    w = n.clone()
    seconds = torch.ones(S, dtype=torch.float64)

    def place(name, g, sel, per_run_seconds=None, unit="runs"):
        count = int(sel.sum())
        if g.shape[0] != count:
            raise ValueError(f"{name} has {g.shape[0]} rows but mm_token_type_ids has {count} "
                             f"{name.split('_')[0]} {unit}")
        gt, gh, gw = g[:, 0], g[:, 1] // m, g[:, 2] // m
        expected = gt * gh * gw
        got = n[sel]
        wrong = (expected != got).nonzero()
        if wrong.numel():
            i = int(wrong[0, 0])
            raise ValueError(f"{name.split('_')[0]} run {i} has {int(got[i])} tokens but its grid "
                             f"{tuple(g[i].tolist())} (merged {int(gt[i])}x{int(gh[i])}x{int(gw[i])}) "
                             f"expects {int(expected[i])}")
        t[sel], h[sel], w[sel] = gt, gh, gw
        if per_run_seconds is not None:
            seconds[sel] = per_run_seconds

    place("image_grid_thw", img_grid, kind == IMAGE)
    place("video_grid_thw", vid_grid, kind == VIDEO, per_run_seconds=spg,
          unit="frame runs" if split_video_frames else "runs")
    w = torch.where((kind == TEXT) | (kind == PAD), n, w)
    table = SegmentTable(seq=starts // L, kind=kind, n=n, t=t, h=h, w=w, tiles=torch.ones(S, dtype=torch.int64),
                         seconds=seconds, batch_size=B, length=L)
    return VLMLayout.from_table(table)


def hf_rope_inputs(layout: VLMLayout, *, spatial_merge_size: int = 2, image_token_id: int = 151655,
                   video_token_id: int = 151656, vision_start_token_id: int = 151652, text_token_id: int = 1000,
                   pad_token_id: int = 0) -> dict:
    """The tensors HF Qwen-VL ``get_rope_index`` takes for ``layout`` (vectorised over tokens).

    Returns ``input_ids`` (text ``text_token_id``; the token before every vision block
    ``vision_start_token_id``; vision pads), ``mm_token_type_ids``, ``attention_mask``, ``image_grid_thw`` /
    ``video_grid_thw`` (raw grids: spatial sizes times ``spatial_merge_size``) and ``second_per_grid_ts``
    (float32, one per video). Images must be single tiles.
    """
    tb = layout.table
    B, L = tb.batch_size, tb.length
    types = layout.token_types()
    mask = types != PAD
    ids = torch.full((B, L), text_token_id, dtype=torch.int64)
    ids[types == IMAGE] = image_token_id
    ids[types == VIDEO] = video_token_id
    ids[~mask] = pad_token_id
    vis = tb.is_vision
    before = tb.start[vis] - 1
    ok = (before >= 0) & (before // L == tb.seq[vis])
    ids.view(-1)[before[ok]] = vision_start_token_id
    if bool(((tb.kind == IMAGE) & (tb.tiles > 1)).any()):
        raise ValueError("hf_rope_inputs: Qwen-VL has no tiled images")
    m = _pos_int(spatial_merge_size, "spatial_merge_size")
    grid = torch.stack([tb.t, tb.h * m, tb.w * m], 1)
    img, vid = grid[tb.kind == IMAGE], grid[tb.kind == VIDEO]
    return dict(input_ids=ids, mm_token_type_ids=types.masked_fill(~mask, 0), attention_mask=mask.long(),
                image_grid_thw=img if img.numel() else None, video_grid_thw=vid if vid.numel() else None,
                second_per_grid_ts=tb.seconds[tb.kind == VIDEO].to(torch.float32) if vid.numel() else None)
