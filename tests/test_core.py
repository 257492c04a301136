"""Layout, registry, the table cache and the rotary core."""
import pytest
import torch

import visionpe
from visionpe import Layout, create_encoder, list_encoders
from visionpe.cache import DEFAULT_MAXSIZE, TableCache
from visionpe.layout import relative_offsets
from visionpe.rotary import (angles_from_axes, angles_to_cis, apply_rotary, apply_rotary_cis, axial_freq_matrix,
                             grid_positions, inv_freq, rotary_angles, section_axes, sectioned_freq_matrix)


def test_layout_counts_and_check():
    lay = Layout((4, 5), num_prefix_tokens=3)
    assert lay.num_patches == 20 and lay.num_tokens == 23 and lay.ndim == 2
    lay.check(23)
    with pytest.raises(ValueError, match=r"21 tokens .* expects 23"):
        lay.check(21)
    assert Layout((2, 3, 4), 0).num_tokens == 24
    assert hash(Layout((4, 5), 1)) == hash(Layout([4, 5], 1))


@pytest.mark.parametrize("grid, exc", [(14, TypeError), ((14,), ValueError), ((0, 3), ValueError),
                                       ((2, 3, 4, 5), ValueError), ((2.0, 3), TypeError)])
def test_layout_rejects_bad_grids(grid, exc):
    with pytest.raises(exc, match="grid"):
        Layout(grid, 1)


def test_layout_rejects_negative_prefix():
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        Layout((2, 2), -1)


def test_registry_lists_baselines_and_hooks():
    names = list_encoders()
    for n in ["none", "learned", "sincos2d", "rope_axial", "rope_mixed", "relpos_bias"]:
        assert n in names
    assert "rope_mixed" in list_encoders("rotate") and "rope_mixed" not in list_encoders("embed")
    assert visionpe.encoder_info("relpos_bias").hooks == ("bias",)


def test_unknown_encoder_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown encoder 'ropee'.*rope_axial.*rope_mixed"):
        create_encoder("ropee", dim=64)


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['thetaa'\]"):
        create_encoder("rope_axial", dim=64, num_heads=1, thetaa=3)


def test_create_from_config_dict():
    enc = create_encoder({"name": "rope_axial", "theta": 10000.0}, dim=128, num_heads=2)
    assert enc.theta == 10000.0 and enc.encoder_name == "rope_axial"
    with pytest.raises(ValueError, match="'name' key"):
        create_encoder({"theta": 1.0}, dim=64)


def test_inv_freq_matches_classic_formula():
    d = 64
    f = inv_freq(d // 2, 10000.0)
    ref = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    torch.testing.assert_close(f, ref, rtol=1e-6, atol=0)


def test_rotary_angles_axial_and_sections():
    pos = grid_positions((3, 4))
    w = axial_freq_matrix(torch.tensor([1.0, 0.5]), 2)
    ang = rotary_angles(pos, w)
    assert ang.shape == (12, 4) and ang.dtype == torch.float32
    torch.testing.assert_close(ang[:, :2], pos[:, :1] * torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(ang[:, 2:], pos[:, 1:] * torch.tensor([1.0, 0.5]))
    w2 = sectioned_freq_matrix(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 0, -1]), 2)
    torch.testing.assert_close(rotary_angles(pos, w2)[:, 2], torch.zeros(12))
    with pytest.raises(ValueError, match="axes"):
        rotary_angles(torch.zeros(5, 3), w)


def test_rotary_angles_float64_for_large_positions():
    pos = torch.tensor([[2 ** 25 + 1]], dtype=torch.int64)
    ang = rotary_angles(pos, torch.ones(1, 1))
    assert ang.dtype == torch.float64 and ang.item() == 2 ** 25 + 1


