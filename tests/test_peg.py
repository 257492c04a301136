"""CPE/PEG: parity with Twins' PosCNN / the CPVT snippet, placement, pooling, resolution, bad input."""
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.optim import create_optimizer_v2

from visionpe import Layout, create_encoder
from visionpe.models import VisionPEViT

from conftest import REFERENCE

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
CASES = ["cls_4x4", "cls_3x5", "nocls_4x4", "nocls_3x5"]


def _case(name):
    d = load_file(os.path.join(REFERENCE, "irpe", "cpvt_peg.safetensors"))
    prefix = 1 if name.startswith("cls") else 0
    h, w = map(int, name.split("_")[1].split("x"))
    params = {k.split("/param/")[1]: v for k, v in d.items() if k.startswith(f"{name}/param/")}
    return d[f"{name}/input"], d[f"{name}/output"], params, Layout((h, w), prefix)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_peg_matches_reference(name, dtype):
    x, ref, params, layout = _case(name)
    enc = create_encoder("peg", dim=8, grid_size=layout.grid, num_prefix_tokens=layout.num_prefix_tokens).to(dtype)
    enc.peg[0].load_state_dict({k: v.to(dtype) for k, v in params.items()})
    out = enc.embed(x.to(dtype), layout, 0)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.double(), ref, **tol)
    if layout.num_prefix_tokens:
        assert torch.equal(out[:, 0], x[:, 0].to(dtype))  # the class token bypasses the PEG


def test_identity_at_stages_without_a_peg():
    x, _, params, layout = _case("cls_3x5")
    enc = create_encoder("peg", dim=8, depth=4, grid_size=(3, 5), peg_blocks=(0, 2))
    assert enc.embed_stages == (0, 2) and len(enc.peg) == 2
    for stage in (-1, 1, 3):
        assert enc.embed(x.float(), layout, stage) is not None
        assert torch.equal(enc.embed(x.float(), layout, stage), x.float())
    assert not torch.equal(enc.embed(x.float(), layout, 2), x.float())


def _trace(model, x):
    """Inputs/outputs of every block and every PEG, in call order."""
    log = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: log.append(("block", i, a[0], o)))
             for i, b in enumerate(model.blocks)]
    hooks += [p.register_forward_hook(lambda m, a, o, i=i: log.append(("peg", i, a[0], o)))
              for i, p in enumerate(model.pe.peg)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return log


def test_placement_after_block_zero_in_the_model():
    m = VisionPEViT(pe="peg", **TINY).eval()
    log = _trace(m, torch.randn(2, 3, 32, 32))
    assert [(k, i) for k, i, _, _ in log] == [("block", 0), ("peg", 0), ("block", 1)]
    (_, _, _, b0_out), (_, _, peg_in, peg_out), (_, _, b1_in, _) = log
    # the PEG sees block 0's patch tokens as a (B, C, h, w) map, and block 1 sees class token + PEG output
    torch.testing.assert_close(peg_in, b0_out[:, 1:].transpose(1, 2).reshape(2, 32, 4, 4))
    torch.testing.assert_close(b1_in[:, 1:], peg_out.flatten(2).transpose(1, 2))
    torch.testing.assert_close(b1_in[:, :1], b0_out[:, :1])


def test_configurable_placement_including_input():
    m = VisionPEViT(pe=dict(name="peg", peg_blocks=(-1, 1)), **TINY).eval()
    log = _trace(m, torch.randn(1, 3, 32, 32))
    assert [(k, i) for k, i, _, _ in log] == [("peg", 0), ("block", 0), ("block", 1), ("peg", 1)]


def test_zero_peg_is_exactly_no_position_encoding():
    m = VisionPEViT(pe="peg", **TINY).eval()
    ref = VisionPEViT(pe="none", **TINY).eval()
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("pe.")})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(m(x), ref(x))
        for p in m.pe.parameters():
            p.zero_()
        torch.testing.assert_close(m(x), ref(x))


def test_gap_variant_registered_name():
    m = timm.create_model("vpe_vit_tiny_patch16_224_peg_gap", num_classes=3)
    assert m.pe_name == "peg_gap" and m.cls_token is None and m.num_prefix_tokens == 0
    assert m.global_pool == "avg" and isinstance(m.fc_norm, torch.nn.Identity)  # norm, then average (Twins)
    m = timm.create_model("vpe_vit_tiny_patch16_224_peg_gap", num_classes=3, embed_dim=32, num_heads=2, depth=2)
    x = torch.randn(1, 3, 224, 224)
    feats = m.forward_features(x)
    assert feats.shape == (1, 196, 32)
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), feats.mean(1))
    cls = timm.create_model("vpe_vit_tiny_patch16_224_peg", num_classes=3)
    assert cls.num_prefix_tokens == 1 and cls.global_pool == "token" and cls.pe.peg_blocks == (0,)


