"""RoPE-ViT (Heo et al., ECCV 2024): the DeiT-III models of naver-ai/rope-vit ``models/vit_rope.py``.

Official layout (``rope_vit_models``, a ``deit/models_v2.vit_models``): timm-named ViT keys, LayerScale as
``blocks.{i}.gamma_1``/``gamma_2`` (``Layer_scale_init_Block``), optional ``pos_embed`` ``(1, h*w, D)`` added to
the patches only (no class-token row), and for RoPE-Mixed a learnable ``freqs`` ``(2, depth, heads*head_dim/2)``
([0] x-, [1] y-frequencies, heads concatenated) plus the buffers ``freqs_t_x``/``freqs_t_y`` (patch x / y
index, row-major), which the official loader deletes. RoPE rotates every token but the first (the class
token), channel pairs interleaved, x on the first half of the frequencies (axial, theta 100).

Axial RoPE has no tensor at all, so an axial checkpoint is recognised by DeiT-III's ``gamma_1`` naming; with a
``pos_embed`` it looks exactly like a DeiT-III APE checkpoint (RoPE-ViT's own ``deit_*_patch16_LS`` baseline):
``rope='none'`` loads that one, and the default (RoPE-Axial) is said in the spec's notes and a warning.
"""
from __future__ import annotations

import logging
from typing import Any, List, Mapping

import torch

from .common import OfficialCheckpointError, OfficialSpec, Rule, find_param, grid_from_rows, heads_for
from .deit import ape_rule, vit_geometry, vit_rules

NAME = "ropevit"
#: loader options of this family (not model arguments)
OPTIONS = ("rope",)
TITLE = "RoPE-ViT DeiT-III (naver-ai/rope-vit)"

_logger = logging.getLogger(__name__)

#: the family's key table: official -> ours (everything else is DeiT/timm-named, see deit.vit_rules)
KEYS = [
    (r"blocks\.(\d+)\.gamma_([12])", r"blocks.\1.ls\2.gamma"),
    (r"freqs", "@rope_freqs.freqs"),
]
#: official axial theta (compute_axial_cis in every rope_axial factory); mixed theta only sets the init
AXIAL_THETA = 100.0
ROPE_KINDS = ("axial", "mixed", "none")


def signature(sd: Mapping[str, torch.Tensor]) -> List[str]:
    """RoPE-ViT / DeiT-III keys in ``sd``: RoPE-Mixed ``freqs`` / ``freqs_t_*``, or ``gamma_1`` LayerScale."""
    keys = [k for k in ("freqs", "freqs_t_x", "freqs_t_y") if k in sd and (k != "freqs" or sd[k].ndim == 3)]
    if keys:
        return keys
    return [k for k in sd if k.startswith("blocks.") and k.endswith(".gamma_1")][:1]


def _grid_from_t(sd, notes: List[str]):
    tx, ty = sd["freqs_t_x"], sd["freqs_t_y"]
    n = tx.numel()
    w = int(tx.max().item()) + 1 if n else 0
    if n == 0 or ty.numel() != n or n % w:
        raise OfficialCheckpointError(f"RoPE-ViT: freqs_t_x {tuple(tx.shape)} / freqs_t_y {tuple(ty.shape)} are not "
                                      f"the coordinates of a grid")
    t = torch.arange(n, dtype=torch.float32)
    if not (torch.equal(tx.float(), t % w) and torch.equal(ty.float(), torch.div(t, w, rounding_mode="floor"))):
        raise OfficialCheckpointError("RoPE-ViT: freqs_t_x / freqs_t_y are not x = t % W, y = t // W of a row-major "
                                      "grid, which is what visionpe computes; they cannot be dropped safely")
    notes.append(f"grid {n // w}x{w}: from freqs_t_x / freqs_t_y (x = t % W); both are then dropped (recomputed)")
    return n // w, w


