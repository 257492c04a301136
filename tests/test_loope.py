"""LOOPE and the static Gilbert encoder: parity with the official ArtPE / Hilbert PE vectors, the documented
deviations (any grid, any prefix tokens, batch independence at eval), ViT wiring and bad input."""
import copy
import os

import pytest
import timm
import torch
from safetensors.torch import load_file

import visionpe
from visionpe import Layout, create_encoder, list_encoders
from visionpe.encoders.loope import (LOOPE, GilbertPE, convert_official_state_dict, resample_square_operator,
                                     sinusoid_1d)
from visionpe.gilbert import gilbert_rank
from visionpe.models.vit import VisionPEViT
from conftest import REFERENCE

REF = os.path.join(REFERENCE, "loope")
RTOL, ATOL = 1e-5, 1e-6
# (file, grid, D, seed used by the generator before constructing the official module)
ARTPE = [("artpe_grid14_d192", (14, 14), 192, 0), ("artpe_grid5_d32", (5, 5), 32, 7)]
TINY = dict(embed_dim=64, depth=2, num_heads=2, patch_size=8, num_classes=5)


def _close(a, b, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, check_dtype=False)


def _official(fname, grid, dim, seed, dtype=torch.float64):
    """LOOPE loaded with the official parameters of a vector file, plus the vectors and the [0,1] input."""
    v = load_file(os.path.join(REF, f"{fname}.safetensors"))
    torch.manual_seed(seed)
    enc = create_encoder("loope", dim=dim, grid_size=grid, num_prefix_tokens=1)
    params = {k[len("param."):]: t for k, t in v.items() if k.startswith("param.")}
    enc = enc.to(dtype)
    enc.load_state_dict(convert_official_state_dict(params), strict=True)
    return enc, v, (v["input_u8"].double() / 255.0).to(dtype)


# -- parity -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fname, grid, dim, seed", ARTPE)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_artpe_parity_every_stage(fname, grid, dim, seed, mode):
    enc, v, img = _official(fname, grid, dim, seed)
    enc.train(mode == "train")
    ctx = enc.context
    feat = ctx.features(img, grid)
    _close(feat, v[f"{mode}.conv_gelu_out"])
    bn = ctx.norm(feat).flatten(1)
    _close(bn, v[f"{mode}.bn_flat"])
    lin = torch.nn.functional.linear(bn, ctx.linear_weight(grid))
    _close(lin, v[f"{mode}.linear_out"])
    _close(torch.sigmoid(lin), v[f"{mode}.sigmoid_out"])
    _close(ctx(img, grid), v[f"{mode}.X_C"])
    _close(enc.positions(img, grid, torch.float64), v[f"{mode}.X"])
    n = grid[0] * grid[1]
    out = enc.embed(torch.zeros(img.shape[0], 1 + n, dim, dtype=torch.float64), Layout(grid, 1), image=img)
    _close(out, v[f"{mode}.pos_embedding"])
    xc = v[f"{mode}.X_C"]
    assert xc.abs().max() < 1


@pytest.mark.parametrize("fname, grid, dim, seed", ARTPE)
def test_artpe_parity_float32(fname, grid, dim, seed):
    # float32: the conv stack agrees to ~1e-6; sin/cos of X (up to 196) carry the fp32 rounding of X
    # (ulp(196) = 1.5e-5), hence the README's ~5e-5 tolerance on embeddings computed in float32.
    enc, v, img = _official(fname, grid, dim, seed, torch.float32)
    enc.eval()
    _close(enc.positions(img, grid), v["eval.X"].float(), rtol=0, atol=2e-5)
    x = torch.zeros(img.shape[0], 1 + grid[0] * grid[1], dim)
    _close(enc.embed(x, Layout(grid, 1), image=img), v["eval.pos_embedding"].float(), rtol=0, atol=5e-5)