def test_built_at_224_runs_at_384_without_resampling():
    m = VisionPEViT(pe="peg", img_size=224, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                    dynamic_img_size=True).eval()
    before = {k: v.clone() for k, v in m.pe.state_dict().items()}
    with torch.no_grad():
        out = m(torch.randn(1, 3, 384, 384))
    assert out.shape == (1, 5) and torch.isfinite(out).all()
    assert all(torch.equal(before[k], v) for k, v in m.pe.state_dict().items())
    # on the 24x24 grid the PEG is exactly the zero-padded depthwise conv residual
    x = torch.randn(2, 1 + 576, 32)
    conv = m.pe.peg[0].proj[0]
    grid = x[:, 1:].transpose(1, 2).reshape(2, 32, 24, 24)
    ref = (F.conv2d(grid, conv.weight, conv.bias, padding=1, groups=32) + grid).flatten(2).transpose(1, 2)
    torch.testing.assert_close(m.pe.embed(x, Layout((24, 24), 1), 0)[:, 1:], ref)
    # a fixed-size model moved to 384 keeps its PEG untouched as well
    m2 = VisionPEViT(pe="peg_gap", img_size=224, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                     class_token=False, global_pool="avg")
    sd = {k: v.clone() for k, v in m2.pe.state_dict().items()}
    m2.set_input_size((384, 384))
    assert all(torch.equal(sd[k], v) for k, v in m2.pe.state_dict().items())
    assert m2(torch.randn(1, 3, 384, 384)).shape == (1, 5)


def test_twins_init_weight_decay_and_layer_decay():
    m = VisionPEViT(pe=dict(name="peg", peg_blocks=(-1, 0, 1)), **TINY)
    w = m.pe.peg[1].proj[0].weight
    assert w.shape == (32, 1, 3, 3) and torch.equal(m.pe.peg[1].proj[0].bias, torch.zeros(32))
    assert 0.3 < w.std().item() < 0.65  # N(0, sqrt(2/9)) ~ 0.47
    assert {"pe.peg.0.proj.0.weight", "pe.peg.2.proj.0.bias"} <= m.no_weight_decay()
    opt = create_optimizer_v2(m, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert group_of[id(m.pe.peg[0].proj[0].weight)]["lr_scale"] == group_of[id(m.patch_embed.proj.weight)]["lr_scale"]
    for slot, blk in ((1, 0), (2, 1)):
        g = group_of[id(m.pe.peg[slot].proj[0].weight)]
        assert g["lr_scale"] == group_of[id(m.blocks[blk].attn.qkv.weight)]["lr_scale"] and g["weight_decay"] == 0.0


def test_kernel_size_option():
    enc = create_encoder("peg", dim=8, grid_size=(3, 5), num_prefix_tokens=0, kernel_size=5)
    x = torch.randn(2, 15, 8)
    conv = enc.peg[0].proj[0]
    grid = x.transpose(1, 2).reshape(2, 8, 3, 5)
    ref = (F.conv2d(grid, conv.weight, conv.bias, padding=2, groups=8) + grid).flatten(2).transpose(1, 2)
    torch.testing.assert_close(enc.embed(x, Layout((3, 5), 0), 0), ref)


# -- bad input --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 4, 0, True])
def test_bad_kernel_size(k):
    with pytest.raises(ValueError, match="kernel_size must be an odd int >= 3"):
        create_encoder("peg", dim=8, kernel_size=k)


@pytest.mark.parametrize("blocks, match", [((2,), r"\[-1, 1\]"), ((-2,), r"\[-1, 1\]"), ((), "non-empty"),
                                           ((0, 0), "distinct"), ((0.5,), "ints")])
def test_bad_peg_blocks(blocks, match):
    with pytest.raises(ValueError, match=match):
        create_encoder("peg", dim=8, depth=2, peg_blocks=blocks)


def test_bad_layouts():
    enc = create_encoder("peg", dim=8, grid_size=(3, 5))
    with pytest.raises(ValueError, match=r"15 tokens but the layout expects 16"):
        enc.embed(torch.randn(1, 15, 8), Layout((3, 5), 1), 0)
    with pytest.raises(ValueError, match="2D layout grid"):
        enc.embed(torch.randn(1, 25, 8), Layout((2, 3, 4), 1), 0)


@pytest.mark.slow
def test_torch_compile_forward_backward():
    torch._dynamo.reset()
    m = VisionPEViT(pe=dict(name="peg", peg_blocks=(0, 1)), dynamic_img_size=True, **TINY)
    x = torch.randn(2, 3, 32, 24)
    ref = m(x)
    ref.sum().backward()
    g_ref = m.pe.peg[1].proj[0].weight.grad.clone()
    m.zero_grad()
    out = torch.compile(m)(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.pe.peg[1].proj[0].weight.grad, g_ref, rtol=1e-4, atol=1e-5)
