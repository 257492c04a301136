"""The Three-Cell ViT: build it for one encoder, load a pretrained backbone (with a key report), and the
optimiser parameter groups."""
from __future__ import annotations

import logging
import os

import torch

from .threecell_config import data_config, patch_size

__all__ = ["MODEL_NAME", "build_model", "load_pretrained", "param_groups", "any_grid_copy"]

_logger = logging.getLogger(__name__)

#: the timm name every Three-Cell model is built from (resized by the recipe)
MODEL_NAME = "vpe_vit_tiny_patch16_224"


def build_model(name: str, cfg: dict, any_grid: bool = False) -> tuple[torch.nn.Module, dict | None]:
    """The recipe's ViT with encoder ``name`` (the encoder's own ``model_kwargs`` win, e.g. GAP variants).

    Returns ``(model, report)``: ``report`` is :func:`load_pretrained`'s key report when
    ``model.pretrained`` is set, else ``None``. The model has 6 outputs (one logit per label bit).
    ``any_grid=True`` builds it with ``dynamic_img_size=True``: the same parameters (a state dict of the
    fixed-size model loads as is), but it takes images of any size that the patch size divides, and each
    encoder adapts to the new grid on every forward (tables resampled, positions recomputed), as
    ``visionpe evalres`` runs models at new resolutions.
    """
    import visionpe
    from visionpe.train.model import create_model_with_pe
    m = cfg["model"]
    kwargs = dict(img_size=tuple(data_config(cfg).img_size), patch_size=patch_size(cfg), embed_dim=m["embed_dim"],
                  depth=m["depth"], num_heads=m["num_heads"], mlp_ratio=m["mlp_ratio"],
                  drop_path_rate=m["drop_path_rate"], num_classes=6)
    if any_grid:
        kwargs["dynamic_img_size"] = True
    kwargs.update(visionpe.encoder_info(name).model_kwargs)
    model = create_model_with_pe(MODEL_NAME, kwargs, pe=name)
    report = load_pretrained(model, m["pretrained"]) if m["pretrained"] else None
    return model, report


def _read_state_dict(source: str) -> dict:
    if os.path.isfile(source):
        if source.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(source)
        return torch.load(source, map_location="cpu", weights_only=True)
    import timm
    if not timm.is_model(source.split(".")[0]):
        raise ValueError(f"model.pretrained {source!r} is neither a checkpoint file nor a timm model name")
    return timm.create_model(source, pretrained=True).state_dict()  # downloaded by timm


def _unwrapped_keys(sd: dict) -> set:
    """The checkpoint's tensor names as ``pe_checkpoint_filter`` sees them (training wrappers removed)."""
    for key in ("model", "state_dict", "model_ema", "module"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return {k[len("module."):] if k.startswith("module.") else k for k in sd}


def load_pretrained(model: torch.nn.Module, source: str) -> dict:
    """Load a backbone into ``model`` from a checkpoint file or a timm model name; the head stays new.

    The checkpoint goes through ``pe_checkpoint_filter`` (unwrapping, patch-embed resampling, ``pos_embed`` /
    ``rope.freqs`` mapped onto the model's encoder), which raises ``ValueError`` with the key diff when the
    backbone does not fit (a block tensor missing or extra, a shape mismatch). The result is loaded
    **strictly**, the new classifier ``head.*`` included. What the load could not take from the checkpoint is
    reported, never dropped silently:

    * ``missing``: model tensors the checkpoint lacks, kept at their initialisation (a new encoder's
      parameters, e.g. a relative-bias table when the checkpoint had a learned APE);
    * ``unexpected``: checkpoint tensors the model does not use (an APE table or another encoder's
      parameters; a dropped APE's class row is folded into ``cls_token``).

    Returns ``{"source", "loaded": n tensors taken from the checkpoint, "missing": [...], "unexpected": [...]}``
    and logs a warning when either list is non-empty.
    """
    from visionpe.models.registry import pe_checkpoint_filter
    raw = _read_state_dict(source)
    raw_keys = _unwrapped_keys(raw)
    sd = pe_checkpoint_filter(raw, model)
    own = model.state_dict()
    head = {k for k in own if k.startswith("head.")}
    # the filter fills encoder parameters the checkpoint lacks with the model's own tensors (same storage)
    missing = sorted(k for k in own if k not in head and (
        k not in sd or (sd[k].data_ptr() == own[k].data_ptr() and sd[k].shape == own[k].shape)))
    renamed = {"pos_embed": "pe.pos_embed", "rope.freqs": "pe.freqs"}
    unexpected = sorted(k for k in raw_keys if k not in sd and not k.startswith("head.")
                        and not (k in renamed and renamed[k] in sd and renamed[k] not in missing))
    full = {k: v for k, v in sd.items() if k not in head}
    full.update({k: own[k] for k in head})
    model.load_state_dict(full, strict=True)
    report = {"source": source, "loaded": len(own) - len(head) - len(missing), "missing": missing,
              "unexpected": unexpected}
    if missing or unexpected:
        _logger.warning("model.pretrained %r: loaded %d tensors; %d missing in the checkpoint (kept at init): %s; "
                        "%d unexpected (not used): %s", source, report["loaded"], len(missing), missing[:12],
                        len(unexpected), unexpected[:12])
    return report


def param_groups(model, lr: float, weight_decay: float, pe_lr_scale: float = 1.0) -> list[dict]:
    """Optimiser groups: no weight decay on 1-D parameters and ``model.no_weight_decay()``; the encoder's own
    parameters (``pe.*``) get ``lr * pe_lr_scale``.

    Why the scale: learned tables start tiny (std 0.02, or zero-mean biases) next to patch features of order
    1, and with a from-scratch ViT and a short budget they barely move; fixed tables (sin-cos, RoPE) need no
    learning. A larger step for PE parameters only lets the learned encoders compete within the quick
    budget; it applies to every encoder alike (1.0 in the paper recipe).
    """
    skip = model.no_weight_decay()
    buckets: dict = {}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if p.ndim <= 1 or pname in skip else weight_decay
        scale = pe_lr_scale if pname.startswith("pe.") else 1.0
        buckets.setdefault((wd, scale), []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr": lr * scale} for (wd, scale), ps in buckets.items()]


def any_grid_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of a timm ViT (``VisionPEViT`` or timm's own) that takes images of any size, as if it had
    been built with ``dynamic_img_size=True``; ``model`` itself is not changed.

    These are the switches timm's ``VisionTransformer.__init__`` sets for ``dynamic_img_size=True`` (patch
    embedding to NHWC without the size assert), and ``forward`` then gives the encoder the grid of each
    input. The copy is used rather than ``set_input_size`` because an encoder that keeps a grid-sized table
    must then resample it for good (``relpos_bias`` does not do that in ``set_grid_size``), while the dynamic
    path resamples per forward for every encoder. At the model's own size the copy gives the same outputs
    (tested against a model built with ``dynamic_img_size=True``).
    """
    import copy
    from timm.layers import Format
    pe = getattr(model, "patch_embed", None)
    if pe is None or not hasattr(model, "dynamic_img_size") or not hasattr(pe, "strict_img_size"):
        raise TypeError(f"any_grid_copy needs a timm VisionTransformer with a PatchEmbed; got {type(model).__name__}")
    out = copy.deepcopy(model)
    out.dynamic_img_size = True
    out.patch_embed.strict_img_size = False
    out.patch_embed.flatten = False
    out.patch_embed.output_fmt = Format.NHWC
    return out
