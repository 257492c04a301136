"""Layout of a batch of multimodal token sequences: text, images, videos and padding as segments.

A sequence is a list of segments in token order:

* :class:`Text` ``(n)``: ``n`` ordinary tokens (special markers such as ``<|vision_start|>``, ``<img>`` or
  Qwen3-VL timestamps are text);
* :class:`Image` ``(h, w, tiles=1)``: ``tiles * h * w`` visual tokens, ``h x w`` per tile in row-major order
  (``tiles > 1``: InternVL-style tiles plus thumbnail, used by V2PE);
* :class:`Video` ``(t, h, w, seconds_per_frame=1.0)``: ``t * h * w`` tokens, frame-major then row-major;
  ``t`` counts the temporal steps the LLM sees (Qwen: temporal patches) and ``seconds_per_frame`` is the
  time between two of them (Qwen2.5-VL's ``second_per_grid_t``); :meth:`Video.at_fps` converts from fps;
* :class:`Padding` ``(n)``: masked slots (attention mask 0); they never advance a position counter.

Grids are in LLM tokens (after any patch merger). :class:`VLMLayout` pads a batch to one length on the
left or the right and compiles it into a :class:`SegmentTable` (one row per segment, all tensors), which is
what the position schemes consume. :meth:`VLMLayout.from_token_types` builds the same table directly from
HF-style ``mm_token_type_ids`` + grids (:mod:`visionpe.vlm.hf_inputs`, next to the other HF conversions).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence, Union

import torch

from ._checks import short_repr

__all__ = ["Text", "Image", "Video", "Padding", "Segment", "VLMLayout", "SegmentTable",
           "TEXT", "IMAGE", "VIDEO", "PAD"]

TEXT, IMAGE, VIDEO, PAD = 0, 1, 2, 3  # HF mm_token_type_ids use 0/1/2 for text/image/video
_KIND_NAMES = {TEXT: "text", IMAGE: "image", VIDEO: "video", PAD: "padding"}


def _pos_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value)
        else:
            raise TypeError(f"{name} must be an int; got {short_repr(value)}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1; got {value}")
    return value


@dataclass(frozen=True)
class Text:
    """``n`` text tokens (1-D positions in every scheme)."""
    n: int

    def __post_init__(self):
        object.__setattr__(self, "n", _pos_int(self.n, "Text.n"))

    @property
    def num_tokens(self) -> int:
        return self.n


@dataclass(frozen=True)
class Image:
    """An image of ``h x w`` LLM tokens per tile; ``tiles`` tiles (thumbnail included) in one run."""
    h: int
    w: int
    tiles: int = 1

    def __post_init__(self):
        for name in ("h", "w", "tiles"):
            object.__setattr__(self, name, _pos_int(getattr(self, name), f"Image.{name}"))

    @classmethod
    def tiled(cls, h: int, w: int, rows: int, cols: int, thumbnail: bool = True) -> "Image":
        """InternVL dynamic tiling: ``rows x cols`` tiles, plus a thumbnail tile when there is more than one."""
        n = _pos_int(rows, "rows") * _pos_int(cols, "cols")
        return cls(h, w, n + (1 if thumbnail and n > 1 else 0))

    @property
    def num_tokens(self) -> int:
        return self.tiles * self.h * self.w


@dataclass(frozen=True)
class Video:
    """A video of ``t`` temporal steps of ``h x w`` tokens; ``seconds_per_frame`` between two steps."""
    t: int
    h: int
    w: int
    seconds_per_frame: float = 1.0

    def __post_init__(self):
        for name in ("t", "h", "w"):
            object.__setattr__(self, name, _pos_int(getattr(self, name), f"Video.{name}"))
        s = self.seconds_per_frame
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise ValueError(f"Video.seconds_per_frame must be a finite number > 0; got {short_repr(s)}")
        object.__setattr__(self, "seconds_per_frame", float(s))

    @classmethod
    def at_fps(cls, t: int, h: int, w: int, fps: float, frames_per_step: int = 2) -> "Video":
        """Video sampled at ``fps`` with ``frames_per_step`` frames merged per temporal step (Qwen: 2)."""
        if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a finite number > 0; got {short_repr(fps)}")
        return cls(t, h, w, _pos_int(frames_per_step, "frames_per_step") / fps)

    @property
    def num_tokens(self) -> int:
        return self.t * self.h * self.w


@dataclass(frozen=True)
class Padding:
    """``n`` padded slots (attention mask 0)."""
    n: int

    def __post_init__(self):
        object.__setattr__(self, "n", _pos_int(self.n, "Padding.n"))

    @property
    def num_tokens(self) -> int:
        return self.n


Segment = Union[Text, Image, Video, Padding]
_SEGMENT_TYPES = (Text, Image, Video, Padding)


def _as_segment(seg) -> Segment:
    """Accept segment objects or the shorthand tuples ``("text", n)``, ``("image", h, w[, tiles])``,
    ``("video", t, h, w[, seconds_per_frame])``, ``("pad", n)``."""
    if isinstance(seg, _SEGMENT_TYPES):
        return seg
    if isinstance(seg, (tuple, list)) and seg and isinstance(seg[0], str):
        kind, args = seg[0], tuple(seg[1:])
        cls = {"text": Text, "image": Image, "video": Video, "pad": Padding, "padding": Padding}.get(kind)
        if cls is None:
            raise ValueError(f"unknown segment kind {short_repr(kind)}; expected text, image, video or pad")
        return cls(*args)
    raise TypeError(f"a segment must be Text, Image, Video, Padding or a tuple like ('text', 5); got {short_repr(seg)}")


@dataclass(frozen=True)
class SegmentTable:
    """One row per segment of a padded batch, in token order (sequence 0 first). All ``(S,)`` tensors.

    Attributes:
        seq: sequence index of the segment.
        kind: ``TEXT``/``IMAGE``/``VIDEO``/``PAD``.
        n: number of tokens.
        t, h, w: grid (``t = 1`` for images, ``1, 1, n`` for text and padding).
        tiles: tiles of an image (1 otherwise).
        seconds: seconds between temporal steps of a video (float64; 1.0 otherwise).
        start: flat index of the segment's first token in the ``(B * L)`` token stream.
        batch_size, length: ``B`` and ``L``.
    """
    seq: torch.Tensor
    kind: torch.Tensor
    n: torch.Tensor
    t: torch.Tensor
    h: torch.Tensor
    w: torch.Tensor
    tiles: torch.Tensor
    seconds: torch.Tensor
    batch_size: int
    length: int
    start: torch.Tensor = field(init=False)

    def __post_init__(self):
        S = self.n.numel()
        for name in ("seq", "kind", "n", "t", "h", "w", "tiles", "seconds"):
            v = getattr(self, name)
            if not isinstance(v, torch.Tensor) or v.shape != (S,):
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"SegmentTable.{name} must be a ({S},) tensor like n; got {shape}")
        for name in ("t", "h", "w", "tiles"):  # grids: every entry >= 1, wherever the table comes from
            bad = (getattr(self, name) < 1).nonzero()
            if bad.numel():
                i = int(bad[0, 0])
                raise ValueError(f"SegmentTable.{name} must be >= 1; segment {i} has {int(getattr(self, name)[i])} "
                                 f"({bad.numel()} bad segment(s))")
        vis = (self.kind == IMAGE) | (self.kind == VIDEO)
        wrong = (vis & (self.n != self.t * self.tiles * self.h * self.w)).nonzero()
        if wrong.numel():
            i = int(wrong[0, 0])
            raise ValueError(f"SegmentTable: vision segment {i} has n={int(self.n[i])} tokens but its grid "
                             f"t*tiles*h*w = {int(self.t[i] * self.tiles[i] * self.h[i] * self.w[i])}")
        object.__setattr__(self, "start", torch.cumsum(self.n, 0) - self.n)

    @property
    def num_segments(self) -> int:
        return int(self.n.numel())

    @property
    def is_vision(self) -> torch.Tensor:
        return (self.kind == IMAGE) | (self.kind == VIDEO)

    def segmented_exclusive_cumsum(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sequence exclusive cumulative sum of ``(S,)`` values (the counter before each segment)."""
        cs = torch.cumsum(values, 0)
        excl = cs - values
        first = torch.searchsorted(self.seq, torch.arange(self.batch_size, dtype=self.seq.dtype))
        return excl - excl[first][self.seq]

    def per_sequence_sum(self, values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.batch_size, dtype=values.dtype)
        return out.index_add_(0, self.seq, values)

    def per_sequence_max(self, values: torch.Tensor, empty: float = -math.inf) -> torch.Tensor:
        out = torch.full((self.batch_size,), empty, dtype=values.dtype)
        return out.scatter_reduce_(0, self.seq, values, reduce="amax", include_self=True)


