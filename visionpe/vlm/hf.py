"""A thin hook that makes an HF transformers decoder use any :mod:`visionpe.vlm` position scheme.

Works with decoders whose base model owns ``rotary_emb`` and ``layers`` and calls
``rotary_emb(hidden_states, position_ids) -> (cos, sin)`` with ``(B, L, head_dim)`` tables in the
rotate_half layout: Qwen2, Llama, Mistral, and the language model inside Qwen2-VL / Qwen2.5-VL.

>>> hook = attach_scheme(model, "mrope", variant="qwen2vl", sections=(4, 6, 6))
>>> hook.set_layout(VLMLayout([Text(5), Image(4, 6), Text(3)]))
>>> model(input_ids)                                   # prefill: the scheme's positions (and CCA's mask)
>>> model.generate(input_ids, max_new_tokens=4)        # decode: next_position + step on every axis
>>> hook.remove()

How: the decoder's ``rotary_emb`` is replaced by a module that builds cos/sin from the scheme's
``(A, B, L)`` positions and frequency allocation, and a forward pre-hook on the decoder picks the positions
for each call (prompt positions when the cache is empty, ``VLMPositions.decode_positions`` after it). The
model's own ``position_ids`` and masks are left alone (they still drive padding and caching); for CCA the
prefill mask is replaced by the concentric causal mask. Without a layout the hook rotates by the model's
own 1-D ``position_ids`` on every axis.

:func:`hf_rope_inputs` turns a layout into the tensors HF's Qwen-VL ``get_rope_index`` expects, and
:func:`tiny_qwen_vl` builds a small randomly initialised Qwen-VL model from a local config (no download);
both serve tests and the ``visionpe bench vlm`` comparison.
"""
from __future__ import annotations

import torch
from torch import nn

from .layout import IMAGE, PAD, VIDEO, VLMLayout
from .positions import VLMPositions, vlm_positions
from .tables import per_channel, rotary_cos_sin

__all__ = ["SchemeHook", "attach_scheme", "hf_rope_inputs", "tiny_qwen_vl"]


