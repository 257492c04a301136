"""VLM position schemes against slow per-token reference loops written from the specs, their options
(transformers versions, VRoPE order, HoPE gamma / decode, V2PE delta rules, CCA grids and batches), the
rotary allocations, and bad input."""
import math

import numpy as np
import pytest
import torch

from visionpe import rotary
from visionpe.vlm import (Hybrid, Image, Padding, Sections, SingleAxis, Text, Video, VLMLayout,
                          causal_mask_from_positions, cca_positions, choose_delta, delta_from_stride, hope_positions,
                          mrope_positions, rope1d_positions, rotary_cos_sin, v2pe_positions, vlm_positions,
                          vrope_positions)
from visionpe.vlm.v2pe import V2PE_DELTAS


# ------------------------------------------------------------------ slow references: one token at a time
def _tokens(seg):
    """(f, r, c) of every token of a vision segment, frame-major then row-major."""
    t = seg.t if isinstance(seg, Video) else seg.tiles
    return [(f, r, c) for f in range(t) for r in range(seg.h) for c in range(seg.w)]


def slow_mrope(segs, variant, compat="reference", tps=2):
    out, nxt = [], 0
    top = -1
    for s in segs:
        if isinstance(s, Text):
            out += [(nxt + k,) * 3 for k in range(s.n)]
            top, nxt = max(top, nxt + s.n - 1), nxt + s.n
            continue
        T = s.t if isinstance(s, Video) else 1
        M = max(s.h, s.w)
        if variant == "qwen3vl":
            out += [(nxt + f * M, nxt + f * M + r, nxt + f * M + c) for f, r, c in _tokens(s)]
            top, nxt = nxt + T * M - 1, nxt + T * M
            continue

        def tid(f):
            if variant != "qwen25vl" or not isinstance(s, Video):
                return f
            spg = np.float32(s.seconds_per_frame)
            if compat == "transformers4.57":
                return f * int(spg) * tps
            if compat == "transformers5":
                return int(np.float32(f) * np.float32(spg * np.float32(tps)))
            return int(np.float32(np.float32(f) * spg) * np.float32(tps))
        block = [(nxt + tid(f), nxt + r, nxt + c) for f, r, c in _tokens(s)]
        out += block
        mx = max(max(p) for p in block)
        top = max(top, mx)
        nxt = nxt + M if compat == "transformers5" else mx + 1
    return out, top + 1


def slow_vrope(segs):
    out, nxt = [], 0
    for s in segs:
        if isinstance(s, Text):
            out += [(nxt + k,) * 4 for k in range(s.n)]
            nxt += s.n
            continue
        H, W = s.h, s.w
        out += [tuple(nxt + f * (H + W - 1) + v for v in (r + c, r + W - 1 - c, H - 1 - r + c, H - 1 - r + W - 1 - c))
                for f, r, c in _tokens(s)]
        nxt += (s.t if isinstance(s, Video) else 1) * (H + W - 1)
    return out, nxt


