"""Which attention kernel a PE-aware attention layer runs: ``attn_impl = "sdpa" | "flex" | "auto"``.

* ``"sdpa"``: the encoder's ``bias`` hook materialises ``(B|1, H, N, N)`` logits for
  ``F.scaled_dot_product_attention``'s ``attn_mask`` (the explicit path when the encoder needs the attention
  probabilities, e.g. ``irpe_qkv``'s value term).
* ``"flex"``: encoders with a ``flex_terms`` hook (``relpos_bias``, ``irpe`` without the value term) hand
  small tables and bucket maps (:mod:`visionpe.flex`) to ``flex_attention``; nothing ``N x N`` is built.
  torch's FlexAttention has no CPU backward, so on CPU with gradients the backward walks blocks of query rows
  (:mod:`visionpe.flex_rows`, memory ``O(rows N)``).
  Encoders with a value term on the attention probabilities (``irpe_qkv``; a ``flex_value_terms`` hook), which
  FlexAttention cannot express, run the explicit path on blocks of query rows instead
  (:func:`visionpe.flex_rows.explicit_rows_attention`): also nothing ``N x N``. Encoders without a logit term
  (APE, RoPE) have nothing to gain and keep SDPA.
* ``"auto"``: :func:`resolve_attn_impl`'s rule, measured in the resolution sweep: flex from
  :data:`AUTO_MIN_TOKENS` tokens on, per device, per forward-only or forward+backward, per eager or inside
  ``torch.compile`` and per encoder; SDPA wherever the sweep did not measure or flex was not the faster
  (docs/bench.md, "Resolution sweep").

A :class:`~torch.nn.attention.flex_attention.BlockMask` ``attn_mask`` always runs flex (``"sdpa"`` densifies it).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.nn.attention.flex_attention import BlockMask, create_mask

from .flex import flex_attention_terms, grad_flows, term_tensors
from .flex_rows import explicit_rows_attention, flex_attention_cpu_train, rows_attention

__all__ = ["ATTN_IMPLS", "AUTO_MIN_TOKENS", "AUTO_RESULTS", "auto_encoder_name", "check_attn_impl", "has_flex_path",
           "resolve_attn_impl", "pe_flex_attention", "densify_block_mask"]

ATTN_IMPLS = ("sdpa", "flex", "auto")

#: The results file :data:`AUTO_MIN_TOKENS` is read from (``visionpe bench sweep`` on the 2-core CPU).
AUTO_RESULTS = "benchmarks/results/vit_s16_sweep_cpu.json"

#: ``auto``'s rule: per (device type, ``"fwd"`` (no gradients) or ``"fwdbwd"`` (gradients flow), ``compiled``:
#: inside ``torch.compile``), per encoder (a registered name, in its registered default configuration), flex from
#: this many tokens ``N`` on (``q.shape[-2]``, prefix tokens included). Each threshold is
#: ``visionpe.eval.bench_sweep.flex_crossover(results, mode, [name])`` of :data:`AUTO_RESULTS`: the smallest
#: measured token count from which that encoder's flex row beat its own SDPA row, at it and at every larger
#: count measured (eager models; forward+backward was measured up to 1025 tokens and the rule extends its last
#: decision beyond). tests/test_flex.py checks these values against the file. ``None``: measured, and flex was
#: not the faster at the largest count measured. Anything the sweep did not measure (CUDA; a model inside
#: ``torch.compile``, which on CPU with gradients also takes another flex backward; another encoder or
#: configuration) has no entry, and ``auto`` keeps SDPA there, the path whose cost is known.
AUTO_MIN_TOKENS: dict[tuple[str, str, bool], dict[str, Optional[int]]] = {
    ("cpu", "fwd", False): {"relpos_bias": None, "irpe_bias": None, "irpe": None, "irpe_qkv": 1025},
    ("cpu", "fwdbwd", False): {"relpos_bias": 197, "irpe_bias": None, "irpe": None, "irpe_qkv": None},
}


_MISSING = object()


def auto_encoder_name(pe) -> Optional[str]:
    """The registered name among :data:`AUTO_MIN_TOKENS`' encoders whose default configuration encoder ``pe``
    is (same class, every registered default option equal), or None."""
    from .base import encoder_info
    for name in sorted({n for table in AUTO_MIN_TOKENS.values() for n in table}):
        info = encoder_info(name)
        if type(pe) is info.cls and all(getattr(pe, k, _MISSING) == v for k, v in info.defaults.items()):
            return name
    return None


def check_attn_impl(impl) -> str:
    """Validate an ``attn_impl`` value; returns it."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}; got {impl!r}")
    return impl


