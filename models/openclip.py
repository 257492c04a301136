"""open_clip integration: any visionpe encoder as an open_clip vision tower, and open_clip ViT weights in timm.

Two routes (see the timm/open_clip spec, "hook points"):

1. **timm tower.** open_clip builds a vision tower from a timm name (``vision_cfg.timm_model_name``).
   Every ``vpe_vit_*`` name works; :func:`register_tower` registers more (any size, any ``pe`` config) and
   :func:`openclip_config` / :func:`add_openclip_config` write the open_clip model config, offline.
2. **conversion.** :func:`openclip_visual_to_timm` turns an open_clip ``VisionTransformer`` (OpenAI/LAION
   CLIP weights) into a timm ``VisionTransformer`` with the same outputs; :func:`visionpe.models.swap_pe`
   then changes its encoder, and :func:`replace_visual` puts it back into the CLIP model.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from functools import partial
from typing import Optional

import torch
from torch import nn
from timm.models import generate_default_cfgs, register_model

from .registry import _cfg, create_vpe_vit

__all__ = ["register_tower", "openclip_config", "add_openclip_config", "openclip_visual_to_timm",
           "TimmTower", "replace_visual"]

default_cfgs: dict = {}  # timm's register_model reads the pretrained cfgs of new entrypoints from here
_TOWERS: dict = {}
_CONFIG_DIR: Optional[str] = None


# -- 1. timm towers ---------------------------------------------------------------------------------
def register_tower(name: str, *, pe="learned", img_size: int = 224, patch_size: int = 16, embed_dim: int = 768,
                   depth: int = 12, num_heads: int = 12, **vit_kwargs) -> str:
    """Register ``name`` in timm as a ``VisionPEViT`` with these arguments, for open_clip's
    ``timm_model_name``. Registering the same name with the same arguments again is a no-op.

    Args:
        name: a new timm name, ``vpe_`` + letters, digits and underscores.
        pe: encoder name or config dict.
        **vit_kwargs: more ``VisionPEViT``/timm ``VisionTransformer`` arguments (``mlp_ratio``, ``reg_tokens``...).
    """
    if not isinstance(name, str) or not re.fullmatch(r"vpe_[A-Za-z0-9_]+", name):
        raise ValueError(f"tower name must look like 'vpe_<letters, digits, _>'; got {name!r}")
    args = dict(pe=pe, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                num_heads=num_heads, **vit_kwargs)
    if name in _TOWERS:
        if _TOWERS[name] != args:
            raise ValueError(f"tower {name!r} is already registered with other arguments: {_TOWERS[name]}")
        return name
    import timm
    if name in timm.list_models(name):
        raise ValueError(f"{name!r} is already a timm model name; pick another")

    def entry(pretrained: bool = False, **kwargs):
        return create_vpe_vit(name, pretrained=pretrained, **dict(args, **kwargs))
    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"visionpe tower {name}: {args}"
    default_cfgs.update(generate_default_cfgs({f"{name}.untrained": _cfg(img_size)}))
    setattr(sys.modules[__name__], name, entry)
    register_model(entry)
    _TOWERS[name] = args
    return name


def openclip_config(tower: str, *, embed_dim: int = 512, image_size: int = 224, pool: str = "token",
                    proj: str = "linear", proj_bias: bool = False, text_cfg: Optional[dict] = None) -> dict:
    """open_clip model config (``CLIP(**cfg)``) whose vision tower is the timm model ``tower``.

    ``pool='token'`` uses the class token, ``'avg'`` the mean patch token; ``proj='linear'`` maps the
    tower width to ``embed_dim`` as CLIP does. The default text tower is CLIP ViT-B/16's.
    """
    import timm
    if not timm.is_model(tower):
        raise ValueError(f"{tower!r} is not a registered timm model (import visionpe, or register_tower first)")
    text = text_cfg if text_cfg is not None else dict(context_length=77, vocab_size=49408, width=512, heads=8,
                                                      layers=12)
    return {"embed_dim": embed_dim,
            "vision_cfg": {"timm_model_name": tower, "timm_model_pretrained": False, "timm_pool": pool,
                           "timm_proj": proj, "timm_proj_bias": proj_bias, "image_size": image_size},
            "text_cfg": text}


def add_openclip_config(model_name: str, cfg: dict, directory: Optional[str] = None) -> str:
    """Write ``cfg`` as ``<directory>/<model_name>.json`` and register it with open_clip, so that
    ``open_clip.create_model(model_name)`` builds it (offline). Returns the file path."""
    import open_clip
    global _CONFIG_DIR
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", model_name or ""):
        raise ValueError(f"model_name must be a plain file stem (letters, digits, . _ -); got {model_name!r}")
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ValueError(f"an open_clip config needs {key!r}; got keys {sorted(cfg)}")
    if directory is None:
        _CONFIG_DIR = _CONFIG_DIR or tempfile.mkdtemp(prefix="visionpe_openclip_")
        directory = _CONFIG_DIR
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{model_name}.json")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)
    open_clip.add_model_config(path)
    return path


# -- 2. open_clip ViT -> timm ViT ---------------------------------------------------------------------
def _visual_spec(visual) -> dict:
    """timm ``VisionTransformer`` arguments equivalent to an open_clip ``VisionTransformer``."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer as OCViT
    from timm.layers import QuickGELU

    if not isinstance(visual, OCViT):
        raise TypeError(f"expected an open_clip VisionTransformer (model.visual); got {type(visual).__name__} "
                        f"(timm towers are timm models already)")
    if visual.attn_pool is not None:
        raise ValueError("open_clip towers with attentional pooling (CoCa) have no timm ViT equivalent")
    if visual.pool_type not in ("tok", "avg"):
        raise ValueError(f"pool_type {visual.pool_type!r} is not supported (only 'tok' and 'avg')")
    if not isinstance(visual.patch_dropout, nn.Identity):
        raise ValueError("set patch_dropout=0 before converting (it breaks the patch grid)")
    blocks = visual.transformer.resblocks
    for i, blk in enumerate(blocks):
        if type(blk) is not ResidualAttentionBlock:
            raise ValueError(f"resblocks[{i}] is {type(blk).__name__}: only the standard block converts")
    blk = blocks[0]
    width = visual.conv1.out_channels
    act = QuickGELU if type(blk.mlp.gelu).__name__ == "QuickGELU" else nn.GELU
    gamma = getattr(blk.ls_1, "gamma", None)
    pre_norm = not isinstance(visual.ln_pre, nn.Identity)
    eps = visual.ln_post.eps
    return dict(
        img_size=tuple(visual.image_size), patch_size=tuple(visual.patch_size), embed_dim=width,
        depth=len(blocks), num_heads=blk.attn.num_heads, mlp_ratio=blk.mlp.c_fc.out_features / width,
        qkv_bias=blk.attn.in_proj_bias is not None, pre_norm=pre_norm, class_token=True,
        global_pool="token" if visual.pool_type == "tok" else "avg",
        fc_norm=bool(visual.final_ln_after_pool) if visual.pool_type == "avg" else False,
        num_classes=visual.proj.shape[1] if visual.proj is not None else 0,
        norm_layer=partial(nn.LayerNorm, eps=eps), act_layer=act,
        init_values=float(gamma.detach().flatten()[0]) if gamma is not None else None,
    )