def infer(sd: Mapping[str, torch.Tensor], given: Mapping[str, Any]) -> OfficialSpec:
    """Model arguments of an official RoPE-ViT state dict (``given``: user overrides, see load_official)."""
    notes: List[str] = []
    kw = vit_geometry(sd, NAME, notes)
    if kw.get("distilled"):
        raise OfficialCheckpointError("RoPE-ViT: no official RoPE-ViT class has a distillation token (its attention "
                                      "rotates every token after the first); dist_token is not supported here")
    if not kw["class_token"]:
        raise OfficialCheckpointError("RoPE-ViT: no cls_token; the official models always have one")
    dim, depth = kw["embed_dim"], kw["depth"]
    gammas = [f"blocks.{i}.gamma_{j}" for i in range(depth) for j in (1, 2)]
    have = [g for g in gammas if g in sd]
    if have and len(have) != len(gammas):
        raise OfficialCheckpointError(f"RoPE-ViT: LayerScale gammas in some blocks only ({len(have)} of {len(gammas)})")
    if have:
        kw["init_values"] = 1e-4  # Layer_scale_init_Block's init; the loaded gammas replace it
        notes.append("LayerScale: gamma_1 / gamma_2 -> ls1.gamma / ls2.gamma")
    rope = (given.get("rope") or ("mixed" if "freqs" in sd else "axial"))
    if rope not in ROPE_KINDS:
        raise ValueError(f"rope must be one of {ROPE_KINDS}; got {rope!r}")
    if rope != "mixed" and "freqs" in sd:
        raise OfficialCheckpointError(f"RoPE-ViT: rope={rope!r} but the checkpoint has RoPE-Mixed freqs "
                                      f"{tuple(sd['freqs'].shape)}")
    if rope == "mixed":
        if "freqs" not in sd:
            raise OfficialCheckpointError("RoPE-ViT: rope='mixed' but the checkpoint has no freqs")
        f = sd["freqs"]
        if f.ndim != 3 or f.shape[0] != 2 or f.shape[1] != depth or f.shape[2] * 2 != dim:
            raise OfficialCheckpointError(f"RoPE-ViT: freqs {tuple(f.shape)} is not (2, depth={depth}, "
                                          f"embed_dim/2={dim // 2})")
    heads = heads_for(dim, given.get("num_heads"), None, "RoPE-ViT", notes)
    ape = "pos_embed" in sd
    patch = kw["patch_size"] if isinstance(kw["patch_size"], tuple) else (kw["patch_size"],) * 2
    grid = None
    if "freqs_t_x" in sd or "freqs_t_y" in sd:
        if not ("freqs_t_x" in sd and "freqs_t_y" in sd):
            raise OfficialCheckpointError("RoPE-ViT: freqs_t_x and freqs_t_y come together")
        grid = _grid_from_t(sd, notes)
    if ape:
        pos = sd["pos_embed"]
        if pos.ndim != 3 or pos.shape[2] != dim:
            raise OfficialCheckpointError(f"RoPE-ViT: pos_embed {tuple(pos.shape)} is not (1, h*w, {dim})")
        if grid is not None and grid[0] * grid[1] != pos.shape[1]:
            raise OfficialCheckpointError(f"RoPE-ViT: pos_embed has {pos.shape[1]} rows but freqs_t_x describes a "
                                          f"{grid} grid")
        grid = grid or grid_from_rows(pos.shape[1], patch, given.get("img_size"), "pos_embed", notes)
    if grid is not None:
        kw["img_size"] = (grid[0] * patch[0], grid[1] * patch[1])
    if rope == "none":
        pe = {"name": "learned", "embed_prefix": False} if ape else {"name": "none"}
        notes.append("rope='none': a DeiT-III model without RoPE (RoPE-ViT's APE baseline layout)")
    else:
        pe = {"name": f"rope_{rope}_ape" if ape else f"rope_{rope}"}
        if rope == "axial":
            pe["theta"] = AXIAL_THETA
            why = ("axial RoPE has no tensor: RoPE-Axial is assumed (theta 100, as every official axial factory); "
                   "a DeiT-III APE checkpoint looks the same, load it with rope='none'")
            notes.append(why)
            if ape:
                _logger.warning("RoPE-ViT checkpoint without RoPE tensors: %s", why)
    if ape:
        notes.append("APE: pos_embed (no class-token row) is added to the patch tokens only, as rope_vit_models")
    kw.update(num_heads=heads, pe=pe, norm_eps=1e-6)
    notes.append("LayerNorm eps 1e-6: the official factories' norm_layer (not stored)")
    return OfficialSpec(NAME, kw, grid, notes, facts={"rope": rope})


def _reshape_freqs(t: torch.Tensor, shape) -> torch.Tensor:
    """Official ``(2, depth, heads*F)`` -> ours ``(2, depth, heads, F)``: heads are consecutive F-blocks
    (``compute_mixed_cis`` views the product as ``(depth, N, heads, F)``)."""
    if t.numel() != torch.Size(shape).numel():
        return t  # the strict shape check reports it
    return t.reshape(shape)


def rules(model, spec: OfficialSpec):
    """The key table for ``model`` (``@ape``, ``@rope_freqs`` found on the model); returns ``(rules, roles)``."""
    ape, roles = ape_rule(model, spec.grid)
    roles["rope_freqs"] = find_param(model, "freqs")
    table = [Rule(o, t, fit=_reshape_freqs if o == "freqs" else None) for o, t in KEYS]
    drop = Rule(r"freqs_t_[xy]", None, reason="patch-grid x / y coordinates (a buffer; the official loader deletes it "
                "too); visionpe computes them from the layout. infer() checks them: x = t % W, y = t // W")
    return table + vit_rules() + [ape, drop], roles
