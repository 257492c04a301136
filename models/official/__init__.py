"""Load the papers' released checkpoints (official key layouts) into visionpe models, exactly.

>>> from visionpe.models import load_official
>>> model = load_official("deit_small_patch16_224_ctx_product_50_shared_k.pth").eval()

Families (one converter module each, one key table each):

==========  =======================================================================================
``irpe``    iRPE DeiT models of microsoft/Cream (``blocks.{i}.attn.rpe_{q,k,v}.lookup_table_*``)
``ropevit`` RoPE-ViT DeiT-III models of naver-ai/rope-vit (``freqs``, ``freqs_t_*``, ``gamma_1``)
``peg``     CPVT's PEG as released in Twins: a one-stage ``CPVTV2`` (``pos_block.0``, ``patch_embeds.0``)
``loope``   LOOPE's ``ViT_Art`` (``pos_embedding.art_conv.*``, HF ViT encoder keys)
==========  =======================================================================================

:func:`load_official` reads the file, detects the family, infers the architecture from the tensors
(:func:`inspect_official`), builds ``vpe_vit_official`` with ``timm.create_model`` and loads the converted
state dict strictly: every official key is consumed or dropped for a stated reason (``model.official_report``).
:func:`official_checkpoint_filter` is the same conversion as a timm ``pretrained_filter_fn``.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from . import irpe, loope, peg, ropevit
from .build import OFFICIAL_ARCH, create_official_vit
from .common import (OfficialCheckpointError, OfficialSpec, convert_with_rules, read_checkpoint,
                     unwrap_state_dict)
from .distilled import VisionPEViTDistilled
from .releases import RELEASES, Release, release

__all__ = ["load_official", "inspect_official", "detect_family", "convert_state_dict", "official_checkpoint_filter",
           "convert_if_official", "read_checkpoint", "FAMILIES", "OfficialCheckpointError", "OfficialSpec",
           "VisionPEViTDistilled", "create_official_vit", "OFFICIAL_ARCH", "RELEASES", "Release", "release"]

_logger = logging.getLogger(__name__)

#: family name -> converter module (``signature``, ``infer``, ``rules``, ``OPTIONS``, ``TITLE``)
FAMILIES = {m.NAME: m for m in (irpe, ropevit, peg, loope)}


def _family_module(family: str):
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)} (or None to detect it); got {family!r}")
    return FAMILIES[family]


def detect_family(state_dict: Mapping[str, torch.Tensor], family: Optional[str] = None) -> str:
    """The converter family of an official state dict, from its keys.

    Args:
        family: when given, checked against the keys (a checkpoint of another family raises).

    Raises:
        OfficialCheckpointError: no family's keys are present, several are, or ``family`` disagrees.
    """
    hits = {name: mod.signature(state_dict) for name, mod in FAMILIES.items()}
    hits = {name: keys for name, keys in hits.items() if keys}
    if family is not None:
        _family_module(family)
        other = {n: k for n, k in hits.items() if n != family}
        if family not in hits and other:
            name, keys = next(iter(other.items()))
            raise OfficialCheckpointError(f"family={family!r} was asked for but the checkpoint has {name} keys "
                                          f"({', '.join(keys[:3])}): it is a {FAMILIES[name].TITLE} checkpoint")
        return family
    if len(hits) == 1:
        return next(iter(hits))
    if not hits:
        some = ", ".join(list(state_dict)[:6])
        raise OfficialCheckpointError(
            f"not an official checkpoint of a known family ({', '.join(m.TITLE for m in FAMILIES.values())}); its "
            f"first keys are: {some}. timm / visionpe checkpoints load with timm.create_model(..., "
            f"pretrained_cfg_overlay=dict(file=...)) instead")
    raise OfficialCheckpointError(f"the checkpoint has keys of several families: "
                                  f"{ {n: k[:2] for n, k in hits.items()} }; pass family=")


def _split_options(mod, model_kwargs: Mapping[str, Any]) -> Tuple[dict, dict]:
    opts = {k: v for k, v in model_kwargs.items() if k in mod.OPTIONS}
    return opts, {k: v for k, v in model_kwargs.items() if k not in mod.OPTIONS}


def _prepared(mod, sd: Mapping[str, torch.Tensor]) -> dict:
    return mod.prepare(sd) if hasattr(mod, "prepare") else dict(sd)


def inspect_official(path_or_state_dict, family: Optional[str] = None, **model_kwargs) -> OfficialSpec:
    """What :func:`load_official` would build: family, ``vpe_vit_official`` arguments, grid and notes.

    ``model_kwargs`` as for :func:`load_official`. Reads nothing but the tensors' names and shapes (and
    the few deterministic buffers it checks).
    """
    sd = read_checkpoint(path_or_state_dict)
    fam = detect_family(sd, family)
    mod = FAMILIES[fam]
    opts, given = _split_options(mod, model_kwargs)
    spec = mod.infer(_prepared(mod, sd), {**given, **opts})
    kw = dict(spec.model_kwargs)
    for k, v in given.items():
        if k == "pe":
            if isinstance(v, str) or (isinstance(v, dict) and "name" in v):
                kw["pe"] = v  # a whole encoder config replaces the inferred one (the strict load checks it)
                spec.notes.append(f"pe={v!r}: given")
            elif isinstance(v, dict):
                kw["pe"] = {**kw["pe"], **v}
            else:
                raise TypeError(f"pe must be an encoder name or config dict; got {type(v).__name__}")
        elif k != "img_size":
            kw[k] = v
    if "img_size" in given and spec.grid is None:
        kw["img_size"] = given["img_size"]  # nothing in the checkpoint depends on the grid
    spec.model_kwargs = kw
    return spec


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module, family: Optional[str] = None,
                       spec: Optional[OfficialSpec] = None, lenient: Tuple[str, ...] = ()
                       ) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Official ``state_dict`` -> ``model.state_dict()`` keys, strictly (see :func:`convert_with_rules`).

    Args:
        model: a ``VisionPEViT`` built for this checkpoint (any grid: APE / LOOPE tables are resampled).
        family: detected when None.
        spec: the checkpoint's :class:`OfficialSpec` (inferred when None; it says the checkpoint's grid).
        lenient: model keys whose shape may differ (a classifier timm re-initialises).

    Returns:
        ``(converted state dict, {dropped official key: reason})``.
    """
    sd = unwrap_state_dict(state_dict)
    fam = detect_family(sd, family)
    mod = FAMILIES[fam]
    sd = _prepared(mod, sd)
    if spec is None:
        # the model is given (timm's loading path): what the tensors do not store comes from it
        given: Dict[str, Any] = {"num_heads": model.blocks[0].attn.num_heads}
        if hasattr(model.pe, "method") and hasattr(model.pe, "ratio"):  # iRPE's unstored bucket options
            given["pe"] = {"method": model.pe.method, "ratio": model.pe.ratio}
        spec = mod.infer(sd, given)
    rules, roles = mod.rules(model, spec)
    return convert_with_rules(sd, model, rules, FAMILIES[fam].TITLE, roles, lenient)


