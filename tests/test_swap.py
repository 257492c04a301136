"""PE swap on live timm ViTs / VisionPEViTs and from local checkpoint files."""
import math

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.optim import create_optimizer_v2

import visionpe
from visionpe.models import VisionPEViT, adapt_state_dict, create_swapped, swap_pe
from visionpe.models.vit import PEAttention, PEBlock

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def plain(**kw):
    return timm.create_model("vit_tiny_patch16_224", **{**TINY, **kw}).eval()


def non_pe_state(m):
    return {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("pe.") and k != "pos_embed"}


def test_swap_to_learned_is_exact_on_plain_timm_vit():
    m = plain()
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    params_before = {n: p for n, p in m.named_parameters() if n != "pos_embed"}
    table = m.pos_embed.detach().clone()
    out = swap_pe(m, "learned")
    assert out is m and type(m) is VisionPEViT
    assert all(type(b) is PEBlock and type(b.attn) is PEAttention for b in m.blocks)
    torch.testing.assert_close(m.pe.pos_embed.detach(), table, rtol=0, atol=0)
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-6)
    # in place: the very same parameter objects (an optimizer built before the swap still holds them)
    after = dict(m.named_parameters())
    assert all(after[n] is p for n, p in params_before.items())


def test_swap_no_embed_class_and_registers_exact():
    m = plain(no_embed_class=True, reg_tokens=2)
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    swap_pe(m, "learned")
    assert m.pe.pos_embed.shape == (1, 3 + 16, 32)  # zero rows added for cls + 2 registers
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-6)
    m2 = plain(reg_tokens=2)
    ref2 = m2(x)
    swap_pe(m2, {"name": "learned", "embed_prefix": False})  # prefix rows folded into the tokens
    assert m2.pe.pos_embed.shape == (1, 16, 32)
    torch.testing.assert_close(m2(x), ref2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pe", visionpe.list_encoders())
def test_swap_plain_vit_to_every_encoder_matches_fresh_model(pe):
    m = plain()
    before = non_pe_state(m)
    cls_row = m.pos_embed[:, :1].detach().clone()
    swap_pe(m, pe)
    fresh = VisionPEViT(pe=pe, **TINY)
    own, ref = m.state_dict(), fresh.state_dict()
    assert {k: tuple(v.shape) for k, v in own.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert {n: type(mod) for n, mod in m.named_modules()} == {n: type(mod) for n, mod in fresh.named_modules()}
    assert all(hasattr(m, a) for a in vars(fresh)) and m.pos_embed is None  # what VisionPEViT.__init__ sets
    for k, v in before.items():
        table = fresh.pe.absolute_table()
        if k == "cls_token" and (table is None or not table.table_prefix):  # APE class row folded into the token
            torch.testing.assert_close(own[k], v + cls_row, rtol=0, atol=0)
        else:
            torch.testing.assert_close(own[k], v, rtol=0, atol=0)
    out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for n, p in m.pe.named_parameters())


def test_ape_table_moves_through_the_absolute_table_protocol():
    # iRPE holds a LearnedAPE (pe.ape.pos_embed): swap finds it through PositionEncoder.absolute_table()
    m = plain()
    x = torch.randn(2, 3, 32, 32)
    table = m.pos_embed.detach().clone()
    swap_pe(m, "irpe")
    assert m.pe.absolute_table() is m.pe.ape and "pe.pos_embed" not in m.state_dict()
    torch.testing.assert_close(m.pe.ape.pos_embed.detach(), table, rtol=0, atol=0)
    swap_pe(m, "learned")                                      # and on from iRPE to a plain learned APE
    torch.testing.assert_close(m.pe.pos_embed.detach(), table, rtol=0, atol=0)
    ref = plain()
    ref.load_state_dict({**non_pe_state(m), "pos_embed": table})
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=1e-6)
    # an old-style VisionPEViT checkpoint of iRPE (key pe.pos_embed) adapts onto the new layout
    src = VisionPEViT(pe="irpe", **TINY)
    old = {("pe.pos_embed" if k == "pe.ape.pos_embed" else k): v for k, v in src.state_dict().items()}
    sd = adapt_state_dict(old, VisionPEViT(pe="irpe", **TINY))
    torch.testing.assert_close(sd["pe.ape.pos_embed"], src.pe.ape.pos_embed.detach(), rtol=0, atol=0)


def test_swap_initialises_new_pe_as_the_encoder_does():
    m = swap_pe(plain(), "rope_mixed")
    f = m.pe.freqs.detach()
    assert f.shape == (2, 2, 2, 8)  # (axes, depth, heads, head_dim/2)
    # RoPE-Mixed init: |(fx, fy)| per pair is theta^(-4i/head_dim), random rotation per block and head
    mag = (f[0] ** 2 + f[1] ** 2).sqrt()
    expect = 1.0 / (10.0 ** (torch.arange(0, 16, 4).float() / 16))
    torch.testing.assert_close(mag, expect.repeat(2).expand_as(mag), rtol=1e-5, atol=1e-6)
    r = swap_pe(plain(), "relpos_bias")
    assert r.pe.tables[0].std() > 0 and r.pe.tables[0].abs().max() <= 0.04  # trunc-normal std 0.02
    opt = create_optimizer_v2(m, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.7)
    assert any(p is m.pe.freqs for g in opt.param_groups for p in g["params"] if g["weight_decay"] == 0.0)


