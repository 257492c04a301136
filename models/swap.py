"""Moving weights between position encodings: checkpoint adaptation and in-place PE swap.

* :func:`adapt_state_dict` maps the PE entries of a ViT-family state dict (timm ``pos_embed``, RoPE-ViT
  ``rope.freqs``, visionpe ``pe.*``) onto a :class:`~visionpe.models.VisionPEViT`; timm's pretrained
  loader calls it through ``pe_checkpoint_filter``.
* :func:`attach_encoder` builds an encoder sized for a timm ViT and wires it in (``VisionPEViT.__init__``
  and :func:`swap_pe` both use it).
* :func:`swap_pe` converts a live timm ``VisionTransformer`` or ``VisionPEViT`` to another encoder in place.
* :func:`create_swapped` loads a local checkpoint with ``pretrained_cfg_overlay=dict(file=...)`` (the path
  that keeps the registry's mean/std and runs the checkpoint filter) and swaps the encoder.
* :func:`check_state_dict` / :func:`state_dict_diff`: a clear missing/unexpected/shape diff instead of
  timm's silent non-strict load when a checkpoint does not fit.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict, Iterable, Optional, Union

import torch

from visionpe.base import AbsoluteTable, PositionEncoder, create_encoder, split_pe_config
from visionpe.resample import resample_grid_table

__all__ = ["adapt_state_dict", "attach_encoder", "build_encoder", "swap_pe", "create_swapped", "state_dict_diff",
           "check_state_dict"]

PEConfig = Union[str, Dict[str, Any], None]

#: state-dict keys that may hold a learned APE table: timm's, a LearnedAPE encoder's, iRPE's ``ape``
#: (and the key iRPE used before it held a LearnedAPE)
_APE_KEYS = ("pos_embed", "pe.pos_embed", "pe.ape.pos_embed")

_logger = logging.getLogger(__name__)


# -- key diffs ---------------------------------------------------------------------------------------
def _fmt_keys(keys: list, limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... (+{len(keys) - limit} more)' if len(keys) > limit else ''}]"


def state_dict_diff(sd: dict, model_or_sd, ignore_prefixes: Iterable[str] = ()) -> tuple[list, list, list]:
    """``(missing, unexpected, mismatched)`` keys of ``sd`` against a model (or its state dict).

    ``mismatched`` holds ``(key, checkpoint_shape, model_shape)``. Keys starting with any of
    ``ignore_prefixes`` (e.g. the classifier when it is re-initialised) are left out.
    """
    own = model_or_sd.state_dict() if isinstance(model_or_sd, torch.nn.Module) else model_or_sd
    ignore = tuple(ignore_prefixes)

    def keep(k):
        return not (ignore and k.startswith(ignore))
    missing = sorted(k for k in own if k not in sd and keep(k))
    unexpected = sorted(k for k in sd if k not in own and keep(k))
    mismatched = sorted((k, tuple(sd[k].shape), tuple(own[k].shape)) for k in sd
                        if k in own and keep(k) and tuple(sd[k].shape) != tuple(own[k].shape))
    return missing, unexpected, mismatched


def check_state_dict(sd: dict, model_or_sd, what: str = "checkpoint", ignore_prefixes: Iterable[str] = (),
                     model_name: Optional[str] = None) -> None:
    """Raise ``ValueError`` with the key diff when ``sd`` does not fit the model exactly."""
    missing, unexpected, mismatched = state_dict_diff(sd, model_or_sd, ignore_prefixes)
    if not (missing or unexpected or mismatched):
        return
    name = model_name or (type(model_or_sd).__name__ if isinstance(model_or_sd, torch.nn.Module) else "the model")
    lines = [f"{what} does not fit {name}:"]
    if missing:
        lines.append(f"  missing in {what} ({len(missing)}): {_fmt_keys(missing)}")
    if unexpected:
        lines.append(f"  unexpected in {what} ({len(unexpected)}): {_fmt_keys(unexpected)}")
    if mismatched:
        items = [f"{k} {a} vs {b}" for k, a, b in mismatched]
        lines.append(f"  shape mismatches ({len(mismatched)}, checkpoint vs model): {_fmt_keys(items)}")
    raise ValueError("\n".join(lines))


# -- APE tables --------------------------------------------------------------------------------------
def _ape_table(pe) -> tuple[Optional[str], Optional[AbsoluteTable]]:
    """``(state-dict key, holder)`` of the learned absolute table encoder ``pe`` adds, or ``(None, None)``.

    The holder satisfies :class:`visionpe.base.AbsoluteTable` (``pos_embed``, ``grid_size``, ``table_prefix``,
    ``interpolation``, ``antialias``); the key is ``pe.<path to holder>.pos_embed``.
    """
    holder = pe.absolute_table() if isinstance(pe, PositionEncoder) else None
    if holder is None:
        return None, None
    if not isinstance(holder, AbsoluteTable):
        raise TypeError(f"{type(pe).__name__}.absolute_table() returned {type(holder).__name__}, which lacks the "
                        f"AbsoluteTable attributes (pos_embed, grid_size, table_prefix, interpolation, antialias)")
    for name, mod in pe.named_modules():
        if mod is holder:
            return "pe." + (f"{name}." if name else "") + "pos_embed", holder
    raise ValueError(f"{type(pe).__name__}.absolute_table() must return the encoder or one of its submodules")


def _square_side(n: int) -> Optional[int]:
    side = math.isqrt(n) if n > 0 else 0
    return side if side > 0 and side * side == n else None


def _prefix_rows(table: torch.Tensor, num_prefix_tokens: int) -> int:
    """How many leading rows of a bare APE table belong to prefix tokens (a checkpoint does not say).

    timm tables have rows for every prefix token (``no_embed_class=False``) or none; a square grid is
    the only one a bare table can describe, so the count whose remainder is square wins.
    """
    rows = table.shape[1]
    if num_prefix_tokens and _square_side(rows - num_prefix_tokens):
        return num_prefix_tokens
    if _square_side(rows):
        return 0
    raise ValueError(f"checkpoint pos_embed has shape {tuple(table.shape)}: neither {rows} nor {rows} - "
                     f"{num_prefix_tokens} prefix rows form a square grid; resample it to a square grid with "
                     f"visionpe.resample.resample_grid_table first")


def _fold_prefix_rows(sd: dict, rows: torch.Tensor, model) -> None:
    """Add APE rows of prefix tokens to the tokens themselves: ``cls + pe[0]`` is what block 0 saw, so
    dropping the rows this way keeps the class/register inputs exact (timm does the same for DINOv2)."""
    n_cls = 1 if getattr(model, "cls_token", None) is not None else 0
    n_reg = rows.shape[1] - n_cls
    if n_cls:
        if "cls_token" not in sd:
            raise ValueError("checkpoint pos_embed has a class-token row but the checkpoint has no cls_token")
        sd["cls_token"] = sd["cls_token"] + rows[:, :1].to(sd["cls_token"].dtype)
    if n_reg:
        if "reg_token" not in sd or sd["reg_token"].shape[1] != n_reg:
            raise ValueError(f"checkpoint pos_embed has {n_reg} register rows but reg_token is "
                             f"{tuple(sd['reg_token'].shape) if 'reg_token' in sd else 'missing'}")
        sd["reg_token"] = sd["reg_token"] + rows[:, n_cls:].to(sd["reg_token"].dtype)


def _map_ape(sd: dict, table: torch.Tensor, src_prefix: Optional[int], model, own: dict) -> None:
    """Put an APE table onto ``model.pe.pos_embed`` (resampled, prefix rows adapted) or fold it away."""
    P = model.num_prefix_tokens
    if src_prefix is None:
        src_prefix = _prefix_rows(table, P)
    elif src_prefix not in (0, P):
        raise ValueError(f"pos_embed prefix rows must be 0 or num_prefix_tokens={P}; got {src_prefix}")
    prefix_rows, grid_rows = table[:, :src_prefix], table[:, src_prefix:]
    key, holder = _ape_table(model.pe)
    target = own.get(key) if key is not None else None
    dst_prefix = holder.table_prefix if target is not None else 0
    if src_prefix and not dst_prefix:
        _fold_prefix_rows(sd, prefix_rows, model)
    if target is None:
        _logger.info("dropped pos_embed %s: encoder %r has no APE table", tuple(table.shape), model.pe_name)
        return
    grid = holder.grid_size
    side = _square_side(grid_rows.shape[1])
    if side is None:
        if grid_rows.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"checkpoint pos_embed has {grid_rows.shape[1]} grid rows: not a square grid and "
                             f"not the model's grid {grid}")
        old_grid = grid
    else:
        old_grid = (side, side)
    if tuple(target.shape[1:]) == tuple(table.shape[1:]) and src_prefix == dst_prefix:
        old_grid = grid  # same table layout: keep the rows (covers non-square model grids)
    grid_rows = resample_grid_table(grid_rows, grid, old_grid, 0, mode=holder.interpolation,
                                    antialias=holder.antialias)
    if dst_prefix:
        if not src_prefix:  # prefix tokens had no position: a zero row is the same function
            prefix_rows = grid_rows.new_zeros(grid_rows.shape[0], dst_prefix, grid_rows.shape[2])
        grid_rows = torch.cat([prefix_rows.to(grid_rows.dtype), grid_rows], dim=1)
    sd[key] = grid_rows


def adapt_state_dict(sd: dict, model, pos_embed: Optional[torch.Tensor] = None,
                     pos_embed_prefix: Optional[int] = None, check: bool = True,
                     ignore_prefixes: Iterable[str] = ()) -> dict:
    """Map PE entries of a ViT-family state dict onto ``model`` (a ``VisionPEViT``).

    * An APE table (``pos_embed`` argument, or ``pos_embed`` / ``pe.pos_embed`` / ``pe.ape.pos_embed`` in
      ``sd``, shape ``(1, P' + h*w, dim)``) goes to the model encoder's learned absolute table
      (:class:`visionpe.base.AbsoluteTable`: ``pe.pos_embed`` for ``learned``, ``pe.ape.pos_embed`` for iRPE),
      resampled to the model's grid (bicubic, as timm) with prefix rows added (zeros) or removed; without
      such a table it is dropped. Dropped prefix rows are folded into ``cls_token``/``reg_token`` so those
      inputs stay exact.
    * ``rope.freqs`` (timm/RoPE-ViT mixed) becomes ``pe.freqs``.
    * ``pe.*`` entries the model's encoder does not have are dropped (another encoder's parameters);
      encoder parameters the checkpoint lacks keep the model's fresh init (each encoder's paper init).
    * ``check``: every other key must match the model exactly (``ignore_prefixes`` and the classifier
      aside, which timm re-initialises on a class-count change); a ``ValueError`` lists the diff.

    Args:
        pos_embed_prefix: how many leading rows of the APE are prefix rows (``None``: inferred).
    """
    sd = dict(sd)
    own = model.state_dict()
    if "rope.freqs" in sd:
        sd["pe.freqs"] = sd.pop("rope.freqs")
    table = pos_embed
    for key in _APE_KEYS:
        if key in sd:
            if table is not None:
                raise ValueError(f"two APE tables given: the pos_embed argument / another key and {key!r}")
            table = sd.pop(key)
    if table is not None:
        if table.ndim == 2:  # open_clip-style (N, dim) tables
            table = table.unsqueeze(0)
        _map_ape(sd, table, pos_embed_prefix, model, own)
    for key in [k for k in sd if k.startswith("pe.") and k not in own]:
        _logger.info("dropped %s: not a parameter of encoder %r", key, model.pe_name)
        del sd[key]
    for key in own:
        if key.startswith("pe.") and key not in sd:
            sd[key] = own[key]
    if check:
        classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head")
        classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
        check_state_dict(sd, own, ignore_prefixes=tuple(ignore_prefixes) + tuple(c + "." for c in classifiers),
                         model_name=f"{type(model).__name__} (pe={model.pe_name!r})")
    return sd


# -- in-place swap -----------------------------------------------------------------------------------
def _check_plain_vit(model) -> None:
    from timm.models.vision_transformer import Attention, Block
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            raise TypeError(f"swap_pe supports timm ViTs built with the standard Block; blocks[{i}] is "
                            f"{type(blk).__name__}")
        if type(blk.attn) is not Attention:
            raise TypeError(f"swap_pe supports timm ViTs with the standard Attention; blocks[{i}].attn is "
                            f"{type(blk.attn).__name__}")
    if not isinstance(model.patch_drop, torch.nn.Identity):
        raise ValueError("swap_pe: patch dropout (patch_drop_rate > 0) breaks the grid layout encoders rely on; "
                         "rebuild the model with patch_drop_rate=0")


def build_encoder(model, pe: PEConfig) -> PositionEncoder:
    """The encoder ``pe`` (name or config dict) sized for the timm ViT ``model``, on its device and dtype.

    Sizes come from the model: ``embed_dim``, the heads of ``blocks[0].attn``, ``len(blocks)``, the patch
    grid and ``num_prefix_tokens``. Unknown names/options raise here, before anything changes.
    """
    name, cfg = split_pe_config(pe)
    enc = create_encoder(name, dim=model.embed_dim, num_heads=model.blocks[0].attn.num_heads,
                         depth=len(model.blocks), grid_size=tuple(model.patch_embed.grid_size),
                         num_prefix_tokens=model.num_prefix_tokens, **cfg)
    ref = next(model.patch_embed.parameters(), None)
    if ref is not None:
        enc = enc.to(device=ref.device)
        if ref.dtype != torch.float32 and ref.is_floating_point():
            enc = enc.to(dtype=ref.dtype)  # fixed rotary frequencies are derived float32 tensors, not buffers
    return enc


def attach_encoder(model, pe: PEConfig, encoder: Optional[PositionEncoder] = None) -> PositionEncoder:
    """Wire the encoder ``pe`` into a timm ViT (``VisionPEViT.__init__`` and :func:`swap_pe` both call this).

    Sets ``model.pe`` (the encoder module), ``model.pe_name``, ``model.pe_cfg`` (``{"name": ..., **options}``)
    and the embed-stage flags the forward reads. ``encoder``: an encoder already built for this ``pe`` by
    :func:`build_encoder` (``swap_pe`` builds first so that bad options raise before the model changes);
    built here when None. Returns the encoder.
    """
    name, cfg = split_pe_config(pe)
    enc = build_encoder(model, pe) if encoder is None else encoder
    model.pe = enc
    model.pe_name = name
    model.pe_cfg = {"name": name, **cfg}
    model._embed_after = frozenset(s for s in enc.embed_stages if s >= 0) if "embed" in enc.hooks else frozenset()
    model._embed_input = "embed" in enc.hooks and -1 in enc.embed_stages
    return enc


def swap_pe(model, pe: PEConfig = "rope_mixed"):
    """Convert ``model`` to the position encoding ``pe``, in place, keeping every other weight.

    Args:
        model: a timm ``VisionTransformer`` with standard blocks (e.g. ``vit_small_patch16_224``, any APE
            layout incl. ``no_embed_class``), or a ``VisionPEViT`` (``vpe_vit_*``).
        pe: encoder name or config dict ``{"name": ..., **options}``.

    Returns:
        ``model`` itself, now a ``VisionPEViT`` (a plain timm model changes class; its blocks become
        ``PEBlock``/``PEAttention``, whose parameter names are timm's, so nothing is copied).

    The APE is handled by :func:`adapt_state_dict`: kept (``learned`` target, prefix rows adapted) or
    dropped (folded into the class/register tokens). Encoder parameters are carried over only when the
    source and target encoders are the same class; new ones get the encoder's own (paper) init.
    """
    from timm.models.vision_transformer import VisionTransformer
    from .vit import PEAttention, PEBlock, VisionPEViT

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"swap_pe expects a timm VisionTransformer or VisionPEViT; got {type(model).__name__}")
    split_pe_config(pe)  # a malformed pe raises before anything changes
    if not isinstance(model, VisionPEViT):
        _check_plain_vit(model)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    enc = build_encoder(model, pe)
    if isinstance(model, VisionPEViT):
        old_cls = type(model.pe)
        pos_embed, src_prefix = None, None
        key, holder = _ape_table(model.pe)
        if key is not None and key in sd:
            pos_embed, src_prefix = sd.pop(key), holder.table_prefix
        attach_encoder(model, pe, enc)
        if type(model.pe) is not old_cls:
            sd = {k: v for k, v in sd.items() if not k.startswith("pe.")}
    else:
        pos_embed = sd.pop("pos_embed", None)
        src_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        model.__class__ = VisionPEViT
        for blk in model.blocks:
            blk.__class__ = PEBlock
            blk.attn.__class__ = PEAttention
        model.pos_embed = None
        attach_encoder(model, pe, enc)
        model.set_attn_impl("auto")  # what VisionPEViT.__init__ sets by default
    model.load_state_dict(adapt_state_dict(sd, model, pos_embed=pos_embed, pos_embed_prefix=src_prefix))
    return model


def create_swapped(model_name: str, checkpoint: str, pe=None, *, keep_head: bool = False, **kwargs):
    """Build ``model_name`` from a local checkpoint and give it the encoder ``pe``.

    Loading goes through ``timm.create_model(model_name, pretrained=True,
    pretrained_cfg_overlay=dict(file=checkpoint))`` (the filter runs; the registry's mean/std stay).
    ``vpe_vit_*`` names get ``pe=`` at creation (their filter adapts the checkpoint); other timm ViTs are
    loaded as they are, checked against the file, then converted with :func:`swap_pe` (``pe=None`` keeps
    the plain model). ``keep_head=False`` drops the checkpoint's classifier (fine-tuning on new classes).
    """
    import timm
    from timm.models import get_pretrained_cfg, model_entrypoint

    shown = os.fspath(checkpoint) if isinstance(checkpoint, os.PathLike) else checkpoint
    if not isinstance(shown, str) or not os.path.isfile(shown):
        raise ValueError(f"checkpoint file {shown!r} does not exist")
    entry = model_entrypoint(model_name)  # raises RuntimeError naming unknown models
    is_vpe = entry.__module__.startswith("visionpe.")
    overlay = dict(file=os.fspath(checkpoint))
    if keep_head and "num_classes" in kwargs:
        overlay["num_classes"] = kwargs["num_classes"]  # equal counts: timm keeps and strictly loads the head
    if not keep_head:
        # the cfg's class count differs from the model's, so timm drops the classifier (train.py's
        # --pretrained-path does the same); num_classes must then be explicit
        overlay["num_classes"] = -1
        if "num_classes" not in kwargs:
            cfg = get_pretrained_cfg(model_name.split(".")[0])
            kwargs["num_classes"] = cfg.num_classes if cfg is not None and cfg.num_classes else 1000
    if is_vpe and pe is not None:
        kwargs["pe"] = pe
    ignore = () if keep_head else ("head.",)
    try:
        model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as err:  # timm's strict load: replace its per-tensor dump with the key diff
        if is_vpe:
            raise
        model = timm.create_model(model_name, pretrained=False, **kwargs)
        _check_plain_checkpoint(checkpoint, model, ignore)
        raise
    if not is_vpe:
        # timm loads non-strictly once the classifier is dropped: missing keys would pass silently
        _check_plain_checkpoint(checkpoint, model, ignore)
        if pe is not None:
            swap_pe(model, pe)
    return model


def _check_plain_checkpoint(checkpoint, model, ignore) -> None:
    from timm.models import load_state_dict
    from timm.models.vision_transformer import checkpoint_filter_fn
    sd = checkpoint_filter_fn(load_state_dict(os.fspath(checkpoint)), model)
    check_state_dict(sd, model, what=f"checkpoint {os.path.basename(os.fspath(checkpoint))!r}",
                     ignore_prefixes=ignore)
