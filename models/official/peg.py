"""CPVT's PEG (Chu et al., ICLR 2023) as released in Twins (Meituan-AutoML/Twins ``gvt.py``).

The CPVT repository has no code; the official PEG is Twins' ``PosCNN``, and a one-stage ``CPVTV2`` with
``sr_ratio`` 1 is exactly CPVT-GAP: a plain ViT (Twins ``PatchEmbed`` = conv + LayerNorm, attention with
separate ``q`` and ``kv`` Linear layers) with the PEG after block 0, no class token, no APE, and global average
pooling of the final norm's output. Keys: ``patch_embeds.0.{proj,norm}``, ``blocks.0.{i}.*``,
``pos_block.0.proj.0``, ``norm``, ``head``.

From the tensors: width, depth, patch, MLP ratio, qkv bias, the PEG kernel, the class count. NOT stored: the
head count (released widths: head_dim 64; otherwise ``num_heads=``), the LayerNorm eps (Twins' ``PatchEmbed``
uses ``nn.LayerNorm`` = 1e-5; blocks and final norm ``norm_layer``, 1e-6 in every Twins factory; override
with ``norm_eps=``). Pyramids (``patch_embeds.1``, spatial-reduction ``attn.sr``) are not ViTs and are refused.

visionpe had no patch-embedding norm in its ViT wiring; timm's ``VisionTransformer(embed_norm_layer=...)``
provides it, and ``vpe_vit_official`` exposes it as ``embed_norm_eps`` (JSON-able).
"""
from __future__ import annotations

import re
from typing import Any, List, Mapping

import torch

from .common import OfficialCheckpointError, OfficialSpec, Rule, block_count, heads_for, mlp_ratio_for

NAME = "peg"
OPTIONS = ()
TITLE = "CPVT PEG (Twins gvt.CPVTV2, one stage = CPVT-GAP)"

#: the family's key table: official -> ours (``q`` and ``kv`` are concatenated into timm's ``qkv``)
KEYS = [
    (r"patch_embeds\.0\.(proj|norm)\.(weight|bias)", r"patch_embed.\1.\2", None),
    (r"blocks\.0\.(\d+)\.attn\.q\.(weight|bias)", r"blocks.\1.attn.qkv.\2", (0, 2)),
    (r"blocks\.0\.(\d+)\.attn\.kv\.(weight|bias)", r"blocks.\1.attn.qkv.\2", (1, 2)),
    (r"blocks\.0\.(\d+)\.(norm1|norm2|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", r"blocks.\1.\2.\3", None),
    (r"pos_block\.0\.proj\.0\.(weight|bias)", r"@peg.\1", None),
    (r"norm\.(weight|bias)", r"norm.\1", None),
    (r"head\.(weight|bias)", r"head.\1", None),
]


def signature(sd: Mapping[str, torch.Tensor]) -> List[str]:
    return [k for k in sd if k.startswith(("pos_block.", "patch_embeds."))][:2]


def infer(sd: Mapping[str, torch.Tensor], given: Mapping[str, Any]) -> OfficialSpec:
    notes: List[str] = []
    extra = sorted(k for k in sd if re.match(r"(patch_embeds|blocks|pos_block)\.[1-9]", k))
    if extra:
        raise OfficialCheckpointError(f"PEG: a multi-stage Twins pyramid (keys {extra[:4]}) is not a ViT; only a "
                                      f"one-stage CPVTV2 (CPVT-GAP) maps onto VisionPEViT")
    sr = [k for k in sd if ".attn.sr." in k]
    if sr:
        raise OfficialCheckpointError(f"PEG: spatial-reduction attention (sr_ratio > 1: {sr[0]}) is not supported")
    for k in ("cls_token", "pos_embeds.0"):
        if k in sd:
            raise OfficialCheckpointError(f"PEG: {k} is present: a PyramidVisionTransformer with an APE, not CPVTV2")
    w = sd.get("patch_embeds.0.proj.weight")
    if w is None or w.ndim != 4:
        raise OfficialCheckpointError("PEG: patch_embeds.0.proj.weight (D, C, ph, pw) is missing")
    dim, in_chans, ph, pw = (int(s) for s in w.shape)
    depth = block_count(sd, r"blocks\.0\.(\d+)\.", NAME)
    hidden = sd["blocks.0.0.mlp.fc1.weight"].shape[0] if "blocks.0.0.mlp.fc1.weight" in sd else None
    if hidden is None:
        raise OfficialCheckpointError("PEG: blocks.0.0.mlp.fc1.weight is missing")
    conv = sd.get("pos_block.0.proj.0.weight")
    if conv is None or conv.ndim != 4 or conv.shape[1] != 1 or conv.shape[2] != conv.shape[3]:
        raise OfficialCheckpointError(f"PEG: pos_block.0.proj.0.weight must be a depthwise (D, 1, k, k) conv; got "
                                      f"{None if conv is None else tuple(conv.shape)}")
    head = sd.get("head.weight")
    heads = heads_for(dim, given.get("num_heads"), None, "Twins/PEG", notes)
    kw = dict(embed_dim=dim, depth=depth, num_heads=heads, patch_size=ph if ph == pw else (ph, pw), in_chans=in_chans,
              mlp_ratio=mlp_ratio_for(int(hidden), dim), qkv_bias="blocks.0.0.attn.q.bias" in sd,
              num_classes=int(head.shape[0]) if head is not None else 0,
              class_token=False, global_pool="avg", fc_norm=False,
              pe={"name": "peg", "peg_blocks": [0], "kernel_size": int(conv.shape[-1])},
              norm_eps=1e-6, embed_norm_eps=1e-5 if "patch_embeds.0.norm.weight" in sd else None)
    notes += ["PEG after block 0 (CPVTV2 applies pos_block[i] after the first block of the stage)",
              "no class token, global average pooling of the final norm's output (CPVT-GAP)",
              "LayerNorm eps: 1e-5 in the patch embedding (nn.LayerNorm in Twins' PatchEmbed), 1e-6 elsewhere "
              "(the Twins factories' norm_layer); not stored, override with norm_eps="]
    return OfficialSpec(NAME, kw, None, notes)


def rules(model, spec: OfficialSpec):
    """The key table for ``model`` (``@peg``: the encoder's single PEG conv); returns ``(rules, roles)``."""
    from torch import nn
    convs = [n for n, m in model.pe.named_modules() if isinstance(m, nn.Conv2d)]
    roles = {"peg": f"pe.{convs[0]}" if len(convs) == 1 else None}
    return [Rule(o, t, part=p) for o, t, p in KEYS], roles
