"""``relpos_bias``: Swin/BEiT-style learned relative-position bias table, one per block."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..base import PositionEncoder, register_encoder
from ..layout import Layout, as_grid, relative_offsets
from ..resample import resample_offset_table

__all__ = ["RelPosBias", "relative_position_index"]


def relative_position_index(grid: Sequence[int], num_prefix_tokens: int, device=None) -> torch.Tensor:
    """``(P + N, P + N)`` long index into a table of ``(2h-1)(2w-1) + 3`` rows.

    Row ``(dy + h - 1) * (2w - 1) + (dx + w - 1)`` holds offset ``(dy, dx)`` (query minus key). Prefix tokens
    use three shared extra rows, as BEiT: prefix->patch, patch->prefix and prefix->prefix.
    """
    h, w = grid
    dy, dx = relative_offsets((h, w), device=device)
    idx = (dy + h - 1) * (2 * w - 1) + (dx + w - 1)
    if num_prefix_tokens:
        n_rel = (2 * h - 1) * (2 * w - 1)
        idx = F.pad(idx, [num_prefix_tokens, 0, num_prefix_tokens, 0])
        idx[:num_prefix_tokens, :] = n_rel
        idx[:, :num_prefix_tokens] = n_rel + 1
        idx[:num_prefix_tokens, :num_prefix_tokens] = n_rel + 2
    return idx


@register_encoder("relpos_bias", "learned relative-position bias table per block (Swin/BEiT), via SDPA attn_mask")
class RelPosBias(PositionEncoder):
    """A table ``((2H-1)(2W-1) + 3, heads)`` per block (or one shared), gathered into an additive logit bias.

    On another grid the table's offset part is resampled bicubically to ``(2h-1, 2w-1)`` on the fly
    (:func:`~visionpe.resample.resample_offset_table`, Swin/BEiT practice); :meth:`set_grid_size`
    (``model.set_input_size``) resamples the stored tables the same way, once.
    """

    hooks = frozenset({"bias"})

    def __init__(self, dim: int, num_heads: int = 1, depth: int = 1, grid_size: Sequence[int] = (14, 14),
                 num_prefix_tokens: int = 1, shared: bool = False, init_std: float = 0.02):
        super().__init__(dim, num_heads, depth, grid_size, num_prefix_tokens)
        if len(self.grid_size) != 2:
            raise ValueError(f"relpos_bias supports 2D grids (h, w); got grid_size={self.grid_size}")
        self.shared = shared
        h, w = self.grid_size
        rows = (2 * h - 1) * (2 * w - 1) + 3
        self.tables = nn.ParameterList(
            [nn.Parameter(torch.zeros(rows, num_heads)) for _ in range(1 if shared else depth)])
        for t in self.tables:
            nn.init.trunc_normal_(t, std=init_std, a=-2 * init_std, b=2 * init_std)

    def index(self, layout: Layout, device) -> torch.Tensor:
        """Flat ``((P + N)^2,)`` int64 table rows of every token pair (cached)."""
        return self.table_cache.get("index", layout, device, torch.int64, lambda: relative_position_index(
            layout.grid, layout.num_prefix_tokens, device).reshape(-1))

    def table_for(self, block: int, grid: Sequence[int]) -> torch.Tensor:
        """Block ``block``'s table for ``grid``: ``((2h-1)(2w-1) + 3, heads)``, the stored one on ``grid_size``,
        else its offset rows resampled (:func:`~visionpe.resample.resample_offset_table`, bicubic) on the fly."""
        table = self.tables[0 if self.shared else block]
        return resample_offset_table(table, grid, self.grid_size, num_extra_rows=3)

    def bias(self, q: torch.Tensor, k: torch.Tensor, layout: Layout, block: int = 0) -> Optional[torch.Tensor]:
        if layout.ndim != 2:
            raise ValueError(f"relpos_bias needs a 2D layout grid; got {layout.grid}")
        n = layout.num_tokens
        layout.check(q.shape[-2], "q")
        table = self.table_for(block, layout.grid)
        b = table[self.index(layout, q.device)].view(n, n, -1).permute(2, 0, 1)
        return b.unsqueeze(0).to(q.dtype)

    def flex_terms(self, q, k, layout, block=0) -> list:
        """The logit term of :meth:`bias` for the flex path, without the ``(N, N)`` index or bias.

        Returns ``[BucketBias]``: the table ``(H, R)`` (resampled to ``layout.grid`` as in :meth:`bias`) and
        bucket ids computed from token coordinates, with the three prefix rows of
        :func:`relative_position_index` (prefix query; prefix key; both). See :mod:`visionpe.flex`.
        """
        from ..flex import bucket_bias, grid_buckets
        if layout.ndim != 2:
            raise ValueError(f"relpos_bias needs a 2D layout grid; got {layout.grid}")
        layout.check(q.shape[-2], "q")
        h, w = layout.grid
        n_rel = (2 * h - 1) * (2 * w - 1)
        offsets = torch.arange(n_rel, device=q.device).view(2 * h - 1, 2 * w - 1)
        buckets = grid_buckets(layout, offsets, [n_rel, n_rel + 1, n_rel + 2])
        return [bucket_bias(self.table_for(block, layout.grid).t().to(q.dtype), buckets)]

    def set_grid_size(self, grid_size: Sequence[int]) -> None:
        """Resample every table's offset rows to the new grid (as :meth:`table_for` does on the fly); the three
        prefix rows are kept. An unchanged grid keeps the Parameter objects (optimizers hold references)."""
        old = self.grid_size
        super().set_grid_size(as_grid(grid_size, "grid_size", (2,)))
        if self.grid_size == old:
            return
        for i, t in enumerate(self.tables):
            with torch.no_grad():
                new = resample_offset_table(t, self.grid_size, old, num_extra_rows=3)
            self.tables[i] = nn.Parameter(new.contiguous(), requires_grad=t.requires_grad)

    def _prune_own_blocks(self, depth: int) -> None:
        if not self.shared:
            self.tables = self.tables[:depth]  # the same Parameter objects

    def block_param_index(self, name: str) -> int | str | None:
        if name.startswith("tables.") and not self.shared:
            return int(name.split(".")[1])
        return None
