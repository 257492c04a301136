"""A thin hook that makes an HF transformers decoder use any :mod:`visionpe.vlm` position scheme.

>>> hook = attach_scheme(model, "mrope", variant="qwen2vl", sections=(2, 3, 3))
>>> hook.set_layout(VLMLayout([Text(5), Image(4, 6), Text(3)]))
>>> model(input_ids)                                   # prefill: the scheme's positions (and CCA's mask)
>>> model.generate(input_ids, max_new_tokens=4)        # decode: the scheme's decode positions
>>> hook.remove()

Works with the decoders of Llama / Qwen2 / Mistral-style models (a submodule with ``layers`` and
``rotary_emb``) and with the language model inside Qwen2-VL / Qwen2.5-VL / Qwen3-VL.

How, relying only on what HF promises (docs/vlm.md has the table):

* A forward pre-hook on the decoder (the torch hook API) computes the positions of the tokens of each call:
  the prompt's when nothing is cached yet, :meth:`VLMPositions.decode_positions` after it. The number of
  cached tokens comes from the ``transformers.Cache`` object among the call's arguments
  (``Cache.get_seq_length()``), whatever the argument is called (``past_key_values`` up to 5.23, ``cache``
  from 5.24), else from the length of a 2-D ``attention_mask``.
* **position_ids route** (public): the positions go into the decoder's ``position_ids`` argument, and the
  model's own rotary embedding turns them into rotations. Used when the model's rotary embedding realises
  the scheme's frequency allocation: 1-D schemes (``rope1d``, ``v2pe``, ``cca``) on any decoder (plain
  decoders cast ``position_ids`` to float, so V2PE's fractional positions go through; Qwen-VL decoders get
  the same value on the t, h, w rows), and ``mrope`` on a Qwen-VL decoder whose config has the same
  sections and interleaving (rows ``[text, t, h, w]``, as HF's own generate passes them).
* **rotary route** (the least HF-specific mechanism for what HF's rotary embedding cannot express:
  ``vrope``, ``hope``, ``mrope`` on a plain decoder or with other sections): a forward hook on the decoder's
  ``rotary_emb`` submodule replaces the ``(cos, sin)`` it returns with the scheme's tables. It checks the
  layout of what it replaces (``(B, L, head_dim)``, or ``(3, B, L, head_dim)`` per-axis tables as 4.57's
  Qwen2-VL / Qwen2.5-VL return them, which then select identical tables) and raises rather than guess.
  It needs plain RoPE (``rope_type="default"``): scaled RoPE (llama3, yarn, ...) raises, naming the
  position_ids route as the one that keeps the model's scaling.
* CCA: the prefill ``attention_mask`` becomes the concentric causal mask as a 4-D additive mask (HF returns
  4-D masks as given). Without an ``attention_mask`` the hook passes the layout's padding mask.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from .hf_compat import check_transformers_version, config_mrope, config_rope_type, config_theta, model_family
from .layout import VLMLayout
from .positions import VLMPositions
from .schemes import vlm_positions
from .tables import Sections, SingleAxis, per_channel, rotary_cos_sin

__all__ = ["SchemeHook", "attach_scheme", "ROUTES"]

ROUTES = ("position_ids", "rotary")


def _find_decoder(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if hasattr(m, "rotary_emb") and hasattr(m, "layers") and isinstance(getattr(m, "layers"), nn.ModuleList):
            return m
    raise TypeError(f"{type(model).__name__} has no submodule with `rotary_emb` and `layers` "
                    "(expected an HF Llama/Qwen2-style decoder or a Qwen-VL model)")


class SchemeHook:
    """Swap an HF decoder's positions for a visionpe scheme (see the module docstring).

    Args:
        model: an HF model containing a Llama/Qwen2-style decoder (or a Qwen-VL model).
        scheme: ``rope1d``, ``mrope``, ``vrope``, ``hope``, ``v2pe`` or ``cca``.
        theta: RoPE base (default: the model config's). A different base forces the rotary route.
        route: ``None`` (choose: position_ids when possible), ``"position_ids"`` or ``"rotary"``.
        **options: scheme options (``variant``, ``sections``, ``gamma``, ``delta``, ...). The frequency
            allocation must fit the model's ``head_dim`` (e.g. ``sections=(4, 6, 6)`` for head_dim 32).

    Attributes: ``route`` (the route taken), ``route_reason`` (why), ``family`` (``plain``, ``qwen2_vl``,
    ``qwen2_5_vl``, ``qwen3_vl`` or ``mrope-other``), ``result`` (the current layout's positions).
    """

    def __init__(self, model: nn.Module, scheme: str, *, theta: float | None = None, route: str | None = None,
                 **options):
        check_transformers_version()
        self.decoder = _find_decoder(model)
        cfg = self.decoder.config
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.model_theta = config_theta(cfg)
        self.theta = self.model_theta if theta is None else float(theta)
        self.family = model_family(cfg)
        self.scheme, self.options = scheme, dict(options)
        probe = vlm_positions(VLMLayout([("text", 1)]), scheme, **self.options)
        self.allocation, self.num_axes = probe.allocation, probe.positions.shape[0]
        self.allocation.axis_of_freq(self.head_dim // 2)  # a head_dim the allocation doesn't fit fails now
        self._signature = inspect.signature(self.decoder.forward)
        if "position_ids" not in self._signature.parameters:
            raise TypeError(f"{type(self.decoder).__name__}.forward takes no position_ids argument")
        self.route, self.route_reason = self._choose_route(route, cfg)
        self.result: VLMPositions | None = None
        self._current: torch.Tensor | None = None
        self._handles = [self.decoder.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
                         self.decoder.register_forward_hook(self._post_forward)]
        if self.route == "rotary":
            self._handles.append(self.decoder.rotary_emb.register_forward_hook(self._rotary_output))

    # -- routes -------------------------------------------------------------------------------------------
    def _position_ids_obstacle(self, cfg) -> str | None:
        """Why the model's own rotary embedding cannot realise the scheme (None: it can)."""
        if self.theta != self.model_theta:
            return f"theta={self.theta} differs from the model's rope_theta={self.model_theta}"
        if self.family == "mrope-other":
            return f"{getattr(cfg, 'model_type', '?')} is an M-RoPE model of unknown position_ids layout"
        if isinstance(self.allocation, SingleAxis):
            return None
        mrope = config_mrope(cfg)
        if self.family == "plain":
            return (f"{self.scheme} has {self.num_axes} position axes; a plain decoder's rotary embedding "
                    "takes one")
        if isinstance(self.allocation, Sections) and mrope == (tuple(self.allocation.sections),
                                                               self.allocation.interleaved):
            return None
        return (f"{self.scheme}'s frequency allocation {self.allocation} is not the model's M-RoPE "
                f"(sections {mrope[0] if mrope else None}, interleaved {mrope[1] if mrope else None})")

    def _choose_route(self, route: str | None, cfg) -> tuple[str, str]:
        if route is not None and route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES} or None; got {route!r}")
        obstacle = self._position_ids_obstacle(cfg)
        if route == "position_ids" and obstacle:
            raise ValueError(f"route='position_ids' is not possible: {obstacle}; use route='rotary'")
        if route == "position_ids" or (route is None and obstacle is None):
            return "position_ids", "the model's rotary embedding realises the scheme's frequency allocation"
        reason = obstacle or "requested"
        rope_type = config_rope_type(cfg)
        if rope_type != "default":
            raise ValueError(
                f"the rotary route (needed because {reason}) computes plain RoPE but the model uses "
                f"rope_type={rope_type!r}; the position_ids route keeps the model's scaling and works for the "
                "1-D schemes (rope1d, v2pe, cca), and for mrope on Qwen-VL models")
        return "rotary", reason

    # -- layout -------------------------------------------------------------------------------------------
    def set_layout(self, layout: VLMLayout | None) -> VLMPositions | None:
        """Positions for the next prompt (``None``: the hook stands aside and the model runs as it is)."""
        self.result = None if layout is None else vlm_positions(layout, self.scheme, **self.options)
        return self.result

    # -- hooks --------------------------------------------------------------------------------------------
    def _bind(self, args, kwargs) -> dict:
        """The call's arguments by name (positional ones included; ``**kwargs`` flattened)."""
        bound = self._signature.bind_partial(*args, **kwargs)
        call = {}
        for name, value in bound.arguments.items():
            if self._signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                call.update(value)
            else:
                call[name] = value
        return call

    @staticmethod
    def _past_length(call: dict, new: int) -> int:
        """Tokens already cached: from the ``transformers.Cache`` among the arguments, else a 2-D mask."""
        from transformers import Cache
        for value in call.values():
            if isinstance(value, Cache):
                return int(value.get_seq_length())
        mask = call.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.shape[-1] > new:
            return int(mask.shape[-1]) - new
        return 0

    def _positions(self, res: VLMPositions, batch: int, new: int, past: int) -> torch.Tensor:
        """``(A, batch, new)`` float64 positions of the tokens at slots ``past .. past + new - 1``."""
        B, L = res.batch_size, res.length
        if batch % B:
            raise ValueError(f"the model runs a batch of {batch} but the layout describes {B} sequence(s) "
                             "(generate may repeat each sequence: the batch must be a multiple)")
        if past == 0 and new != L:
            raise ValueError(f"the prompt has shape ({batch}, {new}) but the layout describes "
                             f"{B} sequence(s) of {L} tokens")
        if past + new <= L:  # the prompt (or a chunk of it)
            pos = res.positions[:, :, past:past + new].to(torch.float64)
        elif past >= L:
            pos = res.decode_positions(new, past)
        else:
            pos = torch.cat([res.positions[:, :, past:].to(torch.float64), res.decode_positions(past + new - L, L)], -1)
        return pos.repeat_interleave(batch // B, dim=1)

    def _padding_mask(self, res: VLMPositions, batch: int, total: int, device) -> torch.Tensor:
        """``(batch, total)`` long: the layout's padding mask, ones for the tokens after the prompt."""
        m = res.padding_mask.long()
        if total > res.length:
            m = torch.cat([m, torch.ones(res.batch_size, total - res.length, dtype=torch.long)], 1)
        return m[:, :total].repeat_interleave(batch // res.batch_size, dim=0).to(device)

    def _position_ids(self, pos: torch.Tensor, past: int) -> torch.Tensor:
        """What goes into ``position_ids``: the scheme's positions (position_ids route) or the token slots."""
        A, batch, new = pos.shape
        slots = (past + torch.arange(new, dtype=torch.float64)).expand(batch, new)
        if self.route == "position_ids":
            rows = pos if A == 3 else pos.expand(3, -1, -1)
            out = pos[0] if self.family == "plain" else torch.cat([slots[None], rows], 0)
        else:  # the rotary output is replaced: position_ids only need to look like an ordinary sequence
            out = slots if self.family == "plain" else slots.expand(4, -1, -1)
        return out.long() if bool((out == out.round()).all()) else out

    def _pre_forward(self, module, args, kwargs):
        self._current = None
        res = self.result
        if res is None:
            return None
        call = self._bind(args, kwargs)
        x = call.get("inputs_embeds")
        if x is None:
            x = call.get("input_ids")
        if x is None:
            raise ValueError("the decoder was called without input_ids or inputs_embeds")
        batch, new = int(x.shape[0]), int(x.shape[1])
        past = self._past_length(call, new)
        pos = self._positions(res, batch, new, past)
        self._current = pos
        mask = call.get("attention_mask")
        if past == 0 and isinstance(mask, torch.Tensor) and mask.ndim == 2:
            expected = res.padding_mask.repeat_interleave(batch // res.batch_size, dim=0)
            if not torch.equal(mask.detach().cpu() != 0, expected):
                raise ValueError("attention_mask disagrees with the layout's padding (padding_side / Padding "
                                 "segments): the masked slots must be the layout's padded slots")
        if res.attention_mask is not None and past == 0:
            call["attention_mask"] = self._cca_mask(res.attention_mask, batch, x)
        elif res.attention_mask is not None and past < res.length:
            raise ValueError("CCA needs the whole prompt in one call (its mask spans the prompt)")
        elif mask is None:
            call["attention_mask"] = self._padding_mask(res, batch, past + new, x.device)
        call["position_ids"] = self._position_ids(pos, past).to(x.device)
        return (), call

    def _post_forward(self, module, args, output):
        self._current = None
        return None

    def _rotary_output(self, module, args, output):
        pos = self._current
        if pos is None:
            return None
        cos, sin = output
        c, s = rotary_cos_sin(pos.to(cos.device), self.allocation, self.head_dim, self.theta)
        c, s = per_channel(c).to(cos.dtype), per_channel(s).to(sin.dtype)
        if cos.shape == c.shape:
            return c, s
        if cos.ndim == 4 and cos.shape[0] == 3 and cos.shape[1:] == c.shape:  # per-axis tables (4.57 Qwen2-VL)
            return c.expand_as(cos), s.expand_as(sin)
        raise RuntimeError(f"{type(module).__name__} returned cos of shape {tuple(cos.shape)}; the rotary route "
                           f"replaces (B, L, head_dim) = {tuple(c.shape)} tables or (3, B, L, head_dim) per-axis "
                           "tables only. The position_ids route (1-D schemes; mrope on Qwen-VL models) does not "
                           "depend on this layout.")

    def _cca_mask(self, allowed: torch.Tensor, batch: int, x: torch.Tensor) -> torch.Tensor:
        """The concentric causal mask as an additive ``(batch, 1, L, L)`` mask (0 allowed, dtype min else)."""
        dtype = x.dtype if x.is_floating_point() else next(
            (p.dtype for p in self.decoder.parameters() if p.is_floating_point()), torch.float32)
        allowed = allowed.repeat_interleave(batch // allowed.shape[0], dim=0)
        add = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        return add[:, None].to(x.device)

    def remove(self) -> None:
        """Drop every hook: the model is exactly its old self."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.result = self._current = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def attach_scheme(model: nn.Module, scheme: str, **options) -> SchemeHook:
    """:class:`SchemeHook` ``(model, scheme, **options)``."""
    return SchemeHook(model, scheme, **options)
