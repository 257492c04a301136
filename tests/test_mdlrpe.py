"""MD-LRPE (cosine and rotate forms) and MD-TPE: golden-vector parity, relative property, softmax and linear
attention, 2D and 3D grids, prefix tokens, bad input."""
import hashlib
import json
import math
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from visionpe import Layout, create_encoder
from visionpe.encoders.mdlrpe import (MDLRPE, cosine_theta_init, md_lrpe_cosine, md_lrpe_linear_attention,
                                      md_lrpe_rotate, rotate_theta_init)
from visionpe.encoders.mdtpe import MDTPE, MDTPEWithMDLRPE, md_tpe_kernel
from visionpe.models import VisionPEViT
from visionpe.rotary import grid_positions, inv_freq, rotary_angles, rotate_interleaved, rotation_table

REF = os.path.join(os.path.dirname(__file__), "reference", "mdlrpe")
MANIFEST = json.load(open(os.path.join(REF, "manifest.json")))["files"]
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
ENCODERS = ["mdlrpe", "mdlrpe_rotate", "mdtpe", "mdtpe_mdlrpe"]


def case(name):
    meta = MANIFEST[name + ".safetensors"]["meta"]
    return load_file(os.path.join(REF, name + ".safetensors")), meta


def test_reference_files_match_manifest():
    for name, entry in MANIFEST.items():
        with open(os.path.join(REF, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == entry["sha256"], name


# -- parity: cosine form -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cosine_md_2d_4x5", "cosine_md_2d_4x5_cls1", "cosine_md_3d_2x3x4",
                                  "cosine_md_2d_4x5_base10000"])
def test_cosine_form_matches_vectors(name):
    t, meta = case(name)
    out = md_lrpe_cosine(t["x"], t["theta"], json.loads(meta["grid_shape"]), int(meta["l_prefix"]))
    torch.testing.assert_close(out, t["out"], rtol=1e-5, atol=1e-6)