def slow_hope(segs, gammas):
    out, nxt, gi = [], 0.0, 0
    for s in segs:
        if isinstance(s, Text):
            out += [(nxt + k,) * 3 for k in range(s.n)]
            nxt += s.n
            continue
        g = gammas[gi]
        gi += 1
        for f, r, c in _tokens(s):
            t = nxt + g * f
            out.append((t, t + r - (s.h - 1) // 2, t + c - (s.w - 1) // 2))
        nxt = nxt + g * ((s.t if isinstance(s, Video) else 1) - 1) + 1
    return out, nxt


def slow_v2pe(segs, deltas):
    out, c, di = [], -1, 0
    for s in segs:
        if isinstance(s, Text):
            for _ in range(s.n):
                c += 1
                out.append((float(c),))
            continue
        d = deltas[di]
        di += 1
        n = s.num_tokens
        out += [(c + k * d,) for k in range(1, n + 1)]
        c = math.ceil(c + n * d)
    return out, c + 1


def slow_cca(segs):
    out, nxt = [], 0
    for s in segs:
        if isinstance(s, Text):
            out += [(nxt + k,) for k in range(s.n)]
            nxt += s.n
            continue
        rings = (min(s.h, s.w) + 1) // 2
        out += [(nxt + f * rings + min(r, c, s.h - 1 - r, s.w - 1 - c),) for f, r, c in _tokens(s)]
        nxt += (s.t if isinstance(s, Video) else s.tiles) * rings
    return out, nxt


def random_segments(g, allow_tiles=False):
    segs = [Text(int(torch.randint(1, 4, (1,), generator=g)))]
    for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
        h, w = torch.randint(1, 7, (2,), generator=g).tolist()
        kind = int(torch.randint(0, 3 if allow_tiles else 2, (1,), generator=g))
        if kind == 0:
            segs.append(Image(h, w))
        elif kind == 1:
            segs.append(Video(int(torch.randint(1, 6, (1,), generator=g)), h, w,
                              [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2 / 3][int(torch.randint(0, 7, (1,), generator=g))]))
        else:
            segs.append(Image(h, w, tiles=int(torch.randint(2, 4, (1,), generator=g))))
        if torch.rand((), generator=g) < 0.8:
            segs.append(Text(int(torch.randint(1, 4, (1,), generator=g))))
    return segs


def assert_matches(res, slow_out, slow_next, b=0):
    keep = res.padding_mask[b]
    got = res.positions[:, b, keep].double().T
    assert torch.equal(got, torch.tensor(slow_out, dtype=torch.float64))
    assert res.next_position[b].item() == slow_next


@pytest.mark.parametrize("variant", ["qwen2vl", "qwen25vl", "qwen3vl"])
@pytest.mark.parametrize("compat", ["reference", "transformers4.57", "transformers5"])
def test_mrope_matches_slow_reference(variant, compat):
    g = torch.Generator().manual_seed(len(variant) * 31 + len(compat))
    for _ in range(12):
        seqs = [random_segments(g) for _ in range(3)]
        res = mrope_positions(VLMLayout(seqs, padding_side="left"), variant, compat=compat)
        for b, segs in enumerate(seqs):
            out, top1 = slow_mrope(segs, variant, compat)
            keep = res.padding_mask[b]
            assert torch.equal(res.positions[:, b, keep].double().T, torch.tensor(out, dtype=torch.float64))
            assert res.rope_delta[b].item() == top1 - res.length  # HF: global max + 1 - padded length
            fill = 0.0 if compat == "transformers5" else 1.0
            assert bool((res.positions[:, b, ~keep] == fill).all())


def test_vrope_hope_v2pe_cca_match_slow_references():
    g = torch.Generator().manual_seed(11)
    for _ in range(15):
        seqs = [random_segments(g) for _ in range(2)]
        lay = VLMLayout(seqs, padding_side="right")
        nv = [sum(not isinstance(s, Text) for s in segs) for segs in seqs]
        res = vrope_positions(lay)
        for b, segs in enumerate(seqs):
            assert_matches(res, *slow_vrope(segs), b=b)
        gammas = [0.5 + 0.25 * (i % 5) for i in range(sum(nv))]
        res = hope_positions(lay, gamma=gammas)
        for b, segs in enumerate(seqs):
            assert_matches(res, *slow_hope(segs, gammas[sum(nv[:b]):]), b=b)
        deltas = [V2PE_DELTAS[i % 9] for i in range(sum(nv))]
        res = v2pe_positions(lay, delta=deltas)
        for b, segs in enumerate(seqs):
            assert_matches(res, *slow_v2pe(segs, deltas[sum(nv[:b]):]), b=b)
        tiled = [random_segments(g, allow_tiles=True) for _ in range(2)]
        res = cca_positions(VLMLayout(tiled, padding_side="left"))
        for b, segs in enumerate(tiled):
            assert_matches(res, *slow_cca(segs), b=b)
        res = rope1d_positions(lay)
        for b, segs in enumerate(seqs):
            n = sum(s.num_tokens for s in segs)
            assert_matches(res, [(float(i),) for i in range(n)], n, b=b)


# ------------------------------------------------------------------------------------------- M-RoPE
def test_mrope_text_only_equals_plain_rope_and_large_positions_use_float64():
    res = mrope_positions(VLMLayout([Text(7)]), "qwen2vl")
    assert torch.equal(res.positions, torch.arange(7.0).expand(3, 1, 7))
    assert res.positions.dtype == torch.float32  # exact: small integers
    # Qwen2.5-VL absolute time can push positions past 2**24 with few tokens: float64, exact
    lay = VLMLayout([Text(2), Video(3, 1, 1, seconds_per_frame=2.0 ** 23), Text(2)])
    res = mrope_positions(lay, "qwen25vl")
    assert res.positions.dtype == torch.float64
    assert res.positions[0, 0].tolist() == [0, 1, 2, 2 + 2 ** 24, 2 + 2 ** 25, 3 + 2 ** 25, 4 + 2 ** 25]
    cos, _ = res.cos_sin(128)
    ref = (res.positions[0, 0, -1] * rotary.inv_freq(64, res.theta).double()).cos()
    assert (cos[0, -1].double() - ref).abs().max() < 1e-6  # float64 angles: 2**25 + 3 is not a float32


def test_mrope_qwen25_fps_above_4_collapses_temporal_ids():
    """Spec 1.3 / Qwen3-VL#1031: with tokens_per_second 2 and fps > 4 several temporal patches share an id."""
    res = mrope_positions(VLMLayout([Video.at_fps(6, 1, 1, fps=8)]), "qwen25vl")
    assert res.positions[0, 0].tolist() == [0, 0, 1, 1, 2, 2]


def test_mrope_bad_options():
    lay = VLMLayout([Text(2), Image(2, 2)])
    with pytest.raises(ValueError, match="unknown mrope variant 'qwen4vl'"):
        mrope_positions(lay, "qwen4vl")
    with pytest.raises(ValueError, match="compat must be one of"):
        mrope_positions(lay, compat="transformers6")
    with pytest.raises(ValueError, match="tokens_per_second must be > 0"):
        mrope_positions(lay, "qwen25vl", tokens_per_second=0)
    with pytest.raises(ValueError, match="segment 1 is an image of 3 tiles"):
        mrope_positions(VLMLayout([Text(2), Image(2, 2, tiles=3)]))
    with pytest.raises(ValueError, match="unknown scheme 'rope3d'"):
        vlm_positions(lay, "rope3d")


@pytest.mark.parametrize("alloc, head_dim, match", [
    (Sections((16, 24, 24)), 96, r"sections \(16, 24, 24\) sum to 64 rotary frequencies but head_dim=96 has 48"),
    (Sections((24, 20, 20), True), 64, r"sum to 64 rotary frequencies but head_dim=64 has 32"),
    (Sections((4, 20, 8), True), 64, r"axis 1 needs frequency index 58 but there are only 32"),
    (Hybrid((16, 24, 24)), 64, r"HoPE sections \(16, 24, 24\) sum to 64 rotary frequencies but head_dim=64"),
    (Sections((16, 24, 24)), 127, r"head_dim divisible by 2; got head_dim=127"),
])
def test_head_dim_the_sections_do_not_fit(alloc, head_dim, match):
    pos = torch.zeros(3, 1, 4)
    with pytest.raises(ValueError, match=match):
        rotary_cos_sin(pos, alloc, head_dim, 1e6)


def test_positions_and_allocation_axes_must_agree():
    with pytest.raises(ValueError, match=r"positions have 1 axes .* expects 3"):
        rotary_cos_sin(torch.zeros(1, 1, 4), Sections(), 128, 1e6)
    with pytest.raises(ValueError, match=r"HoPE sections must be \(temporal, s, s\)"):
        Hybrid((16, 20, 28))


# ---------------------------------------------------------------------------------- rotary allocations
def test_section_allocations():
    chunked = rotary.section_axes((16, 24, 24))
    assert chunked.tolist() == [0] * 16 + [1] * 24 + [2] * 24
    inter = rotary.section_axes((24, 20, 20), interleaved=True)
    assert [int((inter == a).sum()) for a in range(3)] == [24, 20, 20]
    assert inter[:6].tolist() == [0, 1, 2, 0, 1, 2] and inter[60:].tolist() == [0, 0, 0, 0]
    assert rotary.cyclic_axes(6, (0, 2, 3, 1)).tolist() == [0, 2, 3, 1, 0, 2]
    hyb = Hybrid((16, 24, 24)).axis_of_freq(64)
    assert hyb[:4].tolist() == [1, 2, 1, 2] and hyb[48:].tolist() == [-1] * 16
    assert Hybrid((16, 24, 24), "t").axis_of_freq(64)[48:].tolist() == [0] * 16
    assert SingleAxis().axis_of_freq(5).tolist() == [0] * 5


def test_interleaved_and_chunked_agree_on_text_but_not_on_images():
    """Spec section 7: text-only tests cannot catch an allocation bug; images do."""
    text = mrope_positions(VLMLayout([Text(9)]), "qwen3vl").positions
    img = mrope_positions(VLMLayout([Text(2), Image(3, 4)]), "qwen3vl").positions
    for pos, same in [(text, True), (img, False)]:
        a = rotary_cos_sin(pos, Sections((24, 20, 20), True), 128, 5e6)[0]
        b = rotary_cos_sin(pos, Sections((24, 20, 20), False), 128, 5e6)[0]
        assert torch.equal(a, b) is same


def test_angles_from_axes_zero_frequencies_and_precision():
    pos = torch.tensor([[3.0, 5.0], [7.0, 11.0]], dtype=torch.float64)
    freqs = torch.tensor([1.0, 0.5, 0.25])
    ang = rotary.angles_from_axes(pos, freqs, torch.tensor([1, -1, 0]))
    assert ang.dtype == torch.float32  # exact in float32
    assert ang.tolist() == [[7.0, 0.0, 0.75], [11.0, 0.0, 1.25]]
    fine = torch.tensor([[70000 + 1 / 256]], dtype=torch.float64)
    assert rotary.angles_from_axes(fine, freqs[:1], torch.tensor([0])).dtype == torch.float64
    assert rotary.exact_in_float32(torch.tensor([2 ** 24])) and not rotary.exact_in_float32(torch.tensor([2 ** 24 + 1]))
    with pytest.raises(ValueError, match="reads axis 2 but positions have 2 axes"):
        rotary.angles_from_axes(pos, freqs, torch.tensor([2, 0, 0]))


# ------------------------------------------------------------------------------------------------ VRoPE
def test_vrope_paper_order_and_properties():
    lay = VLMLayout([Text(3), Video(4, 3, 5), Text(2)])
    res = vrope_positions(lay)
    paper = vrope_positions(lay, channel_order="paper")
    assert torch.equal(res.positions, paper.positions)  # same four arrangements...
    assert paper.allocation.axis_of_freq(8).tolist() == [0, 2, 3, 1, 0, 2, 3, 1]  # ...channels 1-3 permuted
    a, b = res.cos_sin(16)[0], paper.cos_sin(16)[0]
    assert torch.equal(a[..., 0::4], b[..., 0::4]) and not torch.equal(a, b)
    H, W = 3, 5
    vid = res.positions[:, 0, 3:3 + 4 * H * W].view(4, 4, H * W)
    centres = vid.mean(-1)  # every frame's centre lies on the text axis, for all four arrangements
    expected = 3 + (H + W - 2) / 2 + torch.arange(4) * (H + W - 1)
    assert torch.allclose(centres, expected.expand(4, 4).double().float().to(centres.dtype))
    assert res.positions[0, 0, -2].item() == 3 + 4 * (H + W - 1)  # text continues one stride on
    with pytest.raises(ValueError, match="channel_order must be one of"):
        vrope_positions(lay, channel_order="reversed")


# ------------------------------------------------------------------------------------------------- HoPE
def test_hope_gamma_options_and_decode():
    lay = VLMLayout([Text(2), Video(3, 2, 2), Text(1), Image(2, 2), Text(1), Video(2, 1, 3), Text(1)])
    g = torch.Generator().manual_seed(0)
    r1 = hope_positions(lay, gamma="random", generator=g)
    r2 = hope_positions(lay, gamma="random", generator=torch.Generator().manual_seed(0))
    assert torch.equal(r1.positions, r2.positions)
    steps = r1.positions[0, 0, 2:2 + 12].view(3, 4)[:, 0].diff()  # temporal stride of the first video
    assert steps[0].item() in (0.5, 0.75, 1.0, 1.25, 1.5) and steps[0] == steps[1]
    fixed = hope_positions(lay, gamma=[1.5, 7.0, 0.75])  # the image's gamma has no effect (T = 1)
    assert torch.equal(fixed.positions, hope_positions(lay, gamma=[1.5, 1.0, 0.75]).positions)
    nxt = fixed.next_position.item()
    assert fixed.decode_positions(2)[:, 0].tolist() == [[nxt, nxt + 1]] * 3
    release = hope_positions(lay, gamma=1.5, decode="zeros")
    assert torch.equal(release.positions, hope_positions(lay, gamma=1.5).positions)
    assert release.decode_positions(3).abs().sum().item() == 0  # the released generate path: all zeros
    with pytest.raises(ValueError, match="decode must be 'continue' or 'zeros'"):
        hope_positions(lay, decode="bug")


@pytest.mark.parametrize("gamma", [0, -1.0, float("nan"), [1.0, 1.0, -0.5]])
def test_hope_gamma_must_be_positive(gamma):
    lay = VLMLayout([Text(2), Video(3, 2, 2), Image(2, 2), Video(2, 1, 3)])
    with pytest.raises(ValueError, match=r"gamma must be > 0.0; got"):
        hope_positions(lay, gamma=gamma)


def test_per_block_values_must_match_the_block_count():
    lay = VLMLayout([Text(2), Video(3, 2, 2), Text(1)])
    with pytest.raises(ValueError, match="gamma has 2 values but the layout has 1 vision blocks"):
        hope_positions(lay, gamma=[1.0, 1.5])
    with pytest.raises(ValueError, match="delta must be a number, a sequence"):
        v2pe_positions(lay, delta="adaptive")


# ------------------------------------------------------------------------------------------------- V2PE
@pytest.mark.parametrize("delta", [0, -0.25, 1.5, float("inf"), [0.5, 2.0]])
def test_v2pe_delta_must_be_in_unit_interval(delta):
    lay = VLMLayout([Text(2), Image(4, 4), Text(1), Image(2, 2)])
    with pytest.raises(ValueError, match=r"delta must be \(0.0, 1.0\]; got"):
        v2pe_positions(lay, delta=delta)


def test_v2pe_training_draw_auto_rule_and_ceil():
    lay = VLMLayout([Text(3), Image(16, 16, tiles=2), Text(2), Image(16, 16), Text(1)])
    res = v2pe_positions(lay, delta="random", generator=torch.Generator().manual_seed(5))
    steps = res.positions[0, 0].diff()
    assert set(steps[3:3 + 511].tolist()) <= set(V2PE_DELTAS)  # uniform over {1, ..., 1/256}, per image
    assert choose_delta(lay, 6 + 3 * 256).item() == 1.0
    assert choose_delta(lay, 6 + 3 * 128).item() == 0.5
    assert choose_delta(lay, 6 + 3 * 128 - 1).item() == 0.25
    assert choose_delta(lay, 9).item() == 1 / 256
    auto = v2pe_positions(lay, delta="auto", max_positions=400)
    assert auto.next_position.item() <= 400 and torch.equal(auto.positions, v2pe_positions(lay, delta=0.5).positions)
    with pytest.raises(ValueError, match="needs 9 positions even with delta=0.00390625, more than max_positions=8"):
        choose_delta(lay, 8)
    with pytest.raises(ValueError, match="delta='auto' needs max_positions"):
        v2pe_positions(lay, delta="auto")
    # ceil after a run whose length * delta is fractional: 3 tokens at 1/2 -> c jumps by 2
    odd = v2pe_positions(VLMLayout([Text(1), Image(1, 3), Text(1)]), delta=0.5)
    assert odd.positions[0, 0].tolist() == [0.0, 0.5, 1.0, 1.5, 3.0]
    assert delta_from_stride(64) == 0.25
    with pytest.raises(ValueError, match="need 0 < stride <= tokens_per_tile"):
        delta_from_stride(512)


# -------------------------------------------------------------------------------------------------- CCA
@pytest.mark.parametrize("h,w", [(1, 1), (1, 5), (5, 1), (3, 3), (5, 5), (7, 3), (3, 8), (6, 4), (24, 24)])
def test_cca_rings_and_mask_for_any_grid(h, w):
    res = cca_positions(VLMLayout([Text(2), Image(h, w), Text(2)]))
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ring = torch.minimum(torch.minimum(i, j), torch.minimum(h - 1 - i, w - 1 - j)).reshape(-1)
    vis = res.positions[0, 0, 2:2 + h * w]
    assert torch.equal(vis, 2 + ring.float())
    assert res.positions[0, 0, -2].item() == 2 + (min(h, w) + 1) // 2
    block = res.attention_mask[0, 2:2 + h * w, 2:2 + h * w]
    assert torch.equal(block, ring[None, :] <= ring[:, None])  # a ring sees itself and all outer rings
    assert bool(res.attention_mask[0, 2:, :2].all()) and not bool(res.attention_mask[0, :2, 2:].any())


def test_cca_batch_with_padding_and_two_images():
    seqs = [[Text(3), Image(4, 4), Text(2)], [Text(1), Image(3, 5), Text(1), Image(2, 2), Text(2)]]
    res = cca_positions(VLMLayout(seqs, padding_side="left"))
    for b, segs in enumerate(seqs):
        single = cca_positions(VLMLayout(segs))
        keep = res.padding_mask[b]
        assert torch.equal(res.positions[0, b, keep], single.positions[0, 0])
        assert torch.equal(res.attention_mask[b][keep][:, keep], single.attention_mask[0])
        assert not bool(res.attention_mask[b][keep][:, ~keep].any())  # nobody attends to padding
        assert bool(res.attention_mask[b].any(-1).all())  # and no row is fully masked
    # the second image sees the whole first image (our multi-image extension: causal on positions)
    m = res.attention_mask[1][res.padding_mask[1]][:, res.padding_mask[1]]
    assert bool(m[17:21, 1:16].all())


def test_causal_mask_from_positions_is_causal_for_increasing_positions():
    pos = torch.arange(6.0)[None]
    mask = causal_mask_from_positions(pos, torch.ones(1, 6, dtype=torch.bool))
    assert torch.equal(mask[0], torch.ones(6, 6, dtype=torch.bool).tril())


def test_decode_positions_checks_past_length():
    res = rope1d_positions(VLMLayout([Text(4), Padding(2)]))
    assert res.decode_positions(2, past_length=7)[0, 0].tolist() == [5.0, 6.0]
    with pytest.raises(ValueError, match="past_length=3 is shorter than the prompt"):
        res.decode_positions(1, past_length=3)
