"""The flex path (visionpe.flex, visionpe.attn_impl) equals the SDPA path: bucket ids, forward, backward, masks.

Tolerance: float32, ``rtol = atol = 1e-5`` elementwise on outputs and on the attention's gradients (q, k, v,
the encoders' tables). Whole models (the plumbing: prefix tokens, blocks, gradients reaching the tables) are
compared in float64 to 1e-10: in float32 a small model's parameter gradients carry noise above 1e-5 relative
through LayerNorms and residual sums whichever kernel runs (both paths differ from a float64 run alike).
torch's FlexAttention has no CPU backward, so on CPU the gradients are those of the row-block path (the same
terms on blocks of query rows, visionpe.flex_rows); the flex kernel's own backward is checked on CUDA in
``test_gpu.py``. Most tests run torch's unfused flex reference (``visionpe.flex.COMPILE_KERNEL = False``) so that
many configurations need no compile each; the ``slow`` tests run the compiled kernel.
"""
import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_mask

import visionpe
from visionpe import Layout, create_encoder
import visionpe.flex
from visionpe import attn_impl
from visionpe.attn_impl import has_flex_path, resolve_attn_impl
from visionpe.encoders.relpos import relative_position_index
from visionpe.flex import (BucketBias, flex_attention_terms, grid_buckets, padding_block_mask,
                           position_causal_block_mask, score_mod_for, terms_rows)
from visionpe import flex_rows
from visionpe.flex import value_rows
from visionpe.flex_rows import explicit_rows_attention, flex_attention_cpu_train, rows_attention
from visionpe.models import VisionPEViT

ROOT = Path(__file__).resolve().parent.parent
TOL = dict(rtol=1e-5, atol=1e-5)
GRIDS = [(3, 5), (4, 2), (1, 6)]
PREFIX = [0, 1, 2, 3, 4]
IRPE_CFGS = [
    dict(name="irpe"),                                                         # contextual on k, product
    dict(name="irpe_bias"),                                                    # bias on k
    dict(name="irpe", method="cross", rpe_on="qk", shared_head=False),         # two tables, both sides
    dict(name="irpe", mode="bias", method="euc", rpe_on="qk", ratio=1.5),
    dict(name="irpe", method="quant", rpe_on="q", shared_head=False),          # q side only (transposed)
    dict(name="irpe", mode="bias", method="cross", rpe_on="q"),
]
ENCODER_CFGS = [dict(name="relpos_bias")] + IRPE_CFGS


def _encoder(cfg, grid, prefix, heads=3, dim=24):
    # iRPE tables need a prefix bucket whenever the layout has prefix tokens
    enc = create_encoder(dict(cfg), dim=dim, num_heads=heads, depth=2, grid_size=grid,
                         num_prefix_tokens=prefix)
    with torch.no_grad():
        for p in enc.parameters():  # iRPE tables start at zero: give every term something to show
            p.normal_(0, 0.5)
    return enc


def _qkv(layout, B=2, H=3, d=8):
    return [torch.randn(B, H, layout.num_tokens, d, requires_grad=True) for _ in range(3)]


F64 = dict(rtol=1e-10, atol=1e-10)


def assert_grads_close(model_ref, model, **tol):
    """Every parameter gradient of ``model`` equals ``model_ref``'s (``torch.testing.assert_close``)."""
    n = 0
    for (name, pa), pb in zip(model_ref.named_parameters(), model.parameters()):
        if pa.grad is None:
            assert pb.grad is None, name
            continue
        torch.testing.assert_close(pb.grad, pa.grad, **tol, msg=lambda m: f"{name}: {m}")
        n += 1
    assert n > 0


@pytest.fixture
def eager_kernel(monkeypatch):
    """The flex path with torch's unfused reference kernel (no compile per configuration)."""
    monkeypatch.setattr(visionpe.flex, "COMPILE_KERNEL", False)


def _sdpa_and_flex_models(pe, dtype=None, eval_mode=False, **kw):
    """Two copies of one ``VisionPEViT`` (encoder tables drawn from N(0, 0.5), so every term shows): ``attn_impl``
    ``"sdpa"`` and ``"flex"``; in ``dtype`` (default float32), in eval mode if ``eval_mode``."""
    a = VisionPEViT(pe=pe, attn_impl="sdpa", **kw)
    a = a.to(dtype) if dtype is not None else a
    a = a.eval() if eval_mode else a
    with torch.no_grad():
        for p in a.pe.parameters():
            p.normal_(0, 0.5)
    b = copy.deepcopy(a)
    b.set_attn_impl("flex")
    return a, b


