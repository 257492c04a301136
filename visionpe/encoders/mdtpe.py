"""LightNet's multi-dimensional Toeplitz position encoding, MD-TPE (Qin et al. 2024, arXiv 2405.21022), and
LightNet's pairing of it with MD-LRPE (:mod:`visionpe.encoders.mdlrpe`).

**MD-TPE** (xmixers ``MdTpe``): per grid axis, a causal exponential Toeplitz scan per head
``u[t] = c_h sum_{s<=t} lambda_h^(t-s) x[s]``, an RMSNorm over the full width (eps on the SUM of squares),
a bias-free projection; the per-axis outputs are summed. It runs once on the patch tokens (``embed`` hook).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..base import PositionEncoder, register_encoder
from ..layout import Layout
from .mdlrpe import MDLRPE

__all__ = ["md_tpe", "md_tpe_kernel", "AxisTPE", "MDTPE", "MDTPEWithMDLRPE"]


def md_tpe_kernel(length: int, log_decay: torch.Tensor, coef: torch.Tensor,
                  bidirectional: bool = False) -> torch.Tensor:
    """Per-head Toeplitz kernel ``(H, L, L)``: ``coef_h * lambda_h^(t-s)`` for ``s <= t`` (0 above), or
    ``lambda_h^|t-s|`` when ``bidirectional``; ``lambda = sigmoid(log_decay)``."""
    idx = torch.arange(length, device=log_decay.device)
    diff = idx.unsqueeze(1) - idx.unsqueeze(0)                               # t - s
    dist = diff.abs() if bidirectional else diff.clamp(min=0)
    # exponent clamped before exp: masked-out entries would otherwise be exp(+big) and poison gradients
    kern = torch.exp(dist.to(log_decay.dtype) * F.logsigmoid(log_decay)[:, None, None])
    if not bidirectional:
        kern = kern * (diff >= 0).to(kern.dtype)
    return coef[:, None, None] * kern


class AxisTPE(nn.Module):
    """TPE along one grid axis (xmixers ``Tpe``): parameters ``q, k (D,)``, ``log_decay (H,)``,
    ``norm_weight (D,)``, ``o_proj (D, D)`` without bias. Upstream init: q = k = 1, log_decay = 0 (lambda 1/2),
    norm weight 1, ``o_proj`` zero (``"zero"``) or xavier with gain 0.01 (``"xavier"``)."""

    def __init__(self, dim: int, num_heads: int, o_proj_init: str = "zero"):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.q = nn.Parameter(torch.ones(dim))
        self.k = nn.Parameter(torch.ones(dim))
        self.log_decay = nn.Parameter(torch.zeros(num_heads))
        self.norm_weight = nn.Parameter(torch.ones(dim))
        self.o_proj = nn.Linear(dim, dim, bias=False)
        if o_proj_init == "zero":
            nn.init.zeros_(self.o_proj.weight)
        elif o_proj_init == "xavier":
            nn.init.xavier_uniform_(self.o_proj.weight, gain=0.01)
        else:
            raise ValueError(f"o_proj_init must be 'zero' or 'xavier'; got {o_proj_init!r}")

    def forward(self, x: torch.Tensor, axis: int, bidirectional: bool = False) -> torch.Tensor:
        """x ``(B, *grid, D)``; scans grid axis ``axis`` (0 = first) -> ``(B, *grid, D)``."""
        m = x.ndim - 2
        coef = (self.q * self.k).view(self.num_heads, -1).sum(-1)           # c_h
        kern = md_tpe_kernel(x.shape[1 + axis], self.log_decay, coef, bidirectional).to(x.dtype)
        letters = "xyz"[:m]
        src = "b" + letters.replace(letters[axis], "s") + "hc"
        dst = "b" + letters.replace(letters[axis], "t") + "hc"
        u = torch.einsum(f"hts,{src}->{dst}", kern, x.unflatten(-1, (self.num_heads, -1))).flatten(-2)
        z = u * torch.rsqrt(u.pow(2).sum(-1, keepdim=True) + 1e-5) * math.sqrt(self.dim) * self.norm_weight
        return self.o_proj(z)


def md_tpe(x: torch.Tensor, axes: nn.ModuleList, bidirectional: bool = False) -> torch.Tensor:
    """MD-TPE: ``sum_a axes[a](x, a)`` for ``x (B, *grid, D)`` with one :class:`AxisTPE` per grid axis."""
    if x.ndim - 2 != len(axes):
        raise ValueError(f"x must have shape (B, *grid, D) with {len(axes)} grid axes; got {tuple(x.shape)}")
    out = axes[0](x, 0, bidirectional)
    for a in range(1, len(axes)):
        out = out + axes[a](x, a, bidirectional)
    return out


@register_encoder("mdtpe", "MD-TPE (LightNet): per-axis causal decaying Toeplitz scan on patch tokens, summed; 2D/3D")
class MDTPE(PositionEncoder):
    """MD-TPE on the patch tokens after the input embedding (``embed`` hook); prefix tokens untouched.

    Args:
        residual: ``x + MD-TPE(x)`` (default; with the zero-init ``o_proj`` the model starts as NoPE) or, when
            False, the output replaces the patch tokens as in xmixers' LM (which would zero them at init).
        bidirectional: symmetric kernel ``lambda^|t-s|`` instead of upstream's causal scan (top-to-bottom,
            left-to-right only).
        o_proj_init: ``"zero"`` or ``"xavier"`` (gain 0.01), the two upstream choices.
    """

    hooks = frozenset({"embed"})

    def __init__(self, dim: int, num_heads: int = 1, depth: int = 1, grid_size: Sequence[int] = (14, 14),
                 num_prefix_tokens: int = 1, residual: bool = True, bidirectional: bool = False,
                 o_proj_init: str = "zero"):
        super().__init__(dim, num_heads, depth, grid_size, num_prefix_tokens)
        self.residual, self.bidirectional = bool(residual), bool(bidirectional)
        self.num_axes = len(self.grid_size)
        self.axes = nn.ModuleList(AxisTPE(dim, num_heads, o_proj_init) for _ in range(self.num_axes))

    def embed(self, x: torch.Tensor, layout: Layout, stage: int = -1) -> torch.Tensor:
        """x ``(B, P+N, dim)`` -> same shape; the scan runs on the ``(B, *grid, dim)`` patch tokens."""
        layout.check(x.shape[1])
        if layout.ndim != self.num_axes:
            raise ValueError(f"MD-TPE was built for {self.num_axes}D grids (grid_size={self.grid_size}); "
                             f"got a {layout.ndim}D layout grid {layout.grid}")
        p = layout.num_prefix_tokens
        patches = x[:, p:]
        y = md_tpe(patches.unflatten(1, layout.grid), self.axes, self.bidirectional).flatten(1, -2)
        if self.residual:
            y = patches + y
        return torch.cat([x[:, :p], y], dim=1) if p else y


@register_encoder("mdtpe_mdlrpe", "LightNet's pair: MD-TPE after the embedding + MD-LRPE (cosine) in every attention")
class MDTPEWithMDLRPE(PositionEncoder):
    """MD-TPE (``embed``) and MD-LRPE (``rotate``) together, the LightNet placement. Options: those of
    :class:`MDLRPE` (``form``, ``base``, ``learnable_theta``) and :class:`MDTPE` (``residual``,
    ``bidirectional``, ``o_proj_init``)."""

    hooks = frozenset({"embed", "rotate"})

    def __init__(self, dim: int, num_heads: int = 1, depth: int = 1, grid_size: Sequence[int] = (14, 14),
                 num_prefix_tokens: int = 1, form: str = "cosine", base: float = 10000.0,
                 learnable_theta: bool = False, residual: bool = True, bidirectional: bool = False,
                 o_proj_init: str = "zero"):
        super().__init__(dim, num_heads, depth, grid_size, num_prefix_tokens)
        ctx = dict(dim=dim, num_heads=num_heads, depth=depth, grid_size=grid_size,
                   num_prefix_tokens=num_prefix_tokens)
        self.tpe = MDTPE(**ctx, residual=residual, bidirectional=bidirectional, o_proj_init=o_proj_init)
        self.lrpe = MDLRPE(**ctx, form=form, base=base, learnable_theta=learnable_theta)

    def embed(self, x: torch.Tensor, layout: Layout, stage: int = -1) -> torch.Tensor:
        return self.tpe.embed(x, layout, stage)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, layout: Layout,
               block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lrpe.rotate(q, k, layout, block)

    def no_weight_decay(self) -> set:
        return {f"lrpe.{n}" for n in self.lrpe.no_weight_decay()}

    def block_param_index(self, name: str) -> int | str | None:
        return self.lrpe.block_param_index(name[len("lrpe."):]) if name.startswith("lrpe.") else None
