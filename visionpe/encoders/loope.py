"""LOOPE (Chowdhury et al. 2025): Gilbert patch order plus an image-dependent offset, through a 1D sinusoid.

Each patch gets a scalar order ``X = X_G + X_C``:

* ``X_G``: its 1-based rank on the Gilbert curve of the grid (:mod:`visionpe.gilbert`);
* ``X_C`` in (-1, 1): predicted from the image by a small CNN + an ``N x N`` linear layer
  (:class:`LoopeContext`, the official network: five GELU convs, BatchNorm, bias-free linear, ``2*sigmoid-1``).

``X`` goes through the Transformer 1D sinusoid with **interleaved** channels (``2i``: ``sin(X f_i)``,
``2i+1``: ``cos(X f_i)``, ``f_i = 10000^(-2i/D)``, positions not normalised) and is added to the patch tokens
at the input. Two encoders are registered:

* ``loope``: the full method; prefix tokens get learned vectors (zero at init), as the official class token.
* ``gilbert``: the static curve alone (``X_C = 0``), the paper's "Hilbert" row; prefix tokens get the
  sinusoid of position 0 (``[0, 1, 0, 1, ...]``) as the official static Hilbert PE. Its table is cached
  per layout, so it costs what a learned APE costs.

Deviations from the official code (all tested, see docs/loope.md):

* any grid: ``X_G`` is computed for the grid at hand; the ``N x N`` linear layer is resampled to other
  grids (both of its grid axes, bicubic, rescaled by ``N/N'``); an image whose size is not
  ``grid * context_patch`` is resized for the context network only. The official code fixes one square grid.
* any number of prefix tokens (``prefix_pe``: one learned vector each, the sinusoid at 0, or nothing).
* batch independence at eval is guaranteed by running BatchNorm on its running statistics (``model.eval()``);
  ``context_norm="instance"`` makes training batch-independent as well.

The image reaches the encoder as ``embed(x, layout, -1, image=img)``: LOOPE sets ``needs_image``, and a host
(``VisionPEViT``) then passes its input image to the input embedding. No state is kept between calls.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..base import PositionEncoder, register_encoder
from ..cache import TableCache
from ..gilbert import VARIANTS, gilbert_rank
from ..layout import Layout, as_grid
from ..resample import resample_grid_table

__all__ = ["GilbertPE", "LOOPE", "LoopeContext", "sinusoid_1d", "resample_square_operator",
           "convert_official_state_dict", "PREFIX_MODES", "CONTEXT_NORMS"]

PREFIX_MODES = ("learned", "position0", "none")
CONTEXT_NORMS = ("batch", "instance")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # angles reach ~N (196 at 224, 576 at 384): half precision would lose the order, so use at least fp32
    return torch.float64 if dtype == torch.float64 else torch.float32


def sinusoid_1d(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Interleaved 1D sinusoid of scalar positions (the Transformer's; LOOPE and the PESI reference rows).

    Args:
        positions: ``(..., N)`` float positions (not normalised).
        dim: even output width ``D``.
        temperature: the base of ``f_i = temperature ** (-2i / D)``.

    Returns:
        ``(..., N, D)`` in ``positions``' dtype: channel ``2i`` is ``sin(p f_i)``, ``2i+1`` is ``cos(p f_i)``.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 2:
        raise ValueError(f"sinusoid_1d: dim must be a positive even int; got {dim!r}")
    if not positions.is_floating_point():
        raise TypeError(f"sinusoid_1d: positions must be a float tensor; got {positions.dtype}")
    # exp(-2i log(T) / D), the formula of the official code (and of the Transformer)
    freqs = torch.exp(torch.arange(0, dim, 2, device=positions.device, dtype=positions.dtype)
                      * (-math.log(temperature) / dim))
    ang = positions.unsqueeze(-1) * freqs
    return torch.stack([ang.sin(), ang.cos()], dim=-1).flatten(-2)


def resample_square_operator(weight: torch.Tensor, new_grid: Sequence[int], old_grid: Sequence[int],
                             mode: str = "bicubic") -> torch.Tensor:
    """Resample an ``(N, N)`` grid-to-grid linear map (``N = h*w``, row-major on both sides) to a new grid.

    Both the output and the input axis are interpolated as images (:func:`resample_grid_table`, timm numerics),
    and the result is multiplied by ``N / N'`` so that the map keeps its response to smooth inputs (the sum
    over input cells has ``N'`` terms instead of ``N``). Returns ``(N', N')``; ``weight`` itself if unchanged.
    """
    new_grid, old_grid = as_grid(new_grid, "new_grid", (2,)), as_grid(old_grid, "old_grid", (2,))
    n_old = old_grid[0] * old_grid[1]
    if weight.shape != (n_old, n_old):
        raise ValueError(f"weight must be ({n_old}, {n_old}) for old_grid {old_grid}; got {tuple(weight.shape)}")
    if new_grid == old_grid:
        return weight
    n_new = new_grid[0] * new_grid[1]
    # rows = input cells, channels = output cells -> resample the input axis
    t = resample_grid_table(weight.t().unsqueeze(0), new_grid, old_grid, 0, mode=mode)  # (1, N'_in, N_out)
    t = resample_grid_table(t.transpose(1, 2), new_grid, old_grid, 0, mode=mode)      # (1, N'_out, N'_in)
    return t[0] * (n_old / n_new)


class LoopeContext(nn.Module):
    """The context network: image ``(B, C, H, W)`` -> offsets ``X_C`` ``(B, h*w)`` in (-1, 1).

    ``[image, row-coord, col-coord]`` (coordinates ``linspace(-1, 1)`` per pixel) -> conv ``P x P``/stride
    ``P`` to 32 -> 5x5 convs 32->16->8->4->1 (each conv followed by exact GELU) -> norm -> row-major flatten
    -> bias-free ``N x N`` linear -> ``2*sigmoid - 1``. Modules are created in the official order, so the
    same seed gives the same initial weights as the official ``ArtPE``.

    Args:
        grid_size: training grid ``(h, w)``; sizes the linear layer.
        in_chans: image channels.
        patch: kernel and stride of the first conv (16 in the official code, independent of the ViT).
        norm: ``"batch"`` (official BatchNorm2d(1)) or ``"instance"`` (per-image GroupNorm(1, 1)).
    """

    def __init__(self, grid_size: Sequence[int] = (14, 14), in_chans: int = 3, patch: int = 16,
                 norm: str = "batch"):
        super().__init__()
        self.grid_size = as_grid(grid_size, "grid_size", (2,))
        for name, v in (("in_chans", in_chans), ("patch", patch)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"LoopeContext: {name} must be a positive int; got {v!r}")
        if norm not in CONTEXT_NORMS:
            raise ValueError(f"LoopeContext: norm must be one of {CONTEXT_NORMS}; got {norm!r}")
        self.in_chans, self.patch = in_chans, patch
        self.conv1 = nn.Conv2d(in_chans + 2, 32, patch, patch, 0)
        self.conv2 = nn.Conv2d(32, 16, 5, 1, 2)
        self.conv3 = nn.Conv2d(16, 8, 5, 1, 2)
        self.conv4 = nn.Conv2d(8, 4, 5, 1, 2)
        self.conv5 = nn.Conv2d(4, 1, 5, 1, 2)
        self.norm = nn.BatchNorm2d(1) if norm == "batch" else nn.GroupNorm(1, 1)
        n = self.grid_size[0] * self.grid_size[1]
        self.linear = nn.Linear(n, n, bias=False)
        self.table_cache = TableCache()

    def coords(self, size: Sequence[int], device, dtype: torch.dtype) -> torch.Tensor:
        """``(2, H, W)`` pixel coordinate maps: row coordinate, then column coordinate, each in [-1, 1]."""
        def build():
            rows = torch.linspace(-1, 1, size[0], device=device, dtype=torch.float64)
            cols = torch.linspace(-1, 1, size[1], device=device, dtype=torch.float64)
            return torch.stack(torch.meshgrid(rows, cols, indexing="ij")).to(dtype)
        return self.table_cache.get("pixel_coords", tuple(size), device, dtype, build)

    def features(self, image: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Conv trunk: ``(B, C, H, W)`` -> ``(B, 1, h, w)`` (after conv5 and its GELU, before the norm)."""
        if not isinstance(image, torch.Tensor) or image.ndim != 4:
            raise ValueError(f"LOOPE: image must be (B, {self.in_chans}, H, W); got "
                             f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
        if image.shape[1] != self.in_chans:
            raise ValueError(f"LOOPE: image has {image.shape[1]} channels, the context network expects "
                             f"{self.in_chans} (image shape {tuple(image.shape)}); set the encoder option in_chans")
        h, w = grid
        size = (h * self.patch, w * self.patch)
        dtype = self.conv1.weight.dtype
        image = image.to(dtype)
        if tuple(image.shape[-2:]) != size:
            # the conv trunk sees `patch` pixels per grid cell whatever the ViT's patch size or image size
            image = F.interpolate(image.float(), size=size, mode="bilinear", align_corners=False,
                                  antialias=True).to(dtype)
        coords = self.coords(size, image.device, dtype).expand(image.shape[0], -1, -1, -1)
        z = torch.cat([image, coords], dim=1)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            z = F.gelu(conv(z))
        return z

    def linear_weight(self, grid: Sequence[int]) -> torch.Tensor:
        """The ``(N, N)`` linear weight for ``grid`` (resampled when it is not the training grid)."""
        return resample_square_operator(self.linear.weight, grid, self.grid_size)

    def forward(self, image: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """``(B, C, H, W)`` image, grid ``(h, w)`` -> ``X_C`` ``(B, h*w)`` in (-1, 1)."""
        z = self.norm(self.features(image, grid)).flatten(1)
        z = F.linear(z, self.linear_weight(grid))
        return 2 * torch.sigmoid(z) - 1

    def set_grid_size(self, grid_size: Sequence[int]) -> None:
        new = as_grid(grid_size, "grid_size", (2,))
        if new == self.grid_size:
            return  # keep the Parameter object (optimizers hold references to it)
        with torch.no_grad():
            w = resample_square_operator(self.linear.weight, new, self.grid_size)
        self.linear.weight = nn.Parameter(w.contiguous(), requires_grad=self.linear.weight.requires_grad)
        self.linear.in_features = self.linear.out_features = new[0] * new[1]
        self.grid_size = new


@register_encoder("gilbert", "static Gilbert-curve order through the 1D sinusoid (LOOPE without X_C; "
                  "the paper's 'Hilbert'); any grid")
class GilbertPE(PositionEncoder):
    """Static Gilbert-order sinusoid: patch ``p`` gets ``E(X_G[p])``, ``X_G`` the 1-based Gilbert rank.

    Args:
        variant: Gilbert entry, ``"official"`` (LOOPE code) or ``"branched"`` (supplement; differs on tall grids).
        prefix_pe: what prefix tokens (class/distillation/registers) get: ``"position0"`` (the sinusoid of
            position 0, as the official static Hilbert PE), ``"learned"`` (one learned vector per prefix
            token, zero at init, as LOOPE's class token) or ``"none"``.
        temperature: sinusoid base (10000).
        start: rank of the first cell (1 in the official code; 0 is the paper's ``0 <= X_G < N``).
    """

    hooks = frozenset({"embed"})

    def __init__(self, dim: int, num_heads: int = 1, depth: int = 1, grid_size: Sequence[int] = (14, 14),
                 num_prefix_tokens: int = 1, variant: str = "official", prefix_pe: str = "position0",
                 temperature: float = 10000.0, start: int = 1):
        super().__init__(dim, num_heads, depth, grid_size, num_prefix_tokens)
        name = type(self).__name__
        if dim % 2:
            raise ValueError(f"{name}: dim must be even for the sin/cos pairs; got dim={dim}")
        if len(self.grid_size) != 2:
            raise ValueError(f"{name} supports 2D grids (h, w); got grid_size={self.grid_size}")
        if variant not in VARIANTS:
            raise ValueError(f"{name}: variant must be one of {VARIANTS}; got {variant!r}")
        if prefix_pe not in PREFIX_MODES:
            raise ValueError(f"{name}: prefix_pe must be one of {PREFIX_MODES}; got {prefix_pe!r}")
        if isinstance(start, bool) or not isinstance(start, int):
            raise ValueError(f"{name}: start must be an int; got {start!r}")
        if not temperature > 0:
            raise ValueError(f"{name}: temperature must be > 0; got {temperature!r}")
        self.variant, self.prefix_pe, self.temperature, self.start = variant, prefix_pe, float(temperature), start
        if prefix_pe == "learned":
            self.prefix_pos = nn.Parameter(torch.zeros(num_prefix_tokens, dim))
        self._rank(self.grid_size)  # built eagerly so that torch.compile does not trace the curve recursion

    def _rank(self, grid: tuple) -> torch.Tensor:
        """``(h*w,)`` int64 CPU Gilbert ranks; one entry whatever the autograd mode (compile must find it)."""
        return self.table_cache.get("gilbert_rank", grid, "cpu", torch.int64, lambda: gilbert_rank(
            grid[0], grid[1], self.variant, self.start).reshape(-1), per_mode=False)

    def _check_layout(self, x: torch.Tensor, layout: Layout) -> None:
        if not isinstance(layout, Layout):
            raise TypeError(f"layout must be a visionpe.Layout; got {type(layout).__name__}")
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, N, {self.dim}); got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        layout.check(x.shape[1])
        if layout.ndim != 2:
            raise ValueError(f"{type(self).__name__} supports 2D grids (h, w); got layout grid {layout.grid}")
        if self.prefix_pe == "learned" and layout.num_prefix_tokens != self.num_prefix_tokens:
            raise ValueError(f"{type(self).__name__} has learned vectors for {self.num_prefix_tokens} prefix "
                             f"tokens; the layout has {layout.num_prefix_tokens}")

    def order(self, grid: Sequence[int], device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Static order ``X_G``: ``(h*w,)`` Gilbert ranks of the row-major patches, from ``start``."""
        grid = as_grid(grid, "grid", (2,))
        return self.table_cache.get("order", grid, device, dtype,
                                    lambda: self._rank(grid).to(device=device, dtype=dtype))

    def _position0(self, num: int, device, dtype) -> torch.Tensor:
        return sinusoid_1d(torch.zeros(1, num, device=device, dtype=torch.float64), self.dim,
                           self.temperature).to(dtype)

    def table(self, layout: Layout, device, dtype) -> torch.Tensor:
        """Static rows ``(1, P' + h*w, D)``: the patches' sinusoid, preceded by the ``P`` prefix rows only
        when ``prefix_pe="position0"`` (``P' = P``, else 0). Cached per (layout, device, dtype)."""
        p = layout.num_prefix_tokens if self.prefix_pe == "position0" else 0

        def build():
            t = sinusoid_1d(self.order(layout.grid, device, torch.float64), self.dim, self.temperature).to(dtype)
            if p:
                t = torch.cat([self._position0(p, device, dtype)[0], t], dim=0)
            return t.unsqueeze(0)
        return self.table_cache.get("table", (layout.grid, p), device, dtype, build)

    def _add(self, x: torch.Tensor, layout: Layout, patch_pe: torch.Tensor, has_prefix_rows: bool) -> torch.Tensor:
        """x ``(B, P + N, D)`` plus ``patch_pe`` ``(B|1, P' + N, D)``; prefix rows per ``prefix_pe``."""
        p = layout.num_prefix_tokens
        if p == 0 or has_prefix_rows:
            return x + patch_pe
        if self.prefix_pe == "learned":
            return torch.cat([x[:, :p] + self.prefix_pos.to(x.dtype), x[:, p:] + patch_pe], dim=1)
        return torch.cat([x[:, :p], x[:, p:] + patch_pe], dim=1)

    def embed(self, x: torch.Tensor, layout: Layout, stage: int = -1) -> torch.Tensor:
        """x: ``(B, P + h*w, D)`` -> the same plus the static Gilbert-order sinusoid."""
        self._check_layout(x, layout)
        t = self.table(layout, x.device, x.dtype)
        return self._add(x, layout, t, has_prefix_rows=self.prefix_pe == "position0")

    def set_grid_size(self, grid_size: Sequence[int]) -> None:
        super().set_grid_size(as_grid(grid_size, "grid_size", (2,)))
        self._rank(self.grid_size)

    def no_weight_decay(self) -> set:
        return {"prefix_pos"} if self.prefix_pe == "learned" else set()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, variant={self.variant}, prefix_pe={self.prefix_pe}"


@register_encoder("loope", "LOOPE: Gilbert order + image-dependent offset X_C in (-1, 1), 1D sinusoid; "
                  "learned class-token vector")
class LOOPE(GilbertPE):
    """LOOPE: ``X = X_G + X_C(image)`` through the interleaved 1D sinusoid, added at the input.

    Args (besides :class:`GilbertPE`'s; ``prefix_pe`` defaults to ``"learned"`` as the official class token):
        in_chans: image channels seen by the context network.
        context_patch: first-conv kernel/stride of the context network (16 in the official code).
        context_norm: ``"batch"`` (official) or ``"instance"`` (batch-independent in training too).

    ``embed(x, layout, stage, image)``: ``image`` ``(B, in_chans, H, W)`` is the model input (``needs_image``).
    """

    needs_image = True

    def __init__(self, dim: int, num_heads: int = 1, depth: int = 1, grid_size: Sequence[int] = (14, 14),
                 num_prefix_tokens: int = 1, variant: str = "official", prefix_pe: str = "learned",
                 temperature: float = 10000.0, start: int = 1, in_chans: int = 3, context_patch: int = 16,
                 context_norm: str = "batch"):
        super().__init__(dim, num_heads, depth, grid_size, num_prefix_tokens, variant=variant,
                         prefix_pe=prefix_pe, temperature=temperature, start=start)
        self.context = LoopeContext(self.grid_size, in_chans, context_patch, context_norm)

    def _resolve_image(self, image, batch: int) -> torch.Tensor:
        if image is None:
            raise ValueError("LOOPE needs the input image: call embed(x, layout, -1, image=img) with img "
                             "(B, C, H, W); hosts do this for encoders with needs_image=True")
        if not isinstance(image, torch.Tensor) or image.ndim != 4:
            raise ValueError(f"LOOPE: image must be (B, {self.context.in_chans}, H, W); got "
                             f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
        if image.shape[0] != batch:
            raise ValueError(f"LOOPE: the image batch has {image.shape[0]} samples but x has {batch}")
        return image

    # -- the encoding ------------------------------------------------------------------------------
    def positions(self, image: torch.Tensor, grid: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``X = X_G + X_C``: ``(B, h*w)`` fractional orders of the row-major patches."""
        grid = as_grid(grid, "grid", (2,))
        xc = self.context(image, grid).to(dtype)
        return self.order(grid, xc.device, dtype) + xc

    def patch_embedding(self, image: torch.Tensor, grid: Sequence[int],
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(B, h*w, D)`` interleaved sinusoid of ``X`` (computed in ``dtype``)."""
        return sinusoid_1d(self.positions(image, grid, dtype), self.dim, self.temperature)

    def embed(self, x: torch.Tensor, layout: Layout, stage: int = -1,
              image: torch.Tensor | None = None) -> torch.Tensor:
        """x: ``(B, P + h*w, D)`` -> x plus LOOPE's embedding (``(B, P + h*w, D)``)."""
        self._check_layout(x, layout)
        image = self._resolve_image(image, x.shape[0])
        pe = self.patch_embedding(image, layout.grid, _compute_dtype(x.dtype)).to(x.dtype)
        p = layout.num_prefix_tokens
        if p and self.prefix_pe == "position0":
            pe = torch.cat([self._position0(p, x.device, x.dtype).expand(x.shape[0], -1, -1), pe], dim=1)
        return self._add(x, layout, pe, has_prefix_rows=self.prefix_pe == "position0")

    def set_grid_size(self, grid_size: Sequence[int]) -> None:
        super().set_grid_size(grid_size)
        self.context.set_grid_size(self.grid_size)


def convert_official_state_dict(sd: dict, prefix: str = "") -> dict:
    """Map an official ``ArtPE`` state dict (keys under ``prefix``) onto :class:`LOOPE`'s parameter names.

    ``art_conv.{0,2,4,6,8}`` -> ``context.conv{1..5}``, ``art_conv.10`` -> ``context.norm``, ``art_conv.12``
    -> ``context.linear``, ``cls_token`` ``(1, D)`` -> ``prefix_pos``. The buffers ``cord``,
    ``wrap_pos_hilbert`` and ``div_term`` are recomputed by LOOPE and dropped.
    """
    names = {"art_conv.0": "context.conv1", "art_conv.2": "context.conv2", "art_conv.4": "context.conv3",
             "art_conv.6": "context.conv4", "art_conv.8": "context.conv5", "art_conv.10": "context.norm",
             "art_conv.12": "context.linear"}
    out = {}
    for key, val in sd.items():
        if not key.startswith(prefix):
            continue
        k = key[len(prefix):]
        if k in ("cord", "wrap_pos_hilbert", "div_term"):
            continue
        if k == "cls_token":
            out["prefix_pos"] = val
            continue
        mod, _, leaf = k.rpartition(".")
        if mod not in names:
            raise ValueError(f"convert_official_state_dict: unexpected key {key!r}")
        out[f"{names[mod]}.{leaf}"] = val
    return out