def test_swap_between_visionpe_encoders_keeps_weights():
    m = VisionPEViT(pe="rope_mixed", **TINY).eval()
    before = non_pe_state(m)
    freqs = m.pe.freqs.detach().clone()
    swap_pe(m, {"name": "rope_mixed", "theta": 10.0})  # same encoder class: parameters carried over
    torch.testing.assert_close(m.pe.freqs.detach(), freqs, rtol=0, atol=0)
    swap_pe(m, "rope_axial")
    assert m.pe_name == "rope_axial" and m.pe_cfg == {"name": "rope_axial"}
    assert not [k for k in m.state_dict() if k.startswith("pe.")]
    for k, v in before.items():
        torch.testing.assert_close(m.state_dict()[k], v, rtol=0, atol=0)
    swap_pe(m, "learned")
    assert m.pe.pos_embed.shape == (1, 17, 32) and m(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_swap_keeps_dtype_and_dynamic_size():
    m = plain(dynamic_img_size=True).to(torch.bfloat16)
    swap_pe(m, "rope_axial")
    assert m.pe.freq_matrix.dtype == torch.float32  # rotary frequencies stay float32
    out = m(torch.randn(1, 3, 48, 40, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 5)


# -- checkpoint files (pretrained_cfg_overlay=dict(file=...)) ------------------------------------------
@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(1)
    src = plain()  # a randomly initialised timm ViT, saved as a "pretrained" checkpoint
    path = tmp_path / "vit_tiny_random.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    return src, path


def test_checkpoint_overlay_into_vpe_learned_is_exact(ckpt):
    src, path = ckpt
    m = timm.create_model("vpe_vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          pe="learned", **TINY).eval()
    assert m.pretrained_cfg["mean"] == timm.get_pretrained_cfg("vpe_vit_tiny_patch16_224").mean  # cfg kept
    x = torch.randn(2, 3, 32, 32)
    # num_classes 5 != cfg's 1000: timm re-initialises the head, so compare pre-logits
    torch.testing.assert_close(m.forward_head(m.forward_features(x), pre_logits=True),
                               src.forward_head(src.forward_features(x), pre_logits=True), rtol=0, atol=1e-6)
    kept = create_swapped("vpe_vit_tiny_patch16_224", path, pe="learned", keep_head=True, **TINY).eval()
    torch.testing.assert_close(kept(x), src(x), rtol=0, atol=1e-6)


def test_checkpoint_overlay_resamples_pos_embed(ckpt):
    src, path = ckpt
    m = create_swapped("vpe_vit_tiny_patch16_224", path, pe="learned", **{**TINY, "img_size": 48})
    expect = resample_abs_pos_embed(src.pos_embed.detach(), new_size=(6, 6), old_size=(4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(m.pe.pos_embed.detach(), expect, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("arch", ["vpe_vit_tiny_patch16_224", "vit_tiny_patch16_224"])
def test_checkpoint_to_rope_keeps_block_weights(ckpt, arch):
    src, path = ckpt
    m = create_swapped(arch, path, pe="rope_mixed", **TINY)
    assert type(m) is VisionPEViT and m.pe_name == "rope_mixed" and m.pos_embed is None
    sd, ref = m.state_dict(), src.state_dict()
    for k in ref:
        if k.startswith("blocks.") or k.startswith("patch_embed.") or k.startswith("norm."):
            torch.testing.assert_close(sd[k], ref[k], rtol=0, atol=0)
    torch.testing.assert_close(sd["cls_token"], ref["cls_token"] + ref["pos_embed"][:, :1], rtol=0, atol=0)
    assert "pe.freqs" in sd and not any("pos_embed" in k for k in sd)


# -- bad input ----------------------------------------------------------------------------------------
def test_incompatible_checkpoint_lists_missing_and_unexpected(ckpt, tmp_path):
    src, path = ckpt
    with pytest.raises(ValueError, match=r"missing in checkpoint \(12\): \[blocks\.2\.attn\.proj\.bias"):
        create_swapped("vpe_vit_tiny_patch16_224", path, pe="rope_axial", **{**TINY, "depth": 3})
    with pytest.raises(ValueError, match=r"unexpected in checkpoint.*\(12\): \[blocks\.1\.attn"):
        create_swapped("vit_tiny_patch16_224", path, pe="rope_axial", **{**TINY, "depth": 1})
    with pytest.raises(ValueError, match=r"shape mismatches \(\d+, checkpoint vs model\): .*\(32,\) vs \(64,\)"):
        create_swapped("vit_tiny_patch16_224", path, pe="rope_axial", **{**TINY, "embed_dim": 64})
    with pytest.raises(ValueError, match=r"checkpoint file .*nope.safetensors' does not exist"):
        create_swapped("vit_tiny_patch16_224", tmp_path / "nope.safetensors", pe="rope_axial", **TINY)


def test_adapt_state_dict_rejects_non_square_table():
    m = VisionPEViT(pe="learned", **TINY)
    sd = {k: v for k, v in m.state_dict().items() if k != "pe.pos_embed"}
    with pytest.raises(ValueError, match=r"pos_embed has shape \(1, 13, 32\).*square grid"):
        adapt_state_dict(sd, m, pos_embed=torch.zeros(1, 13, 32))


def test_swap_rejects_unsupported_models():
    with pytest.raises(TypeError, match="expects a timm VisionTransformer or VisionPEViT; got Linear"):
        swap_pe(torch.nn.Linear(2, 2), "rope_axial")
    m = plain()
    m.blocks[1].attn = torch.nn.Identity()
    with pytest.raises(TypeError, match=r"blocks\[1\]\.attn is Identity"):
        swap_pe(m, "rope_axial")
    with pytest.raises(ValueError, match="patch dropout"):
        swap_pe(plain(patch_drop_rate=0.1), "rope_axial")
    m = plain()
    with pytest.raises(ValueError, match="unknown encoder 'rope_mixd'"):
        swap_pe(m, "rope_mixd")
    assert type(m) is not VisionPEViT and m.pos_embed is not None  # untouched after the error
    assert math.isfinite(m(torch.randn(1, 3, 32, 32)).sum().item())