@pytest.mark.parametrize("interleaved", [True, False])
def test_apply_rotary_is_a_rotation(interleaved):
    x = torch.randn(2, 3, 7, 16)
    ang = torch.randn(7, 8)
    y = apply_rotary(x, ang.cos(), ang.sin(), interleaved)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rotated_dot_product_depends_only_on_the_position_difference(interleaved):
    # the relative property: <R(m) q, R(n) k> is a function of m - n alone
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    freqs = inv_freq(8, 100.0).double()

    def rot(x, pos):
        ang = torch.tensor([[float(pos)]], dtype=torch.float64) * freqs          # (1, F)
        return apply_rotary(x[None], ang.cos(), ang.sin(), interleaved)[0]

    def logit(m, n):
        return rot(q, m) @ rot(k, n)

    by_delta = {}
    for delta in (-5, -1, 0, 3, 9):
        vals = torch.stack([logit(m, m + delta) for m in (0, 1, 4, 37, 250)])
        torch.testing.assert_close(vals, vals[:1].expand_as(vals), rtol=0, atol=1e-10)
        by_delta[delta] = vals[0]
    assert by_delta[0] == pytest.approx(float(q @ k), abs=1e-12)           # no rotation between equal positions
    assert len({round(float(v), 6) for v in by_delta.values()}) == len(by_delta)  # and it does see the offset


@pytest.mark.parametrize("pe", ["rope_axial", "rope_mixed", "mdlrpe_rotate"])
def test_encoder_logits_depend_only_on_the_2d_offset(pe):
    # the same content at every token: q_i . k_j is then a function of the (row, col) offset i - j alone
    torch.manual_seed(0)
    enc = create_encoder(pe, dim=32, num_heads=2, depth=1, grid_size=(4, 5), num_prefix_tokens=0).double()
    lay = Layout((4, 5), 0)
    q = torch.randn(1, 2, 1, 16, dtype=torch.float64).expand(1, 2, 20, 16)
    k = torch.randn(1, 2, 1, 16, dtype=torch.float64).expand(1, 2, 20, 16)
    with torch.no_grad():
        qr, kr = enc.rotate(q, k, lay, 0)
    logits = qr @ kr.transpose(-1, -2)                                       # (1, H, N, N)
    dr, dc = relative_offsets((4, 5))
    offset_id = (dr + 3) * 9 + (dc + 4)
    for oid in offset_id.unique():
        vals = logits[..., offset_id == oid]                                # (1, H, pairs)
        torch.testing.assert_close(vals, vals[..., :1].expand_as(vals), rtol=0, atol=1e-5)
    assert float(logits[0, 0, 0, 1]) != pytest.approx(float(logits[0, 0, 0, 5]), abs=1e-4)  # (0,-1) vs (-1,0)


def test_angles_from_axes_is_rotary_angles_with_a_sectioned_matrix():
    pos = torch.stack([torch.arange(10.0), torch.arange(10.0) * 2, torch.arange(10.0) % 3])     # (A=3, N)
    freqs = inv_freq(8, 10000.0)
    axes = torch.tensor([0, 0, 1, 2, 1, 2, -1, 0])
    got = angles_from_axes(pos, freqs, axes)
    want = rotary_angles(pos.t(), sectioned_freq_matrix(freqs, axes, 3))
    assert got.dtype == torch.float32 and torch.equal(got, want)
    # bit-identical to the reference rule position.float() * inv_freq, zero frequencies exactly 0
    ref = torch.stack([pos[a].float() * freqs[f] if a >= 0 else torch.zeros(10) for f, a in enumerate(axes.tolist())], -1)
    assert torch.equal(got, ref)
    chunks = section_axes((2, 3, 3))
    assert torch.equal(angles_from_axes(pos, freqs, chunks)[:, 2], pos[1] * freqs[2])


def test_one_precision_rule():
    w = torch.ones(1, 1)
    assert rotary_angles(torch.tensor([[3.0]], dtype=torch.float64), w).dtype == torch.float32  # exact
    assert rotary_angles(torch.tensor([[2 ** 24 + 0.5]], dtype=torch.float64), w).dtype == torch.float64
    assert rotary_angles(torch.tensor([[2 ** 24]]), w).dtype == torch.float32
    assert rotary_angles(torch.tensor([[3.0]]), w, dtype=torch.float64).dtype == torch.float64  # explicit


# -- the table cache ----------------------------------------------------------------------------------------
def test_table_cache_is_a_bounded_lru():
    cache, built = TableCache(maxsize=3), []

    def get(grid):
        return cache.get("t", grid, "cpu", torch.float32, lambda: built.append(grid) or torch.zeros(grid))

    for g in [(1, 1), (1, 2), (1, 3)]:
        get(g)
    assert get((1, 1)) is get((1, 1)) and built == [(1, 1), (1, 2), (1, 3)]  # hits build nothing
    get((1, 4))                                                                # evicts the least recent, (1, 2)
    assert len(cache) == 3 and [k[1] for k in cache.keys()] == [(1, 3), (1, 1), (1, 4)]
    get((1, 2))
    assert built[-1] == (1, 2) and len(cache) == 3
    with pytest.raises(ValueError, match="maxsize"):
        TableCache(maxsize=0)