def _cfg_id(cfg):
    return "-".join(str(v) for v in cfg.values())


# -- bucket ids from coordinates == the encoders' cached (N, N) ids ------------------------------------------
@pytest.mark.parametrize("grid", GRIDS + [(5, 5)])
@pytest.mark.parametrize("prefix", PREFIX)
def test_relpos_grid_buckets_equal_relative_position_index(grid, prefix):
    enc = _encoder(dict(name="relpos_bias"), grid, prefix)
    layout = Layout(grid, prefix)
    q = torch.zeros(1, 3, layout.num_tokens, 8)
    (term,) = enc.flex_terms(q, q, layout)
    n = torch.arange(layout.num_tokens)
    ids = term.buckets.ids(0, n[:, None], n[None, :])
    assert torch.equal(ids, relative_position_index(grid, prefix))


@pytest.mark.parametrize("cfg", IRPE_CFGS, ids=_cfg_id)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("prefix", [0, 1, 4])
def test_irpe_grid_buckets_equal_bucket_ids(cfg, grid, prefix):
    enc = _encoder(cfg, grid, prefix)
    layout = Layout(grid, prefix)
    q = torch.zeros(1, 3, layout.num_tokens, 8)
    bk = enc.flex_terms(q, q, layout)[0].buckets
    n = torch.arange(layout.num_tokens)
    ids = torch.stack([bk.ids(t, n[:, None], n[None, :]) for t in range(bk.num_tables)])
    expected = enc.bucket_ids(layout).view(-1, layout.num_tokens, layout.num_tokens)
    shift = torch.arange(expected.shape[0]).view(-1, 1, 1) * enc.num_buckets  # merged-table ids
    assert torch.equal(ids, expected + shift)


# -- forward: flex kernel == SDPA with the materialised bias ----------------------------------------------------
@pytest.mark.parametrize("cfg", ENCODER_CFGS, ids=_cfg_id)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("prefix", PREFIX)
def test_flex_forward_equals_sdpa(cfg, grid, prefix):
    enc = _encoder(cfg, grid, prefix)
    layout = Layout(grid, prefix)
    q, k, v = _qkv(layout)
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=enc.bias(q, k, layout, 1))
        terms = enc.flex_terms(q, k, layout, 1)
        out = flex_attention_terms(q, k, v, terms, compile_kernel=False)
        rows = rows_attention(q, k, v, terms, rows_per_block=4)
        # the terms on query rows are the SDPA bias itself
        full = terms_rows(terms, torch.arange(layout.num_tokens), layout.num_tokens)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(rows, ref, **TOL)
    torch.testing.assert_close(full.expand_as(enc.bias(q, k, layout, 1)), enc.bias(q, k, layout, 1), **TOL)


# -- backward: the CPU flex path's gradients (q, k, v, tables) == SDPA's -----------------------------------------
def _assert_leaf_grads_close(enc, ref, got, label=""):
    """Gradients to q, k, v and every parameter of ``enc`` (in that order) equal the reference's (``TOL``);
    returns the names of those compared (a leaf without a reference gradient must have none, or zeros)."""
    compared = []
    for (name, _), g_ref, g in zip([("q", 0), ("k", 0), ("v", 0)] + list(enc.named_parameters()), ref, got):
        if g_ref is None:
            assert g is None or not g.any(), name
            continue
        torch.testing.assert_close(g, g_ref, **TOL, msg=lambda m: f"{label}{name}: {m}")
        compared.append(name)
    return compared


