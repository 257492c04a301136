"""The flex path's gradients on CPU, where torch's FlexAttention has no backward (torch 2.14).

Each function computes attention with :mod:`visionpe.flex` terms and masks, equal to SDPA with the
materialised bias (the explicit path, for value terms), in ``O(N)`` memory besides one block of ``rows`` query
rows at a time:

* :func:`flex_attention_cpu_train` (eager training): the forward is the flex kernel; the backward walks
  blocks of query rows, rebuilds the block's logits ``S = s q k^T + bias`` against all keys, so that
  ``P = softmax(S)`` is exact without the forward's log-sum-exp (which the CPU kernel cannot return), and
  forms ``dv += P^T do``,
  ``dS = P (do v^T - rowsum(do o))``, ``dq = s dS k``, ``dk += s dS^T q``; the terms' own tensors get ``dS``
  summed per bucket (``index_add_`` / ``scatter_add_``): the fused bias tables directly, iRPE's contextual
  ``P = x (s R)`` through ``dP`` (``P`` is rebuilt in the backward, not kept from the forward).
  This is FlashAttention's backward, block by block in PyTorch ops.
* :func:`rows_attention` (inside ``torch.compile``, where a custom ``autograd.Function`` around the flex
  call is not traced): SDPA on each block of query rows under activation checkpointing, so each block's bias
  is rebuilt in backward instead of saved.
* :func:`explicit_rows_attention` (encoders with a value term, e.g. ``irpe_qkv``, which FlexAttention cannot
  express): the explicit path, probabilities formed, on blocks of query rows; when gradients flow, each
  block is checkpointed.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask
from torch.utils.checkpoint import checkpoint

from .flex import (BucketBias, BucketContext, BucketValue, Term, block_mask_rows, context_proj, flex_attention_terms,
                   grad_flows, head_matmul, term_tensors, terms_rows, value_rows)

__all__ = ["ROWS_PER_HEAD_DIM", "EXPLICIT_ROWS_PER_HEAD_DIM", "rows_attention", "explicit_rows_attention",
           "flex_attention_cpu_train", "default_rows"]

#: a block of ``(B, H, rows, S)`` logits is at most this many times the size of ``k`` ``(B, H, S, d)``,
#: i.e. ``rows = ROWS_PER_HEAD_DIM * d``: memory ``O(N)``, like the activations around it
ROWS_PER_HEAD_DIM = 4


#: the explicit path's blocks without gradients (:func:`explicit_rows_attention`):
#: ``rows = EXPLICIT_ROWS_PER_HEAD_DIM * d``, so the block's one ``(B, H, rows, S)`` buffer is half the size of
#: ``k`` and an inference forward's peak stays at the activations'. With gradients the blocks are
#: :data:`ROWS_PER_HEAD_DIM` ``* d`` rows, like the flex path's: a training step's peak is its saved
#: activations, and fewer, larger blocks cost less recomputation overhead.
EXPLICIT_ROWS_PER_HEAD_DIM = 0.5


def default_rows(head_dim: int, per_head_dim: Optional[float] = None) -> int:
    """Rows per block: ``per_head_dim * head_dim`` (default :data:`ROWS_PER_HEAD_DIM`, read at call time), >= 16."""
    return max(16, int((ROWS_PER_HEAD_DIM if per_head_dim is None else per_head_dim) * head_dim))


def _mask_rows(attn_mask, rows: torch.Tensor, batch: int, heads: int):
    """The rows of a dense mask or a ``BlockMask`` as a dense ``(B|1, H|1, R, S)`` tensor, or None."""
    if attn_mask is None:
        return None
    if isinstance(attn_mask, BlockMask):
        return block_mask_rows(attn_mask, rows, batch, heads)
    return attn_mask[:, :, rows]


def _apply_mask_rows(logits: torch.Tensor, attn_mask, rows: torch.Tensor, inplace: bool):
    """``logits`` ``(B, H, R, S)`` with the mask's ``rows`` applied (bool: ``-inf`` where False; float: added in
    the logits' dtype), in place or not; returns ``(logits, mask rows or None)``."""
    mask = _mask_rows(attn_mask, rows, logits.shape[0], logits.shape[1])
    if mask is None:
        return logits, None
    if mask.dtype == torch.bool:
        logits = logits.masked_fill_(~mask, float("-inf")) if inplace else logits.masked_fill(~mask, float("-inf"))
    else:
        logits = logits.add_(mask.to(logits.dtype)) if inplace else logits + mask.to(logits.dtype)
    return logits, mask


