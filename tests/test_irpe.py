"""iRPE: parity with the official code's vectors, the attention composite, speed paths and bad input."""
import json
import os
import re

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.optim import create_optimizer_v2

from visionpe import Layout, create_encoder
from visionpe.encoders.irpe import IRPE, convert_official_state_dict
from visionpe.irpe_buckets import bucket_ids, num_buckets, offset_table, piecewise_index, piecewise_params
from visionpe.models import VisionPEViT

from conftest import REFERENCE

REF = os.path.join(REFERENCE, "irpe")
MANIFEST = json.load(open(os.path.join(REF, "manifest.json")))
MODULE_FILES = ["irpe_module_cls1_4x5.safetensors", "irpe_module_nocls_7x7.safetensors"]
MODULE_CASES = [(f, c) for f in MODULE_FILES for c in MANIFEST["files"][f]["cases"]]
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def _load(name):
    return load_file(os.path.join(REF, name))


# -- piecewise index and bucket tables: exact ------------------------------------------------------------
def test_piecewise_index_matches_official_exactly():
    d = _load("irpe_piecewise.safetensors")
    ratios = sorted({k.split("/")[0] for k in d})
    assert len(ratios) == 6
    for r in ratios:
        alpha, beta, gamma = piecewise_params(float(r[1:]))
        assert torch.equal(piecewise_index(d[f"{r}/int_in"], alpha, beta, gamma), d[f"{r}/int_out"]), r
        assert torch.equal(piecewise_index(d[f"{r}/float_in"], alpha, beta, gamma), d[f"{r}/float_out"]), r


def test_piecewise_spec_table_ratio_1_9():
    alpha, beta, gamma = piecewise_params(1.9)
    x = torch.arange(-6, 7)
    assert piecewise_index(x, alpha, beta, gamma).tolist() == [-3, -3, -3, -2, -2, -1, 0, 1, 2, 2, 3, 3, 3]
    # float branch rounds half to even inside |x| <= alpha
    assert piecewise_index(torch.tensor([0.5, 1.5, -0.5]), alpha, beta, gamma).tolist() == [0, 2, 0]


def test_bucket_tables_14x14_match_official_exactly():
    d = _load("irpe_buckets_14x14_u8.safetensors")
    names = sorted({k.split("/")[0] for k in d})
    assert len(names) == 12
    for name in names:
        kind, ratio = name.rsplit("_r", 1)
        method, part = (kind.split("_") + [None])[:2]
        pick = (lambda t: t[0 if part == "rows" else 1]) if method == "cross" else (lambda t: t)
        ratio = float(ratio)
        assert torch.equal(pick(offset_table(method, ratio, (14, 14))), d[f"{name}/offset_table"].long()), name
        assert torch.equal(pick(bucket_ids(method, ratio, (14, 14), 0)), d[f"{name}/bucket_ids_skip0"].long()), name
        if f"{name}/bucket_ids_skip1" in d:
            assert torch.equal(pick(bucket_ids(method, ratio, (14, 14), 1)), d[f"{name}/bucket_ids_skip1"].long())
        info = MANIFEST["files"]["irpe_buckets_14x14.safetensors"]["tables"][name]
        assert num_buckets(method, ratio, 1) == info["num_buckets_skip1"]


def test_fifty_buckets_for_deit_default():
    assert num_buckets("product", 1.9, 1) == 50 and num_buckets("product", 1.9, 0) == 49
    assert num_buckets("euc", 20, 1) == 82 and num_buckets("quant", 33, 1) == 134


# -- the official modules, case by case ------------------------------------------------------------------
def _encoder_for(case, depth=1, dtype=torch.float32):
    return create_encoder("irpe", dim=24, num_heads=3, depth=depth, grid_size=(case["height"], case["width"]),
                          num_prefix_tokens=case["skip"], method=case["method"], mode=case["mode"],
                          rpe_on=case["rpe_on"], shared_head=case["shared_head"], ratio=case["ratio"],
                          ape=False).to(dtype)