@pytest.mark.parametrize("cfg", ENCODER_CFGS, ids=_cfg_id)
@pytest.mark.parametrize("grid,prefix", [((3, 5), 0), ((4, 2), 1), ((1, 6), 2), ((3, 5), 3), ((2, 3), 4)])
def test_flex_path_backward_equals_sdpa(cfg, grid, prefix):
    enc = _encoder(cfg, grid, prefix)
    layout = Layout(grid, prefix)
    q, k, v = _qkv(layout)
    w = torch.randn(2, 3, layout.num_tokens, 8)
    leaves = [q, k, v] + list(enc.parameters())
    ref_out = F.scaled_dot_product_attention(q, k, v, attn_mask=enc.bias(q, k, layout, 0))
    ref = torch.autograd.grad((ref_out * w).sum(), leaves, allow_unused=True)
    paths = {"flex forward, blockwise backward": lambda terms: flex_attention_cpu_train(
                 q, k, v, terms, rows_per_block=5, compile_kernel=False),
             "checkpointed SDPA row blocks": lambda terms: rows_attention(q, k, v, terms, rows_per_block=5)}
    for path, fn in paths.items():
        out = fn(enc.flex_terms(q, k, layout, 0))
        got = torch.autograd.grad((out * w).sum(), leaves, allow_unused=True)
        torch.testing.assert_close(out, ref_out, **TOL)
        compared = _assert_leaf_grads_close(enc, ref, got, f"{path}, ")
        assert any(n.startswith(("tables", "rpe_")) for n in compared), path  # block 0's table(s) got their gradient


# -- value terms (irpe_qkv) on blocks of query rows == the full-matrix explicit path -----------------------------
VALUE_CFGS = [
    dict(name="irpe_qkv"),                                                     # product, shared heads
    dict(name="irpe", method="cross", rpe_on="qkv", shared_head=False),        # two tables, per head
    dict(name="irpe", method="euc", rpe_on="kv", ratio=1.5),
    dict(name="irpe", method="quant", rpe_on="v", shared_head=False),           # the value term only
]


def _explicit_reference(enc, q, k, v, layout, block, mask=None, drop=None):
    """The full-matrix explicit path (models.vit.PEAttention with attn_impl="sdpa" and a value term)."""
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    bias = enc.bias(q, k, layout, block)
    if bias is not None:
        attn = attn + bias
    if mask is not None:
        attn = attn.masked_fill(~mask, float("-inf"))
    attn = attn.softmax(-1)
    if drop is not None:
        attn = drop(attn)
    return attn @ v + enc.value_term(attn, layout, block)


@pytest.mark.parametrize("cfg", VALUE_CFGS, ids=_cfg_id)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("prefix", PREFIX)
def test_value_rows_equal_value_term(cfg, grid, prefix):
    enc = _encoder(cfg, grid, prefix)
    layout = Layout(grid, prefix)
    n = layout.num_tokens
    p = torch.randn(2, 3, n, n).softmax(-1)
    ref = enc.value_term(p, layout, 1)
    (term,) = enc.flex_value_terms(layout, 1)
    blocks = [value_rows(term, p[:, :, a:a + 4], torch.arange(a, min(a + 4, n))) for a in range(0, n, 4)]
    torch.testing.assert_close(torch.cat(blocks, 2), ref, **TOL)


@pytest.mark.parametrize("cfg", VALUE_CFGS, ids=_cfg_id)
@pytest.mark.parametrize("grid,prefix", [((3, 5), 0), ((4, 2), 1), ((1, 6), 2), ((3, 5), 3), ((2, 3), 4)])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_explicit_rows_forward_backward_equal_full_explicit_path(cfg, grid, prefix, masked):
    """Forward (with and without gradients) and gradients to q, k, v and every table, blocks of 5 rows."""
    enc = _encoder(cfg, grid, prefix)
    layout = Layout(grid, prefix)
    q, k, v = _qkv(layout)
    n = layout.num_tokens
    mask = torch.rand(2, 1, n, n) > 0.3 if masked else None
    if mask is not None:
        mask |= torch.eye(n, dtype=torch.bool)  # no fully masked row
    w = torch.randn(2, 3, n, 8)
    leaves = [q, k, v] + list(enc.parameters())
    ref_out = _explicit_reference(enc, q, k, v, layout, 0, mask)
    ref = torch.autograd.grad((ref_out * w).sum(), leaves, allow_unused=True)
    out = explicit_rows_attention(q, k, v, enc.flex_terms(q, k, layout, 0), enc.flex_value_terms(layout, 0),
                                  mask, rows_per_block=5)
    got = torch.autograd.grad((out * w).sum(), leaves, allow_unused=True)
    with torch.no_grad():  # the in-place, one-buffer blocks
        out_ng = explicit_rows_attention(q, k, v, enc.flex_terms(q, k, layout, 0), enc.flex_value_terms(layout, 0),
                                         mask, rows_per_block=5)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(out_ng, ref_out, **TOL)
    compared = _assert_leaf_grads_close(enc, ref, got)
    assert any(n.startswith("rpe_v.0") for n in compared)  # block 0's value table(s) got their gradient


