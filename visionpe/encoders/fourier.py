"""Learnable Fourier features (LFF) positional encoding, Li et al., NeurIPS 2021 (arXiv 2106.02795).

The mapping (Algorithm 1 of the paper, as both public implementations compute it):

1. ``P = X W_r^T`` with ``X: (N, G, M)`` (N positions, G positional groups of M coordinates) and the
   learnable frequencies ``W_r: (F/2, M)``;
2. ``r = [cos P || sin P] / sqrt(F)``: cos block first, then sin block (not interleaved); the normaliser
   is the Fourier width F (not the output width D, whatever the issue text says; see the spec);
3. ``Y = GELU(r W1^T + b1) W2^T + b2``: one hidden layer of width H, output ``D/G`` per group;
4. groups are concatenated in order: group g fills columns ``[g*D/G, (g+1)*D/G)``. All groups share
   ``W_r``, ``W1`` and ``W2``.

:class:`LearnableFourierFeatures` is that mapping for arbitrary coordinates;
:class:`FourierPE` is the ViT encoder (``embed`` hook) that computes the coordinates of the layout's
grid every forward, so it works at any resolution, for 2D ``(h, w)`` and 3D ``(t, h, w)`` grids.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..base import PositionEncoder, register_encoder
from ..layout import Layout, as_grid, grid_positions

__all__ = ["LearnableFourierFeatures", "FourierPE", "lff_grid_coordinates", "lff_init_std"]

#: W_r initialisation conventions found in the wild (spec A.2); values are functions of gamma
_INIT_CONVENTIONS = {
    "paper": lambda g: 1.0 / g,          # N(0, gamma^-2) read as variance -> std 1/gamma
    "inv_gamma_sq": lambda g: g ** -2,   # willGuimont's pip package
    "gamma_sq": lambda g: g ** 2,        # JHLew
}
_COORDS = ("normalized", "index")
_GROUP_MODES = ("joint", "axes", "corners")


def lff_init_std(init_std: Union[float, str], gamma: float) -> float:
    """Resolve ``init_std`` (a float, or one of ``"paper"`` = 1/gamma, ``"inv_gamma_sq"``, ``"gamma_sq"``)."""
    if isinstance(init_std, str):
        if init_std not in _INIT_CONVENTIONS:
            raise ValueError(f"init_std must be a float or one of {sorted(_INIT_CONVENTIONS)}; got {init_std!r}")
        return float(_INIT_CONVENTIONS[init_std](gamma))
    if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or init_std <= 0:
        raise ValueError(f"init_std must be a positive float or a convention name; got {init_std!r}")
    return float(init_std)


class LearnableFourierFeatures(nn.Module):
    """The LFF mapping ``(..., N, G, M) -> (..., N, D)`` for arbitrary real coordinates.

    Args:
        pos_dim: M, coordinates per group (2 for ``(row, col)``, 3 for ``(t, row, col)``).
        fourier_dim: F, the Fourier feature width (even); ``F/2`` learnable frequencies.
        hidden_dim: H, the MLP hidden width.
        out_dim: D, the output width; must be divisible by ``groups``.
        groups: G, positional groups (share all weights; concatenated in group order).
        gamma: the scale of the frequency prior (a Gaussian kernel of length scale gamma).
        init_std: std of ``W_r`` at init: a float or ``"paper"`` (1/gamma, default), ``"inv_gamma_sq"``
            (willGuimont), ``"gamma_sq"`` (JHLew).

    Parameters keep ``nn.Linear`` layout: ``wr.weight (F/2, M)``, ``mlp1 (H, F)``, ``mlp2 (D/G, H)``.
    """

    def __init__(self, pos_dim: int, fourier_dim: int, hidden_dim: int, out_dim: int, groups: int = 1,
                 gamma: float = 1.0, init_std: Union[float, str] = "paper"):
        super().__init__()
        for name, val in (("pos_dim", pos_dim), ("fourier_dim", fourier_dim), ("hidden_dim", hidden_dim),
                          ("out_dim", out_dim), ("groups", groups)):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name} must be a positive int; got {val!r}")
        if fourier_dim % 2:
            raise ValueError(f"fourier_dim must be even (cos and sin halves); got {fourier_dim}")
        if out_dim % groups:
            raise ValueError(f"the group count must divide the output width: out_dim={out_dim} is not "
                             f"divisible by groups={groups}")
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0; got {gamma!r}")
        self.pos_dim, self.fourier_dim, self.hidden_dim = pos_dim, fourier_dim, hidden_dim
        self.out_dim, self.groups, self.gamma = out_dim, groups, float(gamma)
        self.wr = nn.Linear(pos_dim, fourier_dim // 2, bias=False)
        self.mlp1 = nn.Linear(fourier_dim, hidden_dim)
        self.mlp2 = nn.Linear(hidden_dim, out_dim // groups)
        self.init_std = lff_init_std(init_std, self.gamma)
        nn.init.normal_(self.wr.weight, std=self.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(..., N, G, M)`` coordinates -> ``(..., N, D)`` in the parameters' dtype."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"coordinates must be a tensor of shape (..., N, G, M); got {type(x).__name__}")
        if x.ndim < 3 or x.shape[-2:] != (self.groups, self.pos_dim):
            raise ValueError(f"coordinates must have shape (..., N, G={self.groups}, M={self.pos_dim}); "
                             f"got {tuple(x.shape)}")
        if x.shape[-3] == 0:
            raise ValueError(f"coordinates hold no positions (N=0); shape {tuple(x.shape)}")
        w = self.wr.weight
        proj = x.to(w.dtype) @ w.t()                                    # (..., N, G, F/2)
        feats = torch.cat([proj.cos(), proj.sin()], dim=-1) * (self.fourier_dim ** -0.5)
        y = self.mlp2(F.gelu(self.mlp1(feats)))                        # (..., N, G, D/G)
        return y.flatten(-2)

    def extra_repr(self) -> str:
        return (f"M={self.pos_dim}, F={self.fourier_dim}, H={self.hidden_dim}, D={self.out_dim}, "
                f"G={self.groups}, gamma={self.gamma}, init_std={self.init_std:g}")


def lff_grid_coordinates(grid: Sequence[int], coords: str = "normalized", groups: str = "joint", *, device=None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Coordinates of a row-major grid for LFF: ``(N, G, M)``.

    Args:
        grid: ``(h, w)`` or ``(t, h, w)``; axis order ``ij`` (row before column), last axis fastest.
        coords: ``"normalized"``: each axis mapped linearly onto [-1, 1] (a length-1 axis sits at 0), so a
            larger grid interpolates the training range; ``"index"``: integer patch indices ``0..n-1``, so a
            larger grid extrapolates.
        groups: ``"joint"`` (G=1, M=A: all axes in one group, the paper's image setting), ``"axes"``
            (G=A, M=1: one group per axis, a separable encoding), ``"corners"`` (G=2, M=A: each patch as
            the box of its top-left and bottom-right corners, the paper's widget/box setting).
    """
    grid = as_grid(grid, "grid")
    if coords not in _COORDS:
        raise ValueError(f"coords must be one of {_COORDS}; got {coords!r}")
    if groups not in _GROUP_MODES:
        raise ValueError(f"groups must be one of {_GROUP_MODES}; got {groups!r}")
    idx = grid_positions(grid, device=device, dtype=torch.float64)     # (N, A), exact integers
    n = torch.tensor(grid, dtype=torch.float64, device=device)
    if groups == "corners":
        lo, hi = idx, idx + 1
        if coords == "normalized":    # patch edges partition [-1, 1] into n cells per axis
            lo, hi = lo * 2 / n - 1, hi * 2 / n - 1
        pos = torch.stack([lo, hi], dim=1)                             # (N, 2, A)
    else:
        if coords == "normalized":    # centres: linspace(-1, 1, n), 0 for a length-1 axis
            pos = torch.where(n > 1, idx * 2 / (n - 1).clamp(min=1) - 1, torch.zeros_like(idx))
        else:
            pos = idx
        pos = pos.unsqueeze(1) if groups == "joint" else pos.unsqueeze(-1)   # (N,1,A) or (N,A,1)
    return pos.to(dtype)