def _find_decoder(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if hasattr(m, "rotary_emb") and hasattr(m, "layers") and isinstance(getattr(m, "layers"), nn.ModuleList):
            return m
    raise TypeError(f"{type(model).__name__} has no submodule with `rotary_emb` and `layers` "
                    "(expected an HF Llama/Qwen2-style decoder)")


def _config_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    theta = theta if theta is not None else getattr(cfg, "rope_theta", None)
    if theta is None:
        raise ValueError("could not read rope_theta from the model config; pass theta=")
    return float(theta)


class _SchemeRotary(nn.Module):
    """Stands in for the decoder's ``rotary_emb``: cos/sin from the hook's current positions."""

    def __init__(self, hook: "SchemeHook"):
        super().__init__()
        self._hook = [hook]  # a list so the hook is not registered as a submodule

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        hook = self._hook[0]
        pos = hook.current
        if pos is None:  # no layout: the model's 1-D positions on every axis
            pos = position_ids.to(torch.float64).unsqueeze(0).expand(hook.num_axes, *position_ids.shape)
        elif pos.shape[-1] != x.shape[1]:
            raise ValueError(f"the scheme positions cover {pos.shape[-1]} tokens but the model runs {x.shape[1]}")
        cos, sin = rotary_cos_sin(pos.to(x.device), hook.allocation, hook.head_dim, hook.theta)
        return per_channel(cos).to(x.dtype), per_channel(sin).to(x.dtype)


class SchemeHook:
    """Swap an HF decoder's position computation for a visionpe scheme (see the module docstring).

    Args:
        model: an HF model containing a Llama/Qwen2-style decoder.
        scheme: ``rope1d``, ``mrope``, ``vrope``, ``hope``, ``v2pe`` or ``cca``.
        theta: RoPE base (default: the model config's).
        **options: scheme options (``variant``, ``sections``, ``gamma``, ``delta``, ...). The frequency
            allocation must fit the model's ``head_dim`` (e.g. ``sections=(4, 6, 6)`` for head_dim 32).
    """

    def __init__(self, model: nn.Module, scheme: str, *, theta: float | None = None, **options):
        self.decoder = _find_decoder(model)
        cfg = self.decoder.config
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.theta = _config_theta(cfg) if theta is None else float(theta)
        self.scheme, self.options = scheme, dict(options)
        probe = vlm_positions(VLMLayout([("text", 1)]), scheme, **self.options)
        self.allocation, self.num_axes = probe.allocation, probe.positions.shape[0]
        self.allocation.axis_of_freq(self.head_dim // 2)  # a head_dim the allocation doesn't fit fails now
        self.result: VLMPositions | None = None
        self.current: torch.Tensor | None = None
        self._original = self.decoder.rotary_emb
        self.decoder.rotary_emb = _SchemeRotary(self)
        self._handle = self.decoder.register_forward_pre_hook(self._pre_forward, with_kwargs=True)

    def set_layout(self, layout: VLMLayout | None) -> VLMPositions | None:
        """Positions for the next prompt (``None``: back to the model's own 1-D positions)."""
        self.result = None if layout is None else vlm_positions(layout, self.scheme, **self.options)
        return self.result

    def _pre_forward(self, module, args, kwargs):
        self.current = None
        res = self.result
        if res is None:
            return args, kwargs
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids", args[0] if args else None)
        batch, new = x.shape[0], x.shape[1]
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0:
            if (batch, new) != (res.batch_size, res.length):
                raise ValueError(f"the prompt has shape ({batch}, {new}) but the layout describes "
                                 f"{res.batch_size} sequence(s) of {res.length} tokens")
            self.current = res.positions
            if res.attention_mask is not None:
                kwargs = dict(kwargs)
                kwargs["attention_mask"] = self._cca_mask(res.attention_mask, x)
        else:
            if batch % res.batch_size:
                raise ValueError(f"batch {batch} is not a multiple of the layout's {res.batch_size} sequences")
            pos = res.decode_positions(new, past)
            self.current = pos.repeat_interleave(batch // res.batch_size, dim=1)
        return args, kwargs

    def _cca_mask(self, allowed: torch.Tensor, x: torch.Tensor):
        """The concentric causal mask as the additive 4-D mask HF layers add to the logits."""
        dtype = self.decoder.dtype if hasattr(self.decoder, "dtype") else torch.float32
        add = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        add = add[:, None].to(x.device)
        return {"full_attention": add, "sliding_attention": add}

    def remove(self) -> None:
        """Restore the decoder's own rotary embedding and drop the pre-hook."""
        self.decoder.rotary_emb = self._original
        self._handle.remove()
        self.result = self.current = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def attach_scheme(model: nn.Module, scheme: str, **options) -> SchemeHook:
    """:class:`SchemeHook` ``(model, scheme, **options)``."""
    return SchemeHook(model, scheme, **options)


def hf_rope_inputs(layout: VLMLayout, *, spatial_merge_size: int = 2, image_token_id: int = 151655,
                   video_token_id: int = 151656, vision_start_token_id: int = 151652, text_token_id: int = 1000,
                   pad_token_id: int = 0) -> dict:
    """The tensors HF Qwen-VL ``get_rope_index`` takes for ``layout`` (vectorised over tokens).

    Returns ``input_ids`` (text ``text_token_id``; the token before every vision block
    ``vision_start_token_id``; vision pads), ``mm_token_type_ids``, ``attention_mask``, ``image_grid_thw`` /
    ``video_grid_thw`` (raw grids: spatial sizes times ``spatial_merge_size``) and ``second_per_grid_ts``
    (float32, one per video). Images must be single tiles.
    """
    tb = layout.table
    B, L = tb.batch_size, tb.length
    types = layout.token_types()
    mask = types != PAD
    ids = torch.full((B, L), text_token_id, dtype=torch.int64)
    ids[types == IMAGE] = image_token_id
    ids[types == VIDEO] = video_token_id
    ids[~mask] = pad_token_id
    vis = tb.is_vision
    before = tb.start[vis] - 1
    ok = (before >= 0) & (before // L == tb.seq[vis])
    ids.view(-1)[before[ok]] = vision_start_token_id
    if bool(((tb.kind == IMAGE) & (tb.tiles > 1)).any()):
        raise ValueError("hf_rope_inputs: Qwen-VL has no tiled images")
    m = spatial_merge_size
    grid = torch.stack([tb.t, tb.h * m, tb.w * m], 1)
    img, vid = grid[tb.kind == IMAGE], grid[tb.kind == VIDEO]
    return dict(input_ids=ids, mm_token_type_ids=types.masked_fill(~mask, 0), attention_mask=mask.long(),
                image_grid_thw=img if img.numel() else None, video_grid_thw=vid if vid.numel() else None,
                second_per_grid_ts=tb.seconds[tb.kind == VIDEO].to(torch.float32) if vid.numel() else None)


def tiny_qwen_vl(variant: str = "qwen2vl", *, head_dim: int = 16, sections=None, tokens_per_second: int = 2,
                 vocab_size: int = 152000, causal_lm: bool = False):
    """A randomly initialised, tiny HF Qwen-VL model from a local config (1 text layer, 1 vision block).

    ``variant``: ``qwen2vl`` / ``qwen25vl`` / ``qwen3vl``. ``sections`` defaults to ``(2, 3, 3)`` chunked /
    ``(4, 2, 2)`` interleaved for ``head_dim=16`` (8 frequencies). ``causal_lm=True`` returns the
    ``...ForConditionalGeneration`` class (with an LM head), else the base ``...Model``.
    """
    import transformers as tf
    if sections is None:
        sections = (4, 2, 2) if variant == "qwen3vl" else (2, 3, 3)
    text = dict(hidden_size=2 * head_dim, intermediate_size=4 * head_dim, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=vocab_size, head_dim=head_dim)
    vis = dict(depth=1, hidden_size=32, out_hidden_size=2 * head_dim, intermediate_size=64, num_heads=2)
    rope = {"rope_type": "default", "mrope_section": list(sections)}
    if variant == "qwen2vl":
        cfg = tf.Qwen2VLConfig(text_config=dict(text, rope_parameters=dict(rope, rope_theta=1e6)),
                               vision_config=dict(depth=1, embed_dim=32, hidden_size=2 * head_dim, num_heads=2))
        cls = tf.Qwen2VLForConditionalGeneration if causal_lm else tf.Qwen2VLModel
    elif variant == "qwen25vl":
        cfg = tf.Qwen2_5_VLConfig(text_config=dict(text, rope_parameters=dict(rope, rope_theta=1e6)),
                                  vision_config=dict(vis, tokens_per_second=tokens_per_second, fullatt_block_indexes=[0]))
        cls = tf.Qwen2_5_VLForConditionalGeneration if causal_lm else tf.Qwen2_5_VLModel
    elif variant == "qwen3vl":
        cfg = tf.Qwen3VLConfig(text_config=dict(text, rope_parameters=dict(rope, rope_theta=5e6, mrope_interleaved=True)),
                               vision_config=dict(vis, deepstack_visual_indexes=[]))
        cls = tf.Qwen3VLForConditionalGeneration if causal_lm else tf.Qwen3VLModel
    else:
        raise ValueError(f"unknown variant {variant!r}; expected qwen2vl, qwen25vl or qwen3vl")
    return cls(cfg).eval()
