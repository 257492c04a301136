"""Shared plumbing of the official-checkpoint converters: reading files, key rules, strict accounting.

A family converter (``irpe.py``, ``ropevit.py``, ``peg.py``, ``loope.py``) is two things:

* ``infer(sd)``: what the tensors say about the model (width, depth, heads when stored, token layout, PE
  options) as an :class:`OfficialSpec`;
* ``rules(model, spec)``: ONE table of :class:`Rule` s mapping every official key onto a key of the built
  model's ``state_dict`` (``re`` templates; ``@role`` names are found on the model by structure, see
  :func:`ape_holder`) or dropping it with a stated reason (and, where possible, a check that dropping is
  lossless: aliases equal to their primary key, deterministic buffers equal to what we compute).

:func:`convert_with_rules` applies a table strictly: an official key no rule matches, an expected key of the
model that nothing fills, or a shape that differs raise :class:`OfficialCheckpointError` naming the keys and
shapes on both sides. Nothing is loaded partially.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["OfficialCheckpointError", "OfficialSpec", "Rule", "read_checkpoint", "unwrap_state_dict",
           "convert_with_rules", "ape_holder", "block_count", "mlp_ratio_for", "heads_for", "grid_from_rows",
           "RELEASED_HEADS", "fmt_shape", "find_param", "find_module", "resample_ape"]

CheckpointSource = Union[str, "os.PathLike[str]", Mapping[str, Any]]

#: heads of the released widths (DeiT-Ti/S/B, ViT-L: head_dim 64). Only used for families whose tensors do not
#: store the head count (RoPE-ViT, Twins/PEG, LOOPE); any other width needs ``num_heads=``.
RELEASED_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16}


class OfficialCheckpointError(ValueError):
    """An official checkpoint that does not fit: wrong family, size or layout (the message names the keys)."""


@dataclass
class OfficialSpec:
    """What an official state dict says about its model.

    Attributes:
        family: converter name (``irpe``, ``ropevit``, ``peg``, ``loope``).
        model_kwargs: JSON-able keyword arguments of the ``vpe_vit_official`` timm entry (timm
            ``VisionTransformer`` arguments, ``pe=`` config, ``distilled``, ``norm_eps``, ``embed_norm_eps``).
        grid: the patch grid ``(h, w)`` the tensors were trained on, or None when no tensor depends on it.
        notes: how each non-obvious value was obtained (read from a tensor, or the official default).
        facts: family-specific values the key rules need (e.g. the APE's prefix rows).
    """

    family: str
    model_kwargs: Dict[str, Any]
    grid: Optional[Tuple[int, int]] = None
    notes: List[str] = field(default_factory=list)
    facts: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rule:
    """One line of a family's key table.

    Args:
        official: regular expression matched against the whole official key.
        ours: target key template (``re`` expansion: ``\\1`` is the first group); a leading ``@role`` is
            replaced by the role's key prefix on the model (see ``roles`` of :func:`convert_with_rules`).
            None drops the key.
        part: ``(index, count)``: this key is one of ``count`` tensors concatenated along dim 0 into ``ours``
            (e.g. Twins' ``q`` + ``kv`` -> ``qkv``).
        reason: why a dropped key may be dropped (required when ``ours`` is None).
        check: for a dropped key, ``check(key, tensor, state_dict)`` returns an error string when dropping it
            would lose information (None when it is safe).
        fit: ``fit(tensor, target_shape)`` adapts the tensor to the model's parameter (reshape, resample).
    """

    official: str
    ours: Optional[str] = None
    part: Optional[Tuple[int, int]] = None
    reason: Optional[str] = None
    check: Optional[Callable[[str, torch.Tensor, Mapping[str, torch.Tensor]], Optional[str]]] = None
    fit: Optional[Callable[[torch.Tensor, Tuple[int, ...]], torch.Tensor]] = None

    def __post_init__(self):
        if self.ours is None and not self.reason:
            raise ValueError(f"rule {self.official!r} drops keys without a reason")


def fmt_shape(t) -> str:
    return str(tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t))


def _fmt_list(items: Sequence[str], limit: int = 10) -> str:
    items = list(items)
    more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# -- reading -----------------------------------------------------------------------------------------------
def read_checkpoint(src: CheckpointSource) -> Dict[str, torch.Tensor]:
    """A bare state dict from ``src``: a path (``.safetensors``, or a torch file read with
    ``weights_only=True``) or an in-memory mapping; unwrapped with :func:`unwrap_state_dict`."""
    if isinstance(src, Mapping):
        return unwrap_state_dict(src)
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"path_or_state_dict must be a file path or a state dict (mapping of tensors); "
                        f"got {type(src).__name__}")
    path = os.fspath(src)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return unwrap_state_dict(load_file(path, device="cpu"))
    # DeiT-style training scripts store their argparse.Namespace next to the weights (checkpoint['args']);
    # it holds only plain values, so it is the one class added to the weights-only unpickler's allowlist
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # the unpickler names the offending global
            raise OfficialCheckpointError(
                f"torch.load(weights_only=True) refused {path!r}: {e}. Official checkpoints hold tensors under "
                f"checkpoint['model']; re-save that dict (torch.save(ckpt['model'], ...)) from a trusted "
                f"session and load the result") from e
    return unwrap_state_dict(obj)


def unwrap_state_dict(obj: Any) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint: ``obj['model']`` (DeiT, iRPE, RoPE-ViT), ``obj['state_dict']`` or ``obj``
    itself; a ``module.`` prefix (DistributedDataParallel) on every key is removed.

    Raises :class:`OfficialCheckpointError` when the result holds anything but tensors (named, not printed).
    """
    sd = obj
    for key in ("model", "state_dict"):
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
            break
    if not isinstance(sd, Mapping):
        raise TypeError(f"a checkpoint must be a mapping of tensors (or hold one under 'model'); got "
                        f"{type(sd).__name__}")
    bad = [f"{k} ({type(v).__name__})" for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise OfficialCheckpointError(f"the checkpoint's state dict holds non-tensor entries: {_fmt_list(bad)}")
    sd = dict(sd)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


# -- geometry helpers --------------------------------------------------------------------------------------
def block_count(sd: Mapping[str, torch.Tensor], pattern: str, what: str) -> int:
    """Number of blocks from keys matching ``pattern`` (group 1 = block index); indices must be 0..L-1."""
    rx = re.compile(pattern)
    idx = sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})
    if not idx:
        raise OfficialCheckpointError(f"{what}: no transformer blocks found (no key matches {pattern!r})")
    if idx != list(range(len(idx))):
        raise OfficialCheckpointError(f"{what}: block indices must run 0..L-1; found {idx}")
    return len(idx)


def mlp_ratio_for(hidden: int, dim: int) -> float:
    """An ``mlp_ratio`` for which timm's ``int(dim * mlp_ratio)`` gives exactly ``hidden``."""
    for r in (hidden / dim, (hidden + 0.5) / dim):
        if int(dim * r) == hidden:
            return r
    raise OfficialCheckpointError(f"no mlp_ratio reproduces an MLP width of {hidden} at width {dim}")


def heads_for(dim: int, given: Optional[int], stored: Optional[int], family: str, notes: List[str]) -> int:
    """The head count: the tensors' (``stored``), else ``num_heads=`` (``given``), else the released width's."""
    if stored is not None:
        if given is not None and given != stored:
            raise OfficialCheckpointError(f"num_heads={given} was given but the {family} tensors store "
                                          f"{stored} heads (head_dim {dim // stored})")
        notes.append(f"num_heads={stored}: read from the relative-position tables (head_dim {dim // stored})")
        return stored
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, int) or given <= 0 or dim % given:
            raise OfficialCheckpointError(f"num_heads={given!r} does not divide the width {dim}")
        notes.append(f"num_heads={given}: given")
        return given
    if dim in RELEASED_HEADS:
        notes.append(f"num_heads={RELEASED_HEADS[dim]}: not stored in a {family} checkpoint; the released "
                     f"models of width {dim} use it (head_dim 64)")
        return RELEASED_HEADS[dim]
    raise OfficialCheckpointError(
        f"a {family} checkpoint does not store the number of attention heads and width {dim} is not a released "
        f"size ({sorted(RELEASED_HEADS)}); pass num_heads=")