def openclip_visual_to_timm(visual, *, dynamic_img_size: bool = False, dynamic_img_pad: bool = False):
    """A timm ``VisionTransformer`` computing what ``visual`` (open_clip ``model.visual``) computes.

    The class token, ``positional_embedding`` (-> ``pos_embed``), ``ln_pre`` (-> ``norm_pre``), blocks
    (``in_proj`` -> ``qkv``), ``ln_post`` (-> ``norm`` or ``fc_norm``) and ``proj`` (-> ``head``, zero bias)
    map one to one, through timm's own open_clip converter. Returns the model in eval mode.
    """
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
    from .swap import check_state_dict

    if hasattr(visual, "visual") and not hasattr(visual, "conv1"):
        visual = visual.visual  # a whole CLIP model
    spec = _visual_spec(visual)
    model = VisionTransformer(dynamic_img_size=dynamic_img_size, dynamic_img_pad=dynamic_img_pad, **spec)
    sd = {}
    for k, v in visual.state_dict().items():
        sd["visual." + k.replace(".ls_1.", ".ls1.").replace(".ls_2.", ".ls2.")] = v
    sd = checkpoint_filter_fn(sd, model)
    if spec["fc_norm"]:  # LN after pooling: timm calls it fc_norm and leaves `norm` an identity
        sd = {("fc_norm" + k[len("norm"):] if k in ("norm.weight", "norm.bias") else k): v for k, v in sd.items()}
    if "patch_embed.proj.bias" not in sd and model.patch_embed.proj.bias is not None:
        # conv1 has no bias; timm adds one whenever norm_pre is off (no_ln_pre): zero is the same function
        sd["patch_embed.proj.bias"] = torch.zeros_like(model.patch_embed.proj.bias)
    check_state_dict(sd, model, what="converted open_clip state dict")
    model.load_state_dict(sd)
    return model.eval()


class TimmTower(nn.Module):
    """A timm trunk as an open_clip vision tower (the ``TimmModel`` interface, without rebuilding the
    trunk from a name): ``forward(x) -> (B, embed_dim)`` image features from the trunk's head."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.image_size = tuple(trunk.patch_embed.img_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False):
        for p in self.trunk.parameters():
            p.requires_grad = False

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.trunk.set_grad_checkpointing(enable)

    def set_input_size(self, image_size):
        self.trunk.set_input_size(img_size=image_size)
        self.image_size = tuple(self.trunk.patch_embed.img_size)


def replace_visual(clip_model: nn.Module, trunk: nn.Module) -> nn.Module:
    """Put a (converted, PE-swapped) timm trunk into ``clip_model`` as its vision tower, in place.

    The trunk's head must output the CLIP embedding (as :func:`openclip_visual_to_timm` builds it).
    """
    out_dim = getattr(getattr(trunk, "head", None), "out_features", None)
    proj = getattr(clip_model.visual, "proj", None)
    want = proj.shape[1] if isinstance(proj, torch.Tensor) else getattr(clip_model.visual, "output_dim", None)
    if want is not None and out_dim != want:
        raise ValueError(f"trunk head outputs {out_dim} features but the CLIP embedding has {want}")
    clip_model.visual = TimmTower(trunk)
    return clip_model
