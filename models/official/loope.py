"""LOOPE (Chowdhury et al. 2025): ``models.vit_art.ViT_Art`` of AbtahiMajeed144/LOOPE.

``ViT_Art`` wraps an HF ``ViTForImageClassification`` but runs its own forward: its ``patch`` (= the HF patch
embedding), its ``cls_token``, ``+ pos_embedding(x)`` (``ArtPE``: LOOPE), the HF ``encoder``, ``layernorm`` and its
own ``classifier`` on the class token. ``state_dict()`` therefore holds every HF tensor twice (``patch.*`` ==
``model.vit.embeddings.patch_embeddings.*``, ``encoder.*`` == ``model.vit.encoder.*``, ``layernorm.*`` ==
``model.vit.layernorm.*``) plus HF parts the forward never uses (``model.classifier``, the HF class token and
its frozen zero position table). HF layers: ``layernorm_before`` -> self-attention (separate query/key/value)
-> ``output.dense`` + residual -> ``layernorm_after`` -> ``intermediate.dense`` + GELU -> ``output.dense`` +
residual; LayerNorm eps 1e-12 (HF's ``ViTConfig`` default, not stored).

From the tensors: width, depth, patch, MLP width, qkv bias, class count, the image size (``ArtPE.cord``), the
context network's patch and channels. NOT stored: the head count (released width 768: 12 heads; otherwise
``num_heads=``). The deterministic ArtPE buffers are dropped after checking that they equal what visionpe's
LOOPE computes (pixel coordinates, Gilbert ranks, sinusoid frequencies).
"""
from __future__ import annotations

import math
import re
from typing import Any, List, Mapping

import torch

from .common import OfficialCheckpointError, OfficialSpec, Rule, block_count, find_module, heads_for, mlp_ratio_for

NAME = "loope"
OPTIONS = ()
TITLE = "LOOPE ViT_Art (AbtahiMajeed144/LOOPE)"

_L = r"encoder\.layer\.(\d+)\."
#: the family's key table: official -> ours (query/key/value are concatenated into timm's qkv)
KEYS = [
    (r"patch\.projection\.(weight|bias)", r"patch_embed.proj.\1", None),
    (r"cls_token", "cls_token", None),
    (_L + r"attention\.attention\.query\.(weight|bias)", r"blocks.\1.attn.qkv.\2", (0, 3)),
    (_L + r"attention\.attention\.key\.(weight|bias)", r"blocks.\1.attn.qkv.\2", (1, 3)),
    (_L + r"attention\.attention\.value\.(weight|bias)", r"blocks.\1.attn.qkv.\2", (2, 3)),
    (_L + r"attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2", None),
    (_L + r"layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2", None),
    (_L + r"layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2", None),
    (_L + r"intermediate\.dense\.(weight|bias)", r"blocks.\1.mlp.fc1.\2", None),
    (_L + r"output\.dense\.(weight|bias)", r"blocks.\1.mlp.fc2.\2", None),
    (r"layernorm\.(weight|bias)", r"norm.\1", None),
    (r"classifier\.(weight|bias)", r"head.\1", None),
    (r"pos_embedding\.cls_token", r"@loope.prefix_pos", None),
    # ArtPE.art_conv (Sequential): convs at 0, 2, 4, 6, 8, BatchNorm at 10, Linear at 12 -> LoopeContext modules
    (r"pos_embedding\.art_conv\.0\.(.+)", r"@loope.context.conv1.\1", None),
    (r"pos_embedding\.art_conv\.2\.(.+)", r"@loope.context.conv2.\1", None),
    (r"pos_embedding\.art_conv\.4\.(.+)", r"@loope.context.conv3.\1", None),
    (r"pos_embedding\.art_conv\.6\.(.+)", r"@loope.context.conv4.\1", None),
    (r"pos_embedding\.art_conv\.8\.(.+)", r"@loope.context.conv5.\1", None),
    (r"pos_embedding\.art_conv\.10\.(.+)", r"@loope.context.norm.\1", None),
    (r"pos_embedding\.art_conv\.12\.(.+)", r"@loope.context.linear.\1", None),
]
#: aliases torch writes for modules registered twice: alias prefix -> primary prefix
ALIASES = {
    "model.vit.embeddings.patch_embeddings.": "patch.",
    "model.vit.encoder.": "encoder.",
    "model.vit.layernorm.": "layernorm.",
}
UNUSED = {
    r"model\.classifier\.(weight|bias)": "the HF classifier; ViT_Art.forward uses its own `classifier`",
    r"model\.vit\.embeddings\.cls_token": "the HF class token; ViT_Art.forward uses its own `cls_token`",
    r"model\.vit\.embeddings\.position_embeddings": "HF's position table, replaced by frozen zeros and never used "
                                                    "(ViT_Art.forward bypasses the HF embeddings)",
}


def signature(sd: Mapping[str, torch.Tensor]) -> List[str]:
    return [k for k in sd if k.startswith("pos_embedding.art_conv.")][:1]


def with_primary_keys(sd: Mapping[str, torch.Tensor]) -> dict:
    """``sd`` with every aliased tensor under its primary name too (a deduplicating save may keep only one)."""
    out = dict(sd)
    for alias, primary in ALIASES.items():
        for k, v in sd.items():
            if k.startswith(alias):
                out.setdefault(primary + k[len(alias):], v)
    return out


