"""The official-checkpoint converters are general: other depths, widths, heads, grids, a distillation token, APE
with either RoPE; and every bad checkpoint gets an error naming its keys and shapes.

Official-style state dicts of other sizes are synthesised from the tiny reference files (same key layout). Where
the official outputs are still known the check is numeric: blocks whose output projections are zero are
identities, so a deeper checkpoint must reproduce the reference outputs exactly (rtol = atol = 1e-5); a zero APE
added to RoPE-Mixed must reproduce RoPE-Mixed. Otherwise the model must load strictly and run.
"""
import math
import os
import re

import pytest
import torch

from visionpe.models import load_official
from visionpe.models.official import OfficialCheckpointError, VisionPEViTDistilled, inspect_official
from visionpe.models.official.verify import reference_case, run_outputs

from conftest import REFERENCE

REF = os.path.join(REFERENCE, "checkpoints")
TOL = dict(rtol=1e-5, atol=1e-5)
pytestmark = pytest.mark.usefixtures("one_thread")

# per family: official block-key pattern and the keys of a block whose zeroing makes the block an identity
BLOCKS = {
    "irpe": (r"blocks\.(\d+)\.(.+)", "blocks.{}.{}", ("attn.proj", "mlp.fc2")),
    "ropevit": (r"blocks\.(\d+)\.(.+)", "blocks.{}.{}", ("attn.proj", "mlp.fc2")),
    "peg": (r"blocks\.0\.(\d+)\.(.+)", "blocks.0.{}.{}", ("attn.proj", "mlp.fc2")),
    "loope": (r"(?:model\.vit\.)?encoder\.layer\.(\d+)\.(.+)", "encoder.layer.{}.{}",
              ("attention.output.dense", "output.dense")),
}


def case(name):
    return reference_case(REF, name)


def deepen(sd, family, extra=2):
    """Append ``extra`` identity blocks (copies of block 0 with zero output projections) to an official dict."""
    rx, fmt, zero = BLOCKS[family]
    rx = re.compile(rx)
    block0 = {m.group(2): v for k, v in sd.items() for m in [rx.fullmatch(k)] if m and m.group(1) == "0"}
    depth = 1 + max(int(m.group(1)) for k in sd for m in [rx.fullmatch(k)] if m)
    out = dict(sd)
    for i in range(depth, depth + extra):
        for leaf, v in block0.items():
            v = v.clone()
            if leaf.startswith(zero) and leaf.rsplit(".", 1)[0] in zero:
                v.zero_()
            out[fmt.format(i, leaf)] = v
            if family == "loope":
                out[f"model.vit.encoder.layer.{i}.{leaf}"] = v
    if "freqs" in out:  # RoPE-Mixed: one frequency row per block
        f = out["freqs"]
        out["freqs"] = torch.cat([f, f[:, :1].repeat(1, extra, 1) * 1.3], dim=1)
    return out


@pytest.mark.parametrize("name", ["irpe_deit_ctx_product_50_shared_qkv", "ropevit_rope_mixed_deit_LS",
                                  "ropevit_rope_axial_ape_deit_LS", "peg_cpvt_gap_vit", "loope_vit_art"])
def test_deeper_checkpoint_with_identity_blocks_reproduces_the_reference(name):
    sd, t, kwargs = case(name)
    family = name.split("_")[0]
    deep = deepen(sd, family)
    model = load_official(deep, **kwargs)
    assert len(model.blocks) == inspect_official(sd, **kwargs).model_kwargs["depth"] + 2
    out = run_outputs(model, t["input"])
    for key in ("logits", "features", "tokens"):
        torch.testing.assert_close(out[key], t[key], **TOL)