def test_explicit_rows_dropout_matches_full_path_and_recomputes_the_same_mask():
    """Attention dropout: one block draws the full path's mask (same seed); with many blocks, each checkpointed
    block's recomputation in backward redraws its forward mask, so the gradients equal those of the same blocks
    run without checkpointing."""
    enc = _encoder(dict(name="irpe_qkv"), (3, 4), 1)
    layout = Layout((3, 4), 1)
    q, k, v = _qkv(layout)
    n = layout.num_tokens
    leaves = [q, k, v] + list(enc.parameters())
    args = lambda: (q, k, v, enc.flex_terms(q, k, layout, 0), enc.flex_value_terms(layout, 0))  # noqa: E731
    torch.manual_seed(7)
    ref = _explicit_reference(enc, q, k, v, layout, 0, drop=torch.nn.Dropout(0.3))
    torch.manual_seed(7)
    one = explicit_rows_attention(*args(), dropout_p=0.3, training=True, rows_per_block=n)
    torch.testing.assert_close(one, ref, **TOL)
    torch.manual_seed(8)
    out = explicit_rows_attention(*args(), dropout_p=0.3, training=True, rows_per_block=3)
    got = torch.autograd.grad(out.pow(2).sum(), leaves, allow_unused=True)
    torch.manual_seed(8)
    q_, k_, v_, terms, values = args()
    plain = torch.cat([flex_rows._explicit_block(q_[:, :, a:a + 3], k_, v_, a, min(a + 3, n), torch.arange(a, min(a + 3, n)),
                                                 tuple(terms), (None,) * len(terms), tuple(values), None, 0.3, True, True)
                       for a in range(0, n, 3)], 2)
    want = torch.autograd.grad(plain.pow(2).sum(), leaves, allow_unused=True)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    for g, g_want in zip(got, want):
        if g_want is not None:
            torch.testing.assert_close(g, g_want, **TOL)
    with torch.no_grad():  # not training: no dropout
        torch.testing.assert_close(explicit_rows_attention(*args(), dropout_p=0.3, training=False),
                                   _explicit_reference(enc, q, k, v, layout, 0), **TOL)


# -- the model: attn_impl="flex" == "sdpa", forward and backward, non-square, 0..4 prefix tokens ----------------
@pytest.mark.parametrize("pe", ["relpos_bias", "irpe_bias", "irpe", "irpe_qkv",
                                {"name": "irpe", "method": "cross", "rpe_on": "qk", "shared_head": False},
                                {"name": "irpe", "method": "cross", "rpe_on": "qkv", "shared_head": False}],
                         ids=["relpos_bias", "irpe_bias", "irpe", "irpe_qkv", "irpe_cross_qk", "irpe_cross_qkv"])
@pytest.mark.parametrize("class_token,reg_tokens", [(False, 0), (True, 0), (True, 3), (False, 2)])
def test_model_flex_equals_sdpa_forward_backward(pe, class_token, reg_tokens, eager_kernel, monkeypatch):
    # blocks of 16 query rows (the smallest), so the row-block paths run several blocks on 15-19 tokens
    monkeypatch.setattr(flex_rows, "ROWS_PER_HEAD_DIM", 0)
    monkeypatch.setattr(flex_rows, "EXPLICIT_ROWS_PER_HEAD_DIM", 0)
    kw = dict(img_size=(40, 24), patch_size=8, embed_dim=24, depth=2, num_heads=3, num_classes=4,
              class_token=class_token, reg_tokens=reg_tokens, global_pool="avg" if not class_token else "token")
    a, b = _sdpa_and_flex_models(pe, dtype=torch.float64, **kw)
    x = torch.randn(2, 3, 40, 24, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(b.forward_features(x), a.forward_features(x), **F64)
    out_a, out_b = a.forward_features(x), b.forward_features(x)
    torch.testing.assert_close(out_b, out_a, **F64)
    out_a.pow(2).sum().backward()
    out_b.pow(2).sum().backward()
    assert_grads_close(a, b, **F64)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in b.named_parameters() if n.startswith("pe."))


