"""timm registry entries for the PE-aware ViTs.

* ``vpe_vit_{tiny,small,base}_patch16_{224,384}``: generic, the PE chosen with ``pe=`` (name or config
  dict; default ``learned``).
* ``vpe_vit_{size}_patch16_224_<encoder>``: one name per registered encoder with its common config
  (e.g. ``vpe_vit_small_patch16_224_rope_mixed``). ``pe=`` still overrides.

``import visionpe`` (or ``import visionpe.models``) registers them. timm loads no plugins by itself: a
config-driven tool that only calls ``timm.create_model`` (timm's ``train.py``, open_clip's training) sees
the names when started through ``python -m visionpe.run SCRIPT ARGS...`` (see docs/timm.md).

The pretrained configs say ``fixed_input_size: True``, as timm's own ViTs do: a model built for one grid
takes that image size; build it with ``img_size=`` or ``dynamic_img_size=True`` for others.
"""
from __future__ import annotations

import sys

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import checkpoint_filter_fn as _vit_filter
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from visionpe.base import encoder_info, list_encoders

from .vit import VisionPEViT

__all__ = ["SIZES", "vpe_model_names", "create_vpe_vit", "pe_checkpoint_filter"]

SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}
RESOLUTIONS = (224, 384)


def _cfg(res: int = 224, **kw):
    return {
        "url": "", "num_classes": 1000, "input_size": (3, res, res), "pool_size": None,
        "crop_pct": 0.9 if res == 224 else 1.0, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj",
        "classifier": "head", "license": "apache-2.0", **kw,
    }


def pe_checkpoint_filter(state_dict, model: VisionPEViT):
    """Load plain timm ViT (or open_clip / DeiT, via timm's ViT filter) or visionpe checkpoints.

    timm's ViT filter runs first (unwrapping, foreign layouts, patch-embed resampling); then
    ``pos_embed`` / ``rope.freqs`` are mapped onto the model's encoder (see ``visionpe.models.swap``).
    """
    from .swap import adapt_state_dict
    sd = state_dict
    for key in ("model", "state_dict", "model_ema", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    from .official import convert_if_official  # the papers' own layouts (iRPE, RoPE-ViT, Twins PEG, LOOPE)
    official = convert_if_official(sd, model)
    if official is not None:
        return official
    pos = sd.pop("pos_embed", None)
    sd = _vit_filter(sd, model)
    return adapt_state_dict(sd, model, pos_embed=pos)


def create_vpe_vit(variant: str, pretrained: bool = False, **kwargs) -> VisionPEViT:
    return build_model_with_cfg(
        VisionPEViT, variant, pretrained,
        pretrained_filter_fn=pe_checkpoint_filter,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **kwargs,
    )


def _make_entry(name: str, size: str, res: int, pe, model_kwargs=None):
    def entry(pretrained: bool = False, **kwargs):
        args = dict(patch_size=16, img_size=res, **SIZES[size], **(model_kwargs or {}))
        if "pe" not in kwargs:
            args["pe"] = pe
        return create_vpe_vit(name, pretrained=pretrained, **dict(args, **kwargs))
    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"ViT-{size[0].upper()}/16 at {res} with position encoding {pe!r} (override with pe=)."
    return entry


def vpe_model_names() -> list[str]:
    return sorted(_ENTRIES)


_ENTRIES: dict = {}
_this = sys.modules[__name__]


def _register_all() -> None:
    specs = []
    for size in SIZES:
        for res in RESOLUTIONS:
            specs.append((f"vpe_vit_{size}_patch16_{res}", size, res, "learned"))
        for enc in list_encoders():
            specs.append((f"vpe_vit_{size}_patch16_224_{enc}", size, 224, enc))
    new = [s for s in specs if s[0] not in _ENTRIES]
    cfgs = generate_default_cfgs({f"{n}.untrained": _cfg(res) for n, _, res, _ in new})
    global default_cfgs
    default_cfgs = {**globals().get("default_cfgs", {}), **cfgs}
    for name, size, res, pe in new:
        extra = encoder_info(pe).model_kwargs if name.endswith(f"_{pe}") else None
        fn = _make_entry(name, size, res, pe, extra)
        setattr(_this, name, fn)
        _ENTRIES[name] = register_model(fn)


def refresh() -> None:
    """Register ``vpe_vit_*_<encoder>`` names for encoders registered after import (plugins)."""
    _register_all()


_register_all()


# -- the papers' released checkpoints (visionpe.models.official; docs/checkpoints.md) --------------------------
# vpe_vit_official: a VisionPEViT for any official layout (load_official builds it from the tensors), and
# vpe_<official name>.<tag> for every released checkpoint, its pretrained_cfg carrying the official download.
def _register_official() -> None:
    from .official.releases import registry_entries
    global default_cfgs
    entries = registry_entries()
    cfgs = {f"{arch}.{tag}": (cfg if cfg is not None else _cfg(224)) for arch, _, tags in entries
            for tag, cfg in tags.items()}
    default_cfgs = {**default_cfgs, **generate_default_cfgs(cfgs)}
    for arch, fn, _ in entries:
        fn.__name__ = fn.__qualname__ = arch
        fn.__module__ = __name__
        setattr(_this, arch, fn)
        register_model(fn)


_register_official()