def has_flex_path(pe) -> bool:
    """True when encoder ``pe`` has a path without ``N x N`` tensors: a ``flex_terms`` hook for its logit term
    and, if it needs the attention probabilities, a ``flex_value_terms`` hook (run on blocks of query rows)."""
    return (pe is not None and "bias" in pe.hooks and callable(getattr(pe, "flex_terms", None))
            and (not pe.needs_attn_probs or callable(getattr(pe, "flex_value_terms", None))))


def resolve_attn_impl(impl: str, pe, q: torch.Tensor, attn_mask=None, dropout_p: float = 0.0) -> str:
    """``"sdpa"`` or ``"flex"`` for one attention call.

    Args:
        impl: the layer's ``attn_impl``.
        pe: the encoder (or None).
        q: ``(B, H, N, d)`` queries (device, token count, whether gradients flow).
        attn_mask: None, a dense mask or a ``BlockMask``.
        dropout_p: attention dropout in effect (the flex kernel has none; the row blocks of an encoder with a
            value term have).
    """
    check_attn_impl(impl)
    block = isinstance(attn_mask, BlockMask)
    probs = pe is not None and pe.needs_attn_probs
    if impl == "sdpa" or (probs and not has_flex_path(pe)):
        return "sdpa"
    if not (has_flex_path(pe) or block):
        return "sdpa"
    if dropout_p > 0 and not probs:  # the explicit blocks of a value-term encoder have dropout
        if impl == "flex" or block:
            raise ValueError(f"attn_impl='flex' (or a BlockMask attn_mask) has no attention dropout; got "
                             f"attn_drop p={dropout_p} in training (set attn_drop_rate=0 or attn_impl='sdpa')")
        return "sdpa"
    if impl == "flex" or block:
        return "flex"
    key = (q.device.type, "fwdbwd" if grad_flows([q]) else "fwd", bool(torch.compiler.is_compiling()))
    threshold = AUTO_MIN_TOKENS.get(key, {}).get(auto_encoder_name(pe))
    return "flex" if threshold is not None and q.shape[-2] >= threshold else "sdpa"


def densify_block_mask(block_mask: BlockMask, batch: int, heads: int) -> torch.Tensor:
    """``(B, H, L, S)`` bool from a ``BlockMask`` (for the SDPA path)."""
    L, S = block_mask.seq_lengths
    return create_mask(block_mask.mask_mod, batch, heads, L, S, device=block_mask.kv_indices.device)


def pe_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe, layout, block: int = 0,
                      attn_mask=None, dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """The flex path of one attention call: ``(B, H, N, d) -> (B, H, N, dv)``.

    ``pe.flex_terms(q, k, layout, block)`` gives the logit terms (none for an encoder without a flex path,
    e.g. with only a ``BlockMask``); on CPU with gradients :mod:`visionpe.flex_rows` supplies the backward,
    elsewhere ``flex_attention`` runs as is (its compiled kernel outside ``torch.compile``). An encoder with
    a value term (``pe.flex_value_terms``) runs :func:`~visionpe.flex_rows.explicit_rows_attention`, with
    attention dropout ``dropout_p`` when ``training``.
    """
    if has_flex_path(pe) and pe.needs_attn_probs:
        layout.check(q.shape[-2], "q")
        values = pe.flex_value_terms(layout, block, dtype=q.dtype, device=q.device)
        return explicit_rows_attention(q, k, v, pe.flex_terms(q, k, layout, block), values, attn_mask, dropout_p,
                                       training)
    if dropout_p > 0 and training:
        raise ValueError(f"the flex kernel has no attention dropout; got dropout_p={dropout_p} in training "
                         f"(set attn_drop_rate=0 or attn_impl='sdpa')")
    terms = list(pe.flex_terms(q, k, layout, block)) if has_flex_path(pe) else []
    if q.device.type == "cpu":
        grad = grad_flows([q, k, v, *(x for t in terms for x in term_tensors(t))])
        if grad and torch.compiler.is_compiling():  # a custom autograd.Function around flex is not traced
            return rows_attention(q, k, v, terms, attn_mask)
        if grad:
            return flex_attention_cpu_train(q, k, v, terms, attn_mask)
    return flex_attention_terms(q, k, v, terms, attn_mask)
