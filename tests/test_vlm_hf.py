"""M-RoPE against HF transformers' own ``get_rope_index`` on random layouts (Qwen2-VL, Qwen2.5-VL, Qwen3-VL
models built from tiny local configs, no download), the HF input conversion and the version check. Runs
when the optional ``transformers`` extra is installed; under CI a missing transformers fails instead of
skipping. ``tools/test_compat.sh`` runs this module against every pinned transformers release."""
import inspect
import warnings

import pytest
import torch

from conftest import importorskip_or_fail

transformers = importorskip_or_fail("transformers")

from visionpe.vlm import (Image, Padding, Text, Video, VLMLayout, hf_rope_inputs, mrope_positions,  # noqa: E402
                          tiny_qwen_vl)
from visionpe.vlm import hf_compat  # noqa: E402

HF_MAJOR_MINOR = tuple(int(x) for x in transformers.__version__.split(".")[:2])
# which of our compat modes the installed transformers implements (spec vlm_rope.md section 1.5)
COMPAT = ("transformers5" if HF_MAJOR_MINOR >= (5, 0) else
          "transformers4.57" if HF_MAJOR_MINOR >= (4, 57) else "reference")


@pytest.fixture(scope="module")
def models():
    return {v: tiny_qwen_vl(v) for v in ("qwen2vl", "qwen25vl", "qwen3vl")}


def random_batch(g, cfg, variant, batch):
    """Our segments plus the HF inputs (input_ids with vision markers, mm_token_type_ids, grids)."""
    m = 2
    vs, ve = cfg.vision_start_token_id, 151653
    seqs, ids, types, images, videos, spg = [], [], [], [], [], []
    rnd = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    for _ in range(batch):
        segs, tok, typ = [], [], []

        def text(n, first=None, last=None):
            t = [1000 + rnd(0, 900) for _ in range(n)]
            if first is not None:
                t[0] = first
            if last is not None:
                t[-1] = last
            segs.append(Text(n))
            tok.extend(t)
            typ.extend([0] * n)

        def vision(kind, t, h, w):
            n = t * h * w
            segs.append(Image(h, w) if kind == 1 else Video(t, h, w, cur_spg))
            tok.extend([cfg.image_token_id if kind == 1 else cfg.video_token_id] * n)
            typ.extend([kind] * n)

        text(rnd(1, 4), last=vs)
        blocks = rnd(1, 4)
        for i in range(blocks):
            kind, h, w = rnd(1, 3), rnd(1, 6), rnd(1, 6)
            if kind == 1:
                cur_spg = 1.0
                images.append([1, h * m, w * m])
                vision(1, 1, h, w)
            else:
                t = rnd(1, 6)
                cur_spg = [0.25, 0.5, 1.0, 1.5, 2.0, 2 / 3, 0.4][rnd(0, 7)]
                videos.append([t, h * m, w * m])
                spg.append(cur_spg)
                if variant == "qwen3vl":  # one block per frame, separated by timestamp text
                    for f in range(t):
                        if f:
                            text(4, first=ve, last=vs)
                        vision(2, 1, h, w)
                else:
                    vision(2, t, h, w)
            text(rnd(2, 5), first=ve, last=vs if i < blocks - 1 else None)  # 4.57 reads the token after a vs
        seqs.append(segs)
        ids.append(tok)
        types.append(typ)
    L = max(len(t) for t in ids)
    pad = [L - len(t) for t in ids]
    input_ids = torch.tensor([[0] * p + t for p, t in zip(pad, ids)])
    mm = torch.tensor([[0] * p + t for p, t in zip(pad, types)])
    mask = torch.tensor([[0] * p + [1] * len(t) for p, t in zip(pad, ids)])
    grid = lambda x: torch.tensor(x, dtype=torch.int64).view(-1, 3) if x else None  # noqa: E731
    return seqs, dict(input_ids=input_ids, mm_token_type_ids=mm, image_grid_thw=grid(images),
                      video_grid_thw=grid(videos), attention_mask=mask,
                      second_per_grid_ts=torch.tensor(spg, dtype=torch.float32) if spg else None)


def hf_rope_index(model, variant, inputs):
    params = inspect.signature(model.get_rope_index).parameters
    kw = {k: v for k, v in inputs.items() if k in params and k != "input_ids"}
    if variant != "qwen25vl":
        kw.pop("second_per_grid_ts", None)
    return model.get_rope_index(inputs["input_ids"], **kw)


