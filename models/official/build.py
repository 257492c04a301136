"""The timm entry behind every official checkpoint: ``vpe_vit_official`` (and the release names built on it).

``VisionPEViT`` (or :class:`VisionPEViTDistilled`) through timm's ``build_model_with_cfg``, with the official
checkpoint filter, and three JSON-able arguments the official layouts need beyond timm's ViT arguments:

* ``distilled``: DeiT's distillation token and second head;
* ``norm_eps``: the LayerNorm eps of the blocks and the final norm (1e-6 for DeiT/RoPE-ViT/Twins; 1e-12 for
  LOOPE's HF ViT) -- timm's ``norm_layer`` takes a callable, which a model description cannot store;
* ``embed_norm_eps``: a LayerNorm after the patch embedding with this eps (Twins' ``PatchEmbed``), None for none.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

from torch import nn

__all__ = ["create_official_vit", "OFFICIAL_ARCH"]

OFFICIAL_ARCH = "vpe_vit_official"


def create_official_vit(variant: str, pretrained: bool = False, *, distilled: bool = False,
                        norm_eps: float = 1e-6, embed_norm_eps: Optional[float] = None, **kwargs):
    """Build a ``VisionPEViT`` for an official layout (see the module docstring); ``kwargs`` go to timm's ViT.

    Pretrained weights (``pretrained=True``: the cfg's url / hf-hub / ``pretrained_cfg_overlay=dict(file=...)``)
    pass through :func:`visionpe.models.official.official_checkpoint_filter`.
    """
    from timm.models import build_model_with_cfg
    from ..vit import VisionPEViT
    from .distilled import VisionPEViTDistilled
    from . import official_checkpoint_filter

    for name, val in (("norm_eps", norm_eps), ("embed_norm_eps", embed_norm_eps)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, (int, float)) or not val > 0):
            raise ValueError(f"{name} must be a positive number; got {val!r}")
    if norm_eps is None:
        raise ValueError("norm_eps must be a positive number; got None")
    if "norm_layer" in kwargs or "embed_norm_layer" in kwargs:
        raise TypeError(f"{variant}: set the LayerNorm eps with norm_eps= / embed_norm_eps= (JSON-able), not "
                        f"norm_layer= / embed_norm_layer=")
    kwargs["norm_layer"] = partial(nn.LayerNorm, eps=float(norm_eps))
    if embed_norm_eps is not None:
        kwargs["embed_norm_layer"] = partial(nn.LayerNorm, eps=float(embed_norm_eps))
    cls = VisionPEViTDistilled if distilled else VisionPEViT
    return build_model_with_cfg(
        cls, variant, pretrained,
        pretrained_filter_fn=official_checkpoint_filter,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **kwargs,
    )