@register_encoder("fourier", "learnable Fourier features + MLP (Li et al. 2021), computed for any 2D/3D grid")
class FourierPE(PositionEncoder):
    """LFF absolute PE added to the patch tokens; prefix tokens get a learned (zero-init) vector or nothing.

    Args:
        fourier_dim: F (default ``dim``; ViT-B uses F = D = 768, H = 32 in the secondary sources).
        hidden_dim: H, the MLP hidden width.
        gamma: kernel length scale in coordinate units; default 0.25 for normalized coordinates and 2.0
            for index coordinates (about 1.6-2 patches on a 14x14 grid either way).
        init_std: ``W_r`` init std, float or convention name (default ``"paper"``: 1/gamma).
        coords: ``"normalized"`` (default, [-1, 1] per axis) or ``"index"`` (integer patch indices).
        groups: ``"joint"`` (G=1), ``"axes"`` (G = number of grid axes) or ``"corners"`` (G=2); see
            :func:`lff_grid_coordinates`. The output width ``dim`` must be divisible by G.
        prefix_embed: prefix tokens get a learned vector each (zero-initialised) instead of nothing.

    The coordinate dimensionality follows ``grid_size`` (2 for images, 3 for ``(t, h, w)`` video); a
    layout with another number of axes is an error.
    """

    hooks = frozenset({"embed"})

    def __init__(self, dim: int, num_heads: int = 1, depth: int = 1, grid_size: Sequence[int] = (14, 14),
                 num_prefix_tokens: int = 1, fourier_dim: int | None = None, hidden_dim: int = 32,
                 gamma: float | None = None, init_std: Union[float, str] = "paper", coords: str = "normalized",
                 groups: str = "joint", prefix_embed: bool = True):
        super().__init__(dim, num_heads, depth, grid_size, num_prefix_tokens)
        if coords not in _COORDS:
            raise ValueError(f"coords must be one of {_COORDS}; got {coords!r}")
        if groups not in _GROUP_MODES:
            raise ValueError(f"groups must be one of {_GROUP_MODES}; got {groups!r}")
        axes = len(self.grid_size)
        g, m = {"joint": (1, axes), "axes": (axes, 1), "corners": (2, axes)}[groups]
        if dim % g:
            raise ValueError(f"groups={groups!r} gives G={g} positional groups, which does not divide "
                             f"dim={dim}")
        self.coords, self.group_mode, self.num_axes = coords, groups, axes
        if gamma is None:
            gamma = 0.25 if coords == "normalized" else 2.0
        self.lff = LearnableFourierFeatures(m, dim if fourier_dim is None else fourier_dim, hidden_dim, dim,
                                            groups=g, gamma=gamma, init_std=init_std)
        self.prefix_pos = nn.Parameter(torch.zeros(1, num_prefix_tokens, dim)) \
            if prefix_embed and num_prefix_tokens else None

    def coordinates(self, grid: Sequence[int], device) -> torch.Tensor:
        """``(N, G, M)`` coordinates of ``grid`` (cached per grid and device)."""
        grid = as_grid(grid, "grid")
        if len(grid) != self.num_axes:
            raise ValueError(f"fourier was built for {self.num_axes}D coordinates (grid_size={self.grid_size}); "
                             f"got a {len(grid)}D grid {grid}")
        return self.table_cache.get("coordinates", grid, device, torch.float32,
                                    lambda: lff_grid_coordinates(grid, self.coords, self.group_mode, device=device))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """Explicit coordinates ``(..., N, G, M)`` -> ``(..., N, dim)`` (e.g. boxes, irregular points)."""
        return self.lff(coords)

    def table(self, layout: Layout, device) -> torch.Tensor:
        """``(P + N, dim)`` additive table: prefix rows (learned or zero), then the grid's LFF."""
        pe = self.lff(self.coordinates(layout.grid, device))
        p = layout.num_prefix_tokens
        if p == 0:
            return pe
        if self.prefix_pos is not None:
            if p != self.prefix_pos.shape[1]:
                raise ValueError(f"layout has {p} prefix tokens but the encoder was built with "
                                 f"num_prefix_tokens={self.prefix_pos.shape[1]}")
            return torch.cat([self.prefix_pos[0].to(pe.dtype), pe], dim=0)
        return torch.cat([pe.new_zeros(p, pe.shape[-1]), pe], dim=0)

    def embed(self, x: torch.Tensor, layout: Layout, stage: int = -1) -> torch.Tensor:
        """x: ``(B, P + N, dim)`` -> ``x`` plus the table (one broadcast add; the table is small)."""
        layout.check(x.shape[1])
        return x + self.table(layout, x.device).to(x.dtype)

    def no_weight_decay(self) -> set:
        return {"prefix_pos"} if self.prefix_pos is not None else set()
