"""iRPE bucketing: the piecewise index function and the 2D offset -> bucket-id maps.

Wu et al., "Rethinking and Improving Relative Position Encoding for Vision Transformer" (ICCV 2021).
The arithmetic follows the released code (Cream/iRPE) number for number, because pretrained tables are
indexed by these ids:

* ``alpha, beta, gamma = ratio, 2 * ratio, 8 * ratio``; ``Bi = floor(beta)``.
* ``g(x) = x`` for ``|x| <= alpha`` (float inputs rounded half-to-even), otherwise
  ``sign(x) * min(round(alpha + ln(|x|/alpha) / ln(gamma/alpha) * (beta - alpha)), beta)`` truncated to int.
* ``euc``: ``g(round(sqrt(dr^2 + dc^2))) + Bi``; ``quant``: ``g(dr^2 + dc^2) + Bi`` (the squared distance,
  as the code does; the paper ranks distances); ``cross``: two tables, ``g(dr) + Bi`` and ``g(dc) + Bi``;
  ``product``: ``(g(dr) + Bi) * (2 Bi + 1) + g(dc) + Bi``. Offsets are query minus key.
* Prefix tokens (class, distillation, registers) all share ONE extra bucket with id ``nb`` (checkpoint
  compatible: the official tables have ``nb + 1`` rows whenever there is any prefix token).

Everything here is computed once per (grid, prefix, config) and cached by the encoder
(:class:`visionpe.cache.TableCache`).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .layout import relative_offsets

__all__ = ["METHODS", "canonical_method", "piecewise_params", "piecewise_index", "num_buckets",
           "offset_table", "bucket_ids"]

#: accepted spellings -> canonical method name
METHODS = {"euc": "euc", "euclidean": "euc", "quant": "quant", "quantization": "quant",
           "cross": "cross", "product": "product"}


def canonical_method(method) -> str:
    """``'euclidean'``/``'euc'`` ... -> one of ``euc, quant, cross, product``; anything else raises."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, one of {sorted(METHODS)}; got {type(method).__name__}")
    key = method.lower()
    if key not in METHODS:
        raise ValueError(f"unknown iRPE method {method!r}; expected one of {sorted(METHODS)}")
    return METHODS[key]


def piecewise_params(ratio) -> tuple[float, float, float]:
    """``ratio -> (alpha, beta, gamma) = (ratio, 2 ratio, 8 ratio)``; ``ratio`` must be a positive number."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a positive number; got {type(ratio).__name__} {ratio!r}")
    if not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(f"ratio must be a finite number > 0; got {ratio!r}")
    return 1.0 * ratio, 2.0 * ratio, 8.0 * ratio


def piecewise_index(x: torch.Tensor, alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """The piecewise index function ``g`` (Eq. 18 of the paper, as released): any shape -> same shape int64.

    Integer inputs with ``|x| <= alpha`` pass through; float inputs there are rounded half-to-even.
    The log branch is evaluated in float32 (the default dtype the official code ran in) with the same
    operation order, then clipped at the float ``beta`` and truncated toward zero.
    """
    if not (0 < alpha < beta < gamma):
        raise ValueError(f"piecewise_index needs 0 < alpha < beta < gamma; got {alpha}, {beta}, {gamma}")
    ax = x.abs()
    far = (alpha + torch.log(ax.to(torch.float32).clamp_min(alpha) / alpha) / math.log(gamma / alpha)
           * (beta - alpha)).round().clip(max=beta)
    far = (torch.sign(x).to(torch.float32) * far).to(torch.int64)
    near = x.round().to(torch.int64) if x.is_floating_point() else x.to(torch.int64)
    return torch.where(ax <= alpha, near, far)


def num_buckets(method: str, ratio, num_prefix_tokens: int = 0) -> int:
    """Rows of one lookup table: ``2 Bi + 1`` (``(2 Bi + 1)^2`` for product), +1 with any prefix token.

    For ``cross`` this is the size of EACH of the two tables.
    """
    method = canonical_method(method)
    bi = int(piecewise_params(ratio)[1])
    nb = (2 * bi + 1) ** 2 if method == "product" else 2 * bi + 1
    return nb + (1 if num_prefix_tokens > 0 else 0)


def offset_table(method: str, ratio: float, grid: Sequence[int], device=None) -> torch.Tensor:
    """Bucket id of every 2D offset on a ``(h, w)`` grid, without the prefix bucket.

    Returns ``(2h-1, 2w-1)`` int64 with ``[dr + h - 1, dc + w - 1]`` the id of offset (dr, dc) (query minus
    key), or for ``cross`` a ``(2, 2h-1, 2w-1)`` stack of the row-table and column-table ids.
    """
    method = canonical_method(method)
    alpha, beta, gamma = piecewise_params(ratio)
    bi = int(beta)
    h, w = grid
    dr = torch.arange(-(h - 1), h, device=device).view(-1, 1).expand(2 * h - 1, 2 * w - 1)
    dc = torch.arange(-(w - 1), w, device=device).view(1, -1).expand(2 * h - 1, 2 * w - 1)
    if method == "euc":
        # distance rounded to an integer BEFORE g (so the float branch of g sees integral values)
        dist = (dr * dr + dc * dc).to(torch.float32).sqrt().round()
        return piecewise_index(dist, alpha, beta, gamma) + bi
    if method == "quant":
        return piecewise_index(dr * dr + dc * dc, alpha, beta, gamma) + bi
    gr = piecewise_index(dr, alpha, beta, gamma) + bi
    gc = piecewise_index(dc, alpha, beta, gamma) + bi
    if method == "cross":
        return torch.stack([gr, gc])
    return gr * (2 * bi + 1) + gc


def bucket_ids(method: str, ratio: float, grid: Sequence[int], num_prefix_tokens: int = 0,
               device=None) -> torch.Tensor:
    """Token-pair bucket ids ``(N, N)`` int64 (``(2, N, N)`` for cross: rows, cols), ``N = S + h*w``.

    Patches are row-major after the ``S`` prefix tokens; every pair that involves a prefix token gets the
    single extra bucket ``nb`` (the table size without it).
    """
    method = canonical_method(method)
    if len(tuple(grid)) != 2:
        raise ValueError(f"iRPE buckets need a 2D grid (h, w); got {tuple(grid)}")
    h, w = grid
    table = offset_table(method, ratio, grid, device)
    dr, dc = relative_offsets((h, w), device=device)
    ids = table[..., dr + h - 1, dc + w - 1]
    s = num_prefix_tokens
    if s:
        extra = num_buckets(method, ratio, 0)
        ids = torch.nn.functional.pad(ids, (s, 0, s, 0), value=extra)
    return ids
