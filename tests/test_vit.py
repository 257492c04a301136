"""The PE-aware ViT keeps timm's model contract for every registered encoder."""
import pytest
import timm
import torch
from timm.optim import create_optimizer_v2

import visionpe
from visionpe.models import VisionPEViT

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
BASELINES = ["none", "learned", "sincos2d", "rope_axial", "rope_mixed", "relpos_bias"]


def tiny(pe, **kw):
    return VisionPEViT(pe=pe, **{**TINY, **kw})


@pytest.mark.parametrize("pe", visionpe.list_encoders())
def test_every_encoder_forward_backward_and_contract(pe):
    m = tiny(pe)
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.sum().backward()
    assert m.patch_embed.proj.weight.grad is not None
    feats = m.forward_features(x)
    assert feats.shape == (2, 1 + 16, 32)
    assert m.forward_head(feats, pre_logits=True).shape == (2, 32)
    m.reset_classifier(0)
    assert m(x).shape == (2, 32)


@pytest.mark.parametrize("pe", BASELINES)
def test_timm_registry_names(pe):
    m = timm.create_model("vpe_vit_tiny_patch16_224", pe=pe, num_classes=3)
    assert isinstance(m, VisionPEViT) and m.pe_name == pe
    assert m.pretrained_cfg["architecture"] == "vpe_vit_tiny_patch16_224"
    assert m.default_cfg["input_size"] == (3, 224, 224)
    named = timm.create_model(f"vpe_vit_tiny_patch16_224_{pe}", num_classes=3)
    assert named.pe_name == pe
    assert f"vpe_vit_small_patch16_224_{pe}" in timm.list_models("vpe_vit_small*")


def test_pe_config_dict_through_timm():
    m = timm.create_model("vpe_vit_tiny_patch16_224", pe={"name": "rope_axial", "theta": 10000.0}, num_classes=0)
    assert m.pe.theta == 10000.0


@pytest.mark.parametrize("pe", visionpe.list_encoders())
def test_dynamic_img_size_non_square_and_intermediates(pe):
    m = tiny(pe, dynamic_img_size=True).eval()
    x = torch.randn(1, 3, 48, 24)
    assert m(x).shape == (1, 5)
    final, inter = m.forward_intermediates(x, indices=[0, 1])
    assert [t.shape for t in inter] == [(1, 32, 6, 3)] * 2
    pairs = m.forward_intermediates(x, indices=1, return_prefix_tokens=True, intermediates_only=True)
    assert pairs[0][0].shape == (1, 32, 6, 3) and pairs[0][1].shape == (1, 1, 32)
    d = m.forward_intermediates(x, output_dict=True, output_fmt="NLC")
    assert d["image_intermediates"][0].shape == (1, 18, 32) and "image_features" in d


def test_features_only():
    m = timm.create_model("vpe_vit_tiny_patch16_224", pe="rope_mixed", features_only=True, out_indices=(3, 7, 11),
                          dynamic_img_size=True)
    feats = m(torch.randn(1, 3, 64, 96))
    assert [f.shape for f in feats] == [(1, 192, 4, 6)] * 3
    assert m.feature_info.channels() == [192] * 3 and m.feature_info.reduction() == [16] * 3


def test_registers_and_multiple_prefix_tokens():
    for pe in BASELINES:
        m = tiny(pe, reg_tokens=4)
        assert m.num_prefix_tokens == 5
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_set_input_size_updates_encoder():
    m = tiny("learned")
    m.set_input_size((64, 48))
    assert m.pe.grid_size == (8, 6) and m.pe.pos_embed.shape == (1, 1 + 48, 32)
    assert m(torch.randn(1, 3, 64, 48)).shape == (1, 5)


def test_layer_decay_groups_place_pe_parameters():
    m = tiny("relpos_bias")
    groups = m.group_matcher()
    import re
    assert re.match(groups["stem"], "cls_token")
    opt = create_optimizer_v2(m, opt="adamw", lr=1e-3, layer_decay=0.5)
    scale_of = {}
    for g in opt.param_groups:
        for p in g["params"]:
            scale_of[id(p)] = g["lr_scale"]
    assert scale_of[id(m.pe.tables[0])] == scale_of[id(m.blocks[0].attn.qkv.weight)]
    assert scale_of[id(m.pe.tables[1])] == scale_of[id(m.blocks[1].attn.qkv.weight)]
    mm = tiny("rope_mixed")
    opt = create_optimizer_v2(mm, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)

    def group_of(param):
        (group,) = [g for g in opt.param_groups if any(p is param for p in g["params"])]  # exactly one
        return group
    freqs_group, last_block_group = group_of(mm.pe.freqs), group_of(mm.blocks[1].attn.qkv.weight)
    assert freqs_group["weight_decay"] == 0.0 and last_block_group["weight_decay"] == 0.05
    assert freqs_group["lr_scale"] == pytest.approx(last_block_group["lr_scale"])
    assert freqs_group["lr_scale"] > group_of(mm.blocks[0].attn.qkv.weight)["lr_scale"]
    assert "pe.freqs" in mm.no_weight_decay()
    assert "pe.pos_embed" in tiny("learned").no_weight_decay()


