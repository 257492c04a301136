"""iRPE: image relative position encoding (Wu et al., ICCV 2021), pure PyTorch.

Three registered configurations:

* ``irpe``: the paper's DeiT recipe: product method, contextual mode on keys, one table shared by the heads,
  ratio 1.9 (50 buckets with a class token), a table per block, plus DeiT's learned APE (``ape=True``).
* ``irpe_qkv``: the same, contextual on queries, keys and values (the best DeiT-S/B models).
* ``irpe_bias``: product method in bias mode on keys (a learned scalar per bucket, shared by the heads).

How the terms enter attention (``s = head_dim ** -0.5``, offsets query minus key, ``b(i, j)`` the bucket):

* k side: ``logits[i, j] += (s q_i) . R_k[b(i, j)]`` (contextual) or ``+= T_k[b(i, j)]`` (bias);
* q side: ``logits[i, j] += (s k_j) . R_q[b(j, i)]`` (or ``T_q[b(j, i)]``), the official transposed form;
* v side: ``out_i += sum_j p_ij U[b(i, j)]`` on the softmax probabilities ``p``.

The q/k terms are added to the already-scaled logits (as the official code does), so :meth:`IRPE.bias`
returns a ready ``attn_mask`` for ``F.scaled_dot_product_attention`` and the explicit path
``(s q) k^T + bias`` gives the same numbers. The contextual term is ``q . R`` over the buckets,
``(B, H, N, nb)``, followed by one ``gather`` with the cached bucket ids; ``(N, N, d)`` is never built. The
value term scatter-adds ``p`` into ``(B, H, N, nb)`` bucket sums and multiplies by ``U``. Only the value
term needs the explicit attention path (``needs_attn_probs`` is True only when ``'v' in rpe_on``).

Parameter shapes and names follow the official modules (``lookup_table_weight`` ``(H', d, nb)`` for q/k,
``(H', nb, d)`` for v, ``lookup_table_bias`` ``(H', nb)``, ``rp_rows``/``rp_cols`` for cross), one module per
block under ``rpe_{q,k,v}.<block>``; :func:`convert_official_state_dict` maps official DeiT checkpoints.
DeiT's learned APE is a :class:`~visionpe.encoders.absolute.LearnedAPE` held as ``ape`` (state-dict key
``ape.pos_embed``; checkpoints with the former key ``pos_embed`` still load).
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import torch
from torch import nn

from ..base import AbsoluteTable, PositionEncoder, register_encoder
from ..flex import BucketContext, BucketValue, bucket_bias, grid_buckets, head_matmul
from ..irpe_buckets import bucket_ids, canonical_method, num_buckets, offset_table, piecewise_params
from ..layout import Layout
from .absolute import LearnedAPE

__all__ = ["IRPE", "IRPETable", "convert_official_state_dict"]

MODES = {"bias": "bias", "contextual": "contextual", "ctx": "contextual"}


def _check_rpe_on(rpe_on) -> str:
    if not isinstance(rpe_on, str):
        raise TypeError(f"rpe_on must be a str of the letters q, k, v (e.g. 'k', 'qkv'); got {type(rpe_on).__name__}")
    bad = sorted(set(rpe_on) - set("qkv"))
    if not rpe_on or bad or len(set(rpe_on)) != len(rpe_on):
        raise ValueError(f"rpe_on must be a non-empty string of distinct letters from 'q', 'k', 'v' "
                         f"(e.g. 'k', 'qk', 'qkv'); got {rpe_on!r}" + (f" with invalid letters {bad}" if bad else ""))
    return "".join(c for c in "qkv" if c in rpe_on)


class IRPETable(nn.Module):
    """One side's lookup table(s) in one block, named as the official ``iRPE``/``iRPE_Cross`` modules.

    ``kind``: ``"qk_bias"`` -> ``lookup_table_bias (H', nb)``; ``"qk_ctx"`` -> ``lookup_table_weight (H', d, nb)``;
    ``"v_ctx"`` -> ``lookup_table_weight (H', nb, d)``. With ``cross=True`` the module holds ``rp_rows`` and
    ``rp_cols`` tables of that kind instead.
    """

    _SHAPES = {"qk_bias": lambda h, d, nb: (h, nb), "qk_ctx": lambda h, d, nb: (h, d, nb),
               "v_ctx": lambda h, d, nb: (h, nb, d)}

    def __init__(self, kind: str, heads: int, head_dim: int, nb: int, cross: bool = False, init_std: float = 0.0):
        super().__init__()
        self.kind, self.cross = kind, cross
        if cross:
            self.rp_rows = IRPETable(kind, heads, head_dim, nb, False, init_std)
            self.rp_cols = IRPETable(kind, heads, head_dim, nb, False, init_std)
            return
        p = nn.Parameter(torch.zeros(self._SHAPES[kind](heads, head_dim, nb)))
        if init_std > 0:
            nn.init.trunc_normal_(p, std=init_std, a=-2 * init_std, b=2 * init_std)
        if kind == "qk_bias":
            self.lookup_table_bias = p
        else:
            self.lookup_table_weight = p

    def merged(self) -> torch.Tensor:
        """The table with cross's row and column buckets concatenated on the bucket axis (``nbc = 2 nb``)."""
        if self.cross:
            axis = -2 if self.kind == "v_ctx" else -1
            return torch.cat([self.rp_rows.merged(), self.rp_cols.merged()], dim=axis)
        return self.lookup_table_bias if self.kind == "qk_bias" else self.lookup_table_weight


@register_encoder("irpe", "iRPE (DeiT recipe): product buckets, contextual on k, shared heads, ratio 1.9, + learned APE",
                  method="product", mode="contextual", rpe_on="k", shared_head=True, ratio=1.9)
@register_encoder("irpe_qkv", "iRPE contextual on q, k and v (product, shared heads, ratio 1.9), + learned APE",
                  method="product", mode="contextual", rpe_on="qkv", shared_head=True, ratio=1.9)
@register_encoder("irpe_bias", "iRPE bias mode on k (product buckets, shared heads, ratio 1.9), + learned APE",
                  method="product", mode="bias", rpe_on="k", shared_head=True, ratio=1.9)
class IRPE(PositionEncoder):
    """Image relative position encoding with a table per block.

    Args:
        method: ``'euc'``/``'euclidean'``, ``'quant'``/``'quantization'``, ``'cross'`` or ``'product'``.
        mode: ``'contextual'`` (alias ``'ctx'``) or ``'bias'``; bias mode exists only for q and k.
        rpe_on: which of q, k, v get an encoding, e.g. ``'k'``, ``'qk'``, ``'qkv'``; each its own table.
        shared_head: one table for all heads (``H' = 1``) instead of one per head.
        ratio: piecewise parameter; alpha, beta, gamma = ratio, 2 ratio, 8 ratio.
        ape: also add a learned absolute table, as DeiT keeps it: a :class:`LearnedAPE` (timm layout and
            resampling, a row per prefix token) held as ``self.ape`` (``None`` without).
        init_std: tables start at zero (official DeiT) or truncated-normal with this std.
        rpe_weight_decay: the paper excludes the tables from weight decay (the default here); the released
            training script seems to decay them, set True to do that.

    Prefix tokens (any number) share one extra bucket; the table has it whenever ``num_prefix_tokens > 0``.
    """

    hooks = frozenset({"embed", "bias"})

    def __init__(self, dim: int, num_heads: int = 1, depth: int = 1, grid_size: Sequence[int] = (14, 14),
                 num_prefix_tokens: int = 1, method: str = "product", mode: str = "contextual", rpe_on: str = "k",
                 shared_head: bool = True, ratio: float = 1.9, ape: bool = True, init_std: float = 0.0,
                 ape_init_std: float = 0.02, rpe_weight_decay: bool = False):
        super().__init__(dim, num_heads, depth, grid_size, num_prefix_tokens)
        if len(self.grid_size) != 2:
            raise ValueError(f"iRPE supports 2D grids (h, w); got grid_size={self.grid_size}")
        self.method = canonical_method(method)
        if not isinstance(mode, str) or mode.lower() not in MODES:
            raise ValueError(f"unknown iRPE mode {mode!r}; expected one of {sorted(MODES)}")
        self.mode = MODES[mode.lower()]
        self.rpe_on = _check_rpe_on(rpe_on)
        if self.mode == "bias" and "v" in self.rpe_on:
            raise ValueError(f"iRPE on values exists only in contextual mode; got mode='bias' with rpe_on={rpe_on!r}")
        self.ratio = ratio
        self.alpha, self.beta, self.gamma = piecewise_params(ratio)
        if not isinstance(init_std, (int, float)) or init_std < 0:
            raise ValueError(f"init_std must be a number >= 0; got {init_std!r}")
        self.shared_head = bool(shared_head)
        self.rpe_weight_decay = bool(rpe_weight_decay)
        self.num_buckets = num_buckets(self.method, ratio, num_prefix_tokens)  # per table, with the prefix bucket
        self._cross = self.method == "cross"
        self._nbc = self.num_buckets * (2 if self._cross else 1)  # width of a merged (cross: rows|cols) table
        heads = 1 if self.shared_head else num_heads
        qk_kind = "qk_ctx" if self.mode == "contextual" else "qk_bias"
        for side in "qkv":
            tables = None
            if side in self.rpe_on:
                kind = "v_ctx" if side == "v" else qk_kind
                tables = nn.ModuleList(IRPETable(kind, heads, self.head_dim, self.num_buckets, self._cross, init_std)
                                       for _ in range(depth))
            setattr(self, f"rpe_{side}", tables)
        # instance-level: the model reads these to pick the attention path and the hooks to call
        self.needs_attn_probs = "v" in self.rpe_on
        self.hooks = frozenset({"bias", "embed"} if ape else {"bias"})
        self.ape: Optional[LearnedAPE] = LearnedAPE(
            dim, num_heads, depth, self.grid_size, num_prefix_tokens, embed_prefix=True,
            init_std=ape_init_std) if ape else None
        _register_old_key_loader(self)

    # -- bucket ids ---------------------------------------------------------------------------------------
    def bucket_ids(self, layout: Layout, device=None) -> torch.Tensor:
        """``(N, N)`` int64 bucket ids for ``layout`` (``(2, N, N)`` rows/cols for cross), prefix bucket included."""
        return self._indices(layout, device)["ids"]

    def _indices(self, layout: Layout, device) -> dict:
        return self.table_cache.get("indices", layout, device, torch.int64,
                                    lambda: self._build_indices(layout, device))

    def _build_indices(self, layout: Layout, device) -> dict:
        if not isinstance(layout, Layout):
            raise TypeError(f"layout must be a visionpe.Layout; got {type(layout).__name__}")
        if layout.ndim != 2:
            raise ValueError(f"iRPE needs a 2D layout grid (h, w); got {layout.grid}")
        if layout.num_prefix_tokens and not self.num_prefix_tokens:
            raise ValueError(f"layout has {layout.num_prefix_tokens} prefix tokens but the encoder was built with "
                             f"num_prefix_tokens=0, so its tables have no prefix bucket")
        ids = bucket_ids(self.method, self.ratio, layout.grid, layout.num_prefix_tokens, device)
        n = layout.num_tokens
        per_table = ids.view(-1, n, n)  # (T, N, N), T = 2 for cross (rows, cols), else 1
        # merged tables put cross's column buckets after the row buckets
        shift = (torch.arange(per_table.shape[0], device=device) * self.num_buckets).view(-1, 1, 1)
        merged = per_table + shift
        return {
            "ids": ids,
            "T": per_table.shape[0],
            "gather": tuple(merged.unbind(0)),                 # T x (N, N) ids into the merged table
            "bias_k": merged.reshape(-1),                      # table[:, ids[i, j]]
            "bias_q": merged.transpose(1, 2).reshape(-1),      # table[:, ids[j, i]]
        }

    # -- hooks --------------------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor, layout: Layout, stage: int = -1) -> torch.Tensor:
        """x: (B, N, dim) -> x + the APE table (resampled to ``layout.grid``); identity without ``ape``."""
        if self.ape is None:
            return x
        return self.ape.embed(x, layout, stage)

    def _bias_term(self, side: str, block: int, idx: dict, n: int, dtype) -> torch.Tensor:
        """Bias mode, one side: ``(1, H', N, N)``, ``T[h', b(i, j)]`` (k) or ``T[h', b(j, i)]`` (q)."""
        table = getattr(self, f"rpe_{side}")[block].merged().to(dtype)
        out = table[:, idx[f"bias_{side}"]].view(table.shape[0], idx["T"], n, n)
        return (out[:, 0] if idx["T"] == 1 else out.sum(1)).unsqueeze(0)

    def _contextual_terms(self, sides, block: int, idx: dict, n: int) -> torch.Tensor:
        """Contextual q/k terms summed: ``(B, H, N, N)``.

        Per side, ``P = (s x) R`` is ``(B, H, N, nbc)`` and the lookup is one ``torch.gather`` along the bucket
        axis with the cached ``(N, N)`` ids expanded (a stride-0 view, no copy) over batch and heads; on CPU
        this beat ``index_select`` on flat ids and a batch-last row gather, forward and backward. The q side
        is gathered with key rows (``G[j, i] = P[j, b(j, i)]``) and transposed, as the official code does.
        """
        out = None
        for side, x in sides:
            B, H = x.shape[:2]
            table = getattr(self, f"rpe_{side}")[block].merged().to(x.dtype)
            # scale the small table rather than the activations: (s x) . R == x . (s R)
            proj = head_matmul(x, table * self.head_dim ** -0.5)             # (B, H, N, nbc)
            for ids in idx["gather"]:                                       # cross: rows then cols table
                g = torch.gather(proj, -1, ids.expand(B, H, n, n))
                if side == "q":
                    g = g.transpose(-1, -2)
                out = g if out is None else out + g
        return out.contiguous()  # a no-op unless q is the only side (a transposed view)

    def bias(self, q: torch.Tensor, k: torch.Tensor, layout: Layout, block: int = 0) -> Optional[torch.Tensor]:
        """q, k: (B, H, N, head_dim), unscaled -> additive logits ``(B|1, H|1, N, N)`` in q's dtype, or None.

        The result is added to ``q k^T * head_dim^-0.5`` (SDPA ``attn_mask`` or the explicit path alike).
        """
        sides = [(side, x) for side, x in (("k", q), ("q", k)) if side in self.rpe_on]
        if not sides:
            return None
        layout.check(sides[0][1].shape[-2], "q" if sides[0][0] == "k" else "k")
        n = layout.num_tokens
        idx = self._indices(layout, sides[0][1].device)
        if self.mode == "contextual":
            return self._contextual_terms(sides, block, idx, n)
        out = None
        for side, x in sides:
            term = self._bias_term(side, block, idx, n, x.dtype)
            out = term if out is None else out + term
        return out

    def flex_terms(self, q: torch.Tensor, k: torch.Tensor, layout: Layout, block: int = 0) -> list:
        """The q/k terms of :meth:`bias` for the flex path (:mod:`visionpe.flex`), without ``(N, N)`` tensors.

        Bucket ids come from token coordinates and the ``(2h-1, 2w-1)`` offset table (cross: two tables, the
        column ids shifted by ``num_buckets`` as in the merged table); every pair with a prefix token takes the
        prefix bucket. Contextual mode: ``[BucketContext(x, s R, ...)]`` (``(B, H, N, nbc)`` products ``x (s R)``);
        bias mode: ``[BucketBias(T, ...)]``; the q side is transposed. The value term is
        :meth:`flex_value_terms`.
        """
        sides = [(side, x) for side, x in (("k", q), ("q", k)) if side in self.rpe_on]
        if not sides:
            return []
        buckets = self._grid_buckets(layout, sides[0][1].device)
        layout.check(sides[0][1].shape[-2], "q" if sides[0][0] == "k" else "k")
        terms = []
        for side, x in sides:
            table = getattr(self, f"rpe_{side}")[block].merged().to(x.dtype)
            if self.mode == "contextual":
                terms.append(BucketContext(x, table * self.head_dim ** -0.5, buckets, side == "q"))
            else:
                terms.append(bucket_bias(table, buckets, side == "q"))
        return terms

    def flex_value_terms(self, layout: Layout, block: int = 0, dtype=None, device=None) -> list:
        """The value term of :meth:`value_term` without ``(N, N)`` ids: ``[BucketValue(U, ...)]`` (or ``[]``).

        It runs on blocks of query rows (:func:`visionpe.flex_rows.explicit_rows_attention`).
        """
        if self.rpe_v is None:
            return []
        table = self.rpe_v[block].merged()
        device = table.device if device is None else device
        return [BucketValue(table.to(dtype or table.dtype), self._grid_buckets(layout, device))]

    def _grid_buckets(self, layout: Layout, device):
        """:class:`~visionpe.flex.GridBuckets` of ``layout`` (cached): the merged table's ids, prefix bucket included."""
        return self.table_cache.get("grid_buckets", layout, device, torch.int64,
                                    lambda: self._build_grid_buckets(layout, device))

    def _build_grid_buckets(self, layout: Layout, device):
        if not isinstance(layout, Layout):
            raise TypeError(f"layout must be a visionpe.Layout; got {type(layout).__name__}")
        if layout.ndim != 2:
            raise ValueError(f"iRPE needs a 2D layout grid (h, w); got {layout.grid}")
        if layout.num_prefix_tokens and not self.num_prefix_tokens:
            raise ValueError(f"layout has {layout.num_prefix_tokens} prefix tokens but the encoder was built with "
                             f"num_prefix_tokens=0, so its tables have no prefix bucket")
        offsets = offset_table(self.method, self.ratio, layout.grid, device)
        offsets = offsets.view(-1, *offsets.shape[-2:])
        shift = torch.arange(offsets.shape[0], device=device) * self.num_buckets   # merged-table columns
        return grid_buckets(layout, offsets + shift.view(-1, 1, 1),
                            (shift + num_buckets(self.method, self.ratio, 0)).view(-1, 1).expand(-1, 3))

    def value_term(self, attn: torch.Tensor, layout: Layout, block: int = 0) -> Optional[torch.Tensor]:
        """attn: (B, H, N, N) probabilities -> ``(B, H, N, head_dim)`` = ``sum_j attn[i, j] U[b(i, j)]``, or None."""
        if self.rpe_v is None:
            return None
        B, H, n, _ = attn.shape
        layout.check(n, "attn")
        idx = self._indices(layout, attn.device)
        # bucket sums per query, (B, H, N, nbc), then one matmul with the (H', nbc, d) table
        sums = attn.new_zeros(B, H, n, self._nbc)
        for ids in idx["gather"]:
            sums = sums.scatter_add(-1, ids.expand(B, H, n, n), attn)
        return head_matmul(sums, self.rpe_v[block].merged().to(attn.dtype))

    # -- model integration --------------------------------------------------------------------------------
    def absolute_table(self) -> Optional[AbsoluteTable]:
        return self.ape

    def _prune_own_blocks(self, depth: int) -> None:
        for side in "qkv":
            tables = getattr(self, f"rpe_{side}")
            if tables is not None:
                del tables[depth:]

    def no_weight_decay(self) -> set:
        names = {f"ape.{n}" for n in self.ape.no_weight_decay()} if self.ape is not None else set()
        if not self.rpe_weight_decay:
            names |= {n for n, _ in self.named_parameters() if n.startswith("rpe_")}
        return names

    def block_param_index(self, name: str) -> int | str | None:
        if name.startswith("rpe_"):
            return int(name.split(".")[1])
        return None

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, method={self.method}, mode={self.mode}, rpe_on={self.rpe_on!r}, "
                f"shared_head={self.shared_head}, ratio={self.ratio}, buckets={self.num_buckets}, "
                f"ape={self.ape is not None}")