@pytest.mark.parametrize("fname, name", MODULE_CASES, ids=[f"{f[12:-12]}:{c}" for f, c in MODULE_CASES])
def test_module_case_matches_official(fname, name):
    """Each official module output is reproduced through the public hooks (bias / value_term) in float32."""
    d = _load(fname)
    case = MANIFEST["files"][fname]["cases"][name]
    enc = _encoder_for(case)
    side = case["rpe_on"]
    params = {k[len(name) + 7:]: v.float() for k, v in d.items() if k.startswith(f"{name}/param/")}
    getattr(enc, f"rpe_{side}")[0].load_state_dict(params)
    layout = Layout((case["height"], case["width"]), case["skip"])
    ids = enc.bucket_ids(layout)
    if case["method"] == "cross":
        assert torch.equal(ids[0], d[f"{name}/bucket_ids_rows"]) and torch.equal(ids[1], d[f"{name}/bucket_ids_cols"])
    else:
        assert torch.equal(ids, d[f"{name}/bucket_ids"])
    x, ref = d[f"{name}/input"].float(), d[f"{name}/output"]
    s = 8 ** -0.5
    if side == "k":    # the official module gets s*q; the hook gets q and scales it itself
        out = enc.bias(x / s, x / s, layout)
    elif side == "q":  # official: rpe_q(s*k) then transposed by the attention
        out = enc.bias(x / s, x / s, layout)
        ref = ref.transpose(-1, -2)
    else:
        out = enc.value_term(x, layout)
    assert tuple(out.shape) == tuple(ref.shape)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_module_cases_cover_the_grid_of_configurations():
    cases = [MANIFEST["files"][f]["cases"][c] for f, c in MODULE_CASES]
    assert len(cases) == 60
    assert {c["method"] for c in cases} == {"euc", "quant", "cross", "product"}
    assert {(c["mode"], c["rpe_on"]) for c in cases} == {("bias", "q"), ("bias", "k"), ("contextual", "q"),
                                                          ("contextual", "k"), ("contextual", "v")}
    assert {c["shared_head"] for c in cases} == {True, False}


