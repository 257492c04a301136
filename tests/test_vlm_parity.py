"""Parity of every VLM position scheme with the golden vectors of the official code.

Positions and rope deltas must be equal; cos/sin and rotated q/k are compared at float32 tolerance
(rtol 1e-5, atol 1e-6; they come out bit-identical because angles are float32 ``pos * inv_freq`` as in the
reference code).
"""
import json
import os

import numpy as np
import pytest
import torch

from conftest import REFERENCE
from visionpe import rotary
from visionpe.vlm import (Image, Text, Video, VLMLayout, apply_multimodal_rotary, cca_positions, hope_positions,
                          mrope_positions, ring_grid, v2pe_positions, vrope_positions)

VR = os.path.join(REFERENCE, "vlm_rope")
VC = os.path.join(REFERENCE, "v2pe_cca")
CASES = ["A_image", "B_video", "C_two_videos", "D_image_then_long_video", "E_text_only"]
TOL = dict(rtol=1e-5, atol=1e-6)


def _json(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


LAYOUTS = _json(VR, "layouts.json")["cases"]
ROT = torch.load(os.path.join(VR, "rotations.pt"), weights_only=True)
VCT = torch.load(os.path.join(VC, "tensors.pt"), weights_only=True)


def segments(spec):
    out = []
    for s in spec:
        if s["type"] == "text":
            out.append(Text(s["n"]))
        elif s["type"] == "image":
            out.append(Image(s["h"], s["w"]))
        elif s["type"] == "video":
            out.append(Video(s["t"], s["h"], s["w"], s["second_per_grid"]))
        elif s["type"] == "video_frame":  # Qwen3-VL: one temporal patch, timestamps are the text around it
            out.append(Video(1, s["h"], s["w"]))
        else:
            raise AssertionError(s)
    return out


def layout(case, qwen3=False):
    spec = LAYOUTS[case]["qwen3"]["segments"] if qwen3 else LAYOUTS[case]["segments"]
    return VLMLayout(segments(spec))


def f64(x):
    return torch.as_tensor(x, dtype=torch.float64)


def check_rotation(res, prefix, qk_key, case, inv_freq_key):
    """cos/sin and rotated q/k."""
    cos, sin = res.cos_sin(128)
    torch.testing.assert_close(cos[0], ROT[f"{prefix}/cos"], **TOL)
    torch.testing.assert_close(sin[0], ROT[f"{prefix}/sin"], **TOL)
    torch.testing.assert_close(rotary.inv_freq(64, res.theta), ROT[inv_freq_key], rtol=0, atol=0)
    q, k = ROT[f"inputs/{qk_key}/{case}/q"], ROT[f"inputs/{qk_key}/{case}/k"]
    q_rot, k_rot = apply_multimodal_rotary(q, k, cos[0], sin[0])
    torch.testing.assert_close(q_rot, ROT[f"{prefix}/q_rot"], **TOL)
    torch.testing.assert_close(k_rot, ROT[f"{prefix}/k_rot"], **TOL)
    # the same through the (B, H, L, D) path used by decoders
    q4, _ = apply_multimodal_rotary(q[None, None], k[None, None], cos, sin)
    torch.testing.assert_close(q4[0, 0], ROT[f"{prefix}/q_rot"], **TOL)


MROPE_FILES = {"qwen2vl": "mrope_qwen2vl", "qwen25vl": "mrope_qwen25vl", "qwen3vl": "mrope_qwen3vl"}


@pytest.mark.parametrize("variant", list(MROPE_FILES))
@pytest.mark.parametrize("case", CASES)
def test_mrope_positions_delta_and_rotation(variant, case):
    ref = _json(VR, MROPE_FILES[variant] + ".json")
    c = ref["cases"][case]
    res = mrope_positions(layout(case, qwen3=variant == "qwen3vl"), variant)
    assert res.positions.shape == (3, 1, c["seq_len"])
    assert torch.equal(res.positions[:, 0].double(), f64(c["position_ids"]))
    assert res.rope_delta.tolist() == [c["rope_delta"]]
    assert res.next_position.tolist() == [c["next_token_position"]]
    assert torch.equal(res.decode_positions(2), torch.full((3, 1, 1), float(c["next_token_position"]))
                       + torch.arange(2, dtype=torch.float64))
    assert res.theta == ref["config"]["rope_theta"]
    assert tuple(res.allocation.sections) == tuple(ref["config"]["mrope_section"])
    kind = "qwen3" if variant == "qwen3vl" else "bulk"
    check_rotation(res, f"{MROPE_FILES[variant]}/{case}", kind, case, f"{MROPE_FILES[variant]}/inv_freq")


@pytest.mark.parametrize("variant", list(MROPE_FILES))
def test_mrope_transformers_version_variants(variant):
    """Other transformers releases, reproduced by ``compat=`` (4.57: int-cast seconds; 5.x: text resumes
    at base + max(h, w)); identical cases stay identical."""
    ref = _json(VR, MROPE_FILES[variant] + ".json")
    checked = 0
    for vname, v in ref["variants"].items():
        compat = "transformers5" if vname.startswith("transformers_5") else "transformers4.57"
        for case in v["identical_cases"]:
            res = mrope_positions(layout(case, variant == "qwen3vl"), variant, compat=compat)
            assert torch.equal(res.positions[:, 0].double(), f64(ref["cases"][case]["position_ids"])), (vname, case)
            checked += 1
        for case, d in v["differing_cases"].items():
            res = mrope_positions(layout(case, variant == "qwen3vl"), variant, compat=compat)
            assert torch.equal(res.positions[:, 0].double(), f64(d["position_ids"])), (vname, case)
            assert res.rope_delta.tolist() == [d["rope_delta"]]
            # and the reference rule really differs there
            assert not torch.equal(res.positions[:, 0].double(), f64(ref["cases"][case]["position_ids"]))
            checked += 1
    assert checked >= 5


def test_mrope_batched_left_padding():
    ref = _json(VR, "mrope_qwen2vl.json")["batched_left_pad"]
    lay = VLMLayout([segments(LAYOUTS["B_video"]["segments"]), segments(ref["second_row_layout"])],
                    padding_side="left")
    res = mrope_positions(lay, "qwen2vl")
    assert torch.equal(res.positions.double(), f64(ref["position_ids"]))
    assert res.rope_delta.tolist() == [d[0] if isinstance(d, list) else d for d in ref["rope_deltas"]]
    assert torch.equal(res.padding_mask, torch.tensor(ref["attention_mask"], dtype=torch.bool))
    assert torch.equal(lay.token_types().clamp(max=2).masked_fill(~res.padding_mask, 0),
                       torch.tensor(ref["mm_token_type_ids"]))


@pytest.mark.parametrize("case", CASES)
def test_vrope_channel_positions_and_rotation(case):
    c = _json(VR, "vrope.json")["cases"][case]
    res = vrope_positions(layout(case))
    axes = res.allocation.axis_of_freq(64)
    table = res.positions[:, 0].index_select(0, axes).T  # (S, 64) position per frequency, as the official code
    assert torch.equal(table.double(), f64(c["channel_position_ids"]))
    assert res.next_position.tolist() == [c["next_token_position"]]
    check_rotation(res, f"vrope/{case}", "bulk", case, "vrope/inv_freq")


HOPE = _json(VR, "hope.json")


@pytest.mark.parametrize("case,gamma", [(c, g) for c in CASES for g in HOPE["hope"][c]["by_gamma"]])
def test_hope_positions_delta_and_rotation(case, gamma):
    g = HOPE["hope"][case]["by_gamma"][gamma]
    res = hope_positions(layout(case), gamma=float(gamma))
    assert torch.equal(res.positions[:, 0], f64(g["position_ids"]))
    assert res.rope_delta.tolist() == [g["returned_rope_delta"]]
    prefix = f"hope/hope/{case}/gamma{gamma}"
    cos, sin = res.cos_sin(128)
    torch.testing.assert_close(cos[0], ROT[prefix + "/cos"], **TOL)
    torch.testing.assert_close(sin[0], ROT[prefix + "/sin"], **TOL)
    q, k = ROT[f"inputs/bulk/{case}/q"], ROT[f"inputs/bulk/{case}/k"]
    q_rot, k_rot = apply_multimodal_rotary(q, k, cos[0], sin[0])
    torch.testing.assert_close(q_rot, ROT[prefix + "/q_rot"], **TOL)
    torch.testing.assert_close(k_rot, ROT[prefix + "/k_rot"], **TOL)
    # the 16 lowest frequencies are zero frequencies: identity rotation
    assert torch.equal(cos[0, :, 48:], torch.ones_like(cos[0, :, 48:]))
    assert torch.equal(sin[0, :, 48:], torch.zeros_like(sin[0, :, 48:]))


@pytest.mark.parametrize("case", CASES)
def test_videorope_baseline_of_hope_repo(case):
    c = HOPE["videorope_in_hope_repo"][case]
    res = hope_positions(layout(case), gamma=c["scale_factor"], temporal_frequencies="t")
    assert torch.equal(res.positions[:, 0], f64(c["position_ids"]))
    assert res.rope_delta.tolist() == [c["rope_delta_returned"]]
    check_rotation(res, f"hope/videorope/{case}", "bulk", case, "hope/inv_freq")


# ---------------------------------------------------------------------------------------------------- V2PE
V2 = _json(VC, "v2pe_positions.json")


def v2pe_layout(c):
    segs = [Text(s[1]) if s[0] == "text" else Image(1, s[2], tiles=s[1]) for s in c["segments"]]
    return VLMLayout(segs, length=c["seq_len"])


@pytest.mark.parametrize("case", list(V2["cases"]))
def test_v2pe_positions(case):
    c = V2["cases"][case]
    res = v2pe_positions(v2pe_layout(c), delta=c["inferred_delta_per_image"])
    assert res.positions.dtype == torch.float64
    assert torch.equal(res.positions[0, 0], f64(c["position_ids"]))
    roles = c["token_roles"]
    assert torch.equal(res.padding_mask[0], torch.tensor([r != "P" for r in roles]))
    if c.get("delta") is not None and len(set(c["inferred_delta_per_image"])) == 1:  # a fixed stride
        again = v2pe_positions(v2pe_layout(c), delta=c["delta"])
        assert torch.equal(again.positions, res.positions)


@pytest.mark.parametrize("case", ["train_A_fix_stride4", "eval_C_fix_stride64"])
def test_v2pe_decode_positions(case):
    c = V2["cases"][case]
    res = v2pe_positions(v2pe_layout(c), delta=c["delta"])
    assert res.decode_positions(3)[0, 0].tolist() == V2["manifest"]["decode_positions"][case]


@pytest.mark.parametrize("case", ["train_A_fix_stride4", "train_A_fix_stride1", "eval_C_fix_stride64"])
def test_v2pe_fractional_rotation(case):
    c = V2["cases"][case]
    res = v2pe_positions(v2pe_layout(c), delta=c["delta"])
    rows = VCT[f"v2pe/{case}/rows"]
    cos, sin = res.cos_sin(128)
    torch.testing.assert_close(rotary.inv_freq(64, res.theta), VCT[f"v2pe/{case}/inv_freq"], rtol=0, atol=0)
    torch.testing.assert_close(cos[0, rows], VCT[f"v2pe/{case}/cos"], **TOL)
    torch.testing.assert_close(sin[0, rows], VCT[f"v2pe/{case}/sin"], **TOL)
    q_rot, k_rot = apply_multimodal_rotary(VCT[f"v2pe/{case}/q"], VCT[f"v2pe/{case}/k"], cos[0, rows], sin[0, rows])
    torch.testing.assert_close(q_rot, VCT[f"v2pe/{case}/q_rot"], **TOL)
    torch.testing.assert_close(k_rot, VCT[f"v2pe/{case}/k_rot"], **TOL)


def test_v2pe_large_offsets_stay_exact():
    """Above 2**16 float32 cannot hold c + k/256 (official code: assertion failure or 129 distinct values);
    ours stays exact and the angles switch to float64."""
    for prefix, ok_in_f32 in [(40000, True), (70000, False)]:
        lay = VLMLayout([Text(prefix), Image(16, 16), Text(1)])
        res = v2pe_positions(lay, delta=1 / 256)
        vis = res.positions[0, 0, prefix:prefix + 256]
        expected = (prefix - 1) + torch.arange(1, 257, dtype=torch.float64) / 256
        assert torch.equal(vis, expected)
        assert vis.unique().numel() == 256
        assert res.positions[0, 0, -1].item() == prefix + 1  # the end marker: ceil(c + 1) + 1
        assert (torch.equal(vis.float().double(), vis)) is ok_in_f32
        cos, _ = res.cos_sin(128)
        freqs = rotary.inv_freq(64, res.theta)
        if ok_in_f32:  # exact in float32: float32 angles, bit-identical to the official V2PE module
            ref = (vis.float()[:, None] * freqs).cos()
            assert torch.equal(cos[0, prefix:prefix + 256], ref)
        else:  # float32 would round the positions: angles in float64, so 256 distinct rotations
            ref = (vis[:, None] * freqs.double()).cos()
            assert (cos[0, prefix:prefix + 256].double() - ref).abs().max().item() < 1e-6
            assert cos[0, prefix:prefix + 256, 0].unique().numel() == 256
            assert vis.float().unique().numel() < 256
    first = V2["manifest"]["float32_large_position_check"]["eval_prefix40000_stride1"]["first_visual"]
    lay = VLMLayout([Text(40000), Image(16, 16), Text(1)])
    assert v2pe_positions(lay, delta=1 / 256).positions[0, 0, 40000:40004].tolist() == first


# ----------------------------------------------------------------------------------------------------- CCA
CCA = _json(VC, "cca.json")


@pytest.mark.parametrize("grid", ["24x24", "4x4", "5x5", "6x4"])
def test_cca_ids_mask_and_decode(grid):
    g = CCA["grids"][grid]
    lay = VLMLayout([Text(g["layout"]["text_before"]), Image(g["h"], g["w"]), Text(g["layout"]["text_after"])])
    res = cca_positions(lay)
    assert torch.equal(ring_grid(g["h"], g["w"]), VCT[f"cca/{grid}/ring_grid"])
    assert torch.equal(res.positions[0, 0].long(), VCT[f"cca/{grid}/full_position_ids"])
    if "full_allowed" in g:
        full = torch.tensor(g["full_allowed"], dtype=torch.bool)
    else:
        shape = VCT["cca/24x24/full_allowed_shape"].tolist()
        bits = np.unpackbits(VCT["cca/24x24/full_allowed_packbits"].numpy())[:shape[0] * shape[1]]
        full = torch.from_numpy(bits.reshape(shape).astype(bool))
    assert torch.equal(res.attention_mask[0], full)
    p, hw = g["layout"]["text_before"], g["h"] * g["w"]
    assert int(res.attention_mask[0, p:p + hw, p:p + hw].sum()) == g.get("visual_block_allowed_nnz",
                                                                         int(full[p:p + hw, p:p + hw].sum()))
    assert res.decode_positions(3)[0, 0].tolist() == g["decode_position_ids_next3"]


def test_cca_reverse_raster_baseline():
    res = cca_positions(VLMLayout([Text(5), Image(4, 4), Text(3)]), order="reverse_raster")
    assert torch.equal(res.positions[0, 0].long(), VCT["cca/rev_4x4/full_position_ids"])
    assert torch.equal(res.attention_mask[0], VCT["cca/rev_4x4/full_allowed"])


def test_cca_llama_rotation():
    res = cca_positions(VLMLayout([Text(5), Image(4, 4), Text(3)]))
    cos, sin = res.cos_sin(128)
    assert res.theta == CCA["manifest"]["rope"]["theta"]
    torch.testing.assert_close(cos[0], VCT["cca/4x4/rope/cos"], **TOL)
    torch.testing.assert_close(sin[0], VCT["cca/4x4/rope/sin"], **TOL)
    q_rot, k_rot = apply_multimodal_rotary(VCT["cca/4x4/rope/q"], VCT["cca/4x4/rope/k"], cos[0], sin[0])
    torch.testing.assert_close(q_rot, VCT["cca/4x4/rope/q_rot"], **TOL)
    torch.testing.assert_close(k_rot, VCT["cca/4x4/rope/k_rot"], **TOL)


def test_cca_batch_gives_every_sample_the_concentric_mask():
    """The official code gives only sample 0 the CCA mask (sample 1 keeps a raster-causal block); we fix it."""
    official = VCT["cca/batch2_4x4/full_allowed"]
    res = cca_positions(VLMLayout([[Text(5), Image(4, 4), Text(3)]] * 2))
    assert torch.equal(res.attention_mask[0], official[0])
    assert torch.equal(res.attention_mask[1], official[0])
    assert not torch.equal(official[1], official[0])  # the official bug the spec describes
    assert torch.equal(res.positions[:, 0], res.positions[:, 1])