@pytest.mark.slow
@pytest.mark.parametrize("pe,class_token,reg_tokens", [
    ("relpos_bias", False, 0),
    ("irpe", True, 3),
    ({"name": "irpe", "mode": "bias", "method": "cross", "rpe_on": "qk", "shared_head": False}, False, 2),
], ids=["relpos_bias-P0", "irpe-P4", "irpe_bias_cross_qk-P2"])
def test_model_compiled_flex_kernel_forward(pe, class_token, reg_tokens):
    """The compiled flex kernel, two resolutions, non-square; and the CPU training path on it."""
    kw = dict(img_size=(48, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
              class_token=class_token, reg_tokens=reg_tokens, global_pool="token" if class_token else "avg",
              dynamic_img_size=True)
    a, b = _sdpa_and_flex_models(pe, eval_mode=True, **kw)
    with torch.no_grad():
        for shape in ((48, 32), (40, 56)):
            x = torch.randn(2, 3, *shape)
            torch.testing.assert_close(b.forward_features(x), a.forward_features(x), **TOL)
    # training: the compiled kernel's forward (with log-sum-exp) and the blockwise backward, as accurate as
    # SDPA: each gradient's distance to a float64 SDPA run within twice SDPA's own float32 distance (+1e-6 rel)
    x = torch.randn(2, 3, 40, 56)
    c = copy.deepcopy(a).double()
    out_a, out_b = a.train().forward_features(x), b.train().forward_features(x)
    torch.testing.assert_close(out_b, out_a, **TOL)
    for m, xx in ((a, x), (b, x), (c.train(), x.double())):
        m.forward_features(xx).pow(2).sum().backward()
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        if pc.grad is None:
            continue
        err_sdpa = (pa.grad.double() - pc.grad).abs().max().item()
        err_flex = (pb.grad.double() - pc.grad).abs().max().item()
        assert err_flex <= 2 * err_sdpa + 1e-6 * pc.grad.abs().max().item(), (name, err_flex, err_sdpa)


# -- masks ------------------------------------------------------------------------------------------------------
def test_position_causal_block_mask_equals_cca_mask_and_attention():
    from visionpe.vlm import Image, Text, VLMLayout
    from visionpe.vlm import vlm_positions
    from visionpe.vlm.positions import causal_mask_from_positions
    lay = VLMLayout([[Text(3), Image(4, 5), Text(2)], [Image(3, 3), Text(4)]], padding_side="right")
    res = vlm_positions(lay, "cca")
    pos, real = res.positions[0], res.padding_mask
    dense = causal_mask_from_positions(pos, real)
    assert torch.equal(res.attention_mask, dense) and not real.all()  # padding rows are exercised
    bm = position_causal_block_mask(pos, real, block_size=8)
    B, L = pos.shape
    assert torch.equal(create_mask(bm.mask_mod, B, 1, L, L, device="cpu")[:, 0], dense)
    q, k, v = [torch.randn(B, 2, L, 8) for _ in range(3)]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None])
    with torch.no_grad():
        torch.testing.assert_close(flex_attention_terms(q, k, v, (), bm, compile_kernel=False), ref, **TOL)
        torch.testing.assert_close(flex_attention_terms(q, k, v, (), dense[:, None], compile_kernel=False), ref, **TOL)
        torch.testing.assert_close(rows_attention(q, k, v, (), bm, rows_per_block=7), ref, **TOL)


def test_model_block_mask_and_dense_mask_with_bias_encoder_forward_backward(eager_kernel):
    """A padding BlockMask on the flex path == the same dense mask on SDPA (bias encoder, prefix tokens)."""
    kw = dict(img_size=(32, 24), patch_size=8, embed_dim=24, depth=2, num_heads=3, num_classes=0, reg_tokens=1)
    a, b = _sdpa_and_flex_models("irpe", dtype=torch.float64, **kw)
    N = 2 + 4 * 3
    valid = torch.ones(2, N, dtype=torch.bool)
    valid[1, -5:] = False
    dense = valid[:, None, None, :].expand(2, 1, N, N)
    x = torch.randn(2, 3, 32, 24, dtype=torch.float64)
    ref = a.forward_features(x, attn_mask=dense)
    got = b.forward_features(x, attn_mask=padding_block_mask(valid, block_size=8))
    got_dense = b.forward_features(x, attn_mask=dense)
    torch.testing.assert_close(got, ref, **F64)
    torch.testing.assert_close(got_dense, ref, **F64)
    ref.pow(2).sum().backward()
    got.pow(2).sum().backward()
    assert_grads_close(a, b, **F64)
    # "sdpa" densifies a BlockMask
    torch.testing.assert_close(a.forward_features(x, attn_mask=padding_block_mask(valid, block_size=8)), ref, **F64)