# -- the attention composite (official RPEAttention rules), written independently -------------------------
def _naive_ids(method, ratio, h, w, skip):
    """Bucket ids from the official 14x14 offset tables, by plain loops (independent of visionpe's code)."""
    d = _load("irpe_buckets_14x14_u8.safetensors")
    keys = ["cross_rows", "cross_cols"] if method == "cross" else [method]
    out = []
    for key in keys:
        off = d[f"{key}_r{ratio}/offset_table"].long()
        extra = off.max().item() + 1 if method == "product" else 2 * int(2 * ratio) + 1
        n = skip + h * w
        ids = torch.full((n, n), extra, dtype=torch.long)
        for i in range(h * w):
            for j in range(h * w):
                ids[skip + i, skip + j] = off[i // w - j // w + 13, i % w - j % w + 13]
        out.append(ids)
    return out


def _naive_rpe_qk(x, tables, ids_list, mode):
    """official iRPE (transposed): out[b,h,i,j] = x[b,h,i] . W[h', :, ids[i,j]]  (or T[h', ids[i,j]])."""
    out = 0
    for table, ids in zip(tables, ids_list):
        if mode == "bias":
            out = out + table[:, ids].unsqueeze(0)
        else:
            out = out + torch.einsum("bhic,hcij->bhij", x, table[:, :, ids])
    return out


def _naive_rpe_v(a, tables, ids_list):
    out = 0
    for table, ids in zip(tables, ids_list):
        out = out + torch.einsum("bhij,hijc->bhic", a, table[:, ids])
    return out


def _side_tables(enc, side):
    mod = getattr(enc, f"rpe_{side}")[0]
    mods = [mod.rp_rows, mod.rp_cols] if mod.cross else [mod]
    return [m.lookup_table_bias if m.kind == "qk_bias" else m.lookup_table_weight for m in mods]


def _official_attention(attn, enc, x, layout, method, mode, rpe_on):
    """README 'Attention composite' steps 1-6, with naive (N, N, d) lookups."""
    B, N, C = x.shape
    H, d = attn.num_heads, attn.head_dim
    s = d ** -0.5
    q, k, v = (x @ attn.qkv.weight.t() + attn.qkv.bias).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    ids = _naive_ids(method, enc.ratio, *layout.grid, layout.num_prefix_tokens)
    logits = (s * q) @ k.transpose(-1, -2)
    if "k" in rpe_on:
        logits = logits + _naive_rpe_qk(s * q, _side_tables(enc, "k"), ids, mode)
    if "q" in rpe_on:
        logits = logits + _naive_rpe_qk(s * k, _side_tables(enc, "q"), ids, mode).transpose(-1, -2)
    probs = logits.softmax(-1)
    o = probs @ v
    if "v" in rpe_on:
        o = o + _naive_rpe_v(probs, _side_tables(enc, "v"), ids)
    return o.transpose(1, 2).reshape(B, N, C) @ attn.proj.weight.t() + attn.proj.bias


ATTN_CASES = [(m, "contextual", "qkv", True, (5, 5), 1) for m in ("euc", "quant", "cross", "product")] + \
             [(m, "bias", "qk", True, (5, 5), 1) for m in ("euc", "quant", "cross", "product")] + [
    ("product", "contextual", "k", True, (7, 7), 1),
    ("product", "contextual", "qkv", False, (5, 5), 1),
    ("product", "contextual", "qkv", True, (3, 4), 2),   # two prefix tokens, non-square
    ("cross", "contextual", "qkv", False, (4, 5), 6),    # class + 5 register tokens
    ("euc", "contextual", "k", True, (3, 4), 2),
    ("quant", "contextual", "k", True, (3, 4), 2),
    ("cross", "contextual", "k", True, (3, 4), 2),
    ("product", "contextual", "k", True, (3, 4), 2),
    ("product", "contextual", "v", False, (4, 5), 1),   # values only: no logit term at all
    ("euc", "contextual", "q", False, (4, 5), 1),       # queries only: the transposed term alone
    ("quant", "bias", "qk", False, (4, 5), 0),
]


@pytest.mark.parametrize("method, mode, rpe_on, shared, grid, skip", ATTN_CASES)
def test_attention_layer_matches_official_composite(method, mode, rpe_on, shared, grid, skip):
    """PEAttention + iRPE (float64) == the official RPEAttention rules, explicit and SDPA paths alike."""
    m = VisionPEViT(pe=dict(name="irpe", method=method, mode=mode, rpe_on=rpe_on, shared_head=shared, ape=False),
                    img_size=(8 * grid[0], 8 * grid[1]), patch_size=8, embed_dim=24, depth=1, num_heads=3,
                    class_token=skip > 0, reg_tokens=max(skip - 1, 0), global_pool="token" if skip else "avg",
                    num_classes=0).double().eval()
    attn, enc = m.blocks[0].attn, m.pe
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
        for p in enc.parameters():
            p.normal_(0, 0.5)
    layout = Layout(grid, skip)
    x = torch.randn(2, layout.num_tokens, 24, dtype=torch.float64)
    ref = _official_attention(attn, enc, x, layout, method, mode, rpe_on)
    out = attn(x, layout, enc, 0)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # the other path gives the same numbers: force explicit for q/k-only configs, SDPA is used otherwise
    if "v" not in rpe_on:
        enc.needs_attn_probs = True
        torch.testing.assert_close(attn(x, layout, enc, 0), ref, rtol=1e-10, atol=1e-10)


def test_attention_float32_sdpa_equals_explicit():
    m = VisionPEViT(pe="irpe", **TINY).eval()
    with torch.no_grad():
        for t in m.pe.parameters():
            t.normal_(0, 0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        sdpa = m(x)
        m.pe.needs_attn_probs = True
        explicit = m(x)
    torch.testing.assert_close(sdpa, explicit, rtol=1e-5, atol=1e-5)


# -- model integration ---------------------------------------------------------------------------------
def test_attention_paths_sdpa_only_without_value_term(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **k):
        calls.append(k.get("attn_mask") is not None)
        return real(*a, **k)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    for name, expected in (("irpe", [True, True]), ("irpe_bias", [True, True]), ("irpe_qkv", [])):
        calls.clear()
        m = VisionPEViT(pe=name, **TINY)
        assert m.pe.needs_attn_probs == (name == "irpe_qkv")
        m(torch.randn(1, 3, 32, 32))
        assert calls == expected, name
    assert IRPE.needs_attn_probs is False  # the class attribute is untouched


def test_registered_configurations_and_timm_names():
    for name, mode, rpe_on in (("irpe", "contextual", "k"), ("irpe_qkv", "contextual", "qkv"), ("irpe_bias", "bias", "k")):
        # the registered name with a narrow, shallow body (head_dim 64 as DeiT) to keep the test fast
        m = timm.create_model(f"vpe_vit_tiny_patch16_224_{name}", num_classes=0, embed_dim=64, num_heads=1, depth=2)
        pe = m.pe
        assert (pe.method, pe.mode, pe.rpe_on, pe.shared_head, pe.ratio) == ("product", mode, rpe_on, True, 1.9)
        assert pe.num_buckets == 50 and pe.ape and len(pe.rpe_k) == 2
        if mode == "contextual":
            assert pe.rpe_k[0].lookup_table_weight.shape == (1, 64, 50)   # official DeiT-Ti checkpoint shape
    assert "vpe_vit_small_patch16_224_irpe_qkv" in timm.list_models("vpe_vit_small*")


def test_prefix_tokens_share_one_bucket_and_grid_is_never_inferred():
    enc = create_encoder("irpe", dim=24, num_heads=3, grid_size=(4, 5), num_prefix_tokens=6, method="product")
    ids = enc.bucket_ids(Layout((4, 5), 6))
    assert ids.shape == (26, 26) and enc.num_buckets == 50
    assert (ids[:6] == 49).all() and (ids[:, :6] == 49).all() and (ids[6:, 6:] < 49).all()
    # class + 4x5 (N=21) is NOT the official code's silent 4x4 + 5 prefix tokens
    d = _load("irpe_module_cls1_4x5.safetensors")
    assert torch.equal(create_encoder("irpe", dim=24, num_heads=3, grid_size=(4, 5)).bucket_ids(Layout((4, 5), 1)),
                       d["product/ctx/k/shared/bucket_ids"])
    assert not torch.equal(bucket_ids("product", 1.9, (4, 4), 5), d["product/ctx/k/shared/bucket_ids"])


def test_model_with_registers_distillation_like_prefix_and_dynamic_non_square():
    m = VisionPEViT(pe="irpe_qkv", reg_tokens=3, dynamic_img_size=True, **TINY)
    assert m.num_prefix_tokens == 4
    out = m(torch.randn(2, 3, 48, 24))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.sum().backward()
    assert m.pe.rpe_v[1].lookup_table_weight.grad is not None and m.pe.rpe_k[0].lookup_table_weight.grad is not None
    assert ("indices", ((6, 3), 4)) in {key[:2] for key in m.pe.table_cache.keys()}


def test_bucket_ids_cached_once_per_layout(monkeypatch):
    import visionpe.encoders.irpe as mod
    calls = []
    real = mod.bucket_ids
    monkeypatch.setattr(mod, "bucket_ids", lambda *a, **k: calls.append(a) or real(*a, **k))
    m = VisionPEViT(pe="irpe_qkv", **TINY)
    for _ in range(3):
        m(torch.randn(1, 3, 32, 32))
    assert len(calls) == 1   # 3 forwards x 2 blocks x (bias + value) -> one computation


def test_per_block_tables_layer_decay_and_weight_decay():
    m = VisionPEViT(pe="irpe_qkv", **TINY)
    assert m.pe.block_param_index("rpe_v.1.lookup_table_weight") == 1
    assert m.pe.block_param_index("ape.pos_embed") is None
    opt = create_optimizer_v2(m, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    for blk in range(2):
        for side in "qkv":
            g = group_of[id(getattr(m.pe, f"rpe_{side}")[blk].lookup_table_weight)]
            assert g["lr_scale"] == group_of[id(m.blocks[blk].attn.qkv.weight)]["lr_scale"]
            assert g["weight_decay"] == 0.0
    assert {"pe.ape.pos_embed", "pe.rpe_k.0.lookup_table_weight"} <= m.no_weight_decay()
    decayed = VisionPEViT(pe=dict(name="irpe", rpe_weight_decay=True), **TINY)
    assert "pe.rpe_k.0.lookup_table_weight" not in decayed.no_weight_decay()


def test_official_checkpoint_keys_convert_and_load():
    m = VisionPEViT(pe=dict(name="irpe_qkv", method="cross"), **TINY)
    official = {}
    for key, val in m.state_dict().items():
        hit = re.match(r"pe\.(rpe_[qkv])\.(\d+)\.(.+)", key)
        if hit:
            official[f"blocks.{hit.group(2)}.attn.{hit.group(1)}.{hit.group(3)}"] = torch.randn_like(val)
        elif key == "pe.ape.pos_embed":
            official["pos_embed"] = torch.randn_like(val)
        else:
            official[key] = val
    m.load_state_dict(convert_official_state_dict({"model": official}))
    assert torch.equal(m.pe.rpe_v[1].rp_cols.lookup_table_weight, official["blocks.1.attn.rpe_v.rp_cols.lookup_table_weight"])
    assert torch.equal(m.pe.ape.pos_embed, official["pos_embed"])


def test_state_dict_with_the_former_ape_key_loads():
    # iRPE used to own its APE table as `pos_embed`; it now holds a LearnedAPE (`ape.pos_embed`)
    src = VisionPEViT(pe="irpe_qkv", **TINY)
    with torch.no_grad():
        src.pe.ape.pos_embed.normal_()
    old = {("pe.pos_embed" if k == "pe.ape.pos_embed" else k): v for k, v in src.state_dict().items()}
    assert "pe.pos_embed" in old and "pe.ape.pos_embed" not in old
    m = VisionPEViT(pe="irpe_qkv", **TINY)
    m.load_state_dict(old)  # strict
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m(x), src(x), rtol=0, atol=0)
    enc = create_encoder("irpe", dim=32, num_heads=2, depth=2, grid_size=(4, 4))
    enc.load_state_dict({("pos_embed" if k == "ape.pos_embed" else k): v for k, v in src.pe.state_dict().items()
                         if not k.startswith("rpe_q") and not k.startswith("rpe_v")})
    assert torch.equal(enc.ape.pos_embed, src.pe.ape.pos_embed)
    # without an APE the old key is reported, not dropped silently
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "pe.pos_embed"'):
        VisionPEViT(pe=dict(name="irpe_qkv", ape=False), **TINY).load_state_dict(old)


def test_ape_off_and_set_input_size():
    m = VisionPEViT(pe=dict(name="irpe", ape=False), **TINY)
    assert m.pe.hooks == frozenset({"bias"}) and m.pe.ape is None and m.pe.absolute_table() is None
    assert not any("pos_embed" in k for k in m.state_dict())
    m2 = VisionPEViT(pe="irpe", **TINY)
    assert m2.pe.absolute_table() is m2.pe.ape
    m2.set_input_size((48, 32))
    assert m2.pe.ape.grid_size == m2.pe.grid_size == (6, 4)
    assert m2.pe.ape.pos_embed.shape == (1, 1 + 24, 32) and m2(torch.randn(1, 3, 48, 32)).shape == (1, 5)


def test_gradients_of_bias_and_value_term():
    enc = create_encoder("irpe", dim=8, num_heads=2, grid_size=(2, 3), num_prefix_tokens=1, method="cross",
                         rpe_on="qkv", shared_head=False, ape=False, init_std=0.5).double()
    layout = Layout((2, 3), 1)
    q = torch.randn(2, 2, 7, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 7, 4, dtype=torch.float64, requires_grad=True)
    a = torch.rand(1, 2, 7, 7, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda q, k: enc.bias(q, k, layout), (q, k), fast_mode=True)
    torch.autograd.gradcheck(lambda a: enc.value_term(a, layout), (a,), fast_mode=True)


def test_bf16_forward_backward():
    m = VisionPEViT(pe=dict(name="irpe_qkv", init_std=0.1), **TINY)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
    m = m.to(torch.bfloat16)
    out = m(x.bfloat16())
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert m.pe.rpe_v[0].lookup_table_weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


# -- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0, -1.9, float("nan")])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio must be a finite number > 0"):
        create_encoder("irpe", dim=24, num_heads=3, ratio=ratio)


def test_bad_ratio_type():
    with pytest.raises(TypeError, match="ratio must be a positive number"):
        create_encoder("irpe", dim=24, num_heads=3, ratio="1.9")


def test_unknown_method():
    with pytest.raises(ValueError, match=r"unknown iRPE method 'diagonal'; expected one of"):
        create_encoder("irpe", dim=24, num_heads=3, method="diagonal")


@pytest.mark.parametrize("mode", ["contextal", None])
def test_unknown_mode(mode):
    with pytest.raises(ValueError, match="unknown iRPE mode"):
        create_encoder("irpe", dim=24, num_heads=3, mode=mode)


@pytest.mark.parametrize("rpe_on, match", [("kx", r"invalid letters \['x'\]"), ("", "non-empty"), ("QK", "invalid"),
                                           ("kk", "distinct")])
def test_bad_rpe_on(rpe_on, match):
    with pytest.raises(ValueError, match=match):
        create_encoder("irpe", dim=24, num_heads=3, rpe_on=rpe_on)


def test_bad_rpe_on_type_and_bias_on_values():
    with pytest.raises(TypeError, match="rpe_on must be a str"):
        create_encoder("irpe", dim=24, num_heads=3, rpe_on=["k"])
    with pytest.raises(ValueError, match="only in contextual mode"):
        create_encoder("irpe", dim=24, num_heads=3, mode="bias", rpe_on="kv")


def test_bad_layouts():
    enc = create_encoder("irpe", dim=24, num_heads=3, grid_size=(4, 5), num_prefix_tokens=1)
    q = torch.randn(1, 3, 21, 8)
    with pytest.raises(ValueError, match=r"21 tokens but the layout expects 17"):
        enc.bias(q, q, Layout((4, 4), 1))
    with pytest.raises(ValueError, match="2D layout grid"):
        enc.bias(torch.randn(1, 3, 25, 8), None, Layout((2, 3, 4), 1))
    no_prefix = create_encoder("irpe", dim=24, num_heads=3, grid_size=(4, 5), num_prefix_tokens=0)
    with pytest.raises(ValueError, match="no prefix bucket"):
        no_prefix.bias(q, q, Layout((4, 5), 1))
    with pytest.raises(ValueError, match="2D grids"):
        create_encoder("irpe", dim=24, num_heads=3, grid_size=(2, 4, 5))
    with pytest.raises(ValueError, match="pos_embed was built for 1"):
        enc.embed(torch.randn(1, 22, 24), Layout((4, 5), 2))


# -- torch.compile ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torch_compile_forward_backward():
    torch._dynamo.reset()
    m = VisionPEViT(pe=dict(name="irpe_qkv", method="cross", init_std=0.1), **TINY)
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    ref.sum().backward()
    g_ref = m.pe.rpe_v[0].rp_rows.lookup_table_weight.grad.clone()
    m.zero_grad()
    out = torch.compile(m)(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.pe.rpe_v[0].rp_rows.lookup_table_weight.grad, g_ref, rtol=1e-4, atol=1e-5)
