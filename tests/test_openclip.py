"""open_clip: visionpe encoders as timm towers (offline configs) and open_clip ViT -> timm conversion parity."""
import logging

import open_clip
import pytest
import torch

import visionpe
from visionpe.models import VisionPEViT, swap_pe
from visionpe.models.openclip import (add_openclip_config, openclip_config, openclip_visual_to_timm, register_tower,
                                      replace_visual)

TEXT = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
TOWER = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)

logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random init on every create_model


def native_clip(name, **vision):
    cfg = dict(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16,
                                             mlp_ratio=4.0, **vision), text_cfg=TEXT)
    add_openclip_config(name, cfg)
    return open_clip.create_model(name, pretrained=None).eval()


@pytest.mark.parametrize("pe", visionpe.list_encoders())
def test_every_encoder_as_openclip_timm_tower(pe):
    tower = register_tower(f"vpe_test_tower_{pe}", pe=pe, **TOWER)
    add_openclip_config(f"VisionPE-test-{pe}", openclip_config(tower, embed_dim=16, image_size=32, text_cfg=TEXT))
    model = open_clip.create_model(f"VisionPE-test-{pe}", pretrained=None)
    trunk = model.visual.trunk
    assert type(trunk) is VisionPEViT and trunk.pe_name == pe
    img = model.encode_image(torch.randn(2, 3, 32, 32), normalize=True)
    txt = model.encode_text(torch.randint(0, 64, (2, 8)), normalize=True)
    assert img.shape == txt.shape == (2, 16) and torch.isfinite(img).all()
    (img @ txt.t()).sum().backward()
    assert model.visual.head.proj.weight.grad is not None


def test_stock_registered_name_and_force_image_size():
    add_openclip_config("VisionPE-Ti-16-rope-mixed", openclip_config(
        "vpe_vit_tiny_patch16_224_rope_mixed", embed_dim=16, image_size=224, text_cfg=TEXT))
    model = open_clip.create_model("VisionPE-Ti-16-rope-mixed", pretrained=None, force_image_size=64)
    # open_clip calls set_input_size on timm towers after building them
    assert model.visual.trunk.patch_embed.grid_size == (4, 4) and model.visual.trunk.pe_name == "rope_mixed"
    assert model.encode_image(torch.randn(1, 3, 64, 64)).shape == (1, 16)
    assert open_clip.get_model_config("VisionPE-Ti-16-rope-mixed")["vision_cfg"]["timm_model_name"] == \
        "vpe_vit_tiny_patch16_224_rope_mixed"


@pytest.mark.parametrize("variant", [
    {},
    {"ls_init_value": 0.1},
    {"pool_type": "avg"},
    {"pool_type": "avg", "final_ln_after_pool": True},
    {"no_ln_pre": True},
])
def test_conversion_matches_openclip(variant):
    torch.manual_seed(0)
    key = "-".join(f"{k}{v}" for k, v in variant.items()) or "default"
    model = native_clip(f"oc-tiny-{key}", **variant)
    x = torch.randn(3, 3, 32, 32)
    ref = model.encode_image(x)
    vit = openclip_visual_to_timm(model)
    torch.testing.assert_close(vit(x), ref, rtol=1e-5, atol=1e-5)
    assert (vit(x) - ref).abs().max() < 1e-5


def test_conversion_quick_gelu_then_swap_and_back_into_clip():
    torch.manual_seed(0)
    add_openclip_config("oc-tiny-qg", dict(embed_dim=16, quick_gelu=True, text_cfg=TEXT, vision_cfg=dict(
        image_size=32, patch_size=8, width=32, layers=2, head_width=16, mlp_ratio=4.0)))
    model = open_clip.create_model("oc-tiny-qg", pretrained=None).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model.encode_image(x)
    vit = openclip_visual_to_timm(model, dynamic_img_size=True)
    torch.testing.assert_close(vit(x), ref, rtol=1e-5, atol=1e-5)
    assert vit(torch.randn(1, 3, 48, 40)).shape == (1, 16)  # pos_embed resampled at run time
    swap_pe(vit, "learned")  # exact: the table is kept
    torch.testing.assert_close(vit(x), ref, rtol=1e-5, atol=1e-5)
    replace_visual(model, vit)
    torch.testing.assert_close(model.encode_image(x), ref, rtol=1e-5, atol=1e-5)
    swap_pe(model.visual.trunk, "rope_mixed")  # now a RoPE-Mixed CLIP tower with CLIP block weights
    out = model.encode_image(torch.randn(2, 3, 48, 48), normalize=True)
    assert out.shape == (2, 16) and torch.isfinite(out).all()


# -- bad input ----------------------------------------------------------------------------------------
def test_bad_input():
    with pytest.raises(TypeError, match="expected an open_clip VisionTransformer.*got Linear"):
        openclip_visual_to_timm(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="attentional pooling"):
        openclip_visual_to_timm(native_clip("oc-tiny-attnpool", attentional_pool=True, attn_pooler_heads=2,
                                            attn_pooler_queries=4))
    with pytest.raises(ValueError, match=r"tower name must look like 'vpe_<letters, digits, _>'; got 'my-tower'"):
        register_tower("my-tower", pe="rope_axial", **TOWER)
    register_tower("vpe_test_tower_twice", pe="rope_axial", **TOWER)
    register_tower("vpe_test_tower_twice", pe="rope_axial", **TOWER)  # same arguments: fine
    with pytest.raises(ValueError, match="already registered with other arguments"):
        register_tower("vpe_test_tower_twice", pe="rope_mixed", **TOWER)
    with pytest.raises(ValueError, match="'vpe_vit_nope' is not a registered timm model"):
        openclip_config("vpe_vit_nope")
    with pytest.raises(ValueError, match="an open_clip config needs 'text_cfg'"):
        add_openclip_config("x", {"embed_dim": 1, "vision_cfg": {}})
    model = native_clip("oc-tiny-mismatch")
    other = openclip_visual_to_timm(native_clip("oc-tiny-mismatch2"))
    other.reset_classifier(8)
    with pytest.raises(ValueError, match="trunk head outputs 8 features but the CLIP embedding has 16"):
        replace_visual(model, other)