def test_cosine_encoder_default_theta_and_transform_match_vector():
    t, meta = case("cosine_md_2d_4x5_base10000")
    torch.testing.assert_close(cosine_theta_init(2, 4), t["theta"], rtol=1e-6, atol=0)
    enc = create_encoder("mdlrpe", dim=16, num_heads=2, grid_size=(4, 5), num_prefix_tokens=0)
    assert enc.form == "cosine" and enc.block_width == 4
    torch.testing.assert_close(enc.transform(t["x"], Layout((4, 5), 0)), t["out"], rtol=1e-5, atol=1e-6)
    q, k = enc.rotate(t["x"], t["x"], Layout((4, 5), 0))
    torch.testing.assert_close(k, t["out"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q, t["out"] * math.sqrt(2), rtol=1e-5, atol=1e-6)


def test_cosine_encoder_3d_with_prefix_matches_function():
    t, _ = case("cosine_md_3d_2x3x4")
    enc = create_encoder("mdlrpe", dim=16, num_heads=2, grid_size=(2, 3, 4), num_prefix_tokens=2)
    assert enc.block_width == 3                                          # ceil(8/3); col axis gets 2 channels
    x = torch.cat([torch.randn(2, 2, 2, 8), t["x"]], dim=2)
    out = enc.transform(x, Layout((2, 3, 4), 2))
    torch.testing.assert_close(out, md_lrpe_cosine(x, enc.theta, (2, 3, 4), 2))
    torch.testing.assert_close(out[:, :, :2], F.pad(x[:, :, :2], (0, 8)))   # prefix: [x || 0]


# -- parity: rotate form -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rotate_md_2d_4x5", "rotate_md_3d_2x3x4_d12"])
def test_rotate_form_matches_vectors(name):
    t, meta = case(name)
    grid, d = tuple(json.loads(meta["grid_shape"])), int(meta["d"])
    torch.testing.assert_close(rotate_theta_init(2, d), t["theta"], rtol=1e-6, atol=0)
    torch.testing.assert_close(md_lrpe_rotate(t["x"], t["theta"], grid), t["out"], rtol=1e-5, atol=1e-6)
    enc = create_encoder("mdlrpe_rotate", dim=2 * d, num_heads=2, grid_size=grid, num_prefix_tokens=0)
    lay = Layout(grid, 0)
    torch.testing.assert_close(enc._angles(lay, 0, "cpu"), t["angles"], rtol=1e-5, atol=1e-6)
    q, k = enc.rotate(t["x"], t["x"].flip(0), lay)
    torch.testing.assert_close(q, t["out"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k, t["out"].flip(0), rtol=1e-5, atol=1e-6)


def test_rotate_prefix_tokens_are_not_rotated():
    enc = create_encoder("mdlrpe_rotate", dim=24, num_heads=2, grid_size=(2, 3, 4), num_prefix_tokens=1)
    x = torch.randn(2, 2, 25, 12)
    q, k = enc.rotate(x, x, Layout((2, 3, 4), 1))
    torch.testing.assert_close(q[:, :, 0], x[:, :, 0])
    torch.testing.assert_close(q[:, :, 1:], md_lrpe_rotate(x[:, :, 1:], rotate_theta_init(2, 12), (2, 3, 4)))


def test_legacy_lrpe2d_sees_only_row_plus_col_and_md_lrpe_does_not():
    """The LRPE-era 2D use (one theta rotating the same channels by row and by column) is reproduced with the
    rotary core; it cannot tell anti-diagonal neighbours apart, MD-LRPE can."""
    t, _ = case("legacy_lrpe2d_4x5")
    d = 8
    theta = inv_freq(d // 2, 10000.0)
    w = torch.stack([theta, theta])                                     # both axes drive every pair
    table = rotation_table(rotary_angles(grid_positions((4, 5)), w))
    out = rotate_interleaved(t["x"].flatten(2, 3), table).unflatten(2, (4, 5))
    torch.testing.assert_close(out, t["out"], rtol=1e-5, atol=1e-6)
    q = torch.randn(1, 1, 1, d).expand(1, 1, 20, d)
    legacy = rotate_interleaved(q, table)[0, 0]
    md = md_lrpe_rotate(q, rotate_theta_init(1, d), (4, 5))[0, 0]
    # tokens (0, 1) and (1, 0): flattened 1 and 5
    torch.testing.assert_close(legacy[1], legacy[5])
    assert not torch.allclose(md[1], md[5])


# -- the relative property -------------------------------------------------------------------------------
@pytest.mark.parametrize("pe, grid", [("mdlrpe", (4, 5)), ("mdlrpe", (2, 3, 4)), ("mdlrpe_rotate", (4, 5)),
                                      ("mdlrpe_rotate", (2, 3, 4))])
def test_scores_depend_only_on_per_axis_offsets(pe, grid):
    enc = create_encoder(pe, dim=48, num_heads=2, grid_size=grid, num_prefix_tokens=0)
    lay = Layout(grid, 0)
    n = math.prod(grid)
    q0, k0 = torch.randn(2, 24).double(), torch.randn(2, 24).double()
    qt = enc.transform(q0[None, :, None].expand(1, 2, n, 24).float(), lay).double()
    kt = enc.transform(k0[None, :, None].expand(1, 2, n, 24).float(), lay).double()
    scores = qt[0] @ kt[0].transpose(-1, -2)                           # (H, N, N)
    pos = grid_positions(grid).long()
    off = pos[:, None] - pos[None, :]                                  # (N, N, A)
    key = {}
    for p in range(n):                                                 # group pairs by offset: equal scores
        for r in range(n):
            key.setdefault(tuple(off[p, r].tolist()), []).append(scores[:, p, r])
    for vals in key.values():
        vals = torch.stack(vals)
        torch.testing.assert_close(vals, vals[:1].expand_as(vals), rtol=1e-4, atol=1e-4)
    if pe == "mdlrpe":                                                 # = sum_j q_j k_j cos(A_p - A_r)
        ang = enc._angles(lay, 0, "cpu").double()                      # (H, N, d)
        ref = torch.einsum("hj,hprj->hpr", q0 * k0, torch.cos(ang[:, :, None] - ang[:, None, :]))
        torch.testing.assert_close(scores, ref, rtol=1e-4, atol=1e-4)


# -- softmax attention -------------------------------------------------------------------------------------
def test_cosine_form_keeps_the_original_attention_scale():
    """SDPA on the widened q, k (default scale 1/sqrt(2d)) equals softmax(q'.k' / sqrt(d)) v."""
    enc = create_encoder("mdlrpe", dim=32, num_heads=2, grid_size=(3, 4), num_prefix_tokens=1)
    lay = Layout((3, 4), 1)
    q, k, v = (torch.randn(2, 2, 13, 16) for _ in range(3))
    rq, rk = enc.rotate(q, k, lay)
    assert rq.shape == (2, 2, 13, 32) and rk.shape == (2, 2, 13, 32)
    got = F.scaled_dot_product_attention(rq, rk, v)
    tq, tk = enc.transform(q, lay), enc.transform(k, lay)
    ref = ((tq @ tk.transpose(-1, -2)) / math.sqrt(16)).softmax(-1) @ v
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pe", ENCODERS)
def test_vit_forward_backward_dynamic_non_square(pe):
    m = VisionPEViT(pe=pe, dynamic_img_size=True, reg_tokens=2, **TINY)
    out = m(torch.randn(2, 3, 48, 24))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.sum().backward()
    assert m.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert f"vpe_vit_small_patch16_224_{pe}" in timm.list_models("vpe_vit_small*")
    named = timm.create_model(f"vpe_vit_tiny_patch16_224_{pe}", num_classes=0)
    assert named.pe_name == pe and type(named.pe) is {"mdlrpe": MDLRPE, "mdlrpe_rotate": MDLRPE, "mdtpe": MDTPE,
                                                       "mdtpe_mdlrpe": MDTPEWithMDLRPE}[pe]


def test_bf16_and_compile_clean():
    m = VisionPEViT(pe="mdlrpe", **TINY).to(torch.bfloat16)
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    out = m(x)
    assert out.dtype == torch.bfloat16 and m.pe.theta.dtype == torch.float32
    ref = VisionPEViT(pe="mdlrpe", **TINY)
    ref.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    torch.testing.assert_close(out.float(), ref(x.float()), rtol=0.1, atol=0.1)
    for pe in ["mdlrpe", "mdlrpe_rotate"]:
        enc = create_encoder(pe, dim=32, num_heads=2, grid_size=(4, 4), learnable_theta=True, depth=2)
        lay = Layout((4, 4), 1)
        q = torch.randn(2, 2, 17, 16)
        fn = torch.compile(lambda a, b: enc.rotate(a, b, lay, 1), fullgraph=True, backend="aot_eager")
        for got, want in zip(fn(q, q), enc.rotate(q, q, lay, 1)):
            torch.testing.assert_close(got, want)


def test_learnable_theta_per_block():
    m = VisionPEViT(pe={"name": "mdlrpe", "learnable_theta": True}, **TINY)
    assert m.pe.theta.shape == (2, 2, 8) and "pe.theta" in m.no_weight_decay()
    assert m.pe.block_param_index("theta") == "last"
    torch.testing.assert_close(m.pe.theta[1], cosine_theta_init(2, 8))
    m(torch.randn(1, 3, 32, 32)).sum().backward()
    assert (m.pe.theta.grad.abs().sum(dim=(1, 2)) > 0).all()           # every block's theta is used
    fixed = create_encoder("mdlrpe", dim=32, num_heads=2, grid_size=(4, 4))
    assert "theta" not in dict(fixed.named_parameters()) and "theta" not in fixed.state_dict()


# -- linear attention -----------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["cosine", "rotate"])
def test_linear_attention_equals_its_quadratic_form(form):
    enc = create_encoder("mdlrpe", dim=32, num_heads=2, grid_size=(3, 4), num_prefix_tokens=1, form=form)
    lay = Layout((3, 4), 1)
    q, k, v = torch.randn(2, 2, 13, 16), torch.randn(2, 2, 13, 16), torch.randn(2, 2, 13, 8)
    out = md_lrpe_linear_attention(q, k, v, lay, enc)
    assert out.shape == (2, 2, 13, 8)
    qf, kf = enc.transform(F.silu(q), lay), enc.transform(k.softmax(dim=-2), lay)
    torch.testing.assert_close(out, (qf @ kf.transpose(-1, -2)) @ v, rtol=1e-5, atol=1e-5)
    if form == "cosine":                # the kernel is relative: sum_j q_j k_j cos(A_p[j] - A_r[j])
        ang = F.pad(enc._angles(lay, 0, "cpu"), (0, 0, 1, 0))          # prefix token at angle 0
        kern = torch.einsum("bhpj,bhrj,hprj->bhpr", F.silu(q), k.softmax(-2),
                            torch.cos(ang[:, :, None] - ang[:, None, :]))
        torch.testing.assert_close(out, kern @ v, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="k_act must be one of"):
        md_lrpe_linear_attention(q, k, v, lay, enc, k_act="relu")
    with pytest.raises(ValueError, match=r"v the same \(B, H, N\)"):
        md_lrpe_linear_attention(q, k, v[:, :, :5], lay, enc)


# -- MD-TPE ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, grid", [("mdtpe_2d_4x5", (4, 5)), ("mdtpe_3d_2x3x4", (2, 3, 4))])
def test_mdtpe_matches_vectors(name, grid):
    t, _ = case(name)
    m = len(grid)
    enc = create_encoder("mdtpe", dim=16, num_heads=2, grid_size=grid, num_prefix_tokens=1, residual=False)
    for a in range(m):                  # upstream tpes.i scans dims[i] = -2, -3, -4: the LAST grid axis first
        i = m - 1 - a
        enc.axes[a].load_state_dict({"q": t[f"param.tpes.{i}.q"], "k": t[f"param.tpes.{i}.k"],
                                     "log_decay": t[f"param.tpes.{i}.log_decay"],
                                     "norm_weight": t[f"param.tpes.{i}.norm.weight"],
                                     "o_proj.weight": t[f"param.tpes.{i}.o_proj.weight"]})
        torch.testing.assert_close(enc.axes[a](t["x"], a), t[f"axis_out.{i}"], rtol=1e-5, atol=2e-6)
    cls = torch.randn(2, 1, 16)
    x = torch.cat([cls, t["x"].flatten(1, -2)], dim=1)
    out = enc.embed(x, Layout(grid, 1))
    torch.testing.assert_close(out[:, 1:], t["out"].flatten(1, -2), rtol=1e-5, atol=2e-6)
    assert torch.equal(out[:, :1], cls)


def test_mdtpe_causal_scan_residual_init_and_bidirectional():
    enc = create_encoder("mdtpe", dim=16, num_heads=2, grid_size=(3, 4), num_prefix_tokens=0)
    x = torch.randn(1, 12, 16)
    assert torch.equal(enc.embed(x, Layout((3, 4), 0)), x)            # zero o_proj + residual: NoPE at init
    for ax in enc.axes:
        torch.nn.init.normal_(ax.o_proj.weight)
    base = enc.embed(x, Layout((3, 4), 0))
    x2 = x.clone()
    x2[:, 11] += 1.0                                                    # the last token (2, 3)
    changed = (enc.embed(x2, Layout((3, 4), 0)) - base).abs().sum(-1)[0].reshape(3, 4)
    # causal per axis: only the token itself (neither its row nor column has later tokens) changes
    assert changed[2, 3] > 0 and changed.flatten()[:11].abs().max() == 0
    kern = md_tpe_kernel(5, torch.tensor([0.3]), torch.tensor([2.0]), bidirectional=True)
    torch.testing.assert_close(kern[0], kern[0].T)
    torch.testing.assert_close(kern[0, 4, 0], 2.0 * torch.sigmoid(torch.tensor(0.3)) ** 4)
    causal = md_tpe_kernel(5, torch.tensor([0.3]), torch.tensor([2.0]))
    assert causal[0].triu(1).abs().max() == 0
    ld = torch.tensor([30.0], requires_grad=True)                       # long axis: no inf/nan in gradients
    md_tpe_kernel(200, -ld, torch.ones(1)).sum().backward()
    assert torch.isfinite(ld.grad).all()


def test_mdtpe_with_mdlrpe_combines_both_hooks():
    m = VisionPEViT(pe={"name": "mdtpe_mdlrpe", "form": "rotate", "learnable_theta": True}, **TINY)
    assert isinstance(m.pe, MDTPEWithMDLRPE) and m.pe.lrpe.form == "rotate"
    assert set(m.pe.hooks) == {"embed", "rotate"} and "pe.lrpe.theta" in m.no_weight_decay()
    assert m.pe.block_param_index("lrpe.theta") == "last"


# -- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pe", ENCODERS)
def test_coordinates_of_wrong_dimensionality(pe):
    enc = create_encoder(pe, dim=32, num_heads=2, grid_size=(4, 4), num_prefix_tokens=0)
    lay = Layout((2, 2, 4), 0)
    with pytest.raises(ValueError, match=r"built for 2D grid.*3D layout grid \(2, 2, 4\)"):
        if "rotate" in enc.hooks:
            enc.rotate(torch.randn(1, 2, 16, 16), torch.randn(1, 2, 16, 16), lay)
        else:
            enc.embed(torch.randn(1, 16, 32), lay)


def test_group_count_must_divide_head_dim():
    with pytest.raises(ValueError, match=r"head_dim must be divisible by 2\*3=6; got head_dim=8"):
        create_encoder("mdlrpe_rotate", dim=16, num_heads=2, grid_size=(2, 3, 4))
    with pytest.raises(ValueError, match=r"head_dim must be divisible by 2\*3=6; got head_dim=8"):
        md_lrpe_rotate(torch.randn(1, 2, 24, 8), torch.randn(2, 4), (2, 3, 4))
    with pytest.raises(ValueError, match=r"e=2 frequencies per head but head_dim=8 over 3 grid axes needs e >= 3"):
        md_lrpe_cosine(torch.randn(1, 2, 24, 8), torch.randn(2, 2), (2, 3, 4))
    with pytest.raises(ValueError, match=r"e=4 .* leave grid axis 2 without channels"):
        md_lrpe_cosine(torch.randn(1, 2, 24, 8), torch.randn(2, 4), (2, 3, 4))
    with pytest.raises(ValueError, match=r"theta must have shape \(H=2, e\)"):
        md_lrpe_cosine(torch.randn(1, 2, 20, 8), torch.randn(3, 4), (4, 5))


def test_empty_grid():
    for fn in (md_lrpe_cosine, md_lrpe_rotate):
        with pytest.raises(ValueError, match=r"grid must be non-empty.*\(0, 5\)"):
            fn(torch.randn(1, 2, 0, 8), torch.randn(2, 4), (0, 5))
    for pe in ENCODERS:
        with pytest.raises(ValueError, match="grid_size must be non-empty"):
            create_encoder(pe, dim=32, num_heads=2, grid_size=(4, 0))


def test_token_count_and_shape_errors():
    enc = create_encoder("mdlrpe", dim=32, num_heads=2, grid_size=(4, 4), num_prefix_tokens=1)
    with pytest.raises(ValueError, match=r"q has 16 tokens but the layout expects 17"):
        enc.rotate(torch.randn(1, 2, 16, 16), torch.randn(1, 2, 16, 16), Layout((4, 4), 1))
    with pytest.raises(ValueError, match=r"q must have shape \(B, H, N, head_dim\)"):
        enc.rotate(torch.randn(2, 17, 16), torch.randn(2, 17, 16), Layout((4, 4), 1))
    with pytest.raises(ValueError, match=r"x has 19 tokens but the layout expects 20"):
        md_lrpe_cosine(torch.randn(1, 2, 19, 8), torch.randn(2, 4), (4, 5))
    with pytest.raises(ValueError, match="form must be one of"):
        create_encoder("mdlrpe", dim=32, grid_size=(4, 4), form="complex")
    with pytest.raises(ValueError, match="o_proj_init must be"):
        create_encoder("mdtpe", dim=32, grid_size=(4, 4), o_proj_init="normal")