@pytest.mark.parametrize("fname, grid, dim, seed", ARTPE)
def test_init_matches_official_under_the_same_seed(fname, grid, dim, seed):
    # modules are created in the official order, so a seed reproduces the official initial weights
    v = load_file(os.path.join(REF, f"{fname}.safetensors"))
    torch.manual_seed(seed)
    enc = create_encoder("loope", dim=dim, grid_size=grid)
    own = enc.state_dict()
    conv = convert_official_state_dict({k[6:]: t for k, t in v.items() if k.startswith("param.")})
    checked = [k for k in conv if k.startswith(("context.conv", "context.linear"))]
    assert len(checked) == 11
    for k in checked:
        assert torch.equal(own[k].double(), conv[k]), k
    # the official class-position vector and BatchNorm start at zero / identity
    assert own["prefix_pos"].abs().max() == 0 and own["context.norm.weight"].eq(1).all()


def test_static_gilbert_matches_official_hilbert_pe():
    v = load_file(os.path.join(REF, "static_pe_grid14_d192.safetensors"))
    enc = create_encoder("gilbert", dim=192, grid_size=(14, 14), num_prefix_tokens=1)
    out = enc.embed(torch.zeros(1, 197, 192), Layout((14, 14), 1))
    # the official table was computed in float32 (README: compare at ~5e-5); ours rounds a float64 table
    _close(out, v["hilbert_pe_d192"], rtol=0, atol=5e-5)
    pos = torch.cat([torch.zeros(1, dtype=torch.float64), gilbert_rank(14, 14).reshape(-1).double()])
    _close(out[0], sinusoid_1d(pos, 192).float(), rtol=0, atol=0)  # exact: class token at position 0
    # the same sinusoid with raster positions 0..196 is the official 1D sinusoid baseline
    _close(sinusoid_1d(torch.arange(197, dtype=torch.float64), 192), v["sincos1d_pe_d192"][0], rtol=0, atol=5e-5)


def test_loope_with_zero_context_is_static_gilbert():
    enc = create_encoder("loope", dim=32, grid_size=(4, 6), num_prefix_tokens=1).eval()
    static = create_encoder("gilbert", dim=32, grid_size=(4, 6), num_prefix_tokens=1)
    with torch.no_grad():
        enc.context.linear.weight.zero_()  # sigmoid(0) = 1/2 -> X_C = 0
    x = torch.randn(2, 25, 32)
    out = enc.embed(x, Layout((4, 6), 1), image=torch.rand(2, 3, 64, 96))
    _close(out[:, 1:], static.embed(x, Layout((4, 6), 1))[:, 1:])
    _close(out[:, :1], x[:, :1])  # learned class vector, zero at init


# -- deviations: batch independence, any grid, any prefix ---------------------------------------------
def test_eval_is_batch_independent_in_a_vit():
    model = VisionPEViT(pe="loope", img_size=32, **TINY)
    model.train()
    model(torch.rand(4, 3, 32, 32))  # move the BatchNorm running statistics away from their init
    model.eval()
    x = torch.rand(5, 3, 32, 32)
    full = model(x)
    for i in range(5):
        _close(model(x[i:i + 1]), full[i:i + 1])


@pytest.mark.parametrize("norm, independent", [("batch", False), ("instance", True)])
def test_train_mode_batch_dependence_follows_the_norm(norm, independent):
    enc = create_encoder("loope", dim=32, grid_size=(3, 5), num_prefix_tokens=0, context_norm=norm)
    enc = enc.double().train()
    img = torch.rand(3, 3, 48, 80, dtype=torch.float64)
    full = enc.positions(img, (3, 5), torch.float64)
    alone = enc.positions(img[:1], (3, 5), torch.float64)
    assert torch.allclose(full[:1], alone, rtol=1e-12, atol=1e-12) == independent
    enc.eval()  # at eval both are per-sample
    _close(enc.positions(img, (3, 5), torch.float64)[:1], enc.positions(img[:1], (3, 5), torch.float64))