def load_official(path_or_state_dict, family: Optional[str] = None, **model_kwargs) -> nn.Module:
    """Build the visionpe model of an official checkpoint and load it strictly.

    Args:
        path_or_state_dict: a ``.pth`` (read with ``torch.load(weights_only=True)``; weights under
            ``checkpoint['model']`` or bare), a ``.safetensors`` file, or a state dict.
        family: ``irpe``, ``ropevit``, ``peg`` or ``loope``; detected from the keys when None.
        **model_kwargs: ``vpe_vit_official`` / timm ``VisionTransformer`` arguments overriding what the tensors say
            (a different size then fails the strict load with the keys and shapes). Special cases:
            ``num_heads`` where the checkpoint does not store it; ``pe`` as a dict without ``name`` updates the
            inferred encoder options (e.g. ``pe={'ratio': 2.0}``), a name or full config replaces them;
            ``img_size``: the model is built at the checkpoint's grid, loaded, then resized with
            ``set_input_size`` (tables resampled); ``num_classes`` different from the checkpoint's re-initialises
            the classifier with a warning; family options: ``rope='none'`` (RoPE-ViT).

    Returns:
        the model (training mode, as timm returns it; call ``.eval()``) with ``model.official_report``:
        ``{"family", "spec", "dropped": {official key: reason}}``.
    """
    import timm

    sd = read_checkpoint(path_or_state_dict)
    img_size = model_kwargs.get("img_size")
    spec = inspect_official(sd, family, **model_kwargs)
    kw = dict(spec.model_kwargs)
    ckpt_classes = _checkpoint_classes(sd)
    lenient: Tuple[str, ...] = ()
    if "num_classes" in model_kwargs and model_kwargs["num_classes"] != ckpt_classes:
        lenient = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")
    model = timm.create_model(OFFICIAL_ARCH, pretrained=False, **kw)
    converted, dropped = convert_state_dict(sd, model, spec.family, spec, lenient)
    if lenient:
        own = model.state_dict()
        reset = [k for k in lenient if k in converted and converted[k].shape != own[k].shape]
        for k in reset:
            converted[k] = own[k]
        warnings.warn(f"num_classes={model_kwargs['num_classes']} differs from the checkpoint's {ckpt_classes}: "
                      f"{', '.join(reset)} re-initialised (not loaded)", stacklevel=2)
    model.load_state_dict(converted, strict=True)
    if img_size is not None:
        want = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if tuple(model.patch_embed.img_size) != want:
            model.set_input_size(img_size=want)
    model.official_report = {"family": spec.family, "spec": spec, "dropped": dropped}
    return model


def _checkpoint_classes(sd) -> int:
    for key in ("head.weight", "classifier.weight"):
        if key in sd:
            return int(sd[key].shape[0])
    return 0


def convert_if_official(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """For ``pe_checkpoint_filter``: the converted state dict when ``state_dict`` has an official family's keys,
    else None (a timm / visionpe checkpoint, left to the generic filter)."""
    inner = state_dict
    for key in ("model", "state_dict"):
        if isinstance(inner, Mapping) and isinstance(inner.get(key), Mapping):
            inner = inner[key]
            break
    tensors = {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}
    if not any(mod.signature(tensors) for mod in FAMILIES.values()):
        return None
    sd = unwrap_state_dict(inner)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier", "head")
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    names = names + (("head_dist",) if hasattr(model, "head_dist") else ())
    lenient = tuple(f"{n}.{p}" for n in names for p in ("weight", "bias"))
    converted, dropped = convert_state_dict(sd, model, lenient=lenient)
    for key, reason in dropped.items():
        _logger.info("official checkpoint: dropped %s (%s)", key, reason)
    return converted


def official_checkpoint_filter(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn`` of ``vpe_vit_official`` and the release names.

    An official checkpoint is converted strictly (its classifier may differ in size: timm drops it when the
    model's ``num_classes`` differs from the ``pretrained_cfg``'s; pass ``pretrained_cfg_overlay=dict(file=...,
    num_classes=N)`` to keep an N-class head); a visionpe / timm checkpoint (e.g. written by ``visionpe
    convert``) goes through the ``vpe_vit_*`` filter, :func:`visionpe.models.pe_checkpoint_filter`.
    """
    converted = convert_if_official(state_dict, model)
    if converted is not None:
        return converted
    from ..registry import pe_checkpoint_filter
    return pe_checkpoint_filter(state_dict, model)