def resize_width(sd, family, old=64, new=96):
    """Random official-style dict of width ``new`` (head_dim 32 kept: 3 heads), same keys and layout."""
    g = torch.Generator().manual_seed(1)
    maps = {old: new, 4 * old: 4 * new, 3 * old: 3 * new, 2 * old: 2 * new}
    out = {}
    for k, v in sd.items():
        if k.startswith("pos_embedding.art_conv.") or k in ("pos_embedding.cord", "pos_embedding.wrap_pos_hilbert"):
            out[k] = v.clone()  # LOOPE's context network does not depend on the width
            continue
        shape = [maps.get(s, s) for s in v.shape]
        if k == "freqs" or k.endswith("div_term"):
            shape[-1] = new // 2
        if ".rpe_" in k:  # iRPE tables: (1, head_dim, nb) / (1, nb, head_dim); head_dim stays 32
            shape = list(v.shape)
        if v.dtype != torch.float32 or k.endswith(("running_var", "freqs_t_x", "freqs_t_y")):
            out[k] = v.clone()
            continue
        out[k] = torch.randn(shape, generator=g) * 0.1 + (1.0 if k.endswith(("norm.weight", "norm1.weight",
                                                                            "norm2.weight")) else 0.0)
    if family == "loope":
        out["pos_embedding.div_term"] = torch.exp(torch.arange(0, new, 2, dtype=torch.float32)
                                                  * -(math.log(10000.0) / new)).unsqueeze(0)
        for a, p in (("model.vit.embeddings.patch_embeddings.", "patch."), ("model.vit.encoder.", "encoder."),
                     ("model.vit.layernorm.", "layernorm.")):
            for k in list(out):
                if k.startswith(a):
                    out[k] = out[p + k[len(a):]]
    return out


@pytest.mark.parametrize("name", ["irpe_deit_ctx_product_50_shared_qkv", "ropevit_rope_mixed_deit_LS",
                                  "ropevit_rope_axial_ape_deit_LS", "peg_cpvt_gap_vit", "loope_vit_art"])
def test_other_width_and_heads_load_strictly_and_run(name):
    sd, t, kwargs = case(name)
    wide = resize_width(deepen(sd, name.split("_")[0], extra=1), name.split("_")[0])
    if kwargs:
        with pytest.raises(OfficialCheckpointError, match="does not store the number of attention heads.*num_heads="):
            load_official(wide)
        kwargs = {"num_heads": 3}
    model = load_official(wide, **kwargs).eval()
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (96, 3, 3)
    with torch.no_grad():
        y = model(t["input"])
    assert y.shape == t["logits"].shape and torch.isfinite(y).all()


def test_released_widths_need_no_head_count():
    sd, t, _ = case("peg_cpvt_gap_vit")
    spec = inspect_official(resize_width(sd, "peg", new=384))
    assert spec.model_kwargs["num_heads"] == 6 and any("head_dim 64" in n for n in spec.notes)


def distilled(sd):
    """DeiT's DistilledVisionTransformer layout: dist_token, a second pos_embed prefix row, head_dist."""
    g = torch.Generator().manual_seed(2)
    out = dict(sd)
    d = sd["cls_token"].shape[-1]
    out["dist_token"] = torch.randn(1, 1, d, generator=g) * 0.3
    pos = sd["pos_embed"]
    out["pos_embed"] = torch.cat([pos[:, :1], torch.randn(1, 1, d, generator=g) * 0.3, pos[:, 1:]], dim=1)
    out["head_dist.weight"] = torch.randn_like(sd["head.weight"]) * 0.1
    out["head_dist.bias"] = torch.randn_like(sd["head.bias"]) * 0.1
    return out