@pytest.mark.parametrize("variant", ["qwen2vl", "qwen25vl", "qwen3vl"])
def test_mrope_equals_hf_get_rope_index_on_random_layouts(models, variant):
    model = models[variant]
    g = torch.Generator().manual_seed(17)
    for trial in range(12):
        seqs, inputs = random_batch(g, model.config, variant, batch=1 + trial % 3)
        with torch.no_grad():
            hf_pos, hf_delta = hf_rope_index(model, variant, inputs)
        lay = VLMLayout(seqs, padding_side="left")
        ours = mrope_positions(lay, variant, compat=COMPAT)
        assert torch.equal(ours.positions.double(), hf_pos.double()), (variant, trial)
        # transformers 5 reports rope_deltas against the unpadded length, 4.x against the padded one
        ref_len = lay.padding_mask.sum(1) if COMPAT == "transformers5" else torch.full((lay.batch_size,), lay.length)
        assert torch.equal(ours.rope_delta + lay.length - ref_len, hf_delta.view(-1).double()), (variant, trial)
        # the same from the HF tensors, vectorised
        tensors = VLMLayout.from_token_types(inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                             inputs["video_grid_thw"], inputs["attention_mask"],
                                             inputs["second_per_grid_ts"], split_video_frames=variant == "qwen3vl")
        assert torch.equal(mrope_positions(tensors, variant, compat=COMPAT).positions.double(), hf_pos.double())


def test_reference_rule_differs_from_transformers5_only_after_long_videos(models):
    """The 5.x text resumption (base + max(h, w)) is the only difference for Qwen2-VL here."""
    seqs = [[Text(3), Video(6, 2, 2), Text(3)]]
    ref = mrope_positions(VLMLayout(seqs), "qwen2vl")
    hf5 = mrope_positions(VLMLayout(seqs), "qwen2vl", compat="transformers5")
    assert ref.positions[0, 0, -3].item() == 3 + 6 and hf5.positions[0, 0, -3].item() == 3 + 2
    img = [[Text(3), Image(3, 5), Text(3)]]
    assert torch.equal(mrope_positions(VLMLayout(img), "qwen2vl").positions,
                       mrope_positions(VLMLayout(img), "qwen2vl", compat="transformers5").positions)


def test_transformers457_text_only_delta_counts_the_padding_fill():
    """4.57's text-only branch takes the max over the padded row, fill value 1 included: a left-padded row
    with one real token gets rope_delta 2 - L (HF) instead of 1 - L; compat='transformers4.57' matches it."""
    lay = VLMLayout([[Text(5)], [Text(1)], [Text(3)]], padding_side="left")
    ours = mrope_positions(lay, "qwen2vl", compat="transformers4.57")
    assert ours.rope_delta.tolist() == [0.0, -3.0, 0.0 - 2]  # rows: no padding, 1 real token, 3 real tokens
    assert mrope_positions(lay, "qwen2vl").rope_delta.tolist() == [0.0, -4.0, -2.0]  # reference rule
    with_image = VLMLayout([[Text(5), Image(1, 1)], [Text(1)]], padding_side="left")  # vision branch: no quirk
    assert mrope_positions(with_image, "qwen2vl", compat="transformers4.57").rope_delta.tolist() == [0.0, -5.0]
    if COMPAT == "transformers4.57":  # and it is what the installed 4.57 computes, for every variant
        mask = lay.padding_mask.long()
        ids = torch.full(mask.shape, 1000).masked_fill(mask == 0, 0)
        for variant in ("qwen2vl", "qwen25vl", "qwen3vl"):
            hf_pos, hf_delta = tiny_qwen_vl(variant).get_rope_index(ids, attention_mask=mask)
            res = mrope_positions(lay, variant, compat=COMPAT)
            assert torch.equal(res.rope_delta, hf_delta.view(-1).double()), variant
            assert torch.equal(res.positions.double(), hf_pos.double()), variant


def test_version_outside_the_tested_range_warns_once(monkeypatch):
    monkeypatch.setattr(hf_compat, "_warned", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for inside in ("4.57.6", "5.0.0", "5.23.0", "5.24.0", "5.24.3"):
            assert hf_compat.check_transformers_version(inside)
    with pytest.warns(RuntimeWarning, match=r"tested with transformers 4\.57 to 5\.24\.x .*found 4\.51\.3"):
        assert not hf_compat.check_transformers_version("4.51.3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: a second release outside the range stays silent
        assert not hf_compat.check_transformers_version("5.30.0")
    installed = hf_compat._major_minor(transformers.__version__)
    assert (installed >= (4, 57) and installed <= (5, 24)) == hf_compat.check_transformers_version()


def test_hf_rope_inputs_marks_vision_blocks():
    lay = VLMLayout([[Text(2), Image(1, 2), Text(1)], [Text(1), Video(2, 1, 1, 0.5), Padding(1)]])
    inp = hf_rope_inputs(lay, text_token_id=7)
    assert inp["input_ids"][0].tolist() == [7, 151652, 151655, 151655, 7]
    assert inp["input_ids"][1, :3].tolist() == [151652, 151656, 151656]
    assert inp["mm_token_type_ids"].tolist() == [[0, 0, 1, 1, 0], [0, 2, 2, 0, 0]]
    assert inp["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert inp["image_grid_thw"].tolist() == [[1, 2, 4]] and inp["video_grid_thw"].tolist() == [[2, 2, 2]]
    assert inp["second_per_grid_ts"].tolist() == [0.5]
