"""iRPE (Wu et al., ICCV 2021): the DeiT models of microsoft/Cream ``iRPE/DeiT-with-iRPE``.

Official layout (``rpe_vision_transformer.VisionTransformer``, and DeiT's ``DistilledVisionTransformer`` with the
same ``rpe_config``): a timm-0.3 ViT whose attention in every block holds ``rpe_q``/``rpe_k``/``rpe_v`` modules
with their own ``lookup_table_weight`` (contextual) or ``lookup_table_bias`` (bias mode), ``rp_rows``/``rp_cols``
for the cross method; a learned ``pos_embed`` with a row per prefix token.

From the tensors: width, depth, patch, MLP ratio, class/distillation tokens, APE and its grid, which of q/k/v
carry tables, contextual or bias, shared or per-head tables, the head count (a contextual table has
``head_dim`` channels) and the bucket count. NOT stored: the piecewise ``ratio`` and, between ``euc`` and
``quant`` (same table sizes), the method: an odd-square bucket count (+1 prefix bucket) is read as the
product method, and the product method with 7x7 buckets as ratio 1.9, which is what every released
checkpoint uses (``get_rpe_config(ratio=1.9, method='product', ...)``); anything else needs
``pe={'method': ..., 'ratio': ...}``.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Mapping

import torch

from .common import OfficialCheckpointError, OfficialSpec, Rule, grid_from_rows, heads_for
from .deit import ape_rule, vit_geometry, vit_rules

NAME = "irpe"
OPTIONS = ()
TITLE = "iRPE DeiT (microsoft/Cream, iRPE/DeiT-with-iRPE)"

_TABLE = re.compile(r"blocks\.(\d+)\.attn\.rpe_([qkv])\.(?:(rp_rows|rp_cols)\.)?"
                    r"(lookup_table_weight|lookup_table_bias)")
_SIGNATURE = re.compile(r"blocks\.\d+\.attn\.rpe_[qkv]\.")

#: the family's key table: official -> ours (everything else is DeiT/timm-named, see deit.vit_rules)
KEYS = [
    (r"blocks\.(\d+)\.attn\.rpe_([qkv])\.(.+)", r"pe.rpe_\2.\1.\3"),
]


def signature(sd: Mapping[str, torch.Tensor]) -> List[str]:
    """Official iRPE table keys in ``sd`` (empty when it is not an iRPE checkpoint)."""
    return [k for k in sd if _SIGNATURE.match(k)]


def _tables(sd, depth: int) -> Dict[str, dict]:
    """Per side: ``{"leaf", "cross", "shape"}``, checked to be the same in every block."""
    found: Dict[str, Dict[int, dict]] = {}
    for key, val in sd.items():
        m = _TABLE.fullmatch(key)
        if not m:
            continue
        block, side, part, leaf = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        entry = found.setdefault(side, {}).setdefault(block, {"leaf": leaf, "parts": set(), "shape": tuple(val.shape)})
        if entry["leaf"] != leaf or entry["shape"] != tuple(val.shape):
            raise OfficialCheckpointError(f"iRPE: {key} {tuple(val.shape)} differs from the other rpe_{side} tables "
                                          f"of block {block} ({entry['leaf']} {entry['shape']})")
        entry["parts"].add(part)
    out = {}
    for side, blocks in found.items():
        if sorted(blocks) != list(range(depth)):
            raise OfficialCheckpointError(f"iRPE: rpe_{side} tables in blocks {sorted(blocks)}, the official model has "
                                          f"one in every block 0..{depth - 1}")
        first = blocks[0]
        for b, e in blocks.items():
            if (e["leaf"], e["shape"], e["parts"]) != (first["leaf"], first["shape"], first["parts"]):
                raise OfficialCheckpointError(f"iRPE: rpe_{side} of block {b} ({e['leaf']} {e['shape']}) differs "
                                              f"from block 0 ({first['leaf']} {first['shape']})")
        if first["parts"] not in ({None}, {"rp_rows", "rp_cols"}):
            raise OfficialCheckpointError(f"iRPE: rpe_{side} has parts {sorted(map(str, first['parts']))}; expected "
                                          f"one table or rp_rows + rp_cols")
        out[side] = {"leaf": first["leaf"], "cross": None not in first["parts"], "shape": first["shape"]}
    return out


def _method_ratio(nb_grid: int, cross: bool, pe_given: dict, notes: List[str]):
    """Method and ratio for ``nb_grid`` buckets per table (prefix bucket excluded)."""
    method, ratio = pe_given.get("method"), pe_given.get("ratio")
    if method is None:
        if cross:
            method = "cross"
        else:
            side = math.isqrt(nb_grid)
            if side * side == nb_grid and side % 2 == 1 and side >= 3:
                method = "product"
                notes.append(f"method 'product': {nb_grid} = {side}x{side} buckets per table (euc/quant tables have "
                             f"2B+1 rows; pass pe={{'method': ...}} if this one is not product)")
            else:
                raise OfficialCheckpointError(
                    f"iRPE: {nb_grid} buckets per table fit both the 'euc' and 'quant' methods (the checkpoint does "
                    f"not say which); pass pe={{'method': 'euc' or 'quant', 'ratio': r}}")
    if ratio is None:
        if method == "product" and nb_grid == 49:
            ratio = 1.9
            notes.append("ratio 1.9: not stored; 7x7 product buckets are get_rpe_config(ratio=1.9), the value of "
                         "every released DeiT checkpoint")
        else:
            raise OfficialCheckpointError(
                f"iRPE: the piecewise ratio is not stored in the checkpoint ({method}, {nb_grid} buckets per table "
                f"only fixes floor(2 * ratio)); pass pe={{'ratio': r}}")
    return method, ratio


def infer(sd: Mapping[str, torch.Tensor], given: Mapping[str, Any]) -> OfficialSpec:
    """Model arguments of an official iRPE DeiT state dict (``given``: user overrides, see load_official)."""
    from visionpe.irpe_buckets import num_buckets

    notes: List[str] = []
    kw = vit_geometry(sd, NAME, notes)
    dim, depth = kw["embed_dim"], kw["depth"]
    prefix = int(kw["class_token"]) + int(kw.get("distilled", False))
    tables = _tables(sd, depth)
    if not tables:
        raise OfficialCheckpointError("iRPE: no rpe_q / rpe_k / rpe_v tables found")
    leaves = {t["leaf"] for t in tables.values()}
    if len(leaves) != 1:
        raise OfficialCheckpointError(f"iRPE: mixed contextual and bias tables {sorted(leaves)}; the official "
                                      f"config has one mode")
    mode = "bias" if leaves.pop() == "lookup_table_bias" else "contextual"
    crosses = {t["cross"] for t in tables.values()}
    if len(crosses) != 1:
        raise OfficialCheckpointError("iRPE: some sides use rp_rows/rp_cols (cross) and some do not")
    cross = crosses.pop()
    stored_heads, shared, nbs = None, set(), set()
    for side, t in tables.items():
        shape = t["shape"]
        if mode == "bias":
            hp, nb = shape
        else:
            hp, a, b = shape
            head_dim, nb = (b, a) if side == "v" else (a, b)
            if dim % head_dim:
                raise OfficialCheckpointError(f"iRPE: rpe_{side} tables have head_dim {head_dim}, which does not "
                                              f"divide the width {dim}")
            if stored_heads not in (None, dim // head_dim):
                raise OfficialCheckpointError(f"iRPE: the tables disagree on head_dim ({shape} for rpe_{side})")
            stored_heads = dim // head_dim
        shared.add(hp == 1)
        nbs.add(nb)
        if hp != 1 and mode == "bias":
            stored_heads = hp
    if len(nbs) != 1 or len(shared) != 1:
        raise OfficialCheckpointError(f"iRPE: the q/k/v tables disagree on bucket count or head sharing: "
                                      f"{ {s: t['shape'] for s, t in tables.items()} }")
    nb, shared_head = nbs.pop(), shared.pop()
    nb_grid = nb - (1 if prefix else 0)
    pe_given = dict(given.get("pe") or {}) if isinstance(given.get("pe"), dict) and "name" not in given["pe"] else {}
    method, ratio = _method_ratio(nb_grid, cross, pe_given, notes)
    if num_buckets(method, ratio, prefix) != nb:
        raise OfficialCheckpointError(f"iRPE: method {method!r} with ratio {ratio} has "
                                      f"{num_buckets(method, ratio, prefix)} "
                                      f"buckets per table ({prefix} prefix tokens), the checkpoint {nb}")
    heads = heads_for(dim, given.get("num_heads"), stored_heads, "iRPE", notes)
    if not shared_head:
        hp = next(iter(tables.values()))["shape"][0]
        if hp != heads:
            raise OfficialCheckpointError(f"iRPE: per-head tables have {hp} heads, the model {heads}")
    rpe_on = "".join(s for s in "qkv" if s in tables)
    pe = dict(name="irpe", method=method, mode=mode, rpe_on=rpe_on, shared_head=shared_head, ratio=ratio,
              ape="pos_embed" in sd)
    pe.update({k: v for k, v in pe_given.items() if k not in ("method", "ratio")})
    patch = kw["patch_size"] if isinstance(kw["patch_size"], tuple) else (kw["patch_size"],) * 2
    grid = None
    if "pos_embed" in sd:
        rows = sd["pos_embed"].shape[1] - prefix
        if sd["pos_embed"].ndim != 3 or rows <= 0 or sd["pos_embed"].shape[2] != dim:
            raise OfficialCheckpointError(f"iRPE: pos_embed {tuple(sd['pos_embed'].shape)} is not "
                                          f"(1, {prefix} + h*w, {dim})")
        grid = grid_from_rows(rows, patch, given.get("img_size"), "pos_embed", notes)
        kw["img_size"] = (grid[0] * patch[0], grid[1] * patch[1])
    kw.update(num_heads=heads, pe=pe, norm_eps=1e-6)
    notes.append("LayerNorm eps 1e-6: the DeiT factories' norm_layer (not stored)")
    return OfficialSpec(NAME, kw, grid, notes, facts={"prefix": prefix})


def rules(model, spec: OfficialSpec):
    """The key table for ``model`` (``@ape`` found on the model); returns ``(rules, roles)``."""
    ape, roles = ape_rule(model, spec.grid)
    return [Rule(o, t) for o, t in KEYS] + vit_rules() + [ape], roles