def test_resample_square_operator():
    w = torch.randn(12, 12)
    assert resample_square_operator(w, (3, 4), (3, 4)) is w
    # a constant map keeps its response to a constant input on any grid (the N/N' rescaling)
    c = torch.full((12, 12), 0.3)
    for g in [(6, 8), (2, 2), (5, 3)]:
        r = resample_square_operator(c, g, (3, 4))
        n = g[0] * g[1]
        assert r.shape == (n, n)
        _close(r @ torch.ones(n), torch.full((n,), 0.3 * 12))
    with pytest.raises(ValueError, match=r"weight must be \(12, 12\)"):
        resample_square_operator(torch.randn(12, 11), (2, 2), (3, 4))


@pytest.mark.parametrize("img_size, prefix, reg", [((24, 40), 1, 0), ((40, 24), 0, 0), ((32, 32), 4, 3)])
def test_vit_any_grid_and_prefix_tokens(img_size, prefix, reg):
    kw = dict(TINY, img_size=img_size, reg_tokens=reg, class_token=prefix - reg > 0,
              global_pool="token" if prefix - reg > 0 else "avg")
    model = VisionPEViT(pe="loope", **kw).eval()
    assert model.num_prefix_tokens == prefix and model.pe.prefix_pos.shape == (prefix, 64)
    x = torch.rand(2, 3, *img_size)
    assert model(x).shape == (2, 5)
    grid = tuple(model.patch_embed.grid_size)
    # what the ViT added to its patch tokens is exactly the encoder's embedding of this image
    with torch.no_grad():
        model.pe.prefix_pos.normal_()
        tok = model.patch_embed(x)
        got, layout = model._pos_embed(tok, x)
    assert layout == Layout(grid, prefix)
    _close(got[:, prefix:] - tok, model.pe.patch_embedding(x, grid))
    prefix_tokens = [t for t in (model.cls_token, model.reg_token) if t is not None]
    if prefix_tokens:
        _close(got[:, :prefix] - torch.cat(prefix_tokens, 1), model.pe.prefix_pos.expand(2, -1, -1))


def test_other_grid_than_training_one():
    model = VisionPEViT(pe="loope", img_size=32, dynamic_img_size=True, **TINY).eval()
    w_train = model.pe.context.linear.weight.detach().clone()
    for size in [(32, 32), (48, 24), (8, 56)]:
        assert model(torch.rand(2, 3, *size)).shape == (2, 5)
    x = torch.rand(2, 3, 48, 24)
    X = model.pe.positions(x, (6, 3))
    assert X.shape == (2, 18) and ((X - gilbert_rank(6, 3).reshape(-1)).abs() < 1).all()
    # set_input_size resamples the linear layer for good; at that grid the result is what dynamic use gives
    dyn = model.pe.positions(x, (6, 3))
    model.set_input_size(img_size=(48, 24))
    assert model.pe.context.linear.weight.shape == (18, 18)
    _close(model.pe.positions(x, (6, 3)), dyn)
    _close(resample_square_operator(w_train, (6, 3), (4, 4)), model.pe.context.linear.weight)


def test_prefix_modes():
    x = torch.randn(2, 3 + 6, 16)
    lay = Layout((2, 3), 3)
    pos0 = sinusoid_1d(torch.zeros(1, dtype=torch.float64), 16).float()  # [0, 1, 0, 1, ...]
    patch = sinusoid_1d(gilbert_rank(2, 3).reshape(-1).double(), 16).float()
    g0 = create_encoder("gilbert", dim=16, grid_size=(2, 3), num_prefix_tokens=3)
    out = g0.embed(x, lay)
    _close(out[:, :3], x[:, :3] + pos0)
    _close(out[:, 3:], x[:, 3:] + patch)
    gl = create_encoder("gilbert", dim=16, grid_size=(2, 3), num_prefix_tokens=3, prefix_pe="learned")
    with torch.no_grad():
        gl.prefix_pos.normal_()
    _close(gl.embed(x, lay)[:, :3], x[:, :3] + gl.prefix_pos)
    assert gl.no_weight_decay() == {"prefix_pos"} and g0.no_weight_decay() == set()
    gn = create_encoder("gilbert", dim=16, grid_size=(2, 3), num_prefix_tokens=3, prefix_pe="none")
    _close(gn.embed(x, lay)[:, :3], x[:, :3])
    ln = create_encoder("loope", dim=16, grid_size=(2, 3), num_prefix_tokens=3, prefix_pe="position0").eval()
    _close(ln.embed(x, lay, image=torch.rand(2, 3, 32, 48))[:, :3], x[:, :3] + pos0)
    # learned vectors exist for the prefix count the encoder was built with
    with pytest.raises(ValueError, match="learned vectors for 3 prefix tokens; the layout has 1"):
        gl.embed(torch.randn(2, 7, 16), Layout((2, 3), 1))


