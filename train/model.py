"""Model construction for fine-tuning and evaluation, and the JSON description that rebuilds it.

A run stores ``model.json`` (``describe``) next to its weights so ``visionpe evalres`` can rebuild the same
network without the recipe: ``{"name", "kwargs", "pe"}``. ``vpe_vit_*`` names take ``pe=`` at creation;
other timm ViTs are created plain and converted with :func:`visionpe.models.swap_pe`.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

__all__ = ["build_model", "check_model_name", "create_model_with_pe", "describe", "model_from_description",
           "is_visionpe_arch", "patch_size_of", "check_resolution", "load_description", "write_description", "unwrap"]


def check_model_name(name: str) -> None:
    """``ValueError`` for a name timm does not know (with the closest known names), e.g. a typo."""
    import difflib

    import timm
    if not isinstance(name, str) or not timm.is_model(name):
        close = difflib.get_close_matches(str(name).split(".")[0], timm.list_models(), n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; 'timm.list_models()' names them"
        raise ValueError(f"model {name!r} is not a registered timm model{hint}")


def is_visionpe_arch(name: str) -> bool:
    from timm.models import model_entrypoint
    check_model_name(name)
    return model_entrypoint(name).__module__.startswith("visionpe.")


def create_model_with_pe(name: str, kwargs: dict, pe=None, pretrained_file: Optional[str] = None,
                         keep_head: bool = False):
    """``timm.create_model(name, **kwargs)`` with encoder ``pe`` (at creation for ``vpe_vit_*``, else swapped),
    from ``pretrained_file`` when given (via ``pretrained_cfg_overlay``)."""
    import timm
    from visionpe.models import create_swapped, swap_pe

    check_model_name(name)
    if pretrained_file is not None:
        return create_swapped(name, pretrained_file, pe=pe, keep_head=keep_head, **kwargs)
    vpe = is_visionpe_arch(name)
    model = timm.create_model(name, pretrained=False, **(dict(kwargs, pe=pe) if vpe and pe is not None else kwargs))
    if not vpe and pe is not None:
        swap_pe(model, pe)
    return model


def build_model(model_cfg, num_classes: int):
    """``(model, description)`` from the ``model`` config section."""
    kwargs = dict(model_cfg.kwargs)
    kwargs.setdefault("num_classes", num_classes)
    if model_cfg.img_size is not None:
        kwargs.setdefault("img_size", model_cfg.img_size if isinstance(model_cfg.img_size, int)
                          else tuple(model_cfg.img_size))
    kwargs.setdefault("drop_rate", model_cfg.drop_rate)
    kwargs.setdefault("drop_path_rate", model_cfg.drop_path_rate)
    model = create_model_with_pe(model_cfg.name, kwargs, model_cfg.pe, model_cfg.pretrained_file, model_cfg.keep_head)
    check_resolution(model, _img_size(model), "model.img_size")
    return model, describe(model, model_cfg.name, kwargs)


def _img_size(model):
    return tuple(model.patch_embed.img_size) if hasattr(model, "patch_embed") else None


def patch_size_of(model) -> Optional[tuple]:
    pe = getattr(model, "patch_embed", None)
    return tuple(pe.patch_size) if pe is not None else None


def check_resolution(model, size, what: str = "resolution") -> None:
    """A size the patch grid cannot tile is an error unless the model pads (``dynamic_img_pad``)."""
    patch = patch_size_of(model)
    if size is None or patch is None:
        return
    h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    # padding only helps a dynamic-size model: a fixed one keeps the floor(size / patch) grid it was built for
    pad = bool(getattr(model.patch_embed, "dynamic_img_pad", False)) and bool(getattr(model, "dynamic_img_size", False))
    if (h % patch[0] or w % patch[1]) and not pad:
        raise ValueError(f"{what} {(h, w)} is not divisible by the patch size {patch}: use a multiple of the "
                         f"patch size or build the model with dynamic_img_size=True and dynamic_img_pad=True")


def describe(model, name: str, kwargs: dict) -> dict:
    """JSON-able description: timm name, constructor kwargs (no training-only rates), encoder config."""
    keep = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()
            if k not in ("drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate", "pe")}
    if hasattr(model, "patch_embed"):
        keep["img_size"] = list(model.patch_embed.img_size)
    keep["num_classes"] = getattr(model, "num_classes", keep.get("num_classes"))
    pe = getattr(model, "pe_cfg", None)
    return {"name": name, "kwargs": keep, "pe": pe}


def model_from_description(desc: dict, **overrides):
    """Rebuild (untrained) the model a description names; ``overrides`` e.g. ``dynamic_img_size=True``."""
    kwargs = {**desc["kwargs"], **overrides}
    if isinstance(kwargs.get("img_size"), list):
        kwargs["img_size"] = tuple(kwargs["img_size"])
    return create_model_with_pe(desc["name"], kwargs, desc.get("pe"))


def load_description(path: str) -> dict:
    with open(path) as f:
        desc = json.load(f)
    for key in ("name", "kwargs"):
        if key not in desc:
            raise ValueError(f"{path!r} is not a model description (no {key!r} key)")
    return desc


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(
        model, torch.nn.parallel.DistributedDataParallel) else model


def write_description(path: str, desc: dict) -> None:
    from .checkpoint import write_json_atomic
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json_atomic(path, desc)