def test_distillation_token_model():
    sd, t, _ = case("irpe_deit_ctx_product_50_shared_qk")
    model = load_official(distilled(sd)).eval()
    assert isinstance(model, VisionPEViTDistilled) and model.num_prefix_tokens == 2
    assert torch.equal(model.dist_token, distilled(sd)["dist_token"])
    assert model.pe.num_buckets == 50  # one prefix bucket shared by the class and distillation tokens
    with torch.no_grad():
        tokens = model.forward_features(t["input"])
        y = model(t["input"])
    torch.testing.assert_close(y, (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2, rtol=0, atol=0)
    assert (y - t["logits"]).abs().max() > 1e-3  # the extra token changes the model, as it should
    model.train().set_distilled_training(True)
    assert isinstance(model(t["input"]), tuple)
    with pytest.raises(OfficialCheckpointError, match="no official RoPE-ViT class has a distillation token"):
        rsd = dict(case("ropevit_rope_axial_ape_deit_LS")[0], dist_token=torch.zeros(1, 1, 64))
        load_official(rsd, num_heads=2)


def test_mixed_rope_with_ape():
    """rope_mixed_ape (released, no reference file): a zero APE must give exactly RoPE-Mixed's outputs."""
    sd, t, kwargs = case("ropevit_rope_mixed_deit_LS")
    with_ape = dict(sd, pos_embed=torch.zeros(1, 196, 64))
    model = load_official(with_ape, **kwargs)
    assert model.pe_name == "rope_mixed_ape" and model.pe.table_prefix == 0
    out = run_outputs(model, t["input"])
    for key in ("logits", "features", "tokens"):
        torch.testing.assert_close(out[key], t[key], **TOL)
    with_ape["pos_embed"] = torch.randn(1, 196, 64) * 0.5
    moved = run_outputs(load_official(with_ape, **kwargs), t["input"])["logits"] - t["logits"]
    assert moved.abs().max() > 1e-3


def test_irpe_without_ape_and_with_a_non_square_grid():
    sd, _, _ = case("irpe_deit_ctx_product_50_shared_k")
    no_ape = {k: v for k, v in sd.items() if k != "pos_embed"}
    model = load_official(no_ape)
    assert model.pe.hooks == frozenset({"bias"})
    rect = dict(sd, pos_embed=torch.randn(1, 1 + 8 * 12, 64) * 0.3)
    with pytest.raises(OfficialCheckpointError, match=r"96 patch rows, not a square grid; pass img_size=\(H, W\)"):
        load_official(rect)
    model = load_official(rect, img_size=(128, 192)).eval()
    assert model.pe.grid_size == (8, 12)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 128, 192)).shape == (1, 10)


def test_mixed_rope_grid_read_from_coordinates():
    sd, _, kwargs = case("ropevit_rope_mixed_deit_LS")
    t = torch.arange(96, dtype=torch.float32)
    rect = dict(sd, freqs_t_x=t % 12, freqs_t_y=torch.div(t, 12, rounding_mode="floor"))
    model = load_official(rect, **kwargs).eval()
    assert tuple(model.patch_embed.img_size) == (128, 192)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 128, 192)).shape == (1, 10)
    rect["freqs_t_x"] = rect["freqs_t_x"].flip(0)
    with pytest.raises(OfficialCheckpointError, match="cannot be dropped safely"):
        load_official(rect, **kwargs)


def test_img_size_resizes_after_loading():
    sd, _, kwargs = case("ropevit_rope_axial_ape_deit_LS")
    model = load_official(sd, img_size=256, **kwargs)
    assert tuple(model.patch_embed.img_size) == (256, 256) and model.pe.pos_embed.shape == (1, 256, 64)


def test_num_classes_change_reinitialises_the_head_with_a_warning():
    sd, t, kwargs = case("peg_cpvt_gap_vit")
    with pytest.warns(UserWarning, match=r"num_classes=4 differs from the checkpoint's 10: head.weight, head.bias"):
        model = load_official(sd, num_classes=4, **kwargs)
    assert model.head.weight.shape == (4, 64)


# -- bad checkpoints: clear errors naming keys and shapes ------------------------------------------------
def test_wrong_family_is_named():
    sd, _, _ = case("irpe_deit_ctx_product_50_shared_k")
    with pytest.raises(OfficialCheckpointError, match=r"family='loope' was asked for but the checkpoint has irpe keys "
                                                      r"\(blocks.0.attn.rpe_k.lookup_table_weight"):
        load_official(sd, family="loope")
    with pytest.raises(ValueError, match="family must be one of"):
        load_official(sd, family="deit")
    with pytest.raises(OfficialCheckpointError, match="not an official checkpoint of a known family"):
        load_official({"weight": torch.zeros(2)})