# -- attn_impl: the rule, the plumbing, bad input --------------------------------------------------------------
def test_attn_impl_paths():
    relpos = create_encoder("relpos_bias", dim=24, num_heads=3, grid_size=(4, 4))
    qkv = create_encoder("irpe_qkv", dim=24, num_heads=3, grid_size=(4, 4))
    learned = create_encoder("learned", dim=24, num_heads=3, grid_size=(4, 4))
    assert has_flex_path(relpos) and has_flex_path(qkv) and not has_flex_path(learned)
    small, large = torch.zeros(1, 3, 17, 8), torch.zeros(1, 3, 4097, 8)
    assert resolve_attn_impl("sdpa", relpos, large) == "sdpa"
    assert resolve_attn_impl("flex", relpos, small) == "flex"
    # nothing to gain (no logit term): not flex
    assert resolve_attn_impl("flex", learned, large) == "sdpa"
    # a value term: its explicit path on row blocks, which has attention dropout
    assert resolve_attn_impl("flex", qkv, large) == "flex"
    assert resolve_attn_impl("flex", qkv, small, dropout_p=0.1) == "flex"
    assert resolve_attn_impl("sdpa", qkv, large) == "sdpa"
    qkv_no_hook = create_encoder("irpe_qkv", dim=24, num_heads=3, grid_size=(4, 4))
    qkv_no_hook.flex_value_terms = None  # an encoder that needs the probabilities but has no row-block path
    assert not has_flex_path(qkv_no_hook) and resolve_attn_impl("flex", qkv_no_hook, large) == "sdpa"
    assert resolve_attn_impl("auto", relpos, large, dropout_p=0.1) == "sdpa"
    with pytest.raises(ValueError, match="attention dropout"):
        resolve_attn_impl("flex", relpos, small, dropout_p=0.1)
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        resolve_attn_impl("fast", relpos, small)


def test_auto_rule_decides_by_tokens_device_gradients_compile_and_encoder(monkeypatch):
    relpos = create_encoder("relpos_bias", dim=24, num_heads=3, grid_size=(4, 4))
    irpe = create_encoder("irpe", dim=24, num_heads=3, grid_size=(4, 4))
    monkeypatch.setattr(attn_impl, "AUTO_MIN_TOKENS", {("cpu", "fwd", False): {"relpos_bias": 50, "irpe": None},
                                                        ("cpu", "fwdbwd", False): {"relpos_bias": 80, "irpe": 60}})

    def pick(n, grad=False, device="cpu", pe=relpos):
        q = torch.zeros(1, 3, n, 8, device=device, requires_grad=grad)
        return resolve_attn_impl("auto", pe, q)
    assert [pick(49), pick(50), pick(4097)] == ["sdpa", "flex", "flex"]                     # forward
    assert [pick(50, grad=True), pick(79, grad=True), pick(80, grad=True)] == ["sdpa", "sdpa", "flex"]
    with torch.no_grad():
        assert pick(49, grad=True) == "sdpa" and pick(50, grad=True) == "flex"  # no gradients flow: forward rule
    assert [pick(4097, pe=irpe), pick(59, grad=True, pe=irpe), pick(60, grad=True, pe=irpe)] == ["sdpa", "sdpa", "flex"]
    # a configuration other than the registered default, or an encoder without an entry: SDPA
    irpe_other = create_encoder("irpe", dim=24, num_heads=3, grid_size=(4, 4), shared_head=False)
    irpe_bias = create_encoder("irpe_bias", dim=24, num_heads=3, grid_size=(4, 4))
    assert attn_impl.auto_encoder_name(irpe_other) is None and attn_impl.auto_encoder_name(irpe_bias) is None
    assert pick(4097, grad=True, pe=irpe_other) == "sdpa" and pick(4097, pe=irpe_bias) == "sdpa"
    assert pick(4097, device="meta") == "sdpa"                                  # a device not measured: SDPA
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert pick(4097) == "sdpa" and pick(4097, grad=True) == "sdpa"             # inside torch.compile: SDPA


