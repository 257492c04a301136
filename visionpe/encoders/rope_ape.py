"""RoPE plus a learned APE in one encoder: RoPE-ViT's ``rope_{axial,mixed}_ape`` models.

visionpe's encoders each implement one position encoding; RoPE-ViT's ``*_ape`` checkpoints use two at once
(a learned table added to the patch tokens, no class-token row, and 2D RoPE in every block). This encoder
composes the existing ones: the table follows :class:`~visionpe.encoders.absolute.LearnedAPE`'s layout and
resampling (``pos_embed`` ``(1, h*w, dim)``, or with prefix rows when ``ape_prefix``), the rotation is a
:class:`~visionpe.encoders.rope2d.RopeAxial` / :class:`~visionpe.encoders.rope2d.RopeMixed` held as ``rope``.
Registered as ``rope_axial_ape`` and ``rope_mixed_ape``.

The table is this module's own ``pos_embed`` parameter (state-dict key ``pe.pos_embed``, like the ``learned``
encoder's) and :meth:`absolute_table` returns this module, so checkpoint adaptation and PE swap treat it as
any learned APE.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from visionpe.base import PositionEncoder, register_encoder
from visionpe.encoders.rope2d import RopeAxial, RopeMixed
from visionpe.layout import Layout, as_grid
from visionpe.resample import resample_grid_table

__all__ = ["RopeWithAPE"]

_ROPES = {"axial": (RopeAxial, 100.0), "mixed": (RopeMixed, 10.0)}


@register_encoder("rope_axial_ape", "RoPE-ViT Axial + APE: 2D axial RoPE (theta 100) and a learned table on the "
                  "patches", rope="axial")
@register_encoder("rope_mixed_ape", "RoPE-ViT Mixed + APE: learnable mixed-frequency RoPE and a learned table on "
                  "the patches", rope="mixed")
class RopeWithAPE(PositionEncoder):
    """A learned absolute table on the input tokens plus 2D RoPE on q and k.

    Args:
        rope: ``"axial"`` or ``"mixed"``.
        theta: RoPE base (default 100 axial, 10 mixed: RoPE-ViT's).
        xy: x (width) coordinate drives the first frequencies (RoPE-ViT).
        ape_prefix: the table has rows for the prefix tokens (timm ViT); RoPE-ViT's has none (default).
        init_std: truncated-normal init of the table.
        interpolation, antialias: how the table is resampled to other grids (timm's defaults).
    """

    hooks = frozenset({"embed", "rotate"})

    def __init__(self, dim: int, num_heads: int = 1, depth: int = 1, grid_size: Sequence[int] = (14, 14),
                 num_prefix_tokens: int = 1, rope: str = "axial", theta: Optional[float] = None, xy: bool = True,
                 ape_prefix: bool = False, init_std: float = 0.02, interpolation: str = "bicubic",
                 antialias: bool = True):
        super().__init__(dim, num_heads, depth, grid_size, num_prefix_tokens)
        if rope not in _ROPES:
            raise ValueError(f"rope must be one of {sorted(_ROPES)}; got {rope!r}")
        if len(self.grid_size) != 2:
            raise ValueError(f"rope_{rope}_ape supports 2D grids (h, w); got grid_size={self.grid_size}")
        cls, default_theta = _ROPES[rope]
        self.rope_kind = rope
        self.rope = cls(dim, num_heads, depth, self.grid_size, num_prefix_tokens,
                        theta=default_theta if theta is None else theta, xy=xy)
        self.ape_prefix = bool(ape_prefix)
        self.interpolation, self.antialias = interpolation, antialias
        h, w = self.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, self.table_prefix + h * w, dim))
        nn.init.trunc_normal_(self.pos_embed, std=init_std, a=-2 * init_std, b=2 * init_std)

    @property
    def table_prefix(self) -> int:
        """Prefix rows of ``pos_embed`` (timm layout), read by checkpoint adaptation."""
        return self.num_prefix_tokens if self.ape_prefix else 0

    def absolute_table(self) -> "RopeWithAPE":
        return self

    def embed(self, x: torch.Tensor, layout: Layout, stage: int = -1) -> torch.Tensor:
        """x: ``(B, P + h*w, dim)`` -> x plus the table (resampled to ``layout.grid``; prefix rows if ``ape_prefix``)."""
        layout.check(x.shape[1])
        if self.ape_prefix and layout.num_prefix_tokens != self.num_prefix_tokens:
            raise ValueError(f"layout has {layout.num_prefix_tokens} prefix tokens but pos_embed was built for "
                             f"{self.num_prefix_tokens}")
        pe = resample_grid_table(self.pos_embed, layout.grid, self.grid_size, self.table_prefix,
                                 mode=self.interpolation, antialias=self.antialias)
        if self.ape_prefix:
            return x + pe
        p = layout.num_prefix_tokens
        return torch.cat([x[:, :p], x[:, p:] + pe], dim=1)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, layout: Layout, block: int = 0):
        """q, k: ``(B, H, N, head_dim)`` -> rotated (prefix tokens unrotated), as the held RoPE encoder."""
        return self.rope.rotate(q, k, layout, block)

    def set_grid_size(self, grid_size) -> None:
        old = self.grid_size
        super().set_grid_size(as_grid(grid_size, "grid_size", (2,)))  # the held RoPE encoder too
        if self.grid_size == old:
            return  # keep the Parameter object (optimizers hold references to it)
        with torch.no_grad():
            new = resample_grid_table(self.pos_embed, self.grid_size, old, self.table_prefix,
                                      mode=self.interpolation, antialias=self.antialias)
        self.pos_embed = nn.Parameter(new.contiguous(), requires_grad=self.pos_embed.requires_grad)

    def no_weight_decay(self) -> set:
        return {"pos_embed"} | {f"rope.{n}" for n in self.rope.no_weight_decay()}

    def block_param_index(self, name: str):
        if name.startswith("rope."):
            return self.rope.block_param_index(name[len("rope."):])
        return None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rope={self.rope_kind}, ape_prefix={self.ape_prefix}"