def test_static_table_is_cached_and_as_cheap_as_an_ape():
    enc = create_encoder("gilbert", dim=16, grid_size=(3, 3), num_prefix_tokens=1)
    lay = Layout((3, 3), 1)
    assert enc.table(lay, "cpu", torch.float32) is enc.table(lay, "cpu", torch.float32)
    x = torch.randn(2, 10, 16)
    _close(enc.embed(x, lay), x + enc.table(lay, "cpu", torch.float32))


def test_branched_variant_and_zero_based_ranks():
    enc = create_encoder("gilbert", dim=8, grid_size=(7, 5), num_prefix_tokens=0, variant="branched", start=0)
    assert torch.equal(enc.order((7, 5), dtype=torch.int64), gilbert_rank(7, 5, "branched", start=0).reshape(-1))
    assert not torch.equal(enc.order((7, 5)), create_encoder("gilbert", dim=8).order((7, 5)))


def test_gradients_reach_the_context_network():
    model = VisionPEViT(pe="loope", img_size=32, **TINY).train()
    model(torch.rand(3, 3, 32, 32)).square().sum().backward()
    for name in ("pe.prefix_pos", "pe.context.conv1.weight", "pe.context.linear.weight", "pe.context.norm.bias"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert "pe.prefix_pos" in model.no_weight_decay()


def test_bfloat16_model_computes_angles_in_float32():
    enc = create_encoder("loope", dim=32, grid_size=(14, 14), num_prefix_tokens=1).eval()
    img = torch.rand(1, 3, 224, 224)
    ref = enc.patch_embedding(img, (14, 14))
    out = enc.to(torch.bfloat16).embed(torch.zeros(1, 197, 32, dtype=torch.bfloat16), Layout((14, 14), 1),
                                       image=img.bfloat16())
    assert out.dtype == torch.bfloat16
    # bf16 positions near 196 would be off by up to 0.5; angles in fp32 keep the embedding close
    _close(out[:, 1:].float(), ref, rtol=0, atol=0.1)


# -- wiring: image hand-off, registry, copies -----------------------------------------------------------
def test_registered_names_and_configs():
    assert {"loope", "gilbert"} <= set(list_encoders("embed"))
    for name, cls in (("loope", LOOPE), ("gilbert", GilbertPE)):
        m = timm.create_model(f"vpe_vit_tiny_patch16_224_{name}", img_size=32, **TINY)
        assert type(m.pe) is cls and m(torch.rand(1, 3, 32, 32)).shape == (1, 5)
    m = timm.create_model("vpe_vit_tiny_patch16_224", img_size=32,
                          pe={"name": "loope", "variant": "branched", "context_norm": "instance"}, **TINY)
    assert m.pe.variant == "branched" and isinstance(m.pe.context.norm, torch.nn.GroupNorm)


def test_image_handoff_from_the_model():
    model = VisionPEViT(pe="loope", img_size=32, **TINY).eval()
    assert model.pe.needs_image and not model.patch_embed._forward_pre_hooks
    x = torch.rand(2, 3, 32, 32)
    out = model(x)
    # the model hands its input image to embed: same as calling the encoder by hand
    tokens, layout = model.layout_for(model.patch_embed(x))
    tokens = torch.cat([model.cls_token.expand(2, -1, -1), tokens], 1)
    _close(model.pe.embed(tokens, layout, -1, image=x), model._pos_embed(model.patch_embed(x), x)[0])
    feats = model.forward_intermediates(x, indices=1, intermediates_only=True)
    assert feats[0].shape == (2, 64, 4, 4)
    fm = timm.create_model("vpe_vit_tiny_patch16_224_loope", features_only=True, out_indices=(1,),
                           dynamic_img_size=True, **{k: v for k, v in TINY.items() if k != "num_classes"})
    assert [f.shape for f in fm(torch.rand(1, 3, 64, 48))] == [(1, 64, 8, 6)]
    ema = copy.deepcopy(model)  # timm EMA copies: no hidden state to re-wire
    _close(ema(x), out)


def test_missing_or_mismatched_image_raises():
    enc = create_encoder("loope", dim=16, grid_size=(2, 2), num_prefix_tokens=1).eval()
    lay = Layout((2, 2), 1)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="LOOPE needs the input image"):
        enc.embed(x, lay)
    with pytest.raises(ValueError, match="image batch has 3 samples but x has 2"):
        enc.embed(x, lay, image=torch.rand(3, 3, 32, 32))
    with pytest.raises(ValueError, match="image has 1 channels, the context network expects 3"):
        enc.embed(x, lay, image=torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"image must be \(B, 3, H, W\)"):
        enc.embed(x, lay, image=torch.rand(2, 3, 32))