def grid_from_rows(rows: int, patch: Tuple[int, int], img_size, what: str,
                   notes: List[str]) -> Tuple[int, int]:
    """The patch grid of an ``rows``-patch table: from ``img_size=`` when given, else a square grid.

    The official classes build their grid from an int ``img_size`` (square); a non-square checkpoint needs
    ``img_size=(H, W)``, nothing is guessed.
    """
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        grid = (h // patch[0], w // patch[1])
        if grid[0] * grid[1] == rows:
            return grid
        notes.append(f"{what}: img_size={img_size} gives a {grid} grid but the tensors hold {rows} patches; the "
                     f"model is built at the checkpoint's grid and then resized")
    side = int(round(rows ** 0.5))
    if side * side != rows:
        raise OfficialCheckpointError(f"{what} has {rows} patch rows, not a square grid; pass img_size=(H, W) "
                                      f"with (H/{patch[0]}) * (W/{patch[1]}) = {rows}")
    notes.append(f"grid {side}x{side}: {what} has {rows} patch rows (square, as the official int img_size)")
    return side, side


# -- structural roles on the model ------------------------------------------------------------------------
def ape_holder(model: nn.Module) -> Tuple[Optional[str], Optional[nn.Module]]:
    """``(state-dict key, module)`` of the learned absolute table of ``model.pe``, or ``(None, None)``.

    The encoder says where it is (``absolute_table()``) when it can; otherwise the one submodule of the
    encoder with a ``pos_embed`` parameter is it. The holder has ``grid_size``, ``table_prefix``,
    ``interpolation``, ``antialias`` (timm's ``pos_embed`` layout).
    """
    pe = model.pe
    holder = pe.absolute_table() if callable(getattr(pe, "absolute_table", None)) else None
    candidates = [(name, mod) for name, mod in pe.named_modules()
                  if isinstance(getattr(mod, "pos_embed", None), nn.Parameter) and (holder is None or mod is holder)]
    if len(candidates) > 1:
        raise OfficialCheckpointError(f"encoder {type(pe).__name__} has several APE tables: "
                                      f"{[n or '.' for n, _ in candidates]}")
    if not candidates:
        return None, None
    name, mod = candidates[0]
    return "pe." + (f"{name}." if name else "") + "pos_embed", mod


def resample_ape(table: torch.Tensor, holder: nn.Module, src_grid: Tuple[int, int]) -> torch.Tensor:
    """``table`` laid out on ``src_grid`` (with the holder's prefix rows) resampled to the holder's grid."""
    from visionpe.resample import resample_grid_table
    return resample_grid_table(table, tuple(holder.grid_size), src_grid, holder.table_prefix,
                               mode=holder.interpolation, antialias=holder.antialias)


# -- applying a table ----------------------------------------------------------------------------------
def convert_with_rules(sd: Mapping[str, torch.Tensor], model: nn.Module, rules: Sequence[Rule], family: str,
                       roles: Optional[Mapping[str, str]] = None, lenient: Sequence[str] = ()
                       ) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Map ``sd`` (official keys) onto ``model``'s state-dict keys with ``rules``; strict.

    Args:
        roles: ``{"name": "key prefix"}`` for ``@name`` templates (found on the model by structure).
        lenient: keys of the model whose SHAPE may differ (the classifier when timm re-initialises it).

    Returns:
        ``(state_dict, dropped)``: the model's state dict (exactly its keys) and ``{official key: reason}``.

    Raises:
        OfficialCheckpointError: official keys no rule matches, model keys nothing fills, shape mismatches, a
            failed drop check or a missing part of a concatenation, each listed with its shapes.
    """
    roles = dict(roles or {})
    compiled = [(re.compile(r.official), r) for r in rules]
    out: Dict[str, torch.Tensor] = {}
    parts: Dict[str, Dict[int, Tuple[str, torch.Tensor]]] = {}
    part_count: Dict[str, int] = {}
    fits: Dict[str, Callable] = {}
    source: Dict[str, List[str]] = {}
    dropped: Dict[str, str] = {}
    unmatched, failed = [], []
    for key, val in sd.items():
        hit = next(((m, r) for rx, r in compiled for m in [rx.fullmatch(key)] if m), None)
        if hit is None:
            unmatched.append(f"{key} {fmt_shape(val)}")
            continue
        m, rule = hit
        if rule.ours is None:
            problem = rule.check(key, val, sd) if rule.check else None
            if problem:
                failed.append(f"{key}: {problem}")
            dropped[key] = rule.reason
            continue
        target = rule.ours
        if target.startswith("@"):
            role, _, rest = target[1:].partition(".")
            if role not in roles or roles[role] is None:
                failed.append(f"{key} {fmt_shape(val)} has no place in the model: {ROLE_HELP.get(role, role)}")
                continue
            target = roles[role] + (f".{rest}" if rest else "")
        target = m.expand(target)
        source.setdefault(target, []).append(key)
        if rule.fit is not None:
            fits[target] = rule.fit
        if rule.part is None:
            if target in out:
                failed.append(f"{key} and {source[target][0]} both map to {target}")
            out[target] = val
        else:
            i, n = rule.part
            parts.setdefault(target, {})[i] = (key, val)
            part_count[target] = n
    for target, got in parts.items():
        n = part_count[target]
        if sorted(got) != list(range(n)):
            have = [got[i][0] for i in sorted(got)]
            failed.append(f"{target} is the concatenation of {n} official tensors; only {have} are present")
            continue
        out[target] = torch.cat([got[i][1] for i in range(n)], dim=0)
    own = model.state_dict()
    for target, fit in fits.items():
        if target in out and target in own:
            out[target] = fit(out[target], tuple(own[target].shape))
    if unmatched:
        failed.insert(0, f"keys that are not part of a {family} checkpoint ({len(unmatched)}): {_fmt_list(unmatched)}")
    missing = [f"{k} {fmt_shape(v)}" for k, v in own.items() if k not in out]
    unexpected = [f"{k} {fmt_shape(v)} (from {', '.join(source.get(k, ['?']))})" for k, v in out.items()
                  if k not in own]
    mismatched = [f"{', '.join(source.get(k, [k]))} {fmt_shape(v)} -> {k} expects {fmt_shape(own[k])}"
                  for k, v in out.items() if k in own and k not in lenient and tuple(v.shape) != tuple(own[k].shape)]
    if missing:
        failed.append(f"model keys the checkpoint does not fill ({len(missing)}): {_fmt_list(missing)}")
    if unexpected:
        failed.append(f"converted keys the model does not have ({len(unexpected)}): {_fmt_list(unexpected)}")
    if mismatched:
        failed.append(f"shape mismatches, checkpoint -> model ({len(mismatched)}): {_fmt_list(mismatched)}")
    if failed:
        name = getattr(model, "pe_name", None)
        what = f"{type(model).__name__}" + (f" (pe={name!r})" if name else "")
        raise OfficialCheckpointError(f"{family} checkpoint does not fit {what}:\n  " + "\n  ".join(failed))
    return {k: out[k] for k in own}, dropped


#: what each role means, for the error when the model lacks it
ROLE_HELP = {
    "ape": "the checkpoint has a learned absolute table (pos_embed) but the model's encoder has none",
    "rope_freqs": "the checkpoint has RoPE-Mixed frequencies but the model's encoder has no 'freqs' parameter",
    "peg": "the checkpoint has a PEG conv but the model's encoder has no PEG",
    "loope": "the checkpoint has a LOOPE/ArtPE network but the model's encoder is not LOOPE",
}


def find_param(model: nn.Module, leaf: str) -> Optional[str]:
    """Key prefix (``pe.<path>``) of the one module under ``model.pe`` owning a parameter named ``leaf``."""
    hits = [n for n, _ in model.pe.named_parameters() if n.rsplit(".", 1)[-1] == leaf]
    if len(hits) != 1:
        return None
    path = hits[0].rpartition(".")[0]
    return "pe" + (f".{path}" if path else "")


def find_module(model: nn.Module, cls: type) -> Optional[str]:
    """Key prefix (``pe.<path>``) of the one submodule of ``model.pe`` that is a ``cls``, or None."""
    hits = [n for n, m in model.pe.named_modules() if isinstance(m, cls)]
    if len(hits) != 1:
        return None
    return "pe" + (f".{hits[0]}" if hits[0] else "")
