"""What iRPE's and RoPE-ViT's official models share: DeiT / timm-0.3 ViT key names and geometry.

Both official codebases build their ViT from timm's ``PatchEmbed``/``Mlp`` with timm's key names
(``patch_embed.proj``, ``blocks.{i}.norm1``, ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ...), so these keys
map one to one onto :class:`~visionpe.models.VisionPEViT`; only the position encodings differ.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import torch

from .common import OfficialCheckpointError, Rule, ape_holder, block_count, mlp_ratio_for, resample_ape

__all__ = ["vit_rules", "vit_geometry", "ape_rule"]

_BLOCK_KEY = r"blocks\.(\d+)\."


def vit_rules() -> List[Rule]:
    """The timm-named part of a DeiT-style state dict (identical names on our side)."""
    return [
        Rule(r"cls_token", "cls_token"),
        # VisionPEViTDistilled keeps DeiT's distillation token in timm's register-token slot (same position)
        Rule(r"dist_token", "reg_token"),
        Rule(r"patch_embed\.proj\.(weight|bias)", r"patch_embed.proj.\1"),
        Rule(r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", r"blocks.\1.\2.\3"),
        Rule(r"norm\.(weight|bias)", r"norm.\1"),
        Rule(r"head\.(weight|bias)", r"head.\1"),
        Rule(r"head_dist\.(weight|bias)", r"head_dist.\1"),
    ]


def ape_rule(model, src_grid) -> Tuple[Rule, Dict[str, str]]:
    """``pos_embed`` -> the model's APE table (found by structure), resampled when the model's grid differs."""
    key, holder = ape_holder(model)

    def fit(t: torch.Tensor, shape) -> torch.Tensor:
        if tuple(t.shape) == tuple(shape) or src_grid is None or holder is None:
            return t
        if t.ndim != 3 or t.shape[1] != holder.table_prefix + src_grid[0] * src_grid[1]:
            return t  # another prefix-row layout than the model's: the strict shape check reports it
        return resample_ape(t, holder, src_grid)
    return Rule(r"pos_embed", "@ape.pos_embed", fit=fit), {"ape": key[:-len(".pos_embed")] if key else None}


def vit_geometry(sd: Mapping[str, torch.Tensor], family: str, notes: List[str]) -> Dict[str, Any]:
    """timm ``VisionTransformer`` arguments read from a DeiT-style state dict (no heads, no PE).

    ``embed_dim``, ``patch_size``, ``in_chans`` from ``patch_embed.proj.weight``; ``depth`` from the block
    indices; ``mlp_ratio`` and ``qkv_bias`` from block 0; ``num_classes`` from ``head`` (0 without one);
    ``class_token`` from ``cls_token``; ``distilled`` from ``dist_token``.
    """
    if "patch_embed.proj.weight" not in sd:
        raise OfficialCheckpointError(f"{family}: no patch_embed.proj.weight in the checkpoint")
    w = sd["patch_embed.proj.weight"]
    if w.ndim != 4:
        raise OfficialCheckpointError(f"{family}: patch_embed.proj.weight must be (D, C, ph, pw); got {tuple(w.shape)}")
    dim, in_chans, ph, pw = w.shape
    depth = block_count(sd, _BLOCK_KEY, family)
    hidden = {sd[f"blocks.{i}.mlp.fc1.weight"].shape[0] for i in range(depth) if f"blocks.{i}.mlp.fc1.weight" in sd}
    if len(hidden) != 1:
        raise OfficialCheckpointError(f"{family}: every block needs mlp.fc1.weight of one width; found "
                                      f"{sorted(hidden)}")
    head = sd.get("head.weight")
    kw: Dict[str, Any] = dict(
        embed_dim=int(dim), depth=depth, patch_size=(int(ph), int(pw)) if ph != pw else int(ph),
        in_chans=int(in_chans), mlp_ratio=mlp_ratio_for(hidden.pop(), int(dim)),
        qkv_bias="blocks.0.attn.qkv.bias" in sd, class_token="cls_token" in sd,
        num_classes=int(head.shape[0]) if head is not None else 0,
    )
    if "dist_token" in sd:
        if "cls_token" not in sd:
            raise OfficialCheckpointError(f"{family}: a dist_token without a cls_token is not a DeiT layout")
        kw["distilled"] = True
        notes.append("distillation token: built as VisionPEViTDistilled (eval output "
                     "(head(cls) + head_dist(dist)) / 2)")
    return kw