@pytest.mark.parametrize("pe", ["rope_mixed", "relpos_bias", "learned"])
def test_bf16_forward_backward(pe):
    m = tiny(pe).to(torch.bfloat16)
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    out = m(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    ref = tiny(pe)
    ref.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    torch.testing.assert_close(out.float(), ref(x.float()), rtol=0.1, atol=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("pe", ["rope_mixed", "relpos_bias"])
def test_torch_compile_forward_backward(pe, recwarn):
    m = tiny(pe)
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    ref.sum().backward()
    g_ref = m.blocks[0].attn.qkv.weight.grad.clone()
    m.zero_grad()
    out = torch.compile(m)(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert not any("complex" in str(w.message) for w in recwarn.list)
    torch.testing.assert_close(m.blocks[0].attn.qkv.weight.grad, g_ref, rtol=1e-4, atol=1e-5)


def test_sdpa_path_used_for_bias_and_rotate(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **k):
        calls.append(k.get("attn_mask") is not None)
        return real(*a, **k)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    tiny("relpos_bias")(torch.randn(1, 3, 32, 32))
    assert calls == [True, True]
    calls.clear()
    tiny("rope_axial")(torch.randn(1, 3, 32, 32))
    assert calls == [False, False]


# -- bad input ------------------------------------------------------------------------------------------
def test_wrong_grid_for_token_count():
    enc = visionpe.create_encoder("rope_axial", dim=64, num_heads=2, grid_size=(4, 4))
    q = torch.randn(1, 2, 17, 32)
    with pytest.raises(ValueError, match=r"17 tokens but the layout expects 21"):
        enc.rotate(q, q, visionpe.Layout((4, 5), 1))


@pytest.mark.parametrize("pe, dim, heads", [("rope_axial", 30, 3), ("rope_mixed", 60, 6)])
def test_head_dim_not_divisible_for_rope(pe, dim, heads):
    with pytest.raises(ValueError, match=r"head_dim divisible by 4; got head_dim=10"):
        visionpe.create_encoder(pe, dim=dim, num_heads=heads, grid_size=(4, 4))


def test_unknown_encoder_name_in_model():
    with pytest.raises(ValueError, match="unknown encoder 'rope_mixd'.*known encoders"):
        timm.create_model("vpe_vit_tiny_patch16_224", pe="rope_mixd")


def test_image_not_divisible_by_patch():
    m = tiny("rope_axial", dynamic_img_size=True)
    with pytest.raises(ValueError, match=r"image size \(36, 32\) is not divisible by the patch size \(8, 8\)"):
        m(torch.randn(1, 3, 36, 32))
    padded = tiny("rope_axial", dynamic_img_size=True, dynamic_img_pad=True)
    assert padded(torch.randn(1, 3, 36, 32)).shape == (1, 5)


def test_wrong_fixed_input_size():
    with pytest.raises(ValueError, match=r"image size \(64, 32\) does not match the model's \(32, 32\)"):
        tiny("learned")(torch.randn(1, 3, 64, 32))
    with pytest.raises(ValueError, match=r"x has 1 channels but the model expects 3"):
        tiny("learned")(torch.randn(1, 1, 32, 32))


def test_vit_rejects_pos_embed_argument():
    with pytest.raises(TypeError, match="pe="):
        VisionPEViT(pe="learned", pos_embed="learn", **TINY)


@pytest.mark.parametrize("pe", visionpe.list_encoders())
def test_inference_mode_then_training(pe):
    # tables cached during an inference_mode forward must not leak into autograd (inference tensors
    # cannot be saved for backward): eval under inference_mode, then train, on the same model
    m = tiny(pe, dynamic_img_size=True)
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    with torch.inference_mode():
        ref = m(x)
    m.train()
    m(x).sum().backward()
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref)