class VLMLayout:
    """A batch of ``B`` multimodal sequences padded to one length ``L``.

    Args:
        sequences: one sequence (a list of segments) or a list of sequences. Segments are :class:`Text`,
            :class:`Image`, :class:`Video`, :class:`Padding` or shorthand tuples (``("image", 4, 6)``).
        padding_side: ``"right"`` or ``"left"``: where the padding that brings every sequence to ``L`` goes.
        length: ``L``; defaults to the longest sequence. Shorter than a sequence is an error.

    The layout is immutable and hashable (by its segments), so it can key caches. ``table`` is the compiled
    :class:`SegmentTable`; ``padding_mask`` the ``(B, L)`` bool mask of real tokens.

    >>> VLMLayout([Text(10), Image(4, 6), Text(5)]).length
    39
    """

    def __init__(self, sequences, *, padding_side: str = "right", length: int | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right'; got {short_repr(padding_side)}")
        seqs = list(sequences)
        if not seqs:
            raise ValueError("a layout needs at least one sequence")
        if not isinstance(seqs[0], (list, tuple)) or (seqs[0] and isinstance(seqs[0][0], str)):
            seqs = [seqs]  # a single sequence
        parsed = []
        for i, s in enumerate(seqs):
            segs = tuple(_as_segment(x) for x in s)
            if not segs:
                raise ValueError(f"sequence {i} is empty")
            parsed.append(segs)
        counts = [sum(x.num_tokens for x in s) for s in parsed]
        target = max(counts) if length is None else _pos_int(length, "length")
        if target < max(counts):
            i = counts.index(max(counts))
            raise ValueError(f"length={target} is shorter than sequence {i}, which has {counts[i]} tokens")
        padded = []
        for s, n in zip(parsed, counts):
            if n < target:
                s = (Padding(target - n),) + s if padding_side == "left" else s + (Padding(target - n),)
            padded.append(s)
        self.sequences: tuple[tuple[Segment, ...], ...] = tuple(padded)
        self.padding_side = padding_side
        self._table: SegmentTable | None = None
        self._key = self.sequences

    # -- construction from tensors ------------------------------------------------------------------
    @classmethod
    def from_table(cls, table: SegmentTable) -> "VLMLayout":
        """Wrap an already compiled :class:`SegmentTable` (no per-segment Python objects)."""
        obj = cls.__new__(cls)
        obj.sequences = None
        obj.padding_side = None
        obj._table = table
        obj._key = ("table", id(table))
        return obj

    @classmethod
    def from_token_types(cls, mm_token_type_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                         video_grid_thw: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                         second_per_grid_ts: torch.Tensor | Sequence[float] | None = None, *,
                         spatial_merge_size: int = 2, split_video_frames: bool = False) -> "VLMLayout":
        """Layout from HF Qwen-VL processor outputs: :func:`visionpe.vlm.hf_inputs.layout_from_token_types`."""
        from .hf_inputs import layout_from_token_types
        return layout_from_token_types(mm_token_type_ids, image_grid_thw, video_grid_thw, attention_mask,
                                       second_per_grid_ts, spatial_merge_size=spatial_merge_size,
                                       split_video_frames=split_video_frames)

    # -- compiled form ----------------------------------------------------------------------------------
    @property
    def table(self) -> SegmentTable:
        if self._table is None:
            self._table = self._compile()
        return self._table

    def _compile(self) -> SegmentTable:
        rows = []
        for b, segs in enumerate(self.sequences):  # one row per segment: bounded by the segment count
            for s in segs:
                if isinstance(s, Text):
                    rows.append((b, TEXT, s.n, 1, 1, s.n, 1, 1.0))
                elif isinstance(s, Padding):
                    rows.append((b, PAD, s.n, 1, 1, s.n, 1, 1.0))
                elif isinstance(s, Image):
                    rows.append((b, IMAGE, s.num_tokens, 1, s.h, s.w, s.tiles, 1.0))
                else:
                    rows.append((b, VIDEO, s.num_tokens, s.t, s.h, s.w, 1, s.seconds_per_frame))
        cols = list(zip(*rows))
        ints = torch.tensor([list(c) for c in cols[:7]], dtype=torch.int64)
        return SegmentTable(seq=ints[0], kind=ints[1], n=ints[2], t=ints[3], h=ints[4], w=ints[5], tiles=ints[6],
                            seconds=torch.tensor(cols[7], dtype=torch.float64),
                            batch_size=len(self.sequences), length=int(sum(x.num_tokens for x in self.sequences[0])))

    @property
    def batch_size(self) -> int:
        return self.table.batch_size

    @property
    def length(self) -> int:
        return self.table.length

    @cached_property
    def padding_mask(self) -> torch.Tensor:
        """``(B, L)`` bool, True for real tokens, False for padding."""
        tb = self.table
        is_pad = torch.repeat_interleave(tb.kind == PAD, tb.n, output_size=tb.batch_size * tb.length)
        return (~is_pad).view(tb.batch_size, tb.length)

    def token_types(self) -> torch.Tensor:
        """``(B, L)`` int64: 0 text, 1 image, 2 video, 3 padding."""
        tb = self.table
        return torch.repeat_interleave(tb.kind, tb.n, output_size=tb.batch_size * tb.length).view(
            tb.batch_size, tb.length)

    def check(self, batch_size: int, length: int, name: str = "input_ids") -> None:
        """Raise ``ValueError`` unless an input of shape ``(batch_size, length)`` matches this layout."""
        if (batch_size, length) != (self.batch_size, self.length):
            raise ValueError(f"{name} has shape ({batch_size}, {length}) but the layout describes "
                             f"{self.batch_size} sequence(s) of {self.length} tokens")

    def __eq__(self, other):
        return isinstance(other, VLMLayout) and self._key == other._key

    def __hash__(self):
        return hash(self._key)

    def __repr__(self) -> str:
        if self.sequences is None:
            return f"VLMLayout(<table: {self.table.num_segments} segments>, B={self.batch_size}, L={self.length})"
        return f"VLMLayout({[list(s) for s in self.sequences]!r}, padding_side={self.padding_side!r})"
