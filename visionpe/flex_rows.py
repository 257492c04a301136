"""The flex path's gradients on CPU, where torch's FlexAttention has no backward (torch 2.14).

Both functions compute attention with :mod:`visionpe.flex` terms and masks, equal to SDPA with the
materialised bias, in ``O(N)`` memory besides one block of ``rows`` query rows at a time:

* :func:`flex_attention_cpu_train` (eager training): the forward is the flex kernel; the backward walks
  blocks of query rows, rebuilds the block's logits ``S = s q k^T + bias`` against all keys, so that
  ``P = softmax(S)`` is exact without the forward's log-sum-exp (which the CPU kernel cannot return), and
  forms ``dv += P^T do``,
  ``dS = P (do v^T - rowsum(do o))``, ``dq = s dS k``, ``dk += s dS^T q``; the terms' own tensors (bias
  tables, iRPE's ``(B, H, N, nb)`` products) get ``dS`` through autograd on the block's gathered bias. This
  is FlashAttention's backward, block by block in PyTorch ops.
* :func:`rows_attention` (inside ``torch.compile``, where a custom ``autograd.Function`` around the flex
  call is not traced): SDPA on each block of query rows under activation checkpointing, so each block's bias
  is rebuilt in backward instead of saved.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask
from torch.utils.checkpoint import checkpoint

from .flex import BucketBias, Term, block_mask_rows, flex_attention_terms, terms_rows

__all__ = ["ROWS_PER_HEAD_DIM", "rows_attention", "flex_attention_cpu_train", "default_rows"]

#: a block of ``(B, H, rows, S)`` logits is at most this many times the size of ``k`` ``(B, H, S, d)``,
#: i.e. ``rows = ROWS_PER_HEAD_DIM * d``: memory ``O(N)``, like the activations around it
ROWS_PER_HEAD_DIM = 2


def default_rows(head_dim: int) -> int:
    return max(16, ROWS_PER_HEAD_DIM * head_dim)


def _mask_rows(attn_mask, rows: torch.Tensor, batch: int, heads: int):
    """The rows of a dense mask or a ``BlockMask`` as a dense ``(B|1, H|1, R, S)`` tensor, or None."""
    if attn_mask is None:
        return None
    if isinstance(attn_mask, BlockMask):
        return block_mask_rows(attn_mask, rows, batch, heads)
    return attn_mask[:, :, rows]


def _add_mask(logits: torch.Tensor, mask) -> torch.Tensor:
    if mask is None:
        return logits
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, float("-inf"))
    return logits + mask


# -- checkpointed SDPA blocks (compile-friendly) --------------------------------------------------------------
def _rows_block(q_rows, k, v, rows, terms, attn_mask):
    B, H = q_rows.shape[:2]
    bias = terms_rows(terms, rows, k.shape[-2])
    mask = _mask_rows(attn_mask, rows, B, H)
    if mask is not None:
        if mask.dtype == torch.bool:
            zero = torch.zeros((), dtype=q_rows.dtype, device=q_rows.device)
            bias = torch.where(mask, zero if bias is None else bias, float("-inf"))
        else:
            bias = mask if bias is None else bias + mask
    if bias is not None:
        bias = bias.to(q_rows.dtype)
    return F.scaled_dot_product_attention(q_rows, k, v, attn_mask=bias)


def rows_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, terms: Sequence[Term] = (), attn_mask=None,
                   rows_per_block: Optional[int] = None) -> torch.Tensor:
    """SDPA on blocks of query rows with the terms' bias, each block checkpointed: ``(B, H, L, d) -> (B, H, L, dv)``.

    Equal to :func:`visionpe.flex.flex_attention_terms`; memory ``O(B H rows S)`` per block in forward and
    backward (``rows`` = :func:`default_rows`), because each block's bias is rebuilt in backward.
    """
    L = q.shape[-2]
    rows_per_block = default_rows(q.shape[-1]) if rows_per_block is None else rows_per_block
    if rows_per_block <= 0:
        raise ValueError(f"rows_per_block must be > 0; got {rows_per_block}")
    outs = []
    for a in range(0, L, rows_per_block):
        rows = torch.arange(a, min(a + rows_per_block, L), device=q.device)
        q_rows = q[:, :, a:a + rows_per_block]
        if torch.is_grad_enabled():
            outs.append(checkpoint(_rows_block, q_rows, k, v, rows, tuple(terms), attn_mask, use_reentrant=False))
        else:
            outs.append(_rows_block(q_rows, k, v, rows, tuple(terms), attn_mask))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


# -- flex forward, blockwise backward (eager) -----------------------------------------------------------------
def _split_terms(terms: Sequence[Term]):
    """Terms -> (the differentiable tensor of each term, a function rebuilding the terms from such tensors)."""
    terms = list(terms)
    tensors = [t.fused if isinstance(t, BucketBias) else t.proj for t in terms]

    def rebuild(new):
        return [t._replace(fused=x) if isinstance(t, BucketBias) else t._replace(proj=x) for t, x in zip(terms, new)]

    return tensors, rebuild


class _FlexRowsBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rebuild, attn_mask, rows_per_block, compile_kernel, *tensors):
        terms = rebuild(list(tensors))
        with torch.no_grad():
            out = flex_attention_terms(q.detach(), k.detach(), v.detach(), terms, attn_mask,
                                       compile_kernel=compile_kernel)
        ctx.save_for_backward(q, k, v, out, *tensors)
        ctx.rebuild, ctx.attn_mask, ctx.rows = rebuild, attn_mask, rows_per_block
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, *tensors = ctx.saved_tensors
        B, H, L, d = q.shape
        S = k.shape[-2]
        scale = d ** -0.5
        dout = dout.contiguous()
        delta = (dout * out).sum(-1, keepdim=True)                           # (B, H, L, 1)
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        needs = [t.requires_grad for t in tensors]
        leaves = [t.detach().requires_grad_(n) for t, n in zip(tensors, needs)]
        with torch.enable_grad():
            terms = ctx.rebuild(leaves)
        for a in range(0, L, ctx.rows):
            rows = torch.arange(a, min(a + ctx.rows, L), device=q.device)
            sl = slice(a, a + ctx.rows)
            with torch.enable_grad():
                bias = terms_rows(terms, rows, S)                            # (B|1, H|1, R, S) or None
            logits = torch.matmul(q[:, :, sl], k.transpose(-1, -2)) * scale
            if bias is not None:
                logits = logits + bias.detach()
            logits = _add_mask(logits, _mask_rows(ctx.attn_mask, rows, B, H))
            p = torch.softmax(logits, dim=-1).nan_to_num_(0.0)               # whole rows: exact; masked rows: 0
            dv += torch.matmul(p.transpose(-1, -2), dout[:, :, sl])
            ds = torch.matmul(dout[:, :, sl], v.transpose(-1, -2))
            ds.sub_(delta[:, :, sl]).mul_(p)                                  # dS = P (dP - delta)
            dq[:, :, sl] = torch.matmul(ds, k) * scale
            dk += torch.matmul(ds.transpose(-1, -2), q[:, :, sl]) * scale
            if bias is not None and bias.requires_grad:
                with torch.enable_grad():
                    torch.autograd.backward(bias.expand_as(ds), ds)
        grads = [leaf.grad if n else None for leaf, n in zip(leaves, needs)]
        return (dq, dk, dv, None, None, None, None, *grads)


def flex_attention_cpu_train(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, terms: Sequence[Term] = (),
                             attn_mask=None, rows_per_block: Optional[int] = None,
                             compile_kernel: Optional[bool] = None) -> torch.Tensor:
    """Flex forward with a blockwise backward: ``(B, H, L, d) -> (B, H, L, dv)``, differentiable on CPU.

    Gradients flow to ``q``, ``k``, ``v`` and to the terms' tensors (``BucketBias.fused``,
    ``BucketContext.proj``, hence to the encoder tables behind them).
    """
    rows_per_block = default_rows(q.shape[-1]) if rows_per_block is None else rows_per_block
    if rows_per_block <= 0:
        raise ValueError(f"rows_per_block must be > 0; got {rows_per_block}")
    if q.shape[-1] != v.shape[-1]:
        raise ValueError(f"q and v must have the same head width here; got {q.shape[-1]} and {v.shape[-1]}")
    tensors, rebuild = _split_terms(terms)
    return _FlexRowsBackward.apply(q, k, v, rebuild, attn_mask, rows_per_block, compile_kernel, *tensors)
