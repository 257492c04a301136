"""LightNet's multi-dimensional linearized relative position encoding, MD-LRPE (Qin et al. 2024,
arXiv 2405.21022). Its companion MD-TPE lives in :mod:`visionpe.encoders.mdtpe`.

**MD-LRPE** is a q/k transform whose dot products depend only on the per-axis offsets of two grid
tokens. Each head channel is assigned to ONE grid axis (consecutive channel blocks; block 0 is the
first, slowest axis: rows, or time for video) and a frequency of its head. Two forms exist in the first
author's code (the official LightNet repository was not available; see the spec):

* ``form="cosine"`` (xopes ``lrpe_cosine_md``, the LightNet operator family, our default):
  ``x -> [x * cos A || x * sin A]`` doubles the width; ``<q', k'> = sum_j q_j k_j cos(A_p[j] - A_r[j])``.
  With ``e`` frequencies per head, channel ``j`` uses axis ``j // e`` and ``theta[h, j % e]``.
* ``form="rotate"`` (vector-quantize ``MdLrpe(lrpe_type=1)``): axial RoPE with a per-axis channel split,
  interleaved pairs; pair ``j`` uses axis ``j // k`` and ``theta[h, j % k]`` with ``k = head_dim / (2A)``.

Both go through the shared rotary core (``visionpe.rotary``): a per-head frequency matrix ``(H, A, F)``,
``rotary_angles`` (float32 for grid coordinates), identity rows for prefix tokens.

**Softmax attention** (the ``rotate`` hook): the cosine form returns q and k of width ``2 * head_dim``.
SDPA derives its default scale from ``q.shape[-1]`` (``1/sqrt(2 d)``), while the logits must keep
``1/sqrt(d)`` (``q'.k'`` at zero offset equals ``q.k``). ``VisionPEViT`` calls SDPA with the default scale,
so ``rotate`` multiplies q by ``sqrt(2)`` (folded into q's cos/sin table, no extra op). Hosts that pass
an explicit ``scale=1/sqrt(head_dim)`` must use :meth:`MDLRPE.transform` on q instead.

**Linear attention** (what LightNet uses): :func:`md_lrpe_linear_attention`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..base import PositionEncoder, register_encoder
from ..layout import Layout, as_grid, grid_positions
from ..rotary import inv_freq, pad_prefix, rotary_angles, rotate_interleaved, rotation_table

__all__ = [
    "md_lrpe_cosine", "md_lrpe_rotate", "md_lrpe_freq_matrix", "cosine_theta_init", "rotate_theta_init",
    "md_lrpe_linear_attention", "MDLRPE",
]

_FORMS = ("cosine", "rotate")


# -- frequencies ----------------------------------------------------------------------------------------
def cosine_theta_init(num_heads: int, num_freqs: int, base: float = 10000.0) -> torch.Tensor:
    """``(H, e)`` ladder continuing across heads, ``base ** (-(h*e + i) / (H*e))`` (float64, then float32).

    Not an upstream default (xopes takes theta as an argument); see the spec, section C.2.
    """
    i = torch.arange(num_heads * num_freqs, dtype=torch.float64)
    return (base ** (-i / (num_heads * num_freqs))).to(torch.float32).reshape(num_heads, num_freqs)


def rotate_theta_init(num_heads: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """``(H, d/2)`` buffer of ``MdLrpe(lrpe_type=1)``: ``base ** (-2 (h*d/2 + j) / (H*d))``, one ladder over heads."""
    half = head_dim // 2
    return inv_freq(num_heads * half, base, step_denominator=num_heads * half).reshape(num_heads, half)


def md_lrpe_freq_matrix(theta: torch.Tensor, num_axes: int, width: int, block: int) -> torch.Tensor:
    """Per-head frequency matrix ``(H, A, width)``: column ``j`` is driven by axis ``j // block`` alone,
    with frequency ``theta[h, j % block]``.

    ``width`` is ``head_dim`` (cosine form, ``block = e``) or ``head_dim / 2`` pairs (rotate form,
    ``block = head_dim / (2A)``). Built with a one-hot mask (no in-place writes) so a learnable theta gets
    gradients.
    """
    j = torch.arange(width, device=theta.device)
    axis_of = j // block
    onehot = (axis_of.unsqueeze(0) == torch.arange(num_axes, device=theta.device).unsqueeze(1))  # (A, width)
    freq = theta[..., j % block]                                                                  # (..., H, width)
    return freq.unsqueeze(-2) * onehot.to(freq.dtype)


def _check_qk(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor (B, H, N, head_dim); got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (B, H, N, head_dim); got {tuple(x.shape)}")


def _check_theta(theta: torch.Tensor, heads: int, needed: int, what: str) -> None:
    if not isinstance(theta, torch.Tensor) or theta.ndim != 2 or theta.shape[0] != heads:
        got = tuple(theta.shape) if isinstance(theta, torch.Tensor) else type(theta).__name__
        raise ValueError(f"theta must have shape (H={heads}, e) for {what}; got {got}")
    if theta.shape[1] < needed:
        raise ValueError(f"theta has e={theta.shape[1]} frequencies per head but {what} needs e >= {needed}")


def _grid_and_tokens(x: torch.Tensor, grid, num_prefix: int, name: str = "x"):
    grid = as_grid(grid, "grid")
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, int) or num_prefix < 0:
        raise ValueError(f"num_prefix must be an int >= 0; got {num_prefix!r}")
    Layout(grid, num_prefix).check(x.shape[-2], name)
    return grid


# -- the two transforms (functional, golden-vector rules) --------------------------------------------------
def cosine_table(angles: torch.Tensor, num_prefix: int = 0, scale: float = 1.0) -> torch.Tensor:
    """Angles ``(..., N, d)`` -> ``(..., P + N, 2, d)`` stacked ``scale * (cos, sin)``; prefix rows ``(1, 0)``."""
    cos = pad_prefix(angles.cos(), num_prefix, 1.0)
    sin = pad_prefix(angles.sin(), num_prefix, 0.0)
    table = torch.stack([cos, sin], dim=-2)
    return table * scale if scale != 1.0 else table


def apply_cosine_table(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``x (B, H, N, d)``, table ``(H, N, 2, d)`` -> ``[x*cos || x*sin]`` ``(B, H, N, 2d)`` in x's dtype.

    One broadcast multiply: ``(.., N, 1, d) * (.., N, 2, d)`` flattened is the cos block then the sin block.
    """
    return (x.unsqueeze(-2) * table).flatten(-2).to(x.dtype)


