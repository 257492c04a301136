"""The encoder base class and the registry.

Every position encoder is one ``nn.Module`` implementing some of three hooks (see DESIGN.md):

=========  ==================================================  ======================================
hook       what it does                                        signature
=========  ==================================================  ======================================
embed      adds/replaces token features                        ``embed(x, layout, stage) -> x``
bias       additive attention-logit term                       ``bias(q, k, layout, block) -> (B|1, H|1, N, N) | None``
rotate     transforms q and k before the dot product           ``rotate(q, k, layout, block) -> (q, k)``
=========  ==================================================  ======================================

``stage`` is ``-1`` for the input embedding (after patch embed, before block 0) and ``i`` for "after
block i" (CPE/PEG). An attention layer calls only these hooks; it never asks which method it runs.
Encoders that need the explicit (non-SDPA) attention path, e.g. iRPE on values, set
``needs_attn_probs = True`` and implement ``value_term(attn, layout, block)``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from .cache import TableCache, cache_mode
from .layout import Layout, as_grid

__all__ = [
    "PositionEncoder", "AbsoluteTable", "register_encoder", "create_encoder", "list_encoders", "encoder_info",
    "EncoderInfo", "HOOKS", "cache_mode",
]

HOOKS = ("embed", "bias", "rotate")


@runtime_checkable
class AbsoluteTable(Protocol):
    """A learned absolute table in timm's ``pos_embed`` layout, as checkpoint adaptation and PE swap
    (``visionpe.models.swap``) read it.

    Encoders that add such a table return its holder from :meth:`PositionEncoder.absolute_table`
    (:class:`~visionpe.encoders.absolute.LearnedAPE` itself; iRPE its ``ape`` submodule).

    Attributes:
        pos_embed: ``(1, table_prefix + h*w, dim)`` parameter, patch rows row-major on ``grid_size``.
        grid_size: the ``(h, w)`` grid of the patch rows.
        table_prefix: leading rows that belong to prefix tokens (``num_prefix_tokens`` or 0).
        interpolation, antialias: how the table is resampled to another grid (timm's defaults).
    """

    pos_embed: nn.Parameter
    grid_size: tuple
    interpolation: str
    antialias: bool

    @property
    def table_prefix(self) -> int: ...


class PositionEncoder(nn.Module):
    """Base class of every encoder.

    Args (shared by every encoder, filled in by the model that hosts it):
        dim: token width of the model.
        num_heads: attention heads.
        depth: number of transformer blocks (per-block parameters, e.g. RoPE-Mixed, use it).
        grid_size: the default (training) patch grid ``(h, w)`` or ``(t, h, w)``; tabulated encoders size
            their tables from it, computed encoders ignore it.
        num_prefix_tokens: class/distillation/register tokens in front of the patches.
    """

    #: which of "embed", "bias", "rotate" this encoder implements (set by subclasses)
    hooks: frozenset = frozenset()
    #: blocks after which ``embed`` is called: -1 means on the input tokens
    embed_stages: tuple = (-1,)
    #: True when the encoder needs softmax probabilities (explicit attention path, e.g. iRPE on v)
    needs_attn_probs: bool = False
    #: True when ``embed`` at stage -1 needs the model's input image: the host then calls
    #: ``embed(x, layout, -1, image=img)`` with ``img`` ``(B, C, H, W)`` (LOOPE's context network)
    needs_image: bool = False

    def __init__(self, dim: int, num_heads: int = 1, depth: int = 1, grid_size: Sequence[int] = (14, 14),
                 num_prefix_tokens: int = 1):
        super().__init__()
        for name, val in (("dim", dim), ("num_heads", num_heads), ("depth", depth)):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name} must be a positive int; got {val!r}")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be an int >= 0; got {num_prefix_tokens!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.depth = depth
        self.grid_size = as_grid(grid_size, "grid_size")
        self.num_prefix_tokens = num_prefix_tokens
        #: derived per-layout tables (not state: never saved, rebuilt for a new device/dtype)
        self.table_cache = TableCache()

    # -- the three hooks (identity defaults) ------------------------------------------------------
    def embed(self, x: torch.Tensor, layout: Layout, stage: int = -1) -> torch.Tensor:
        """x: (B, N, dim) -> (B, N, dim)."""
        return x

    def bias(self, q: torch.Tensor, k: torch.Tensor, layout: Layout, block: int = 0) -> Optional[torch.Tensor]:
        """q, k: (B, H, N, head_dim) -> additive logits (B|1, H|1, N, N) in q's dtype, or None."""
        return None

    def rotate(self, q: torch.Tensor, k: torch.Tensor, layout: Layout,
               block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: (B, H, N, head_dim) -> transformed (q, k) in the same dtype.

        Usually the same shape; an encoder may widen q and k to (B, H, N, E) (MD-LRPE's cosine form) as long
        as ``q @ k^T`` scaled by ``1/sqrt(E)`` gives the logits it wants (SDPA's default scale).
        """
        return q, k

    def value_term(self, attn: torch.Tensor, layout: Layout, block: int = 0) -> Optional[torch.Tensor]:
        """attn: (B, H, N, N) softmax probabilities -> (B, H, N, head_dim) added to attn @ v, or None."""
        return None

    # -- model integration -----------------------------------------------------------------------
    def set_grid_size(self, grid_size: Sequence[int]) -> None:
        """Called by ``set_input_size``: the new default grid ``(h, w)`` (or ``(t, h, w)``).

        Tabulated encoders override it to resample their tables to the new grid (then call this); this sets
        ``grid_size`` and passes the grid on to the encoders held as submodules (iRPE's APE, RoPE + APE,
        MD-TPE + MD-LRPE).
        """
        self.grid_size = as_grid(grid_size, "grid_size")
        for child in self.children():
            if isinstance(child, PositionEncoder):
                child.set_grid_size(self.grid_size)

    def prune_blocks(self, depth: int) -> None:
        """Keep only what blocks ``0 .. depth-1`` use: drop the per-block state of the later blocks, in place.

        ``VisionPEViT.prune_intermediate_layers`` calls it after timm truncates ``model.blocks`` (``features_only``
        and ``forward_intermediates`` pruning), so that no parameter of a dropped block is left without a
        gradient. Kept values are not changed, so the kept blocks give bit-identical outputs, and the state dict
        then has the keys and shapes of the same encoder built with ``depth`` blocks.

        Encoders with per-block state override :meth:`_prune_own_blocks`; this method checks ``depth``, calls it,
        prunes the encoders held as submodules (iRPE's APE, RoPE + APE, MD-TPE + MD-LRPE), sets ``self.depth``
        and raises ``NotImplementedError`` when :meth:`block_param_index` still places a parameter in a dropped
        block (an encoder whose per-block state has no pruning).
        """
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= self.depth:
            raise ValueError(f"depth (blocks to keep) must be an int in [1, {self.depth}]; got {depth!r}")
        self._prune_own_blocks(depth)
        for child in self.children():
            if isinstance(child, PositionEncoder):
                child.prune_blocks(depth)
        self.depth = depth
        left = [n for n, _ in self.named_parameters()
                if isinstance(i := self.block_param_index(n), int) and i >= depth]
        if left:
            raise NotImplementedError(f"{type(self).__name__} kept parameters of blocks >= {depth} after pruning: "
                                      f"{left[:4]}{' ...' if len(left) > 4 else ''}; override _prune_own_blocks")

    def _prune_own_blocks(self, depth: int) -> None:
        """Drop this module's own state of blocks ``>= depth`` (``depth`` already checked); default: nothing."""

    def absolute_table(self) -> Optional[AbsoluteTable]:
        """The module holding this encoder's learned absolute table (:class:`AbsoluteTable`), or None."""
        return None

    def no_weight_decay(self) -> set:
        """Parameter names (relative to this module) excluded from weight decay."""
        return set()

    def block_param_index(self, name: str) -> int | str | None:
        """Which block a parameter belongs to (for layer-wise LR decay), or None for the stem group."""
        return None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, grid={self.grid_size}, prefix={self.num_prefix_tokens}"


@dataclass(frozen=True)
class EncoderInfo:
    name: str
    cls: type
    hooks: tuple
    description: str
    defaults: dict
    model_kwargs: dict


_REGISTRY: dict[str, EncoderInfo] = {}


def register_encoder(name: str, description: str, model_kwargs: dict | None = None,
                     **defaults) -> Callable[[type], type]:
    """Class decorator: register ``cls`` under ``name``; ``defaults`` preset constructor arguments.

    The same class can be registered several times under different names with different defaults
    (e.g. ``irpe`` and ``irpe_qkv``). ``model_kwargs`` are ViT constructor arguments used by the
    registered timm name ``vpe_vit_<size>_patch16_224_<name>`` (e.g. ``global_pool='avg',
    class_token=False`` for a GAP variant).
    """
    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, PositionEncoder)):
            raise TypeError(f"{cls!r} is not a PositionEncoder subclass")
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"encoder name {name!r} is already registered to {_REGISTRY[name].cls.__name__}")
        hooks = tuple(h for h in HOOKS if h in cls.hooks)
        _REGISTRY[name] = EncoderInfo(name, cls, hooks, description, dict(defaults), dict(model_kwargs or {}))
        return cls
    return deco


def _ensure_builtins_loaded() -> None:
    from . import encoders  # noqa: F401  (registers the built-in encoders)


def list_encoders(hook: str | None = None) -> list[str]:
    """Names of registered encoders, sorted; optionally only those that implement ``hook``."""
    _ensure_builtins_loaded()
    if hook is not None and hook not in HOOKS:
        raise ValueError(f"hook must be one of {HOOKS}; got {hook!r}")
    return sorted(n for n, info in _REGISTRY.items() if hook is None or hook in info.hooks)


def encoder_info(name: str) -> EncoderInfo:
    _ensure_builtins_loaded()
    if not isinstance(name, str):
        raise TypeError(f"encoder name must be a str; got {type(name).__name__}")
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown encoder {name!r}; known encoders: {known}")
    return _REGISTRY[name]


def split_pe_config(pe) -> tuple[str, dict]:
    """Normalise ``pe=`` (a name, a dict with a "name" key, or None) into ``(name, cfg)``."""
    if pe is None:
        return "none", {}
    if isinstance(pe, str):
        return pe, {}
    if isinstance(pe, dict):
        cfg = dict(pe)
        if "name" not in cfg:
            raise ValueError(f"a pe config dict needs a 'name' key (one of {list_encoders()}); got keys {sorted(cfg)}")
        return cfg.pop("name"), cfg
    raise TypeError(f"pe must be an encoder name or a config dict with a 'name' key; got {type(pe).__name__}")


def create_encoder(name, **cfg) -> PositionEncoder:
    """Build a registered encoder.

    Args:
        name: a registered name (see :func:`list_encoders`) or a dict ``{"name": ..., **cfg}``.
        **cfg: model context (``dim``, ``num_heads``, ``depth``, ``grid_size``, ``num_prefix_tokens``)
            and the encoder's own options. Unknown options raise ``TypeError`` naming them.
    """
    if isinstance(name, dict):
        name, extra = split_pe_config(name)
        cfg = {**extra, **cfg}
    info = encoder_info(name)
    kwargs = {**info.defaults, **cfg}
    sig = inspect.signature(info.cls.__init__)
    accepts_var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    if not accepts_var_kw:
        allowed = set(sig.parameters) - {"self"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise TypeError(f"encoder {name!r} got unknown option(s) {unknown}; it accepts {sorted(allowed)}")
    enc = info.cls(**kwargs)
    enc.encoder_name = name
    return enc


def encoders_table(names: Iterable[str] | None = None) -> list[tuple[str, str, str]]:
    """(name, hooks, description) rows for ``visionpe list``."""
    names = list_encoders() if names is None else names
    return [(n, ",".join(encoder_info(n).hooks) or "-", encoder_info(n).description) for n in names]


# the built-in encoders register themselves on import (after everything above is defined)
from . import encoders as _builtin_encoders  # noqa: E402,F401