def test_bad_input():
    with pytest.raises(ValueError, match="dim must be even"):
        create_encoder("loope", dim=15, num_heads=1)
    with pytest.raises(ValueError, match="supports 2D grids"):
        create_encoder("gilbert", dim=16, grid_size=(2, 3, 4))
    with pytest.raises(ValueError, match="variant must be one of"):
        create_encoder("gilbert", dim=16, variant="upstream")
    with pytest.raises(ValueError, match="prefix_pe must be one of"):
        create_encoder("loope", dim=16, prefix_pe="zeros")
    with pytest.raises(ValueError, match="norm must be one of"):
        create_encoder("loope", dim=16, context_norm="layer")
    with pytest.raises(ValueError, match="patch must be a positive int"):
        create_encoder("loope", dim=16, context_patch=0)
    with pytest.raises(ValueError, match="non-empty"):
        create_encoder("gilbert", dim=16, grid_size=(0, 5))
    enc = create_encoder("gilbert", dim=16, grid_size=(2, 3), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="non-empty"):
        enc.order((0, 5))
    with pytest.raises(ValueError, match="layout expects 7"):
        enc.embed(torch.randn(2, 8, 16), Layout((2, 3), 1))
    with pytest.raises(ValueError, match=r"x must be \(B, N, 16\)"):
        enc.embed(torch.randn(2, 7, 15), Layout((2, 3), 1))
    with pytest.raises(ValueError, match="supports 2D grids"):
        enc.embed(torch.randn(2, 1 + 12, 16), Layout((2, 2, 3), 1))
    with pytest.raises(TypeError, match="layout must be a visionpe.Layout"):
        enc.embed(torch.randn(2, 7, 16), (2, 3))
    with pytest.raises(ValueError, match="dim must be a positive even int"):
        sinusoid_1d(torch.zeros(3), 7)
    with pytest.raises(TypeError, match="positions must be a float tensor"):
        sinusoid_1d(torch.zeros(3, dtype=torch.int64), 8)
    with pytest.raises(ValueError, match="unexpected key 'head.weight'"):
        convert_official_state_dict({"head.weight": torch.zeros(1)})


def test_torch_compile_fullgraph():
    # no graph break: the image hand-off, the cached tables and the context network all trace
    x = torch.rand(2, 3, 32, 32)
    for pe in ("loope", "gilbert"):
        model = VisionPEViT(pe=pe, img_size=32, **TINY).eval()
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        _close(compiled(x), model(x))
