"""CPE via PEG (CPVT, Chu et al.): a depthwise conv on the patch grid, added as a residual after a block.

``peg``: one PEG after block 0, class token kept (CPVT). ``peg_gap``: the same with no class token and
global average pooling after the final norm (CPVT-GAP; the registered timm name sets
``class_token=False, global_pool='avg', fc_norm=False``).

The conv is ``k x k`` depthwise (``groups = dim``), stride 1, **zero** padding ``(k-1)/2`` (the padding is
where absolute position comes from), with bias; prefix tokens bypass it. It works on any grid, so a model
built at 224 runs at 384 with no resampling. Parameter names (``peg.<i>.proj.0.weight``) follow Twins'
``PosCNN`` / timm's ``PosConv``.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import nn

from ..base import PositionEncoder, register_encoder
from ..layout import Layout

__all__ = ["PEG", "PosConv"]


class PosConv(nn.Module):
    """One PEG: ``(B, C, h, w) -> conv(X) + X`` with a depthwise ``k x k`` zero-padded conv (Twins' init)."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, bias=True, groups=dim,
                                            padding_mode="zeros"))
        # Twins: N(0, sqrt(2 / fan_out)), fan_out = k*k*C/groups; bias zero
        nn.init.normal_(self.proj[0].weight, 0.0, math.sqrt(2.0 / (kernel_size * kernel_size)))
        nn.init.zeros_(self.proj[0].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + x


@register_encoder("peg", "CPVT PEG: depthwise 3x3 conv residual on the patch grid after block 0 (class token)",
                  peg_blocks=(0,))
@register_encoder("peg_gap", "CPVT-GAP: PEG after block 0, no class token, average pooling",
                  model_kwargs=dict(class_token=False, global_pool="avg", fc_norm=False), peg_blocks=(0,))
class PEG(PositionEncoder):
    """Position encoding generator(s) inserted after the blocks in ``peg_blocks``.

    Args:
        peg_blocks: block indices after which a PEG runs (``-1``: on the input tokens, before block 0);
            each has its own conv. Default ``(0,)``; CPVT's "(0-5)" models use several early blocks.
        kernel_size: odd ``k >= 3`` (a 1x1 kernel carries no position).

    ``embed(x, layout, stage)`` is the identity at any stage without a PEG (including ``-1`` by default).
    """

    hooks = frozenset({"embed"})

    def __init__(self, dim: int, num_heads: int = 1, depth: int = 1, grid_size: Sequence[int] = (14, 14),
                 num_prefix_tokens: int = 1, peg_blocks: Union[int, Sequence[int]] = (0,), kernel_size: int = 3):
        super().__init__(dim, num_heads, depth, grid_size, num_prefix_tokens)
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd int >= 3; got {kernel_size!r}")
        if isinstance(peg_blocks, int):
            peg_blocks = (peg_blocks,)
        try:
            blocks = tuple(peg_blocks)
        except TypeError:
            raise TypeError(f"peg_blocks must be a tuple of block indices; got {type(peg_blocks).__name__}") from None
        for b in blocks:
            if isinstance(b, bool) or not isinstance(b, int) or not -1 <= b < depth:
                raise ValueError(f"peg_blocks entries must be ints in [-1, depth-1] = [-1, {depth - 1}]; got {blocks}")
        if not blocks or len(set(blocks)) != len(blocks):
            raise ValueError(f"peg_blocks must be non-empty with distinct entries; got {blocks}")
        self.peg_blocks = tuple(sorted(blocks))
        self.embed_stages = self.peg_blocks
        self.kernel_size = kernel_size
        self.peg = nn.ModuleList(PosConv(dim, kernel_size) for _ in self.peg_blocks)
        self._slot = {b: i for i, b in enumerate(self.peg_blocks)}

    def embed(self, x: torch.Tensor, layout: Layout, stage: int = -1) -> torch.Tensor:
        """x: (B, S + h*w, dim) -> same shape; patches get ``conv(X) + X``, prefix tokens pass unchanged."""
        slot = self._slot.get(stage)
        if slot is None:
            return x
        if layout.ndim != 2:
            raise ValueError(f"PEG needs a 2D layout grid (h, w); got {layout.grid}")
        layout.check(x.shape[1])
        B, _, C = x.shape
        s = layout.num_prefix_tokens
        h, w = layout.grid
        grid = x[:, s:].transpose(1, 2).reshape(B, C, h, w)
        y = self.peg[slot](grid).flatten(2).transpose(1, 2)
        return torch.cat([x[:, :s], y], dim=1) if s else y

    def _prune_own_blocks(self, depth: int) -> None:
        """Drop the PEGs after blocks ``>= depth``; one after block ``depth-1`` (or on the input) stays. With
        none left, ``embed`` is the identity at every stage."""
        keep = sum(b < depth for b in self.peg_blocks)  # peg_blocks is sorted
        del self.peg[keep:]
        self.peg_blocks = self.embed_stages = self.peg_blocks[:keep]
        self._slot = {b: i for i, b in enumerate(self.peg_blocks)}

    def no_weight_decay(self) -> set:
        # Twins excludes the PEG parameters from weight decay
        return {n for n, _ in self.named_parameters()}

    def block_param_index(self, name: str) -> int | str | None:
        """A PEG after block ``i`` joins block ``i``'s layer-decay group; one on the input joins the stem."""
        block = self.peg_blocks[int(name.split(".")[1])]
        return None if block < 0 else block

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, peg_blocks={self.peg_blocks}, kernel_size={self.kernel_size}"