def _softmax_(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis, in place (the block holds every key of its rows, so it is exact)."""
    x.sub_(x.amax(-1, keepdim=True)).exp_()
    return x.div_(x.sum(-1, keepdim=True))


def _block_projs(terms, projs, a: int, b: int) -> list:
    """Each term's product for the block of query rows ``a:b``: the given one, or (None) formed here, for the
    block's rows only when the term is not transposed (it reads no other row), whole when it is."""
    return [p if p is not None or not isinstance(t, BucketContext)
            else context_proj(t) if t.transpose else head_matmul(t.x[:, :, a:b], t.table)
            for t, p in zip(terms, projs)]


def _outer_projs(terms, grad: bool) -> tuple:
    """The products formed once for all blocks: without gradients, the transposed terms' (each block reads all
    of it); with gradients none (each checkpointed block forms its own, so nothing is kept for backward)."""
    return tuple(context_proj(t) if (not grad and isinstance(t, BucketContext) and t.transpose) else None
                 for t in terms)


# -- checkpointed SDPA blocks (compile-friendly) --------------------------------------------------------------
def _blocks(L: int, rows_per_block: int, device):
    """``(a, b, rows)`` per block: Python bounds (no tensor read back, so no graph break under compile) and the
    ``(b - a,)`` index tensor."""
    for a in range(0, L, rows_per_block):
        b = min(a + rows_per_block, L)
        yield a, b, torch.arange(a, b, device=device)


def _all_tensors(q, k, v, terms, values=()) -> list:
    return [q, k, v, *(x for t in terms for x in term_tensors(t)), *(t.table for t in values)]


def _rows_block(q_rows, k, v, a, b, rows, terms, projs, attn_mask):
    B, H = q_rows.shape[:2]
    bias = terms_rows(terms, rows, k.shape[-2], _block_projs(terms, projs, a, b))
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
    terms = tuple(terms)
    grad = grad_flows(_all_tensors(q, k, v, terms))
    projs = _outer_projs(terms, grad)
    outs = []
    for a, b, rows in _blocks(L, rows_per_block, q.device):
        args = (q[:, :, a:b], k, v, a, b, rows, terms, projs, attn_mask)
        outs.append(checkpoint(_rows_block, *args, use_reentrant=False) if grad else _rows_block(*args))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


# -- the explicit path on blocks of query rows (value terms) ----------------------------------------------------
def _explicit_block(q_rows, k, v, a, b, rows, terms, projs, values, attn_mask, dropout_p, training, grad):
    """One block: ``p = softmax(s q k^T + terms + mask)``, ``out = p v + sum of the value terms``.

    ``projs``: per term, the full contextual product or None (formed here, :func:`_block_projs`). ``grad``:
    whether gradients flow; without, the block holds one ``(B, H, R, S)`` buffer: the terms are gathered into
    it, ``s q k^T`` is accumulated onto it (``baddbmm_``; on CPU one sample at a time, so that strided ``k`` /
    ``v`` views (a packed qkv projection) are read in place, not copied) and the softmax runs in place.
    """
    B, H, R, d = q_rows.shape
    S = k.shape[-2]
    qs = q_rows * d ** -0.5
    bias = terms_rows(terms, rows, S, _block_projs(terms, projs, a, b))
    kt = k.transpose(-1, -2)                                                             # (B, H, d, S)
    per_sample = q_rows.device.type == "cpu"
    if grad:
        logits = qs @ kt                                                                 # (B, H, R, S)
        if bias is not None:
            logits = logits + bias
    else:
        if bias is None:
            logits, beta = torch.empty(B, H, R, S, dtype=q_rows.dtype, device=q_rows.device), 0
        else:  # a fresh contiguous (B, H, R, S) buffer
            logits = bias if (bias.shape[:2] == (B, H) and bias.is_contiguous()) else bias.expand(B, H, R, S).contiguous()
            beta = 1
        del bias
        if per_sample:
            for i in range(B):
                logits[i].baddbmm_(qs[i], kt[i], beta=beta)
        else:
            logits.view(B * H, R, S).baddbmm_(qs.reshape(B * H, R, d), kt.reshape(B * H, d, S), beta=beta)
    logits, _ = _apply_mask_rows(logits, attn_mask, rows, inplace=not grad)
    p = logits.softmax(-1) if grad else _softmax_(logits)
    if dropout_p > 0 and training:
        p = F.dropout(p, dropout_p)
    if grad or not per_sample:
        out = p @ v
    else:
        out = torch.empty(B, H, R, v.shape[-1], dtype=p.dtype, device=p.device)
        for i in range(B):
            torch.bmm(p[i], v[i], out=out[i])
    for term in values:
        out = out + value_rows(term, p, rows)
    return out


def explicit_rows_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, terms: Sequence[Term] = (),
                            values: Sequence[BucketValue] = (), attn_mask=None, dropout_p: float = 0.0,
                            training: bool = False, rows_per_block: Optional[int] = None) -> torch.Tensor:
    """The explicit attention path, probabilities formed, on blocks of query rows: ``(B, H, L, d) -> (B, H, L, dv)``.

    ``out = p v + sum_values`` with ``p = softmax(s q k^T + terms + mask)`` (``s = d ** -0.5``): the same numbers
    as the full-matrix path (``models.vit.PEAttention`` with ``attn_impl="sdpa"``) without any ``(L, S)``
    tensor; memory ``O(B H rows S)``. With gradients each block is checkpointed (rebuilt in backward; the
    random state is restored, so attention dropout draws the same mask twice).

    Args:
        terms: logit terms (:class:`~visionpe.flex.BucketBias`, :class:`~visionpe.flex.BucketContext`).
        values: value terms (:class:`~visionpe.flex.BucketValue`) on the probabilities.
        attn_mask: a ``BlockMask`` or a dense ``(B|1, H|1, L, S)`` bool (True = attend) or additive mask.
        dropout_p: attention dropout on the probabilities, applied when ``training``.
        rows_per_block: query rows per block (default :func:`default_rows`: :data:`ROWS_PER_HEAD_DIM` per head
            dimension when gradients flow, :data:`EXPLICIT_ROWS_PER_HEAD_DIM` otherwise).
    """
    L = q.shape[-2]
    terms, values = tuple(terms), tuple(values)
    grad = grad_flows(_all_tensors(q, k, v, terms, values))
    if rows_per_block is None:
        rows_per_block = default_rows(q.shape[-1], ROWS_PER_HEAD_DIM if grad else EXPLICIT_ROWS_PER_HEAD_DIM)
    if rows_per_block <= 0:
        raise ValueError(f"rows_per_block must be > 0; got {rows_per_block}")
    if grad:
        # each checkpointed block forms what it needs from q, k, v and the small tables (also in backward):
        # nothing of size N beyond what attention saves anyway is kept for backward
        outs = [checkpoint(_explicit_block, q[:, :, a:b], k, v, a, b, rows, terms, _outer_projs(terms, grad), values,
                           attn_mask, dropout_p, training, grad, use_reentrant=False)
                for a, b, rows in _blocks(L, rows_per_block, q.device)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    projs = _outer_projs(terms, grad)
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    for a, b, rows in _blocks(L, rows_per_block, q.device):
        out[:, :, a:b] = _explicit_block(q[:, :, a:b], k, v, a, b, rows, terms, projs, values, attn_mask, dropout_p,
                                         training, grad)
    return out


# -- flex forward, blockwise backward (eager) -----------------------------------------------------------------
def _accumulate_term_grads(terms: Sequence[Term], grads: list, ds: torch.Tensor, rows: torch.Tensor,
                           sl: slice) -> None:
    """Add a block's ``dS`` ``(B, H, R, S)`` to each term's gradient target (in place): ``d fused`` ``(H|1, L)``
    for a bias term, ``d P`` ``(B, H, N, nb)`` for a contextual term (None: not needed).

    By hand rather than through autograd on the gathered block: the backward of an advanced-indexing gather
    is an accumulating ``index_put`` that is slow on CPU; ``index_add_`` / ``scatter_add_`` are not.
    """
    S = ds.shape[-1]
    cols = torch.arange(S, device=ds.device)
    for term, g in zip(terms, grads):
        if g is None:
            continue
        bk = term.buckets
        if isinstance(term, BucketBias):
            idx = (bk.key_q[cols][None, :] - bk.key_k[rows][:, None] if term.transpose
                   else bk.key_q[rows][:, None] - bk.key_k[cols][None, :])              # (R, S)
            gs = ds.sum(0)                                                            # (H, R, S)
            if g.shape[0] == 1:
                gs = gs.sum(0, keepdim=True)
            g.index_add_(1, idx.reshape(-1), gs.reshape(gs.shape[0], -1))
            continue
        B, H = ds.shape[:2]
        for t in range(bk.num_tables):
            if term.transpose:  # logits[i, j] used P[j, b(j, i)]
                ids = bk.ids(t, cols[:, None], rows[None, :])                            # (S, R)
                g.scatter_add_(-1, ids.expand(B, H, *ids.shape), ds.transpose(-1, -2))
            else:
                ids = bk.ids(t, rows[:, None], cols[None, :])                            # (R, S)
                g[:, :, sl].scatter_add_(-1, ids.expand(B, H, *ids.shape), ds)


def _context_grads(term: BucketContext, g_proj: torch.Tensor, needs: tuple) -> tuple:
    """``P = x @ table``: ``(d x, d table)`` from ``d P`` (None where not needed)."""
    x, table = term.x, term.table
    gx = gt = None
    if table.shape[0] == 1:  # shared by the heads
        if needs[0]:
            gx = (g_proj.reshape(-1, g_proj.shape[-1]) @ table[0].t()).view_as(x)
        if needs[1]:
            gt = (x.reshape(-1, x.shape[-1]).t() @ g_proj.reshape(-1, g_proj.shape[-1])).unsqueeze(0)
    else:
        if needs[0]:
            gx = g_proj @ table.transpose(-1, -2)
        if needs[1]:
            gt = (x.transpose(-1, -2) @ g_proj).sum(0)
    return gx, gt


class _FlexRowsBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, terms, attn_mask, rows_per_block, compile_kernel, *tensors):
        with torch.no_grad():
            out = flex_attention_terms(q.detach(), k.detach(), v.detach(), terms, attn_mask,
                                       compile_kernel=compile_kernel)
        # the terms' tensors are q/k (contextual x) or small tables: saving them costs no activation memory
        ctx.save_for_backward(q, k, v, out)
        ctx.terms, ctx.attn_mask, ctx.rows = terms, attn_mask, rows_per_block
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out = ctx.saved_tensors
        B, H, L, d = q.shape
        S, dv_ = k.shape[-2], v.shape[-1]
        scale = d ** -0.5
        terms, mask = ctx.terms, ctx.attn_mask
        needs = iter(ctx.needs_input_grad[7:])
        needs = [tuple(next(needs) for _ in term_tensors(t)) for t in terms]
        projs = [context_proj(t).detach() if isinstance(t, BucketContext) else None for t in terms]
        grads = [None if not any(n) else (torch.zeros_like(t.fused) if p is None else torch.zeros_like(p))
                 for t, p, n in zip(terms, projs, needs)]
        # (B H) batched 3D views; the scale folded into q and k once
        q3 = (q * scale).reshape(B * H, L, d)
        k3 = k.reshape(B * H, S, d)
        ks3 = k3 * scale
        v3 = v.reshape(B * H, S, dv_)
        do3 = dout.contiguous().reshape(B * H, L, dv_)
        neg_delta = -(dout * out).sum(-1, keepdim=True).reshape(B * H, L, 1)
        dq3 = torch.empty_like(q3)
        dk3, dv3 = torch.zeros_like(k3), torch.zeros_like(v3)
        for a in range(0, L, ctx.rows):
            sl = slice(a, min(a + ctx.rows, L))
            rows = torch.arange(sl.start, sl.stop, device=q.device)
            # two (B H, R, S) buffers at a time: the logits, turned into P in place, then dS
            p = torch.bmm(q3[:, sl], k3.transpose(1, 2))
            p4 = p.view(B, H, -1, S)
            bias = terms_rows(terms, rows, S, projs)                         # (B|1, H|1, R, S) or None
            if bias is not None:
                p4.add_(bias)
                del bias
            _, m = _apply_mask_rows(p4, mask, rows, inplace=True)
            _softmax_(p)
            if m is not None:
                p.nan_to_num_(0.0)                                           # fully masked rows: 0
            dv3.baddbmm_(p.transpose(1, 2), do3[:, sl])
            ds = torch.baddbmm(neg_delta[:, sl], do3[:, sl], v3.transpose(1, 2)).mul_(p)   # P (dP - delta)
            del p, p4
            torch.bmm(ds, ks3, out=dq3[:, sl])
            dk3.baddbmm_(ds.transpose(1, 2), q3[:, sl])
            _accumulate_term_grads(terms, grads, ds.view(B, H, -1, S), rows, sl)
        term_grads = []
        for t, g, n in zip(terms, grads, needs):
            if isinstance(t, BucketBias):
                term_grads.append(g)
            else:
                term_grads.extend(_context_grads(t, g, n) if g is not None else (None, None))
        return (dq3.view_as(q), dk3.view_as(k), dv3.view_as(v), None, None, None, None, *term_grads)


def flex_attention_cpu_train(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, terms: Sequence[Term] = (),
                             attn_mask=None, rows_per_block: Optional[int] = None,
                             compile_kernel: Optional[bool] = None) -> torch.Tensor:
    """Flex forward with a blockwise backward: ``(B, H, L, d) -> (B, H, L, dv)``, differentiable on CPU.

    Gradients flow to ``q``, ``k``, ``v`` and to the terms' tensors (``BucketBias.fused``, ``BucketContext.x``
    and ``.table``, hence to the encoder tables behind them).
    """
    rows_per_block = default_rows(q.shape[-1]) if rows_per_block is None else rows_per_block
    if rows_per_block <= 0:
        raise ValueError(f"rows_per_block must be > 0; got {rows_per_block}")
    if q.shape[-1] != v.shape[-1]:
        raise ValueError(f"q and v must have the same head width here; got {q.shape[-1]} and {v.shape[-1]}")
    terms = list(terms)
    tensors = [x for t in terms for x in term_tensors(t)]
    return _FlexRowsBackward.apply(q, k, v, terms, attn_mask, rows_per_block, compile_kernel, *tensors)