def test_auto_thresholds_are_the_committed_sweeps_crossovers():
    """``AUTO_MIN_TOKENS`` is the sweep's measured crossover per encoder and mode (bench_sweep.flex_crossover of
    the committed file), and at each threshold the decision on that encoder flips from SDPA to flex."""
    from visionpe.eval.bench_sweep import BIAS_ENCODERS, flex_crossover
    results = json.loads((ROOT / attn_impl.AUTO_RESULTS).read_text())
    assert results["complete"] and results["meta"]["device"] == "cpu"
    assert set(attn_impl.AUTO_MIN_TOKENS) == {("cpu", "fwd", False), ("cpu", "fwdbwd", False)}
    largest = max(results["tokens"].values())
    for (device, mode, compiled), table in attn_impl.AUTO_MIN_TOKENS.items():
        assert sorted(table) == sorted(e for e in BIAS_ENCODERS if f"{e}@flex" in results["rows"])
        for name, threshold in table.items():
            assert threshold == flex_crossover(results, mode, [name]), (mode, name)
            pe = create_encoder(name, dim=24, num_heads=3, grid_size=(4, 4))
            assert attn_impl.auto_encoder_name(pe) == name
            sizes = [threshold - 1, threshold, largest] if threshold is not None else [largest]
            got = [resolve_attn_impl("auto", pe, torch.zeros(1, 3, n, 8, requires_grad=mode == "fwdbwd"))
                   for n in sizes]
            assert got == (["sdpa", "flex", "flex"] if threshold is not None else ["sdpa"]), (mode, name)


def test_model_kwarg_timm_name_and_set_attn_impl():
    import timm
    m = timm.create_model("vpe_vit_tiny_patch16_224_relpos_bias", attn_impl="flex", num_classes=0)
    assert m.attn_impl == "flex" and all(b.attn.attn_impl == "flex" for b in m.blocks)
    m.set_attn_impl("sdpa")
    assert all(b.attn.attn_impl == "sdpa" for b in m.blocks)
    assert VisionPEViT(pe="learned", img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=3).attn_impl == "auto"
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        VisionPEViT(pe="learned", img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=3, attn_impl="flash")
    with pytest.raises(ValueError, match="attention dropout"):
        mm = VisionPEViT(pe="relpos_bias", img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=3,
                         attn_drop_rate=0.1, attn_impl="flex")
        mm.train()(torch.randn(1, 3, 32, 32))


def test_bad_inputs():
    layout = Layout((3, 4), 1)
    with pytest.raises(ValueError, match=r"offsets must be \(T, 2h-1, 2w-1\) = \(T, 5, 7\)"):
        grid_buckets(layout, torch.zeros(7, 5, dtype=torch.long), [0, 1, 2])
    with pytest.raises(ValueError, match="prefix_ids must be"):
        grid_buckets(layout, torch.zeros(5, 7, dtype=torch.long), [0, 1])
    with pytest.raises(TypeError, match="offsets must be an int64 tensor"):
        grid_buckets(layout, [[0]], [0, 1, 2])
    with pytest.raises(ValueError, match="2D layout grid"):
        grid_buckets(Layout((2, 3, 4), 0), torch.zeros(3, 5, 7, dtype=torch.long), [0, 1, 2])
    with pytest.raises(TypeError, match="visionpe.Layout"):
        grid_buckets((3, 4), torch.zeros(5, 7, dtype=torch.long), [0, 1, 2])
    q = torch.zeros(2, 3, 13, 8)
    with pytest.raises(ValueError, match=r"attn_mask must be \(B\|1, H\|1, L, S\)"):
        flex_attention_terms(q, q, q, (), torch.zeros(2, 3, 13, 12, dtype=torch.bool), compile_kernel=False)
    with pytest.raises(TypeError, match="bool .* or floating"):
        flex_attention_terms(q, q, q, (), torch.zeros(1, 1, 13, 13, dtype=torch.long), compile_kernel=False)
    with pytest.raises(ValueError, match=r"q must be a \(B, H, L, d\)"):
        flex_attention_terms(q[0], q, q, ())
    with pytest.raises(ValueError, match=r"valid must be a \(B, N\) bool"):
        padding_block_mask(torch.ones(2, 5))
    with pytest.raises(ValueError, match="padding_mask must be a bool tensor"):
        position_causal_block_mask(torch.zeros(2, 5), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape="):
        score_mod_for([], torch.zeros(1, 1, 3, 3))
    with pytest.raises(ValueError, match="rows_per_block"):
        rows_attention(q, q, q, (), rows_per_block=0)
    enc = create_encoder("irpe", dim=24, num_heads=3, grid_size=(3, 4), num_prefix_tokens=0)
    with pytest.raises(ValueError, match="no prefix bucket"):
        enc.flex_terms(torch.zeros(1, 3, 13, 8), torch.zeros(1, 3, 13, 8), layout)
    relpos = create_encoder("relpos_bias", dim=24, num_heads=3, grid_size=(3, 4))
    with pytest.raises(ValueError, match="layout expects 13"):
        relpos.flex_terms(torch.zeros(1, 3, 12, 8), torch.zeros(1, 3, 12, 8), layout)
    assert isinstance(relpos.flex_terms(torch.zeros(1, 3, 13, 8), torch.zeros(1, 3, 13, 8), layout)[0], BucketBias)


@pytest.mark.slow
def test_compiled_model_value_term_row_blocks_forward_backward():
    """``torch.compile`` of a whole model (aot_eager: autograd traced through the checkpointed blocks) with
    ``irpe_qkv`` on its row-block path equals the eager SDPA path, forward and gradients."""
    kw = dict(img_size=(48, 32), patch_size=8, embed_dim=24, depth=2, num_heads=3, num_classes=0, reg_tokens=1)
    a, b = _sdpa_and_flex_models("irpe_qkv", dtype=torch.float64, **kw)
    compiled = torch.compile(b, backend="aot_eager")
    x = torch.randn(2, 3, 48, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), a.eval()(x), **F64)
    out_a, out_b = a.train()(x), compiled.train()(x)
    torch.testing.assert_close(out_b, out_a, **F64)
    out_a.pow(2).sum().backward()
    out_b.pow(2).sum().backward()
    assert_grads_close(a, b, **F64)