def md_lrpe_cosine(x: torch.Tensor, theta: torch.Tensor, grid: Sequence[int], num_prefix: int = 0) -> torch.Tensor:
    """MD-LRPE, cosine form (xopes ``lrpe_cosine_md_torch`` rule).

    Args:
        x: ``(B, H, P + prod(grid), d)``.
        theta: ``(H, e)`` with ``e >= ceil(d / A)``; channel ``j`` uses axis ``j // e`` and ``theta[h, j % e]``
            (the last axis gets fewer channels when ``A * e > d``).
        grid: ``(h, w)`` or ``(t, h, w)``, row-major patch order.
        num_prefix: leading tokens left without position (output ``[x || 0]``).
    Returns:
        ``(B, H, P + N, 2d)``.
    """
    _check_qk(x, "x")
    grid = _grid_and_tokens(x, grid, num_prefix)
    d, m = x.shape[-1], len(grid)
    _check_theta(theta, x.shape[1], -(-d // m), f"head_dim={d} over {m} grid axes")
    e = theta.shape[1]
    if (m - 1) * e >= d:
        raise ValueError(f"theta has e={e} frequencies per head, so head_dim={d} channels in blocks of {e} "
                         f"leave grid axis {m - 1} without channels; use e = ceil(d/A) = {-(-d // m)}")
    w = md_lrpe_freq_matrix(theta, m, d, e)                                  # (H, A, d)
    ang = rotary_angles(grid_positions(grid, device=x.device), w)            # (H, N, d)
    return apply_cosine_table(x, cosine_table(ang, num_prefix))


def md_lrpe_rotate(x: torch.Tensor, theta: torch.Tensor, grid: Sequence[int], num_prefix: int = 0) -> torch.Tensor:
    """MD-LRPE, rotate form (``MdLrpe(lrpe_type=1)`` rule): interleaved pairs, axis split per pair block.

    Args:
        x: ``(B, H, P + prod(grid), d)`` with ``d`` divisible by ``2A``.
        theta: ``(H, >= d/(2A))``; pair ``j`` uses axis ``j // k`` and ``theta[h, j % k]``, ``k = d/(2A)``
            (the upstream buffer is ``(H, d/2)``; only its first ``k`` columns are used).
        grid, num_prefix: as :func:`md_lrpe_cosine`; prefix tokens are not rotated.
    Returns:
        ``(B, H, P + N, d)``.
    """
    _check_qk(x, "x")
    grid = _grid_and_tokens(x, grid, num_prefix)
    d, m = x.shape[-1], len(grid)
    _check_split(d, m)
    k = d // (2 * m)
    _check_theta(theta, x.shape[1], k, f"head_dim={d} over {m} grid axes (d/(2A))")
    w = md_lrpe_freq_matrix(theta[:, :k], m, d // 2, k)                      # (H, A, d/2)
    ang = rotary_angles(grid_positions(grid, device=x.device), w)            # (H, N, d/2)
    return rotate_interleaved(x, rotation_table(ang, num_prefix))


def _check_split(head_dim: int, num_axes: int) -> None:
    if head_dim % (2 * num_axes):
        raise ValueError(f"MD-LRPE rotate form splits head_dim into {num_axes} axis groups of channel pairs, "
                         f"so head_dim must be divisible by 2*{num_axes}={2 * num_axes}; got head_dim={head_dim}")


# -- the encoder ---------------------------------------------------------------------------------------
@register_encoder("mdlrpe", "MD-LRPE (LightNet), cosine form: per-axis channel split, doubles q/k width; 2D/3D")
@register_encoder("mdlrpe_rotate", "MD-LRPE (LightNet), rotate form: axial RoPE with per-axis channel split; 2D/3D",
                  form="rotate")
class MDLRPE(PositionEncoder):
    """MD-LRPE through the ``rotate`` hook.

    Args:
        form: ``"cosine"`` (default; q/k become ``2*head_dim`` wide, q pre-scaled by sqrt(2), see the module
            docstring) or ``"rotate"`` (same width; needs ``head_dim % (2A) == 0``).
        base: frequency base of the fixed ladders (:func:`cosine_theta_init`, :func:`rotate_theta_init`).
        learnable_theta: theta becomes a parameter ``(depth, H, e)``, one per block (LightNet has one LRPE
            module per layer); otherwise fixed frequencies shared by all blocks (derived from ``base``, not
            state: a float32 CPU tensor that ``.to()`` leaves alone) and the tables are cached.

    The number of grid axes A follows ``grid_size`` (2 or 3); a layout with another number of axes is an
    error. Prefix tokens get angle 0 (cosine: ``[x || 0]``; rotate: identity).
    """

    hooks = frozenset({"rotate"})

    def __init__(self, dim: int, num_heads: int = 1, depth: int = 1, grid_size: Sequence[int] = (14, 14),
                 num_prefix_tokens: int = 1, form: str = "cosine", base: float = 10000.0,
                 learnable_theta: bool = False):
        super().__init__(dim, num_heads, depth, grid_size, num_prefix_tokens)
        if form not in _FORMS:
            raise ValueError(f"form must be one of {_FORMS}; got {form!r}")
        if not base > 0:
            raise ValueError(f"base must be > 0; got {base!r}")
        self.form, self.base, self.learnable_theta = form, float(base), bool(learnable_theta)
        d, m = self.head_dim, len(self.grid_size)
        self.num_axes = m
        if form == "rotate":
            _check_split(d, m)
            self.block_width = d // (2 * m)
            theta = rotate_theta_init(num_heads, d, base)[:, :self.block_width]
        else:
            self.block_width = -(-d // m)
            theta = cosine_theta_init(num_heads, self.block_width, base)
        if self.learnable_theta:
            self.theta = nn.Parameter(theta.unsqueeze(0).repeat(depth, 1, 1))
        else:
            self.theta = theta

    # -- tables -------------------------------------------------------------------------------------
    def positions(self, layout: Layout, device) -> torch.Tensor:
        if layout.ndim != self.num_axes:
            raise ValueError(f"MD-LRPE was built for {self.num_axes}D grid coordinates (grid_size="
                             f"{self.grid_size}); got a {layout.ndim}D layout grid {layout.grid}")
        return self.table_cache.get("positions", layout.grid, device, torch.float32,
                                    lambda: grid_positions(layout.grid, device=device))

    def _angles(self, layout: Layout, block: int, device) -> torch.Tensor:
        theta = self.theta[block] if self.learnable_theta else self.theta
        width = self.head_dim if self.form == "cosine" else self.head_dim // 2
        w = md_lrpe_freq_matrix(theta.to(device), self.num_axes, width, self.block_width)
        return rotary_angles(self.positions(layout, device), w)             # (H, N, width)

    def tables(self, layout: Layout, block: int, device):
        """``(q_table, k_table)``: cosine ``(H, P+N, 2, d)`` each (q's times sqrt(2)); rotate: one rotation
        table used for both. Cached per layout/device when theta is fixed."""
        if self.learnable_theta:
            return self._build_tables(layout, block, device)
        return self.table_cache.get("tables", layout, device, torch.float32,
                                    lambda: self._build_tables(layout, block, device))

    def _build_tables(self, layout: Layout, block: int, device):
        ang = self._angles(layout, block, device)
        p = layout.num_prefix_tokens
        if self.form == "cosine":
            k_tab = cosine_table(ang, p)
            return k_tab * math.sqrt(2.0), k_tab
        tab = rotation_table(ang, p)
        return tab, tab

    def _apply_table(self, x, table):
        return apply_cosine_table(x, table) if self.form == "cosine" else rotate_interleaved(x, table)

    # -- hooks ----------------------------------------------------------------------------------------
    def transform(self, x: torch.Tensor, layout: Layout, block: int = 0) -> torch.Tensor:
        """The plain MD-LRPE transform of q or k ``(B, H, P+N, d)`` (no attention-scale correction):
        cosine -> ``(B, H, P+N, 2d)``, rotate -> ``(B, H, P+N, d)``. Use this for linear attention."""
        _check_qk(x, "x")
        layout.check(x.shape[-2], "x")
        return self._apply_table(x, self.tables(layout, block, x.device)[1])

    def rotate(self, q: torch.Tensor, k: torch.Tensor, layout: Layout,
               block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k ``(B, H, P+N, d)`` -> cosine: ``(B, H, P+N, 2d)`` each, q times sqrt(2) so SDPA's default
        scale ``1/sqrt(2d)`` gives the original ``1/sqrt(d)`` logits; rotate: same shape."""
        _check_qk(q, "q")
        layout.check(q.shape[-2], "q")
        tq, tk = self.tables(layout, block, q.device)
        return self._apply_table(q, tq), self._apply_table(k, tk)

    def no_weight_decay(self) -> set:
        return {"theta"} if self.learnable_theta else set()

    def _prune_own_blocks(self, depth: int) -> None:
        if self.learnable_theta and depth < self.theta.shape[0]:
            with torch.no_grad():
                kept = self.theta[:depth].clone()
            self.theta = nn.Parameter(kept, requires_grad=self.theta.requires_grad)

    def block_param_index(self, name: str) -> int | str | None:
        # one tensor spans every block: it joins the last layer-decay group, as RoPE-Mixed's freqs
        return "last" if name == "theta" else None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, form={self.form}, e={self.block_width}, learnable={self.learnable_theta}"


def md_lrpe_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout,
                             lrpe: MDLRPE, block: int = 0, q_act: str = "silu",
                             k_act: str = "softmax") -> torch.Tensor:
    """Non-causal linear attention with MD-LRPE, LightNet's placement: ``o = q' (k'^T v)``.

    ``q' = LRPE(q_act(q))`` and ``k' = LRPE(k_act(k))``: the transform comes after the feature map.
    ``k_act="softmax"`` normalises each key channel over the sequence (LightNet's global additive
    recurrence ends in ``sum_s softmax_s(k) k_s^T v_s``); no denominator is applied (LightNet normalises the
    output instead). Cost is linear in N: the state is ``(B, H, d', dv)`` with ``d' = 2d`` (cosine) or ``d``.

    Args:
        q, k: ``(B, H, P+N, d)``; v: ``(B, H, P+N, dv)``.
        lrpe: an :class:`MDLRPE` encoder (either form).
        q_act: ``"silu"``, ``"elu1"`` (ELU+1) or ``"none"``; k_act: ``"softmax"``, ``"elu1"``, ``"silu"``, ``"none"``.
    Returns:
        ``(B, H, P+N, dv)``.
    """
    acts = {"none": lambda t: t, "silu": F.silu, "elu1": lambda t: F.elu(t) + 1.0,
            "softmax": lambda t: t.softmax(dim=-2)}
    for name, act, allowed in (("q_act", q_act, ("none", "silu", "elu1")),
                               ("k_act", k_act, ("none", "silu", "elu1", "softmax"))):
        if act not in allowed:
            raise ValueError(f"{name} must be one of {allowed}; got {act!r}")
    _check_qk(v, "v")
    if v.shape[:3] != q.shape[:3] or k.shape != q.shape:
        raise ValueError(f"q, k must have equal shapes and v the same (B, H, N); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    qf = lrpe.transform(acts[q_act](q), layout, block)
    kf = lrpe.transform(acts[k_act](k), layout, block)
    state = kf.transpose(-2, -1) @ v                                         # (B, H, d', dv)
    return qf @ state
