"""Additive (absolute) encoders: ``none``, ``learned`` (APE) and ``sincos2d``."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..base import AbsoluteTable, PositionEncoder, register_encoder
from ..layout import Layout, as_grid, grid_positions
from ..resample import resample_grid_table
from ..rotary import inv_freq

__all__ = ["NoPE", "LearnedAPE", "SinCos2D", "build_sincos2d"]


@register_encoder("none", "no position information (the baseline every PE must beat)")
class NoPE(PositionEncoder):
    hooks = frozenset()


@register_encoder("learned", "learned absolute table (ViT/DeiT APE), resampled bicubically to new grids")
class LearnedAPE(PositionEncoder):
    """Learned APE ``pos_embed`` of shape ``(1, P + h*w, dim)`` (timm's ``pos_embed`` layout).

    Args:
        embed_prefix: the table has rows for the prefix tokens (timm default, ``no_embed_class=False``);
            otherwise prefix tokens get no position (DeiT-III / ``no_embed_class=True``).
        init_std: truncated-normal init std (0.02 as in ViT/DeiT).
        interpolation, antialias: how the table is resampled for another grid (timm's defaults).

    This is the :class:`~visionpe.base.AbsoluteTable` that checkpoint adaptation and PE swap read; other
    encoders that add a learned APE (iRPE) hold one of these.
    """

    hooks = frozenset({"embed"})

    def __init__(self, dim: int, num_heads: int = 1, depth: int = 1, grid_size: Sequence[int] = (14, 14),
                 num_prefix_tokens: int = 1, embed_prefix: bool = True, init_std: float = 0.02,
                 interpolation: str = "bicubic", antialias: bool = True):
        super().__init__(dim, num_heads, depth, grid_size, num_prefix_tokens)
        if len(self.grid_size) != 2:
            raise ValueError(f"learned APE supports 2D grids (h, w); got grid_size={self.grid_size}")
        self.embed_prefix = embed_prefix
        self.interpolation = interpolation
        self.antialias = antialias
        rows = (num_prefix_tokens if embed_prefix else 0) + self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, rows, dim))
        nn.init.trunc_normal_(self.pos_embed, std=init_std, a=-2 * init_std, b=2 * init_std)

    @property
    def table_prefix(self) -> int:
        return self.num_prefix_tokens if self.embed_prefix else 0

    def absolute_table(self) -> AbsoluteTable:
        return self

    def table_for(self, grid: Sequence[int]) -> torch.Tensor:
        """The table resampled to ``grid`` (the stored one when unchanged): ``(1, P' + h*w, dim)``."""
        return resample_grid_table(self.pos_embed, grid, self.grid_size, self.table_prefix,
                                   mode=self.interpolation, antialias=self.antialias)

    def embed(self, x: torch.Tensor, layout: Layout, stage: int = -1) -> torch.Tensor:
        """x: ``(B, P + h*w, dim)`` -> x plus the table (resampled to ``layout.grid``)."""
        layout.check(x.shape[1])
        if self.embed_prefix and layout.num_prefix_tokens != self.num_prefix_tokens:
            raise ValueError(f"layout has {layout.num_prefix_tokens} prefix tokens but pos_embed was built for "
                             f"{self.num_prefix_tokens}")
        pe = self.table_for(layout.grid)
        if self.embed_prefix:
            return x + pe
        p = layout.num_prefix_tokens
        return torch.cat([x[:, :p], x[:, p:] + pe], dim=1)

    def set_grid_size(self, grid_size: Sequence[int]) -> None:
        old = self.grid_size
        super().set_grid_size(as_grid(grid_size, "grid_size", (2,)))
        if self.grid_size == old:
            return  # keep the Parameter object (optimizers hold references to it)
        with torch.no_grad():
            new = resample_grid_table(self.pos_embed, self.grid_size, old, self.table_prefix,
                                      mode=self.interpolation, antialias=self.antialias)
        self.pos_embed = nn.Parameter(new.contiguous(), requires_grad=self.pos_embed.requires_grad)

    def no_weight_decay(self) -> set:
        return {"pos_embed"}


def build_sincos2d(grid: Sequence[int], dim: int, temperature: float = 10000.0, *, device=None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fixed 2D sin-cos table ``(h*w, dim)``: channel blocks ``[sin(y), sin(x), cos(y), cos(x)]``.

    Each block has ``dim/4`` channels with frequencies ``temperature ** (-i / (dim/4))``; the layout is
    timm's ``build_sincos2d_pos_embed`` (row-major tokens, y is the first coordinate).
    """
    if dim % 4:
        raise ValueError(f"sincos2d needs dim divisible by 4; got dim={dim}")
    grid = tuple(grid)
    if len(grid) != 2:
        raise ValueError(f"sincos2d needs a 2D grid (h, w); got {grid}")
    bands = inv_freq(dim // 4, temperature, device=device)
    pos = grid_positions(grid, device=device)
    ang = pos.unsqueeze(-1) * bands  # (N, 2, dim/4)
    return torch.cat([ang.sin(), ang.cos()], dim=1).flatten(1).to(dtype)


@register_encoder("sincos2d", "fixed 2D sin-cos table (MAE/MoCo-v3 style), computed for any grid")
class SinCos2D(PositionEncoder):
    """2D sin-cos APE; prefix tokens get no position (zeros, as MAE). Tables cached per (grid, device, dtype)."""

    hooks = frozenset({"embed"})

    def __init__(self, dim: int, num_heads: int = 1, depth: int = 1, grid_size: Sequence[int] = (14, 14),
                 num_prefix_tokens: int = 1, temperature: float = 10000.0):
        super().__init__(dim, num_heads, depth, grid_size, num_prefix_tokens)
        if dim % 4:
            raise ValueError(f"sincos2d needs dim divisible by 4; got dim={dim}")
        self.temperature = temperature

    def table(self, grid: Sequence[int], device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(h*w, dim)`` table in ``dtype`` (computed in float32, then cast), cached."""
        grid = tuple(grid)
        return self.table_cache.get("sincos2d", grid, device, dtype, lambda: build_sincos2d(
            grid, self.dim, self.temperature, device=device, dtype=dtype))

    def embed(self, x: torch.Tensor, layout: Layout, stage: int = -1) -> torch.Tensor:
        """x: ``(B, P + h*w, dim)`` -> x plus the table on the patch tokens."""
        layout.check(x.shape[1])
        pe = self.table(layout.grid, x.device, x.dtype)
        p = layout.num_prefix_tokens
        if p == 0:
            return x + pe
        return torch.cat([x[:, :p], x[:, p:] + pe], dim=1)
