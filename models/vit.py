"""A PE-aware timm ``VisionTransformer``: any registered encoder through the three hooks.

The model is timm's ``VisionTransformer`` (patch embed, blocks, heads, ``forward_head``,
``reset_classifier``, ``set_input_size``, ``features_only`` ...) with:

* blocks whose attention calls ``pe.rotate`` / ``pe.bias`` (and ``pe.value_term`` when the encoder
  needs attention probabilities) and otherwise runs ``F.scaled_dot_product_attention``;
* ``_pos_embed`` that builds the :class:`~visionpe.Layout` and calls ``pe.embed(x, layout, -1)``;
* ``pe.embed(x, layout, i)`` after each block ``i`` in ``pe.embed_stages`` (CPE/PEG).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask
from torch.utils.checkpoint import checkpoint

from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from visionpe.attn_impl import check_attn_impl, densify_block_mask, pe_flex_attention, resolve_attn_impl
from visionpe.base import PositionEncoder
from visionpe.layout import Layout

__all__ = ["PEAttention", "PEBlock", "VisionPEViT"]


class PEAttention(Attention):
    """timm ``Attention`` with the PE hooks. Parameter names are unchanged, so ViT weights load as is.

    ``attn_impl`` (``"sdpa" | "flex" | "auto"``, set by the model) picks the kernel: see
    :mod:`visionpe.attn_impl`.
    """

    attn_impl: str = "auto"

    def forward(self, x: torch.Tensor, layout: Layout = None, pe: PositionEncoder = None, block: int = 0,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        hooks = pe.hooks if pe is not None else ()
        if "rotate" in hooks:
            q, k = pe.rotate(q, k, layout, block)
        drop = self.attn_drop.p if self.training else 0.0
        if resolve_attn_impl(self.attn_impl, pe, q, attn_mask, drop) == "flex":
            out = pe_flex_attention(q, k, v, pe, layout, block, attn_mask, drop, self.training)
            out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
            return self.proj_drop(self.proj(self.norm(out)))
        if isinstance(attn_mask, BlockMask):
            attn_mask = densify_block_mask(attn_mask, B, self.num_heads)
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # additive, so that "bias + mask" masks
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(~attn_mask, float("-inf"))
        bias = pe.bias(q, k, layout, block) if "bias" in hooks else None
        if attn_mask is not None:
            bias = attn_mask if bias is None else bias + attn_mask
        if pe is not None and pe.needs_attn_probs:
            attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # = self.scale unless q was widened (SDPA convention)
            if bias is not None:
                attn = attn + bias
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = attn @ v
            extra = pe.value_term(attn, layout, block)
            if extra is not None:
                out = out + extra
        else:
            dv = v.shape[-1]
            if q.shape[-1] != dv:
                # encoders that widen q/k (MD-LRPE cosine form): SDPA's kernels want equal widths, and the
                # mismatched-width fallback is ~1.5x slower than padding v with zeros and slicing back
                v = F.pad(v, (0, q.shape[-1] - dv))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                 dropout_p=self.attn_drop.p if self.training else 0.0)[..., :dv]
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        out = self.norm(out)
        return self.proj_drop(self.proj(out))


class PEBlock(Block):
    """timm ``Block`` whose attention receives the layout and the encoder."""

    def __init__(self, *args, **kwargs):
        kwargs["attn_layer"] = PEAttention
        super().__init__(*args, **kwargs)

    def forward(self, x: torch.Tensor, layout: Layout = None, pe: PositionEncoder = None, block: int = 0,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), layout, pe, block, attn_mask)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class VisionPEViT(VisionTransformer):
    """timm ViT whose position encoding is any visionpe encoder.

    Args:
        pe: encoder name (``visionpe.list_encoders()``) or config dict ``{"name": ..., **options}``.
        attn_impl: ``"sdpa"``, ``"flex"`` or ``"auto"`` (default): how bias encoders reach attention
            (:mod:`visionpe.attn_impl`); change it later with :meth:`set_attn_impl`.
        **kwargs: every ``timm VisionTransformer`` argument except ``pos_embed``/``block_fn``.
    """

    def __init__(self, pe: Union[str, Dict[str, Any], None] = "learned", attn_impl: str = "auto", **kwargs):
        for bad in ("pos_embed", "block_fn", "attn_layer"):
            if bad in kwargs:
                raise TypeError(f"VisionPEViT sets {bad!r} itself; choose the position encoding with pe=")
        if kwargs.get("patch_drop_rate", 0.0):
            raise ValueError("patch_drop_rate > 0 is not supported: dropping patches breaks the grid layout "
                             "that position encoders rely on")
        super().__init__(pos_embed="none", block_fn=PEBlock, **kwargs)
        self.pos_embed = None
        from .swap import attach_encoder  # sets pe, pe_name, pe_cfg and the embed-stage flags (as swap_pe)
        attach_encoder(self, pe)
        self._place_encoder(kwargs.get("device"), kwargs.get("dtype"))
        self.set_attn_impl(attn_impl)

    def set_attn_impl(self, attn_impl: str) -> None:
        """``"sdpa"``, ``"flex"`` or ``"auto"`` for every block (see :mod:`visionpe.attn_impl`)."""
        self.attn_impl = check_attn_impl(attn_impl)
        for blk in self.blocks:
            blk.attn.attn_impl = attn_impl

    def _place_encoder(self, device=None, dtype=None) -> None:
        """Put the encoder where timm's factory kwargs put the rest of the model (``create_model(...,
        device='meta', dtype=torch.bfloat16)``): encoders are built without them."""
        to = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if to:
            self.pe.to(**to)

    # -- geometry ----------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """Clear errors for images the patch grid cannot describe (instead of deep asserts)."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"x must be an image batch (B, C, H, W); got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        in_chans = self.patch_embed.proj.in_channels
        if x.shape[1] != in_chans:
            raise ValueError(f"x has {x.shape[1]} channels but the model expects {in_chans} (x shape {tuple(x.shape)})")
        H, W = x.shape[-2:]
        ph, pw = self.patch_embed.patch_size
        if self.dynamic_img_size:
            if not self.patch_embed.dynamic_img_pad and (H % ph or W % pw):
                raise ValueError(f"image size {(H, W)} is not divisible by the patch size {(ph, pw)}; resize or "
                                 f"crop it, or build the model with dynamic_img_pad=True")
        elif (H, W) != tuple(self.patch_embed.img_size):
            raise ValueError(f"image size {(H, W)} does not match the model's {tuple(self.patch_embed.img_size)}; "
                             f"build it with img_size={(H, W)} or dynamic_img_size=True (PEs follow the grid)")

    def layout_for(self, x: torch.Tensor) -> Tuple[torch.Tensor, Layout]:
        """Patch-embedded ``x`` (NHWC when dynamic, else NLC) -> ``(B, N, C)`` tokens and their layout."""
        if x.ndim == 4:
            B, H, W, C = x.shape
            grid = (H, W)
            x = x.reshape(B, H * W, C)
        else:
            grid = tuple(self.patch_embed.grid_size)
        return x, Layout(grid, self.num_prefix_tokens)

    def _pos_embed(self, x: torch.Tensor, image: Optional[torch.Tensor] = None):
        """Prefix tokens, layout, then the encoder's input embedding. Returns ``(x, layout)``.

        ``image`` (the model input, ``(B, C, H, W)``) is handed to encoders with ``needs_image`` (LOOPE).
        """
        x, layout = self.layout_for(x)
        to_cat = []
        if self.cls_token is not None:
            to_cat.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.reg_token is not None:
            to_cat.append(self.reg_token.expand(x.shape[0], -1, -1))
        if to_cat:
            x = torch.cat(to_cat + [x], dim=1)
        if self._embed_input:
            if self.pe.needs_image:
                x = self.pe.embed(x, layout, -1, image=image)
            else:
                x = self.pe.embed(x, layout, -1)
        return self.pos_drop(x), layout

    def _run_block(self, i: int, blk: nn.Module, x: torch.Tensor, layout: Layout,
                   attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            x = checkpoint(blk, x, layout, self.pe, i, attn_mask, use_reentrant=False)
        else:
            x = blk(x, layout, self.pe, i, attn_mask)
        if i in self._embed_after:
            x = self.pe.embed(x, layout, i)
        return x

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        if is_causal:
            raise ValueError("is_causal is not supported by VisionPEViT: its attention is bidirectional over the image grid; "
                             "pass attn_mask= for a custom mask (CCA's causal mask belongs to the VLM layer, visionpe.vlm)")
        self.check_input(x)
        image = x
        x = self.patch_embed(x)
        x, layout = self._pos_embed(x, image)
        x = self.norm_pre(x)
        for i, blk in enumerate(self.blocks):
            x = self._run_block(i, blk, x, layout, attn_mask)
        return self.norm(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
            output_dict: bool = False,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ):
        """timm's ``forward_intermediates`` contract (same arguments and return forms)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC'; got {output_fmt!r}")
        if is_causal:
            raise ValueError("is_causal is not supported by VisionPEViT: its attention is bidirectional over the image grid; "
                             "pass attn_mask= for a custom mask (CCA's causal mask belongs to the VLM layer, visionpe.vlm)")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.check_input(x)
        B = x.shape[0]
        image = x
        x = self.patch_embed(x)
        x, layout = self._pos_embed(x, image)
        x = self.norm_pre(x)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = self._run_block(i, blk, x, layout, attn_mask)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        npt = self.num_prefix_tokens
        prefix_tokens = [y[:, :npt] for y in intermediates] if npt else None
        intermediates = [y[:, npt:] for y in intermediates]
        if output_fmt == "NCHW":
            H, W = layout.grid
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            out = {"image_intermediates": intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    # -- timm integration --------------------------------------------------------------------------
    def set_input_size(self, img_size=None, patch_size=None):
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        self.pe.set_grid_size(tuple(self.patch_embed.grid_size))

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """timm's pruning (blocks after the last index, optionally the norm and head), then the encoder's
        per-block state of the dropped blocks (:meth:`~visionpe.PositionEncoder.prune_blocks`). Returns the
        kept indices."""
        take_indices = super().prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        depth = len(self.blocks)
        self.pe.prune_blocks(depth)
        self._embed_after = frozenset(s for s in self._embed_after if s < depth)
        return take_indices

    @torch.jit.ignore
    def no_weight_decay(self):
        names = {"cls_token", "reg_token", "dist_token"}
        names |= {f"pe.{n}" for n in self.pe.no_weight_decay()}
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """Layer-decay groups: per-block PE parameters join their block, the rest of the PE joins the stem,
        and parameters spanning all blocks (RoPE-Mixed ``freqs``) join the last block group."""
        block_rules = [(r"^blocks\.(\d+)", None)]
        stem = [r"^cls_token", r"^reg_token", r"^patch_embed", r"^norm_pre"]
        for name, _ in self.pe.named_parameters():
            idx = self.pe.block_param_index(name)
            pat = "^pe\\." + name.replace(".", "\\.") + "$"
            if idx is None:
                stem.append(pat)
            elif idx == "last":
                block_rules.append((pat, (len(self.blocks) - 1,)))
            else:
                block_rules.append((pat, (int(idx),)))
        block_rules.append((r"^norm", (99999,)))
        return dict(stem="|".join(stem), blocks=block_rules)