def test_row_block_paths_edge_cases(monkeypatch):
    """What a review of the row-block paths found: the default block size is read at call time; a frozen model
    evaluated with autograd on takes the in-place, unchecked path; an additive mask of another dtype works with
    gradients too; a layout of another token count is refused on the value path; the flex kernel refuses
    dropout."""
    monkeypatch.setattr(flex_rows, "ROWS_PER_HEAD_DIM", 1)
    assert flex_rows.default_rows(32) == 32 and flex_rows.default_rows(8) == 16
    enc = _encoder(dict(name="irpe_qkv"), (3, 4), 1)
    layout = Layout((3, 4), 1)
    q, k, v = (t.detach() for t in _qkv(layout))
    args = lambda: (q, k, v, enc.flex_terms(q, k, layout, 0), enc.flex_value_terms(layout, 0))  # noqa: E731
    ref = _explicit_reference(enc, q, k, v, layout, 0)
    enc.requires_grad_(False)

    def no_checkpoint(*a, **kw):
        raise AssertionError("checkpointed although no gradient flows")
    with monkeypatch.context() as m:
        m.setattr(flex_rows, "checkpoint", no_checkpoint)
        out = explicit_rows_attention(*args(), rows_per_block=5)   # autograd on, nothing requires a gradient
    torch.testing.assert_close(out, ref, **TOL)
    assert not out.requires_grad
    enc.requires_grad_(True)
    qb, kb, vb = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
    mask = torch.zeros(1, 1, layout.num_tokens, layout.num_tokens)          # float32, additive
    out = explicit_rows_attention(qb, kb, vb, enc.flex_terms(qb, kb, layout, 0),
                                  enc.flex_value_terms(layout, 0, dtype=torch.bfloat16), mask, rows_per_block=5)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert qb.grad is not None
    from visionpe.attn_impl import pe_flex_attention
    with pytest.raises(ValueError, match="layout expects 13"):
        pe_flex_attention(q[:, :, :12], k[:, :, :12], v[:, :, :12], enc, layout)
    relpos = _encoder(dict(name="relpos_bias"), (3, 4), 1)
    with pytest.raises(ValueError, match="no attention dropout"):
        pe_flex_attention(q, k, v, relpos, layout, dropout_p=0.1, training=True)


@pytest.mark.parametrize("pe,grad", [("irpe", True), ("irpe_qkv", True), ("irpe_qkv", False)])
def test_row_block_paths_trace_without_graph_breaks(pe, grad):
    """Under torch.compile the row blocks (with gradients on CPU: ``rows_attention``; a value term:
    ``explicit_rows_attention``) are bounded by Python ints: one graph, no break (a block bound read back from a
    tensor breaks the graph in every block)."""
    m = VisionPEViT(pe=pe, attn_impl="flex", img_size=(48, 32), patch_size=8, embed_dim=24, depth=2, num_heads=3)
    x = torch.randn(2, 3, 48, 32)
    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        explained = torch._dynamo.explain(m)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