def infer(sd: Mapping[str, torch.Tensor], given: Mapping[str, Any]) -> OfficialSpec:
    notes: List[str] = []
    sd = with_primary_keys(sd)
    w = sd.get("patch.projection.weight")
    if w is None or w.ndim != 4:
        raise OfficialCheckpointError("LOOPE: patch.projection.weight (D, C, ph, pw) is missing")
    dim, in_chans, ph, pw = (int(s) for s in w.shape)
    depth = block_count(sd, _L, NAME)
    hidden = sd.get("encoder.layer.0.intermediate.dense.weight")
    cord = sd.get("pos_embedding.cord")
    conv1 = sd.get("pos_embedding.art_conv.0.weight")
    head = sd.get("classifier.weight")
    if hidden is None or cord is None or conv1 is None or head is None:
        raise OfficialCheckpointError("LOOPE: intermediate.dense, pos_embedding.cord, pos_embedding.art_conv.0 and "
                                      "classifier are all required")
    if cord.ndim != 3 or cord.shape[0] != 2:
        raise OfficialCheckpointError(f"LOOPE: pos_embedding.cord must be (2, H, W); got {tuple(cord.shape)}")
    img = (int(cord.shape[1]), int(cord.shape[2]))
    if img[0] % ph or img[1] % pw:
        raise OfficialCheckpointError(f"LOOPE: image size {img} (from pos_embedding.cord) is not a multiple of the "
                                      f"patch {(ph, pw)}")
    grid = (img[0] // ph, img[1] // pw)
    notes.append(f"image size {img}: from pos_embedding.cord (ArtPE's pixel-coordinate buffer)")
    heads = heads_for(dim, given.get("num_heads"), None, "LOOPE", notes)
    ctx_patch = int(conv1.shape[-1])
    pe = {"name": "loope", "prefix_pe": "learned", "context_patch": ctx_patch, "in_chans": int(conv1.shape[1]) - 2,
          "variant": "official", "start": 1, "context_norm": "batch"}
    kw = dict(embed_dim=dim, depth=depth, num_heads=heads, patch_size=ph if ph == pw else (ph, pw), in_chans=in_chans,
              img_size=img, mlp_ratio=mlp_ratio_for(int(hidden.shape[0]), dim),
              qkv_bias="encoder.layer.0.attention.attention.query.bias" in sd, num_classes=int(head.shape[0]),
              class_token=True, pe=pe, norm_eps=1e-12)
    notes += ["LayerNorm eps 1e-12: HF ViTConfig's default layer_norm_eps (not stored)",
              "aliases (model.vit.*) are dropped after checking they equal their primary keys; the HF classifier, "
              "class token and zero position table are unused by ViT_Art.forward and dropped"]
    return OfficialSpec(NAME, kw, grid, notes)


def _alias_check(key, val, sd):
    primary = next(p + key[len(a):] for a, p in ALIASES.items() if key.startswith(a))
    if primary in sd and not torch.equal(sd[primary], val):
        return f"differs from its primary key {primary}: the checkpoint was not saved from one ViT_Art"
    return None


def _buffer_check(enc, grid):
    """Check ArtPE's deterministic buffers against what visionpe's LOOPE ``enc`` computes before dropping them."""

    def check(key, val, sd):
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "cord":
            ours = enc.context.coords(tuple(val.shape[1:]), val.device, torch.float64)
            ok = torch.allclose(val.double(), ours, rtol=0, atol=1e-6)
        elif leaf == "wrap_pos_hilbert":
            ours = enc.order(grid, val.device, torch.float64)
            ok = val.numel() == ours.numel() and torch.equal(val.double().reshape(-1), ours)
        else:  # div_term
            d = enc.dim
            ours = torch.exp(torch.arange(0, d, 2, dtype=torch.float64) * (-math.log(enc.temperature) / d))
            ok = val.numel() == ours.numel() and torch.allclose(val.double().reshape(-1), ours, rtol=1e-6, atol=0)
        return None if ok else f"differs from the value visionpe's LOOPE computes (shape {tuple(val.shape)})"
    return check


def rules(model, spec: OfficialSpec):
    """The key table for ``model`` (``@loope``: the encoder); returns ``(rules, roles)``."""
    from visionpe.encoders.loope import LOOPE
    prefix = find_module(model, LOOPE)
    roles = {"loope": prefix}
    table = [Rule(o, t, part=p, fit=_linear_fit(model, spec.grid) if "linear" in t else None) for o, t, p in KEYS]
    drops = [Rule(re.escape(a) + r".+", None, reason=f"alias of {p}* (the same module registered twice)",
                  check=_alias_check) for a, p in ALIASES.items()]
    drops += [Rule(o, None, reason=r) for o, r in UNUSED.items()]
    if prefix is not None:
        drops.append(Rule(r"pos_embedding\.(cord|wrap_pos_hilbert|div_term)", None,
                          reason="deterministic ArtPE buffer (pixel coordinates / Gilbert ranks / sinusoid "
                                 "frequencies), recomputed by visionpe; checked equal before dropping",
                          check=_buffer_check(model.get_submodule(prefix), spec.grid)))
    return table + drops, roles


def _linear_fit(model, src_grid):
    """The context network's N x N linear resampled when the model's grid differs (timm loading path)."""
    def fit(t: torch.Tensor, shape) -> torch.Tensor:
        if tuple(t.shape) == tuple(shape):
            return t
        from visionpe.encoders.loope import LOOPE, resample_square_operator
        ctx = model.get_submodule(find_module(model, LOOPE)).context
        return resample_square_operator(t, tuple(ctx.grid_size), src_grid)
    return fit


def prepare(sd: Mapping[str, torch.Tensor]) -> dict:
    """Fill primary keys from aliases (so a deduplicated save converts too)."""
    return with_primary_keys(sd)
