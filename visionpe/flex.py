"""FlexAttention builders: relative-position logit terms without an ``(N, N)`` tensor.

A bias encoder's logit term is a function of (batch, head, query index, key index) and small tables:

* ``relpos_bias`` and iRPE in bias mode: ``T[h, b(i, j)]``, a table ``(H|1, nb)`` looked up by a bucket id;
* iRPE contextual: ``P[b, h, i, b(i, j)]`` with ``P = q (s R)`` ``(B, H, N, nb)`` formed first (a GEMM);
* the q side of iRPE uses the transposed pair: ``T[h, b(j, i)]``, ``P[b, h, j, b(j, i)]``.

The bucket id ``b(i, j)`` itself is computed from per-token keys (:class:`GridBuckets`): the flat 2D
offset of two patches is ``key[i] - key[j]`` with ``key = row * (2w - 1) + col``, looked up in the offset
table; pairs with a prefix token land in stretches of the same lookup table that hold their fixed ids.
Everything held is ``O(N + h w + nb)``, so :func:`score_mod_for` gives ``torch.nn.attention.flex_attention`` a ``score_mod``
that never builds the ``(B|1, H, N, N)`` mask the SDPA path hands to ``attn_mask``. The same terms evaluated
on a block of query rows (:func:`terms_rows`) serve the CPU training path (:mod:`visionpe.attn_impl`),
because torch's FlexAttention has no CPU backward.

Masks: a :class:`~torch.nn.attention.flex_attention.BlockMask` is the flex form of any mask; builders for the
two in this package are :func:`padding_block_mask` (key padding) and :func:`position_causal_block_mask`
(CCA: causal on position ids, the same rule as ``visionpe.vlm.positions.causal_mask_from_positions``).
A dense ``attn_mask`` tensor (bool or additive) is also accepted and read inside the ``score_mod``.

Term objects are ``NamedTuple`` s of tensors and Python constants, so ``torch.compile`` treats their tensors
as inputs: a new term per block and per call does not recompile.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention, noop_mask

from .layout import Layout

__all__ = ["GridBuckets", "BucketBias", "BucketContext", "BucketValue", "grid_buckets", "bucket_bias", "context_proj",
           "grad_flows", "head_matmul", "term_projs", "term_tensors", "score_mod_for", "terms_rows", "value_rows",
           "flex_attention_terms", "padding_block_mask", "position_causal_block_mask",
           "block_mask_rows", "tiled_block_mask", "Term"]


class GridBuckets(NamedTuple):
    """Bucket id of a token pair ``(i, j)`` on a 2D grid: ``lut[t, key_q[i] - key_k[j]]``, no ``(N, N)`` table.

    For two patches, ``key_q[i] - key_k[j]`` is the flat 2D offset ``(dy)(2w - 1) + dx`` (query minus key)
    shifted by ``M = (h-1)(2w-1) + (w-1)`` to be >= 0, so ``lut[t, :2M+1]`` is the offset table. Prefix tokens
    get keys far outside that range, chosen so that the three kinds of pairs with a prefix token land in three
    disjoint stretches of ``lut`` that hold their fixed ids: one gather per pair, no branches.

    Attributes:
        key_q: ``(N,)`` int64, the query-side key of every token.
        key_k: ``(N,)`` int64, the key-side key of every token.
        lut: ``(T, 9M + 8)`` int64 bucket ids, one row per table ``t`` (iRPE's cross method has two).
    """

    key_q: torch.Tensor
    key_k: torch.Tensor
    lut: torch.Tensor

    @property
    def num_tables(self) -> int:
        return self.lut.shape[0]

    def ids(self, t: int, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
        """Ids in table ``t`` of pairs ``(qi, ki)``; any broadcastable int64 index tensors -> broadcast shape."""
        return self.lut[t][self.key_q[qi] - self.key_k[ki]]


def grid_buckets(layout: Layout, offsets: torch.Tensor, prefix_ids) -> GridBuckets:
    """Build :class:`GridBuckets` for a 2D ``layout``.

    Args:
        layout: 2D grid ``(h, w)`` with ``P`` prefix tokens (``N = P + h w``, prefix first, patches row-major).
        offsets: ``(T, 2h-1, 2w-1)`` or ``(2h-1, 2w-1)`` int64: ``[dy + h - 1, dx + w - 1]`` is the id of offset
            ``(dy, dx)`` (query minus key) in table ``t``.
        prefix_ids: ``(T, 3)`` or ``(3,)`` int64 ids of (prefix query, patch key), (patch query, prefix key)
            and (prefix query, prefix key).
    """
    if not isinstance(layout, Layout):
        raise TypeError(f"layout must be a visionpe.Layout; got {type(layout).__name__}")
    if layout.ndim != 2:
        raise ValueError(f"grid buckets need a 2D layout grid (h, w); got {layout.grid}")
    h, w = layout.grid
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(f"offsets must be an int64 tensor; got {type(offsets).__name__}")
    if offsets.dim() == 2:
        offsets = offsets.unsqueeze(0)
    if offsets.dim() != 3 or tuple(offsets.shape[1:]) != (2 * h - 1, 2 * w - 1):
        raise ValueError(f"offsets must be (T, 2h-1, 2w-1) = (T, {2 * h - 1}, {2 * w - 1}) for grid {layout.grid}; "
                         f"got {tuple(offsets.shape)}")
    T, dev = offsets.shape[0], offsets.device
    prefix_ids = torch.as_tensor(prefix_ids, dtype=torch.long, device=dev)
    if prefix_ids.dim() == 1 and prefix_ids.shape[0] == 3:
        prefix_ids = prefix_ids.unsqueeze(0).expand(T, 3)
    if tuple(prefix_ids.shape) != (T, 3):
        raise ValueError(f"prefix_ids must be (T, 3) = ({T}, 3) or (3,); got {tuple(prefix_ids.shape)}")
    M = (h - 1) * (2 * w - 1) + (w - 1)
    # patches: key_q - key_k = flat offset + M in [0, 2M]; a prefix query (key_q = 4M + 2) against patches
    # gives [3M + 2, 4M + 2]; patches against a prefix key (key_k = -(5M + 5)) give [6M + 5, 7M + 5]; two
    # prefix tokens give 9M + 7. The stretches are disjoint for every M >= 0.
    # unreachable entries (the gaps; the prefix stretches without prefix tokens) hold the valid id 0, so
    # that looking a table up through the whole lut (bucket_bias) stays in range
    lut = torch.zeros(T, 9 * M + 8, dtype=torch.long, device=dev)
    lut[:, :2 * M + 1] = offsets.reshape(T, -1)
    if layout.num_prefix_tokens:
        lut[:, 3 * M + 2:4 * M + 3] = prefix_ids[:, :1]
        lut[:, 6 * M + 5:7 * M + 6] = prefix_ids[:, 1:2]
        lut[:, 9 * M + 7] = prefix_ids[:, 2]
    ys = torch.arange(h, device=dev).repeat_interleave(w)
    xs = torch.arange(w, device=dev).repeat(h)
    key = ys * (2 * w - 1) + xs
    P = layout.num_prefix_tokens
    key_q = torch.cat([torch.full((P,), 4 * M + 2, dtype=torch.long, device=dev), key + M])
    key_k = torch.cat([torch.full((P,), -(5 * M + 5), dtype=torch.long, device=dev), key])
    return GridBuckets(key_q, key_k, lut)


class BucketBias(NamedTuple):
    """``logits[b, h, i, j] += fused[h, key_q[i] - key_k[j]]`` (``fused[h, key_q[j] - key_k[i]]`` when ``transpose``).

    ``fused``: ``(H, L)`` or ``(1, L)`` (shared by the heads): the bucket table already looked up through
    ``buckets.lut`` (and summed over its tables), so the ``score_mod`` does one gather per pair; build it
    with :func:`bucket_bias`.
    """

    fused: torch.Tensor
    buckets: GridBuckets
    transpose: bool = False


def bucket_bias(table: torch.Tensor, buckets: GridBuckets, transpose: bool = False) -> BucketBias:
    """A :class:`BucketBias` from a bucket table ``(H|1, nb)`` (ids of ``buckets`` index its last axis).

    The ``(H|1, L)`` fused table is ``sum_t table[:, lut[t]]`` (``L = 9M + 8`` entries, see
    :class:`GridBuckets`): small, and differentiable with respect to ``table``.
    """
    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        raise ValueError(f"table must be (H|1, num_buckets); got "
                         f"{tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__}")
    fused = None
    for t in range(buckets.num_tables):
        part = table[:, buckets.lut[t]]
        fused = part if fused is None else fused + part
    return BucketBias(fused, buckets, transpose)


class BucketContext(NamedTuple):
    """``logits[b, h, i, j] += P[b, h, i, b(i, j)]``; with ``transpose``: ``P[b, h, j, b(j, i)]``, ``P = x @ table``.

    ``x``: ``(B, H, N, d)`` (iRPE: ``q`` for the k side, ``k`` for the q side); ``table``: ``(H|1, d, nb)``,
    already scaled (iRPE: ``s R``). The ``(B, H, N, nb)`` product ``P`` is formed where it is used
    (:func:`context_proj`), so a training step need not keep it: it is rebuilt from ``x`` (kept anyway) and
    the small table.
    """

    x: torch.Tensor
    table: torch.Tensor
    buckets: GridBuckets
    transpose: bool = False


def head_matmul(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, a) @ (H|1, a, b) -> (B, H, N, b)``; a table shared by the heads runs as one 2D GEMM."""
    if table.shape[0] == 1:
        return (x.reshape(-1, x.shape[-1]) @ table[0]).view(*x.shape[:-1], table.shape[-1])
    return x @ table


def context_proj(term: BucketContext) -> torch.Tensor:
    """``x @ table``: ``(B, H, N, d) @ (H|1, d, nb) -> (B, H, N, nb)``."""
    return head_matmul(term.x, term.table)


Term = Union[BucketBias, BucketContext]


class BucketValue(NamedTuple):
    """A value term: ``out[b, h, i] += sum_j p[b, h, i, j] table[h, b(i, j)]`` on the attention probabilities ``p``.

    ``table``: ``(H|1, nb, dv)`` (iRPE's ``U``). FlexAttention cannot express it (its ``score_mod`` changes
    logits, not the output), so it runs on blocks of query rows (:func:`value_rows`,
    :func:`visionpe.flex_rows.explicit_rows_attention`).
    """

    table: torch.Tensor
    buckets: GridBuckets


def value_rows(term: BucketValue, p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The value term on a block of query rows: ``p`` ``(B, H, R, S)`` probabilities of ``rows`` -> ``(B, H, R, dv)``.

    ``p`` is summed per bucket (``scatter_add``, ``(B, H, R, nb)``), then multiplied by the table: the
    ``(R, S)`` bucket ids of the block are the only other block-sized tensor.
    """
    B, H, R, S = p.shape
    bk, table = term.buckets, term.table
    if bk.key_k.numel() != S:
        raise ValueError(f"p has {S} keys but the value term's buckets are for {bk.key_k.numel()} tokens")
    cols = torch.arange(S, device=p.device)
    sums = p.new_zeros(B, H, R, table.shape[-2])
    for t in range(bk.num_tables):
        ids = bk.ids(t, rows[:, None], cols[None, :])                                    # (R, S)
        sums = sums.scatter_add(-1, ids.expand(B, H, R, S), p)
    return head_matmul(sums, table)


def _term_score(term: Term, proj, b, h, qi, ki):
    """One term's logit for scalar (score_mod) or broadcastable index tensors; ``proj``: its product or None."""
    i, j = (ki, qi) if term.transpose else (qi, ki)
    bk = term.buckets
    if isinstance(term, BucketBias):
        return term.fused[0 if term.fused.shape[0] == 1 else h, bk.key_q[i] - bk.key_k[j]]
    out = None
    for t in range(bk.num_tables):
        val = proj[b, h, i, bk.ids(t, i, j)]
        out = val if out is None else out + val
    return out


def grad_flows(tensors) -> bool:
    """True when autograd is recording and any of ``tensors`` requires a gradient."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def term_tensors(term: Term) -> tuple:
    """The differentiable tensors of a term: ``(fused,)`` or ``(x, table)``."""
    return (term.fused,) if isinstance(term, BucketBias) else (term.x, term.table)


def term_projs(terms: Sequence[Term]) -> tuple:
    """Each term's product (:func:`context_proj`) for a contextual term, None for a bias term."""
    return tuple(context_proj(t) if isinstance(t, BucketContext) else None for t in terms)


def _check_dense_mask(mask: torch.Tensor, q: torch.Tensor, kv_len: int) -> None:
    B, H, L = q.shape[0], q.shape[1], q.shape[-2]
    ok = (mask.dim() == 4 and mask.shape[0] in (1, B) and mask.shape[1] in (1, H)
          and tuple(mask.shape[2:]) == (L, kv_len))
    if not ok:
        raise ValueError(f"attn_mask must be (B|1, H|1, L, S) = ({B}|1, {H}|1, {L}, {kv_len}); "
                         f"got {tuple(mask.shape)}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True = attend) or floating (additive); got {mask.dtype}")


def score_mod_for(terms: Sequence[Term], dense_mask: Optional[torch.Tensor] = None,
                  shape: Optional[tuple] = None) -> Callable:
    """A flex ``score_mod(score, b, h, q_idx, kv_idx)`` adding every term (and a dense mask, if any).

    Args:
        terms: :class:`BucketBias` / :class:`BucketContext` objects.
        dense_mask: optional ``(B|1, H|1, L, S)`` bool (True = attend) or additive float mask, read per pair.
        shape: ``(B, H)`` of the attention call; needed with ``dense_mask`` (the mask is broadcast to it).
    """
    terms = tuple(terms)
    projs = term_projs(terms)
    if dense_mask is not None:
        if shape is None:
            raise ValueError("score_mod_for: pass shape=(B, H) together with dense_mask")
        dense_mask = dense_mask.expand(shape[0], shape[1], *dense_mask.shape[2:])
        is_bool = dense_mask.dtype == torch.bool

    def score_mod(score, b, h, q_idx, kv_idx):
        for term, proj in zip(terms, projs):
            score = score + _term_score(term, proj, b, h, q_idx, kv_idx)
        if dense_mask is not None:
            m = dense_mask[b, h, q_idx, kv_idx]
            score = torch.where(m, score, -float("inf")) if is_bool else score + m
        return score

    return score_mod


def terms_rows(terms: Sequence[Term], rows: torch.Tensor, num_keys: int,
               projs: Optional[Sequence] = None) -> Optional[torch.Tensor]:
    """The summed terms on a block of query rows: ``(B|1, H|1, R, N)`` (``R = len(rows)``), or None.

    The same numbers as the ``score_mod``, built with one ``gather`` per table as the SDPA path does, for
    ``R`` rows at a time (the CPU training path); ``rows``: ``(R,)`` int64 query indices, consecutive;
    ``projs``: the contextual terms' products (:func:`context_proj`) if already formed (None: formed here); a
    non-transposed term reads only the block's rows of its product, so its entry may hold just those,
    ``(B, H, R, nb)``. The terms are summed into the first one's fresh buffer (contiguous unless the first
    term is transposed).
    """
    cols = torch.arange(num_keys, device=rows.device)
    projs = term_projs(terms) if projs is None else projs
    out = None
    for term, proj in zip(terms, projs):
        bk = term.buckets
        vals = []
        if isinstance(term, BucketBias):
            idx = (bk.key_q[cols][None, :] - bk.key_k[rows][:, None] if term.transpose
                   else bk.key_q[rows][:, None] - bk.key_k[cols][None, :])              # (R, N)
            # heads-last gather, viewed heads-first: SDPA's CPU kernel reads this layout faster
            vals.append(term.fused.t()[idx].permute(2, 0, 1).unsqueeze(0))           # (1, H|1, R, N)
        else:
            B, H = proj.shape[:2]
            if not term.transpose and proj.shape[-2] != rows.numel():
                proj = proj[:, :, rows]
            for t in range(bk.num_tables):
                if term.transpose:  # value at (i, j) is proj[j, b(j, i)]: gather along the keys' rows
                    ids = bk.ids(t, cols[:, None], rows[None, :])                        # (N, R)
                    vals.append(torch.gather(proj, -1, ids.expand(B, H, *ids.shape)).transpose(-1, -2))
                else:
                    ids = bk.ids(t, rows[:, None], cols[None, :])                        # (R, N)
                    vals.append(torch.gather(proj, -1, ids.expand(B, H, *ids.shape)))
        for val in vals:  # in place into the first (a fresh gather): one block-sized buffer, not one per sum
            out = val if out is None else (out.add_(val) if out.shape == torch.broadcast_shapes(out.shape, val.shape)
                                           else out + val)
    return out


def block_mask_rows(block_mask: BlockMask, rows: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """``(B, H, R, S)`` bool: ``block_mask.mask_mod`` evaluated on query ``rows`` (mask_mods that broadcast)."""
    kv_len = block_mask.seq_lengths[1]
    dev = rows.device
    b = torch.arange(batch, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=dev).view(1, -1, 1, 1)
    out = block_mask.mask_mod(b, h, rows.view(1, 1, -1, 1), torch.arange(kv_len, device=dev).view(1, 1, 1, -1))
    return out.expand(batch, heads, rows.numel(), kv_len)


def tiled_block_mask(q_len: int, kv_len: int, device, block_size: tuple = (128, 128)) -> BlockMask:
    """A ``BlockMask`` that attends everywhere, in ``block_size`` tiles (``O(q_len kv_len / 128^2)`` ints).

    Without a block mask, flex on CPU treats the whole ``(L, S)`` as one block and every thread allocates an
    ``L x S`` logits buffer (``O(N^2)`` memory, poor cache use); these tiles keep it at one 128 x 128 tile per
    thread.
    """
    qb, kb = block_size
    nq, nk = -(-q_len // qb), -(-kv_len // kb)
    num = torch.full((1, 1, nq), nk, dtype=torch.int32, device=device)
    idx = torch.arange(nk, dtype=torch.int32, device=device).expand(1, 1, nq, nk).contiguous()
    return BlockMask.from_kv_blocks(num, idx, None, None, BLOCK_SIZE=(qb, kb), mask_mod=noop_mask,
                                    seq_lengths=(q_len, kv_len))


#: outside ``torch.compile``, the flex path runs the compiled flex kernel (True) or torch's unfused reference
#: (False: builds the score matrix; the test suite uses it to check many configurations without compiling each)
COMPILE_KERNEL = True
_COMPILED_FLEX = None
#: compiled flex kernels kept per code object (one per resolution and term structure, see _flex_kernel)
FLEX_RECOMPILE_LIMIT = 64


def _flex_kernel(compile_kernel: bool) -> Callable:
    """``flex_attention`` itself when dynamo is tracing (or ``compile_kernel=False``), else a compiled copy.

    Outside ``torch.compile`` an uncompiled ``flex_attention`` runs torch's unfused reference, which builds
    the full score matrix; the compiled kernel is what avoids it. It is compiled with static shapes: in torch
    2.14 inductor's CPU flex template fails to build the dynamic-shape kernel of these gathering score_mods
    (C++ compile error on a second resolution), so each resolution and term structure gets its own kernel.
    """
    global _COMPILED_FLEX
    if not compile_kernel or torch.compiler.is_compiling():
        return flex_attention
    if _COMPILED_FLEX is None:
        compiled = torch.compile(flex_attention, dynamic=False)

        def run(*args, **kwargs):
            # more kernels than dynamo's default 8 per function: 5 resolutions x 3 encoders in one sweep
            with torch._dynamo.config.patch(recompile_limit=FLEX_RECOMPILE_LIMIT):
                return compiled(*args, **kwargs)

        _COMPILED_FLEX = run
    return _COMPILED_FLEX


def flex_attention_terms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, terms: Sequence[Term] = (),
                         attn_mask: Union[None, torch.Tensor, BlockMask] = None,
                         compile_kernel: Optional[bool] = None) -> torch.Tensor:
    """Attention with relative-position terms through ``flex_attention``: ``(B, H, L, d) -> (B, H, L, dv)``.

    Equals ``F.scaled_dot_product_attention(q, k, v, attn_mask=sum of the terms' (N, N) biases + mask)``
    (scale ``q.shape[-1] ** -0.5``) without building that bias.

    Args:
        q, k, v: ``(B, H, L, d)``, ``(B, H, S, d)``, ``(B, H, S, dv)``.
        terms: logit terms (:class:`BucketBias`, :class:`BucketContext`).
        attn_mask: a ``BlockMask`` (sparsity skips whole blocks) or a dense ``(B|1, H|1, L, S)`` bool/additive mask.
        compile_kernel: outside ``torch.compile``, run the compiled flex kernel or torch's unfused reference
            (builds the score matrix; for checking); ``None`` (default): :data:`COMPILE_KERNEL`.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a (B, H, L, d) tensor; got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    block_mask, dense = None, None
    if isinstance(attn_mask, BlockMask):
        block_mask = attn_mask
    elif attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a BlockMask or a tensor; got {type(attn_mask).__name__}")
        _check_dense_mask(attn_mask, q, k.shape[-2])
        dense = attn_mask
    if not torch.is_grad_enabled():  # flex refuses CPU inputs that merely carry requires_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    score_mod = score_mod_for(terms, dense, (q.shape[0], q.shape[1])) if (terms or dense is not None) else None
    if block_mask is None and q.device.type == "cpu":
        block_mask = tiled_block_mask(q.shape[-2], k.shape[-2], q.device)
    kernel = _flex_kernel(COMPILE_KERNEL if compile_kernel is None else compile_kernel)
    return kernel(q, k, v, score_mod=score_mod, block_mask=block_mask)


# -- masks as BlockMasks --------------------------------------------------------------------------------------
def padding_block_mask(valid: torch.Tensor, num_heads: Optional[int] = None, block_size: int = 128) -> BlockMask:
    """Key padding as a ``BlockMask``: query ``q`` of sample ``b`` attends key ``k`` iff ``valid[b, k]``.

    Args:
        valid: ``(B, N)`` bool, True for real tokens.
        num_heads: heads of the mask (``None``: broadcast over heads).
    """
    if not isinstance(valid, torch.Tensor) or valid.dim() != 2 or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a (B, N) bool tensor; got "
                         f"{(tuple(valid.shape), valid.dtype) if isinstance(valid, torch.Tensor) else type(valid).__name__}")
    B, N = valid.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return valid[b, kv_idx]

    return create_block_mask(mask_mod, B, num_heads, N, N, device=valid.device, BLOCK_SIZE=block_size)


def position_causal_block_mask(positions: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                               num_heads: Optional[int] = None, block_size: int = 128) -> BlockMask:
    """CCA's mask as a ``BlockMask``: ``q`` attends ``k`` iff ``pos[b, k] <= pos[b, q]`` and ``k`` is real.

    Padded query rows attend to themselves only, exactly as
    ``visionpe.vlm.positions.causal_mask_from_positions`` (so no row is all-masked).

    Args:
        positions: ``(B, L)`` position ids (integer or float; CCA's ring positions).
        padding_mask: ``(B, L)`` bool, True for real tokens (``None``: all real).
    """
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2:
        raise ValueError(f"positions must be a (B, L) tensor; got "
                         f"{tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__}")
    B, L = positions.shape
    if padding_mask is None:
        padding_mask = torch.ones(B, L, dtype=torch.bool, device=positions.device)
    if padding_mask.shape != positions.shape or padding_mask.dtype != torch.bool:
        raise ValueError(f"padding_mask must be a bool tensor shaped like positions {tuple(positions.shape)}; "
                         f"got {tuple(padding_mask.shape)} {padding_mask.dtype}")
    pos, real = positions, padding_mask

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = (pos[b, kv_idx] <= pos[b, q_idx]) & real[b, kv_idx]
        return torch.where(real[b, q_idx], allowed, q_idx == kv_idx)

    return create_block_mask(mask_mod, B, num_heads, L, L, device=positions.device, BLOCK_SIZE=block_size)