def test_table_cache_keys_separate_device_dtype_and_inference_mode():
    cache, calls = TableCache(), []

    def get(device, dtype):
        return cache.get("t", Layout((2, 3), 1), device, dtype, lambda: calls.append((device, dtype)) or object())

    a = get("cpu", torch.float32)
    assert get("cpu", torch.float32) is a
    assert get("cuda:0", torch.float32) is not a and get("cpu", torch.bfloat16) is not a
    with torch.inference_mode():
        b = get("cpu", torch.float32)
        assert b is not a and get("cpu", torch.float32) is b
    with torch.no_grad():  # no_grad tensors are ordinary tensors: shared with grad mode
        assert get("cpu", torch.float32) is a
    assert len(calls) == 4
    # a Layout and its (grid, prefix) are the same key; another prefix count is not
    assert cache.get("t", ((2, 3), 1), "cpu", torch.float32, lambda: None) is a
    assert cache.get("t", Layout((2, 3), 0), "cpu", torch.float32, lambda: "new") == "new"


def test_encoder_tables_follow_to_dtype_and_stay_bounded():
    enc = create_encoder("sincos2d", dim=16, grid_size=(3, 4), num_prefix_tokens=1)
    lay = Layout((3, 4), 1)
    out32 = enc.embed(torch.zeros(2, 13, 16), lay)
    enc = enc.to(torch.float64)
    out64 = enc.embed(torch.zeros(2, 13, 16, dtype=torch.float64), lay)
    assert out64.dtype == torch.float64 and enc.table((3, 4), "cpu", torch.float64).dtype == torch.float64
    torch.testing.assert_close(out64.float(), out32, rtol=0, atol=1e-7)
    assert {k[3] for k in enc.table_cache.keys()} == {torch.float32, torch.float64}
    for h in range(1, 3 * DEFAULT_MAXSIZE):                                    # a run over many resolutions
        enc.embed(torch.zeros(1, 1 + 2 * h, 16), Layout((2, h), 1))
    assert len(enc.table_cache) == DEFAULT_MAXSIZE


@pytest.mark.parametrize("pe", visionpe.list_encoders())
def test_every_encoder_runs_after_to_float64(pe):
    # tables are derived, not state: after .to(dtype) they are rebuilt (fixed rotary frequencies stay float32)
    from visionpe.models import VisionPEViT
    torch.manual_seed(0)
    m = VisionPEViT(pe=pe, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3,
                    **visionpe.encoder_info(pe).model_kwargs).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        out = m.double()(x.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-5)


def test_complex_and_real_paths_agree():
    x = torch.randn(2, 3, 7, 16)
    ang = torch.randn(7, 8)
    torch.testing.assert_close(apply_rotary_cis(x, angles_to_cis(ang)), apply_rotary(x, ang.cos(), ang.sin()),
                               rtol=1e-5, atol=1e-6)
    xb = x.bfloat16()
    assert apply_rotary_cis(xb, angles_to_cis(ang)).dtype == torch.bfloat16


def test_apply_rotary_width_mismatch():
    with pytest.raises(ValueError, match="channels"):
        apply_rotary(torch.randn(2, 5, 10), torch.ones(5, 4), torch.zeros(5, 4))


@pytest.mark.slow
@pytest.mark.parametrize("pe", ["rope_axial", "mdlrpe", "relpos_bias", "sincos2d", "irpe_qkv"])
def test_cached_tables_compile_without_graph_breaks(pe):
    # cache keys are plain tuples: a Layout used as a dict key inside a compiled forward broke the graph
    from visionpe.models import VisionPEViT
    torch._dynamo.reset()
    m = VisionPEViT(pe=pe, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3).eval()
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    x = torch.rand(2, 3, 32, 32)
    for _ in range(3):  # miss, then hits
        out = compiled(x)
    torch.testing.assert_close(out, m(x), rtol=1e-5, atol=1e-6)