def test_wrong_size_names_keys_and_shapes():
    sd, _, kwargs = case("loope_vit_art")
    with pytest.raises(OfficialCheckpointError, match=r"shape mismatches, checkpoint -> model \(31\): .*"
                                                      r"cls_token \(1, 1, 64\) -> cls_token expects \(1, 1, 128\)"):
        load_official(sd, embed_dim=128, **kwargs)
    sd, _, kwargs = case("peg_cpvt_gap_vit")
    with pytest.raises(OfficialCheckpointError, match=r"num_heads=3 does not divide the width 64"):
        load_official(sd, num_heads=3)


def test_missing_and_unknown_keys_are_listed():
    sd, _, kwargs = case("ropevit_rope_axial_deit_LS")
    bad = {k: v for k, v in sd.items() if k != "blocks.1.gamma_2"}
    with pytest.raises(OfficialCheckpointError, match=r"gammas in some blocks only"):
        load_official(bad, **kwargs)
    bad = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(OfficialCheckpointError, match=r"model keys the checkpoint does not fill \(1\): "
                                                      r"blocks.1.mlp.fc2.bias \(64,\)"):
        load_official(bad, **kwargs)
    bad = dict(sd, **{"blocks.0.attn.rel_bias": torch.zeros(3, 5)})
    with pytest.raises(OfficialCheckpointError, match=r"not part of a RoPE-ViT.*blocks.0.attn.rel_bias \(3, 5\)"):
        load_official(bad, **kwargs)


def test_layout_errors():
    sd, _, kwargs = case("peg_cpvt_gap_vit")
    with pytest.raises(OfficialCheckpointError, match="multi-stage Twins pyramid"):
        load_official(dict(sd, **{"patch_embeds.1.proj.weight": torch.zeros(8, 64, 2, 2)}), **kwargs)
    with pytest.raises(OfficialCheckpointError, match=r"spatial-reduction attention"):
        load_official(dict(sd, **{"blocks.0.0.attn.sr.weight": torch.zeros(64, 64, 2, 2)}), **kwargs)
    bad = {k: v for k, v in sd.items() if k != "blocks.0.1.attn.kv.bias"}
    with pytest.raises(OfficialCheckpointError, match=r"blocks.1.attn.qkv.bias is the concatenation of 2 official "
                                                      r"tensors; only \['blocks.0.1.attn.q.bias'\]"):
        load_official(bad, **kwargs)
    lsd, _, lkw = case("loope_vit_art")
    bad = dict(lsd)
    bad["model.vit.layernorm.weight"] = bad["layernorm.weight"] + 1
    with pytest.raises(OfficialCheckpointError, match="model.vit.layernorm.weight: differs from its primary key"):
        load_official(bad, **lkw)
    bad = dict(lsd, **{"pos_embedding.wrap_pos_hilbert": lsd["pos_embedding.wrap_pos_hilbert"].flip(0)})
    with pytest.raises(OfficialCheckpointError, match="pos_embedding.wrap_pos_hilbert: differs from the value"):
        load_official(bad, **lkw)
    dedup = {k: v for k, v in lsd.items() if not k.startswith(("patch.", "encoder.", "layernorm."))}
    load_official(dedup, **lkw)  # a deduplicating save kept only the aliases: still complete


def test_irpe_bucket_options_that_are_not_stored():
    sd, _, _ = case("irpe_deit_ctx_product_50_shared_k")
    odd = {k: (v[..., :-1][..., :14] if ".rpe_" in k else v) for k, v in sd.items()}  # 13 + 1 buckets
    with pytest.raises(OfficialCheckpointError, match="fit both the 'euc' and 'quant' methods"):
        load_official(odd)
    with pytest.raises(OfficialCheckpointError, match="ratio is not stored"):
        load_official(odd, pe={"method": "euc"})
    model = load_official(odd, pe={"method": "euc", "ratio": 3.0})
    assert (model.pe.method, model.pe.num_buckets) == ("euc", 14)


def test_non_tensor_and_bad_sources():
    sd, _, kwargs = case("peg_cpvt_gap_vit")
    with pytest.raises(OfficialCheckpointError, match=r"non-tensor entries: epoch \(int\)"):
        load_official(dict(sd, epoch=3), **kwargs)
    with pytest.raises(TypeError, match="path_or_state_dict must be a file path or a state dict"):
        load_official(42)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_official("no/such/file.pth")
