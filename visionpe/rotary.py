"""The one rotary core behind every RoPE variant (2D axial/mixed, MD-LRPE rotate form, M-RoPE, VRoPE,
HoPE, V2PE, ...).

Three steps, each a small function:

1. **frequencies** — :func:`inv_freq` gives the classic ``theta ** (-i / n)`` bands; a variant decides
   which position axis drives each frequency through a *frequency matrix* ``W`` of shape ``(A, F)``
   (:func:`axial_freq_matrix` for 2D RoPE; :func:`sectioned_freq_matrix` from a per-frequency axis
   allocation for M-RoPE, VRoPE and HoPE, whose zero-frequency columns stay 0; MD-LRPE builds its own);
   learnable variants (RoPE-Mixed) make ``W`` a parameter.
2. **angles** — :func:`rotary_angles` is the one angle path: ``positions @ W`` as a sum of per-axis outer
   products, with positions ``(..., N, A)``. One precision rule (:func:`angle_dtype_for`) whatever the model
   dtype: float32 when every position is exact in float32 (bit-identical to the reference
   ``position.float() * inv_freq``), float64 otherwise (integers beyond :data:`EXACT_F32` = 2**24, fine
   fractions at large magnitudes). :func:`angles_from_axes` is the same path for the VLM's per-axis
   position rows ``(A, ..., N)`` and an axis allocation.
3. **apply** — :func:`apply_rotary` rotates channel pairs of q or k by those angles, in either pairing
   convention:

   * ``interleaved=True``: pairs ``(2j, 2j+1)`` (EVA02, RoPE-ViT, timm ``rot``);
   * ``interleaved=False``: pairs ``(j, j + D/2)`` (LLaMA/Qwen "rotate_half").

   The interleaved path uses one complex multiply (no ``cat``/``stack`` of halves); rows for prefix
   tokens are identity rotations built into the table (:func:`pad_prefix`), so the hot path needs no
   slicing of q/k either.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .layout import grid_positions

__all__ = [
    "inv_freq", "axial_freq_matrix", "sectioned_freq_matrix", "rotary_angles", "angles_to_cis",
    "apply_rotary", "apply_rotary_cis", "rotation_table", "rotate_interleaved", "pad_prefix", "grid_positions",
    "expand_layout", "check_rotary_dim", "section_axes", "cyclic_axes", "hybrid_axes", "EXACT_F32",
    "exact_in_float32", "angle_dtype_for", "angles_from_axes",
]

#: the largest magnitude up to which float32 holds every integer exactly
EXACT_F32 = 2 ** 24


def inv_freq(num: int, theta: float = 10000.0, *, step_denominator: int | None = None,
             device=None) -> torch.Tensor:
    """Frequencies ``theta ** (-i / d)`` for ``i = 0..num-1`` as float32 ``(num,)``.

    ``d`` defaults to ``num`` (timm's ``freq_bands(num, step=1)``; per-axis bands of 2D RoPE). LLM-style
    RoPE over ``head_dim`` channels is ``inv_freq(head_dim // 2, theta)`` with the classic
    ``theta ** (-2i / head_dim)``, which is the same formula with ``d = head_dim / 2``.
    """
    if num <= 0:
        raise ValueError(f"num must be >= 1; got {num}")
    if theta <= 0:
        raise ValueError(f"theta must be > 0; got {theta}")
    d = num if step_denominator is None else step_denominator
    exp = torch.arange(num, dtype=torch.int64, device=device).to(torch.float32) / d
    return 1.0 / (theta ** exp)


def check_rotary_dim(head_dim: int, multiple: int, what: str) -> None:
    """Raise ``ValueError`` unless ``head_dim`` is a positive multiple of ``multiple``."""
    if head_dim <= 0 or head_dim % multiple:
        raise ValueError(f"{what} needs head_dim divisible by {multiple}; got head_dim={head_dim}")


def axial_freq_matrix(bands: torch.Tensor, num_axes: int) -> torch.Tensor:
    """Block-diagonal frequency matrix ``(A, A * nb)``: axis ``a`` drives frequencies ``[a*nb, (a+1)*nb)``.

    This is timm's axial layout: the first quarter of the channel pairs rotate with the first axis, the
    next with the second, each with the same ``bands``.
    """
    nb = bands.numel()
    w = torch.zeros(num_axes, num_axes * nb, dtype=bands.dtype, device=bands.device)
    for a in range(num_axes):
        w[a, a * nb:(a + 1) * nb] = bands
    return w


def sectioned_freq_matrix(freqs: torch.Tensor, axis_of_freq: torch.Tensor, num_axes: int) -> torch.Tensor:
    """Frequency matrix ``(A, F)`` where frequency ``f`` is driven by axis ``axis_of_freq[f]`` alone.

    Built from an allocation (:func:`section_axes` for M-RoPE, :func:`cyclic_axes` for VRoPE,
    :func:`hybrid_axes` for HoPE) by :func:`angles_from_axes`; a negative axis id leaves the frequency at
    zero (HoPE's zero-frequency channels). Axis ids must be ``< num_axes``.
    """
    if freqs.ndim != 1 or axis_of_freq.shape != freqs.shape:
        raise ValueError(f"freqs {tuple(freqs.shape)} and axis_of_freq {tuple(axis_of_freq.shape)} must both be (F,)")
    if axis_of_freq.numel() and int(axis_of_freq.max()) >= num_axes:
        raise ValueError(f"the frequency allocation reads axis {int(axis_of_freq.max())} but positions have "
                         f"{num_axes} axes")
    axis_of_freq = axis_of_freq.to(freqs.device)
    w = torch.zeros(num_axes, freqs.numel(), dtype=freqs.dtype, device=freqs.device)
    valid = axis_of_freq >= 0
    cols = torch.arange(freqs.numel(), device=freqs.device)[valid]
    w[axis_of_freq[valid].long(), cols] = freqs[valid]
    return w


def rotary_angles(positions: torch.Tensor, freq_matrix: torch.Tensor, *,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Angles ``positions @ freq_matrix`` as a sum of per-axis outer products: the one angle path.

    Args:
        positions: ``(..., N, A)`` positions (any real dtype).
        freq_matrix: ``(..., A, F)``; leading dims broadcast against ``positions``' (e.g. per block/head).
        dtype: angle precision; ``None`` applies the precision rule, :func:`angle_dtype_for` (float32 unless
            that would round a position, then float64).

    Returns:
        ``(..., N, F)`` in ``dtype``. Element-wise products (not ``matmul``) keep autocast from downcasting,
        and a frequency driven by one axis is one product ``position * frequency`` (plus exact zeros), so
        float32 angles are bit-identical to the reference ``position.float() * inv_freq``.
    """
    if positions.shape[-1] != freq_matrix.shape[-2]:
        raise ValueError(f"positions has {positions.shape[-1]} axes (shape {tuple(positions.shape)}) but "
                         f"freq_matrix expects {freq_matrix.shape[-2]} (shape {tuple(freq_matrix.shape)})")
    dtype = angle_dtype_for(positions) if dtype is None else dtype
    pos = positions.to(dtype)
    w = freq_matrix.to(device=pos.device, dtype=dtype)
    out = pos[..., 0:1] * w[..., 0:1, :]
    for a in range(1, positions.shape[-1]):
        out = out + pos[..., a:a + 1] * w[..., a:a + 1, :]
    return out


def angles_to_cis(angles: torch.Tensor) -> torch.Tensor:
    """``exp(i * angles)`` as complex64 (angles are evaluated in their own precision first)."""
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def pad_prefix(table: torch.Tensor, num_prefix: int, identity) -> torch.Tensor:
    """Prepend ``num_prefix`` identity rows along dim -2 (cos 1 / sin 0 / cis 1) for unrotated tokens."""
    if num_prefix == 0:
        return table
    shape = list(table.shape)
    shape[-2] = num_prefix
    return torch.cat([table.new_full(shape, identity), table], dim=-2)


def expand_layout(t: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Per-frequency ``(..., F)`` -> per-channel ``(..., 2F)``: ``[f0,f0,f1,f1..]`` or ``[f0,f1..,f0,f1..]``."""
    return t.repeat_interleave(2, -1) if interleaved else torch.cat([t, t], dim=-1)


def rotation_table(angles: torch.Tensor, num_prefix: int = 0):
    """Angles ``(..., N, F)`` -> a table for :func:`rotate_interleaved`, with identity rows for prefix tokens.

    Eager mode returns a complex tensor (one complex multiply per application); under ``torch.compile``
    it returns ``(cos, sin)``, since Inductor generates no code for complex ops but fuses the real maths.
    """
    if torch.compiler.is_compiling():
        return pad_prefix(angles.cos(), num_prefix, 1.0), pad_prefix(angles.sin(), num_prefix, 0.0)
    return pad_prefix(angles_to_cis(angles), num_prefix, 1.0)


def rotate_interleaved(x: torch.Tensor, table) -> torch.Tensor:
    """Apply a :func:`rotation_table` (complex tensor or ``(cos, sin)``) to interleaved pairs of ``x``."""
    if isinstance(table, tuple):
        return apply_rotary(x, table[0], table[1], interleaved=True)
    return apply_rotary_cis(x, table)


def apply_rotary_cis(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of ``x`` by a complex table.

    Args:
        x: ``(..., N, D)`` with ``D = 2F``; rotation runs in float32 (or x's dtype if wider).
        cis: complex ``(..., N, F)`` broadcastable to x's leading dims.
    Returns:
        ``(..., N, D)`` in x's dtype.
    """
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if work.stride(-1) != 1:
        work = work.contiguous()
    xc = torch.view_as_complex(work.unflatten(-1, (-1, 2)))
    out = torch.view_as_real(xc * cis).flatten(-2)
    return out.to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """Rotate channel pairs of ``x`` by angles given as per-frequency ``cos``/``sin``.

    Args:
        x: ``(..., N, D)``; ``D = 2F`` (channels beyond ``2F`` would be an error, not silently kept).
        cos, sin: ``(..., N, F)`` broadcastable to x's leading dims (float32/64).
        interleaved: pair convention, see the module docstring.
    Returns:
        ``(..., N, D)`` in x's dtype; products are taken in the tables' precision.
    """
    f = cos.shape[-1]
    if x.shape[-1] != 2 * f:
        raise ValueError(f"x has {x.shape[-1]} channels but the rotary tables have {f} frequencies "
                         f"(expected x.shape[-1] == {2 * f})")
    if interleaved:
        x1, x2 = x.unflatten(-1, (f, 2)).unbind(-1)
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = x[..., :f], x[..., f:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)



# ---------------------------------------------------------------------------------------------------------
# Per-frequency axis allocation (multimodal RoPE: M-RoPE sections, VRoPE cycles, HoPE zero frequencies).
# An allocation is a LongTensor ``axis_of_freq`` of shape ``(F,)``: frequency ``f`` reads position axis
# ``axis_of_freq[f]``; ``-1`` means a zero frequency (angle 0: cos 1, sin 0, an identity rotation).


def section_axes(sections: Sequence[int], interleaved: bool = False, *, num_freqs: int | None = None,
                 device=None) -> torch.Tensor:
    """Axis of each frequency for M-RoPE sections, as ``(F,)`` int64 with ``F = sum(sections)``.

    * ``interleaved=False`` (Qwen2-VL / Qwen2.5-VL): contiguous blocks, axis ``a`` takes frequencies
      ``[sum(sections[:a]), sum(sections[:a+1]))`` (the first axis gets the highest frequencies).
    * ``interleaved=True`` (Qwen3-VL, 3 axes): start with every frequency on axis 0, then frequency ``i``
      goes to axis ``a >= 1`` when ``i % 3 == a`` and ``i < 3 * sections[a]``; axis 0 keeps the rest
      (``i % 3 == 0`` plus the tail), so every axis spans the whole frequency range.

    ``num_freqs`` (``head_dim // 2``) is checked against ``sum(sections)``: a head_dim the sections don't
    fit raises ``ValueError``.
    """
    secs = tuple(int(s) for s in sections)
    if not secs or any(s < 0 for s in secs):
        raise ValueError(f"sections must be non-negative ints; got {tuple(sections)}")
    total = sum(secs)
    if num_freqs is not None and total != num_freqs:
        raise ValueError(f"sections {secs} sum to {total} rotary frequencies but head_dim={2 * num_freqs} "
                         f"has {num_freqs} (head_dim / 2); the sections must sum to head_dim / 2")
    if not interleaved:
        return torch.repeat_interleave(torch.arange(len(secs), device=device),
                                       torch.tensor(secs, device=device), output_size=total)
    if len(secs) != 3:
        raise ValueError(f"interleaved sections need exactly 3 axes (t, h, w); got {secs}")
    axes = torch.zeros(total, dtype=torch.int64, device=device)
    for a in (1, 2):
        if 3 * secs[a] - 3 + a >= total:
            raise ValueError(f"interleaved sections {secs}: axis {a} needs frequency index {3 * secs[a] - 3 + a} "
                             f"but there are only {total} frequencies")
        axes[a:3 * secs[a]:3] = a
    return axes


def cyclic_axes(num_freqs: int, order: Sequence[int], *, device=None) -> torch.Tensor:
    """Frequency ``f`` reads axis ``order[f % len(order)]`` (VRoPE's four mirrored arrangements)."""
    if num_freqs <= 0:
        raise ValueError(f"num_freqs must be >= 1; got {num_freqs}")
    order_t = torch.tensor([int(o) for o in order], dtype=torch.int64, device=device)
    return order_t[torch.arange(num_freqs, device=device) % order_t.numel()]


def hybrid_axes(num_spatial: int, num_temporal: int, *, spatial: Sequence[int] = (1, 2), temporal_axis: int = -1,
                device=None) -> torch.Tensor:
    """HoPE-style allocation: the ``num_spatial`` highest frequencies alternate over ``spatial`` axes
    (``f % len(spatial)``), the ``num_temporal`` lowest read ``temporal_axis`` (``-1``: zero frequency)."""
    if num_spatial < 0 or num_temporal < 0:
        raise ValueError(f"frequency counts must be >= 0; got num_spatial={num_spatial}, num_temporal={num_temporal}")
    sp = torch.tensor([int(a) for a in spatial], dtype=torch.int64, device=device)
    head = sp[torch.arange(num_spatial, device=device) % sp.numel()]
    tail = torch.full((num_temporal,), int(temporal_axis), dtype=torch.int64, device=device)
    return torch.cat([head, tail])


def exact_in_float32(x: torch.Tensor) -> bool:
    """True when every value of ``x`` survives a round trip through float32 unchanged.

    Integers beyond :data:`EXACT_F32` and fine fractions at large magnitudes (V2PE: ``c + k/256`` above
    2**16) do not. Float32 and narrower inputs are exact by definition (no data-dependent check, so this
    stays a constant under ``torch.compile``).
    """
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return True
    if not x.is_floating_point():
        return x.numel() == 0 or bool(x.abs().max() <= EXACT_F32)
    return bool(torch.equal(x.to(torch.float32).to(x.dtype), x))


def angle_dtype_for(positions: torch.Tensor) -> torch.dtype:
    """The precision rule: float32 when the positions are exact in float32 (what the reference code
    computes in), else float64."""
    return torch.float32 if exact_in_float32(positions) else torch.float64


def angles_from_axes(positions: torch.Tensor, freqs: torch.Tensor, axis_of_freq: torch.Tensor, *,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`rotary_angles` for per-axis position rows and a frequency allocation (the VLM schemes' form).

    Angle ``f`` is ``positions[axis_of_freq[f]] * freqs[f]`` (0 where the axis is ``-1``).

    Args:
        positions: ``(A, ..., N)`` positions, one row per axis (any real dtype).
        freqs: ``(F,)`` inverse frequencies (float32 as in the reference code).
        axis_of_freq: ``(F,)`` int axis per frequency, ``-1`` for a zero frequency.
        dtype: angle precision; ``None`` applies :func:`angle_dtype_for`.
    Returns:
        ``(..., N, F)`` angles, bit-identical in float32 to the HF/official ``position.float() * inv_freq``.
    """
    w = sectioned_freq_matrix(freqs.to(positions.device), axis_of_freq, positions.shape[0])
    return rotary_angles(positions.movedim(0, -1), w, dtype=dtype)