def _load_old_ape_key(module: IRPE, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: before iRPE held a :class:`LearnedAPE`, its table was ``pos_embed``; it is now
    ``ape.pos_embed``. Old checkpoints are renamed on the fly (a model without ``ape`` reports the old key as
    unexpected, as before)."""
    old, new = f"{prefix}pos_embed", f"{prefix}ape.pos_embed"
    if module.ape is not None and old in state_dict and new not in state_dict:
        state_dict[new] = state_dict.pop(old)


def _register_old_key_loader(module: IRPE) -> None:
    register = getattr(module, "register_load_state_dict_pre_hook", None)  # public since torch 2.5
    if register is not None:
        register(_load_old_ape_key)
    else:  # pragma: no cover - torch < 2.5
        module._register_load_state_dict_pre_hook(_load_old_ape_key, with_module=True)


_OFFICIAL_KEY = re.compile(r"^(?:module\.)?blocks\.(\d+)\.attn\.(rpe_[qkv])\.(.+)$")


def convert_official_state_dict(state_dict: dict) -> dict:
    """Official iRPE DeiT checkpoint -> keys of ``VisionPEViT(pe='irpe*')``.

    ``blocks.{l}.attn.rpe_k.lookup_table_weight`` becomes ``pe.rpe_k.{l}.lookup_table_weight`` (likewise
    ``rpe_q``/``rpe_v`` and cross's ``rp_rows``/``rp_cols``); ``pos_embed`` becomes ``pe.ape.pos_embed``; every other
    key (timm ViT naming) is kept. Unwraps ``{'model': ...}``.
    """
    sd = state_dict.get("model", state_dict) if isinstance(state_dict, dict) else state_dict
    if not isinstance(sd, dict):
        raise TypeError(f"state_dict must be a dict; got {type(sd).__name__}")
    out = {}
    for key, val in sd.items():
        m = _OFFICIAL_KEY.match(key)
        if m:
            out[f"pe.{m.group(2)}.{m.group(1)}.{m.group(3)}"] = val
        elif key in ("pos_embed", "module.pos_embed"):
            out["pe.ape.pos_embed"] = val
        else:
            out[key[len("module."):] if key.startswith("module.") else key] = val
    return out
