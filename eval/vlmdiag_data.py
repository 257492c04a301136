"""Synthetic interleaved text / video / question sequences for the VLM position diagnostic: a seeded, cached,
vectorised generator and its label rule.

A sample is ``[filler] <vstart> [video: T frames of h x w cells] <vend> [filler] q1 a1 q2 a2 ...``: every
question of the recipe, in a random order, each followed by its answer token (teacher forcing: the model is
scored on the answer token it predicts after each question). Every video token is one cell whose content is
only its colour (background or one of the colours below), so a cell's content says nothing about where or
when it is, as in Three-Cell. Each question reads its own coloured cells, so the answers of one sample are
independent of each other and an earlier answer tells nothing about a later question. A moving object is
shown by two colours, one for where it starts (frame ``f1``) and one for where it ends (a later frame
``f2``), so the move questions compare positions across frames without also asking which appearance comes
first (that is the ``order`` question):

========  ========  =============================================  ==========================================
question  group     cells and question                             answers (class 0, 1, ...)
========  ========  =============================================  ==========================================
order     temporal  O1, O2 once, in different frames: is O1        yes, no
                    first?
half      temporal  H once: in the first or the second half?       first, second
left_of   spatial   S1, S2 in one frame: is S1 left of S2?         yes, no
same_row  spatial   (the same S1, S2): in the same row?            yes, no
corner    spatial   C once: which corner of its frame is nearest?  top_left, top_right, bottom_left, bottom_right
hmove     across    M1 at frame f1, M2 at a later frame, one row:  left, right, stayed
                    did the object move?
vmove     across    V1 at f1, V2 later, one column: did it move?   up, down, stayed
========  ========  =============================================  ==========================================

Coordinates are ``(f, r, c)``: frame, row (grows downwards) and column, all from 0. ``half`` never uses the
middle frame of an odd-length video, ``corner`` never the middle row or column of an odd grid (no answer
there). :func:`answers` is the label rule (exact integer comparisons, ``-1`` where a configuration has no
answer). The generator draws each answer first (uniform over the question's answers, so labels are balanced)
and then places the cells to match it, redrawing any that would share a cell; it checks every sample against
:func:`answers`. ``distractors`` extra cells of a distractor colour are placed at random.

Object slots ``objects[:, k]`` are listed in :data:`SLOTS`; an absent object (question not asked, or a missing
distractor) is ``(-1, -1, -1)``. No two present objects share a cell of the same frame.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["QUESTIONS", "GROUPS", "SLOTS", "ANSWER_WORDS", "Vocab", "DataConfig", "SplitSpec", "answers",
           "generate_split", "load_or_generate", "default_cache_dir", "tokens_and_layout", "majority_answers"]

#: question -> names of its answer classes (class index = position)
QUESTIONS: dict[str, tuple[str, ...]] = {
    "order": ("yes", "no"),
    "half": ("first", "second"),
    "left_of": ("yes", "no"),
    "same_row": ("yes", "no"),
    "corner": ("top_left", "top_right", "bottom_left", "bottom_right"),
    "hmove": ("left", "right", "stayed"),
    "vmove": ("up", "down", "stayed"),
}
#: group -> its questions
GROUPS: dict[str, tuple[str, ...]] = {
    "temporal": ("order", "half"),
    "spatial": ("left_of", "same_row", "corner"),
    "across": ("hmove", "vmove"),
}
QUESTION_IDS = {q: i for i, q in enumerate(QUESTIONS)}
ANSWER_WORDS: tuple[str, ...] = tuple(dict.fromkeys(w for ws in QUESTIONS.values() for w in ws))
#: object slots: name -> (slot index, colour index)
SLOTS: dict[str, tuple[int, int]] = {"O1": (0, 0), "O2": (1, 1), "H": (2, 2), "S1": (3, 3), "S2": (4, 4),
                                     "C": (5, 5), "M1": (6, 6), "M2": (7, 7), "V1": (8, 8), "V2": (9, 9)}
NUM_COLOURS = len(SLOTS) + 1  # one colour per slot + the distractor colour
#: the slots each question places (together, in one draw)
QUESTION_SLOTS = {"order": ("O1", "O2"), "half": ("H",), "left_of": ("S1", "S2"), "same_row": ("S1", "S2"),
                  "corner": ("C",), "hmove": ("M1", "M2"), "vmove": ("V1", "V2")}
#: questions that share their cells (answers drawn jointly, independently of each other)
FAMILIES = (("order",), ("half",), ("left_of", "same_row"), ("corner",), ("hmove",), ("vmove",))
#: bump when the generator's output changes (part of the cache key)
FORMAT_VERSION = 3


class Vocab:
    """Token ids: ``pad``, background, the colours (:data:`SLOTS` colours, then the distractor colour),
    ``<vstart>``, ``<vend>``, one token per question, one per answer word, then ``filler`` content-free ids."""

    PAD, BACKGROUND = 0, 1

    def __init__(self, filler: int):
        self.colour0 = 2
        self.vstart = self.colour0 + NUM_COLOURS
        self.vend = self.vstart + 1
        self.question0 = self.vend + 1
        self.answer0 = self.question0 + len(QUESTIONS)
        self.filler0 = self.answer0 + len(ANSWER_WORDS)
        self.size = self.filler0 + int(filler)

    def answer_tokens(self) -> np.ndarray:
        """``(num_questions, 4)`` token id of class ``k`` of question ``q`` (``-1`` past its last class)."""
        width = max(len(v) for v in QUESTIONS.values())
        out = np.full((len(QUESTIONS), width), -1, dtype=np.int64)
        for qi, words in enumerate(QUESTIONS.values()):
            out[qi, :len(words)] = [self.answer0 + ANSWER_WORDS.index(w) for w in words]
        return out


def _int_range(value, name: str, low: int) -> tuple[int, int]:
    """An int ``v`` (meaning ``(v, v)``) or an inclusive range ``[lo, hi]`` with ``low <= lo <= hi``."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value), int(value))
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or an inclusive range [lo, hi] of ints; got {value!r}") from None
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (lo, hi)):
        raise TypeError(f"{name} must hold ints; got {value!r}")
    if not low <= lo <= hi:
        raise ValueError(f"{name} must satisfy {low} <= lo <= hi; got {[lo, hi]}")
    return int(lo), int(hi)


def _check_int(v, name: str, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int; got {v!r}")
    if v < low:
        raise ValueError(f"{name} must be >= {low}; got {v}")
    return int(v)


@dataclass(frozen=True)
class DataConfig:
    """What every split shares (part of each split's cache key).

    Args:
        questions: the questions every sample asks (in a random order per sample).
        text_before, text_after: inclusive ranges of filler tokens before ``<vstart>`` and between ``<vend>``
            and the first question.
        distractors: cells of the distractor colour per video.
        filler: number of filler token ids.
        seed: generator seed (each split derives its own stream from it and its name).
    """

    questions: tuple = tuple(QUESTIONS)
    text_before: tuple = (0, 8)
    text_after: tuple = (0, 8)
    distractors: int = 0
    filler: int = 16
    seed: int = 0

    def __post_init__(self):
        qs = (self.questions,) if isinstance(self.questions, str) else tuple(self.questions)
        unknown = [q for q in qs if q not in QUESTIONS]
        if not qs or unknown:
            raise ValueError(f"questions must be a non-empty subset of {list(QUESTIONS)}; got {list(qs)}")
        object.__setattr__(self, "questions", tuple(q for q in QUESTIONS if q in qs))  # canonical order
        object.__setattr__(self, "text_before", _int_range(self.text_before, "text_before", 0))
        object.__setattr__(self, "text_after", _int_range(self.text_after, "text_after", 0))
        object.__setattr__(self, "distractors", _check_int(self.distractors, "distractors", 0))
        object.__setattr__(self, "filler", _check_int(self.filler, "filler", 1))
        object.__setattr__(self, "seed", _check_int(self.seed, "seed", 0))

    @property
    def vocab(self) -> Vocab:
        return Vocab(self.filler)


@dataclass(frozen=True)
class SplitSpec:
    """One split: ``num_samples`` videos of ``frames`` (inclusive range, >= 2) frames of ``grid = (h, w)``."""

    name: str
    frames: tuple
    grid: tuple
    num_samples: int

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a split needs a non-empty name; got {self.name!r}")
        object.__setattr__(self, "frames", _int_range(self.frames, f"split {self.name!r} frames", 2))
        g = self.grid
        if isinstance(g, (int, np.integer)) and not isinstance(g, bool):
            g = (g, g)
        try:
            h, w = g
        except (TypeError, ValueError):
            raise TypeError(f"split {self.name!r} grid must be an int or a pair (h, w); got {self.grid!r}") from None
        h, w = _check_int(h, f"split {self.name!r} grid h", 2), _check_int(w, f"split {self.name!r} grid w", 2)
        object.__setattr__(self, "grid", (h, w))
        object.__setattr__(self, "num_samples", _check_int(self.num_samples, f"split {self.name!r} num_samples", 1))


# -- the label rule -----------------------------------------------------------------------------------
def answers(frames, grid, objects) -> np.ndarray:
    """The answer class of every question for every sample, from where and when its cells are.

    Args:
        frames: ``(n,)`` video lengths ``T``.
        grid: ``(h, w)`` of the frames.
        objects: ``(n, K >= 10, 3)`` ``(f, r, c)`` per slot (:data:`SLOTS`), ``-1`` for an absent object.
    Returns:
        ``(n, num_questions)`` int64 class index per question (:data:`QUESTIONS` order); ``-1`` where the
        question's cells are absent or their configuration has no answer.
    """
    T = np.asarray(frames, dtype=np.int64)
    o = np.asarray(objects, dtype=np.int64)
    if o.ndim != 3 or o.shape[1] < len(SLOTS) or o.shape[2] != 3 or o.shape[0] != T.shape[0] or T.ndim != 1:
        raise ValueError(f"objects must be (n, K >= {len(SLOTS)}, 3) and frames (n,); got objects {o.shape}, "
                         f"frames {T.shape}")
    h, w = grid
    f, r, c = (o[..., i] for i in range(3))  # (n, K) each
    s = {name: k for name, (k, _) in SLOTS.items()}
    here = o[..., 0] >= 0
    out = np.full((len(T), len(QUESTIONS)), -1, dtype=np.int64)

    def put(name, valid, value):
        out[:, QUESTION_IDS[name]] = np.where(valid, value, -1)

    o1, o2 = s["O1"], s["O2"]
    put("order", here[:, o1] & here[:, o2] & (f[:, o1] != f[:, o2]), np.where(f[:, o1] < f[:, o2], 0, 1))
    hh = s["H"]
    put("half", here[:, hh] & (2 * f[:, hh] + 1 != T), np.where(2 * f[:, hh] + 1 < T, 0, 1))
    s1, s2 = s["S1"], s["S2"]
    pair = here[:, s1] & here[:, s2] & (f[:, s1] == f[:, s2])
    put("left_of", pair & (c[:, s1] != c[:, s2]), np.where(c[:, s1] < c[:, s2], 0, 1))
    put("same_row", pair & ((r[:, s1] != r[:, s2]) | (c[:, s1] != c[:, s2])), np.where(r[:, s1] == r[:, s2], 0, 1))
    k = s["C"]
    put("corner", here[:, k] & (2 * r[:, k] + 1 != h) & (2 * c[:, k] + 1 != w),
        2 * (2 * r[:, k] + 1 > h) + (2 * c[:, k] + 1 > w))
    for name, a, b, fixed, along in (("hmove", s["M1"], s["M2"], r, c), ("vmove", s["V1"], s["V2"], c, r)):
        valid = here[:, a] & here[:, b] & (f[:, a] < f[:, b]) & (fixed[:, a] == fixed[:, b])
        put(name, valid, np.where(along[:, b] < along[:, a], 0, np.where(along[:, b] > along[:, a], 1, 2)))
    return out


# -- the generator ------------------------------------------------------------------------------------
def _uniform(rng, lo, hi) -> np.ndarray:
    """Ints uniform in ``[lo, hi)`` (elementwise; ``hi > lo``)."""
    lo, hi = np.broadcast_arrays(np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64))
    return lo + np.floor(rng.random(lo.shape) * (hi - lo)).astype(np.int64)


def _ordered_pair(rng, m) -> tuple[np.ndarray, np.ndarray]:
    """Two distinct ints ``lo < hi``, uniform over the pairs of ``[0, m)`` (``m >= 2``, elementwise)."""
    m = np.asarray(m, dtype=np.int64)
    a = _uniform(rng, 0, m)
    b = _uniform(rng, 0, m - 1)
    b = b + (b >= a)
    return np.minimum(a, b), np.maximum(a, b)


def _shuffled_pair(rng, m) -> tuple[np.ndarray, np.ndarray]:
    """Two distinct ints in ``[0, m)`` in a random order."""
    lo, hi = _ordered_pair(rng, m)
    swap = rng.random(lo.shape) < 0.5
    return np.where(swap, hi, lo), np.where(swap, lo, hi)


def _draw(rng, question: str, y: np.ndarray, T: np.ndarray, h: int, w: int) -> np.ndarray:
    """Cells ``(m, len(QUESTION_SLOTS[question]), 3)`` that give answer ``y`` ``(m,)`` to ``question``
    (``left_of``: ``y`` is ``(m, 2)``, the ``left_of`` and ``same_row`` answers of the shared pair)."""
    m = len(y)
    H, W = np.full(m, h), np.full(m, w)
    cell = lambda: (_uniform(rng, 0, H), _uniform(rng, 0, W))  # noqa: E731
    if question == "order":
        f1, f2 = _ordered_pair(rng, T)
        (ra, ca), (rb, cb) = cell(), cell()
        return np.stack([np.stack([np.where(y == 0, f1, f2), ra, ca], 1),
                         np.stack([np.where(y == 0, f2, f1), rb, cb], 1)], 1)
    if question == "half":
        f = np.where(y == 0, _uniform(rng, 0, T // 2), _uniform(rng, (T + 1) // 2, T))
        return np.stack([f, *cell()], 1)[:, None]
    if question == "left_of":  # S1, S2 in one frame; left_of and same_row answers are independent
        f = _uniform(rng, 0, T)
        lo, hi = _ordered_pair(rng, W)  # distinct columns (left_of needs them)
        c1, c2 = np.where(y[:, 0] == 0, lo, hi), np.where(y[:, 0] == 0, hi, lo)
        r_same, (r1, r2) = _uniform(rng, 0, H), _shuffled_pair(rng, H)
        r1, r2 = np.where(y[:, 1] == 0, r_same, r1), np.where(y[:, 1] == 0, r_same, r2)
        return np.stack([np.stack([f, r1, c1], 1), np.stack([f, r2, c2], 1)], 1)
    if question == "corner":  # y = 2 * bottom + right
        r = np.where(y // 2 == 1, _uniform(rng, (H + 1) // 2, H), _uniform(rng, 0, H // 2))
        c = np.where(y % 2 == 1, _uniform(rng, (W + 1) // 2, W), _uniform(rng, 0, W // 2))
        return np.stack([_uniform(rng, 0, T), r, c], 1)[:, None]
    # hmove / vmove: y 0 = left/up, 1 = right/down, 2 = stayed
    f1, f2 = _ordered_pair(rng, T)
    size, other = (W, H) if question == "hmove" else (H, W)
    lo, hi = _ordered_pair(rng, size)
    stay, fixed = _uniform(rng, 0, size), _uniform(rng, 0, other)
    a = np.where(y == 0, hi, np.where(y == 1, lo, stay))
    b = np.where(y == 0, lo, np.where(y == 1, hi, stay))
    if question == "hmove":
        return np.stack([np.stack([f1, fixed, a], 1), np.stack([f2, fixed, b], 1)], 1)
    return np.stack([np.stack([f1, a, fixed], 1), np.stack([f2, b, fixed], 1)], 1)


def _place(rng, obj, slots, draw, max_rounds: int = 10000) -> None:
    """Fill ``obj[:, slots]`` (in place) with ``draw(idx)`` ``(m, len(slots), 3)``, redrawing the samples whose
    cells clash with each other or with a cell already placed."""
    todo = np.arange(obj.shape[0])
    for _ in range(max_rounds):
        if todo.size == 0:
            return
        cand = draw(todo)
        placed = obj[todo]
        clash = np.zeros(todo.size, dtype=bool)
        for i in range(cand.shape[1]):
            clash |= (placed == cand[:, i:i + 1]).all(-1).any(-1)
            clash |= (cand[:, :i] == cand[:, i:i + 1]).all(-1).any(-1)
        ok = todo[~clash]
        obj[ok[:, None], np.asarray(slots)[None, :]] = cand[~clash]
        todo = todo[clash]
    raise RuntimeError("could not place the cells without overlap; use more frames or a larger grid")


def generate_split(cfg: DataConfig, spec: SplitSpec) -> dict[str, np.ndarray]:
    """Draw one split. Returns, for ``n`` samples and ``Q = len(cfg.questions)``:

    * ``frames (n,) int16``, ``objects (n, 10 + distractors, 3) int16`` (:data:`SLOTS`, then distractors),
    * ``answers (n, 7) int8`` (:func:`answers`; ``-1`` for questions whose cells are not placed),
    * ``asked (n, Q) int8``: the question ids in the order they are asked,
    * ``text_before``/``text_after`` ``(n,) int16`` filler counts and ``filler_before``/``filler_after``
      ``(n, max count) int16`` filler indices in ``[0, cfg.filler)``.

    Vectorised over samples: per question, answers are drawn first, then the cells are placed to match.
    """
    seq = np.random.SeedSequence([cfg.seed, zlib.crc32(spec.name.encode()), *spec.frames, *spec.grid])
    rng = np.random.default_rng(seq)
    n, (h, w) = spec.num_samples, spec.grid
    T = rng.integers(spec.frames[0], spec.frames[1] + 1, n)
    obj = np.full((n, len(SLOTS) + cfg.distractors, 3), -1, dtype=np.int64)
    drawn = np.full((n, len(QUESTIONS)), -1, dtype=np.int64)
    for family in FAMILIES:
        if not set(family) & set(cfg.questions):
            continue
        y = np.stack([rng.integers(0, len(QUESTIONS[q]), n) for q in family], 1)
        drawn[:, [QUESTION_IDS[q] for q in family]] = y
        slots = [SLOTS[s][0] for s in QUESTION_SLOTS[family[0]]]
        y = y if len(family) > 1 else y[:, 0]
        _place(rng, obj, slots, lambda i, q=family[0], y=y: _draw(rng, q, y[i], T[i], h, w))
    for k in range(len(SLOTS), obj.shape[1]):
        _place(rng, obj, [k], lambda i: np.stack([_uniform(rng, 0, T[i]), _uniform(rng, 0, np.full(len(i), h)),
                                                  _uniform(rng, 0, np.full(len(i), w))], 1)[:, None])
    check = answers(T, spec.grid, obj)
    if not np.array_equal(check, drawn):  # pragma: no cover - the construction and the rule must agree
        b, qi = (int(v[0]) for v in np.nonzero(check != drawn))
        raise AssertionError(f"generator/label mismatch at sample {b}, question {list(QUESTIONS)[qi]}: drawn "
                             f"{drawn[b, qi]}, rule {check[b, qi]}")
    qids = np.array([QUESTION_IDS[q] for q in cfg.questions])
    asked = qids[np.argsort(rng.random((n, len(qids))), axis=1)]
    return {"frames": T.astype(np.int16), "objects": obj.astype(np.int16), "answers": drawn.astype(np.int8),
            "asked": asked.astype(np.int8),
            "text_before": rng.integers(cfg.text_before[0], cfg.text_before[1] + 1, n).astype(np.int16),
            "text_after": rng.integers(cfg.text_after[0], cfg.text_after[1] + 1, n).astype(np.int16),
            "filler_before": rng.integers(0, cfg.filler, (n, max(cfg.text_before[1], 1))).astype(np.int16),
            "filler_after": rng.integers(0, cfg.filler, (n, max(cfg.text_after[1], 1))).astype(np.int16)}


def default_cache_dir() -> Path:
    """``$VISIONPE_CACHE/vlmdiag`` or ``~/.cache/visionpe/vlmdiag``."""
    root = os.environ.get("VISIONPE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "visionpe")
    return Path(root) / "vlmdiag"


def _key(cfg: DataConfig, spec: SplitSpec) -> str:
    blob = json.dumps({"v": FORMAT_VERSION, "data": asdict(cfg), "split": asdict(spec)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_or_generate(cfg: DataConfig, spec: SplitSpec, cache_dir=None) -> tuple[dict[str, np.ndarray], Path, bool]:
    """Arrays of one split from the cache, generating (and atomically saving) them on the first call.

    Returns ``(arrays, path, generated)``; ``generated`` is False when the cache was hit.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"vlmdiag_{spec.name}_{_key(cfg, spec)}.npz"
    if path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in f.files if k != "meta"}, path, False
    arrays = generate_split(cfg, spec)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, meta=json.dumps({"data": asdict(cfg), "split": asdict(spec)}), **arrays)
    os.replace(tmp, path)  # atomic: a concurrent or interrupted run never sees a half-written file
    return arrays, path, True


# -- tokens -----------------------------------------------------------------------------------------------
def tokens_and_layout(arrays: dict, idx, grid, vocab: Vocab):
    """Token ids, layout and targets of samples ``idx`` of a split, left-padded to one length ``L``.

    The sequence is ``Text(before + 1) Video(T, h, w) Text(1 + after + 2 Q)``: the ``+ 1`` are ``<vstart>``
    and ``<vend>``, then ``Q`` (question, answer) token pairs. Vectorised per batch (no loop over tokens).

    Returns:
        ``input_ids (B, L) int64``, the :class:`~visionpe.vlm.VLMLayout`, ``question (B, Q) int64`` (ids in
        asking order), ``target (B, Q) int64`` (answer token ids), ``query_pos (Q,) int64``: the column of each
        question token (the model's logits there predict the answer; identical for every row thanks to the
        left padding).
    """
    from visionpe.vlm import Text, Video, VLMLayout
    idx = np.asarray(idx)
    h, w = grid
    T = arrays["frames"][idx].astype(np.int64)
    nb = arrays["text_before"][idx].astype(np.int64)
    na = arrays["text_after"][idx].astype(np.int64)
    obj = arrays["objects"][idx].astype(np.int64)
    asked = arrays["asked"][idx].astype(np.int64)
    B, Q = asked.shape
    n_vid = T * h * w
    real = nb + n_vid + na + 2 + 2 * Q
    L = int(real.max())
    ids = np.full((B, L), Vocab.PAD, dtype=np.int64)
    start = L - real
    pos = np.arange(L)[None, :] - start[:, None]  # index inside the real sequence (negative: padding)
    rows = np.arange(B)[:, None]
    v0 = nb + 1  # first video token
    a0 = v0 + n_vid + 1  # first filler token after <vend>
    fb = vocab.filler0 + arrays["filler_before"][idx].astype(np.int64)
    fa = vocab.filler0 + arrays["filler_after"][idx].astype(np.int64)
    sel = (pos >= 0) & (pos < nb[:, None])
    ids[sel] = fb[rows, np.clip(pos, 0, fb.shape[1] - 1)][sel]
    ids[np.arange(B), start + nb] = vocab.vstart
    ids[(pos >= v0[:, None]) & (pos < (v0 + n_vid)[:, None])] = Vocab.BACKGROUND
    slot_colours = [col for _, col in SLOTS.values()] + [NUM_COLOURS - 1] * (obj.shape[1] - len(SLOTS))
    colours = vocab.colour0 + np.array(slot_colours)
    flat = (start + v0)[:, None] + obj[..., 0] * h * w + obj[..., 1] * w + obj[..., 2]
    bi, ki = np.nonzero(obj[..., 0] >= 0)
    ids[bi, flat[bi, ki]] = colours[ki]
    ids[np.arange(B), start + v0 + n_vid] = vocab.vend
    sel = (pos >= a0[:, None]) & (pos < (a0 + na)[:, None])
    ids[sel] = fa[rows, np.clip(pos - a0[:, None], 0, fa.shape[1] - 1)][sel]
    query_pos = L - 2 * Q + 2 * np.arange(Q)
    target = vocab.answer_tokens()[asked, arrays["answers"][idx].astype(np.int64)[rows, asked]]
    ids[:, query_pos] = vocab.question0 + asked
    ids[:, query_pos + 1] = target
    # one Python row per sample (three segments), not per token
    layout = VLMLayout([[Text(int(nb[i]) + 1), Video(int(T[i]), h, w), Text(int(na[i]) + 1 + 2 * Q)]
                        for i in range(B)], padding_side="left")
    return (torch.from_numpy(ids), layout, torch.from_numpy(asked), torch.from_numpy(target),
            torch.from_numpy(query_pos))


def majority_answers(train: dict) -> np.ndarray:
    """``(num_questions,)`` the most frequent answer class of each question in ``train`` (``-1``: not asked)."""
    out = np.full(len(QUESTIONS), -1, dtype=np.int64)
    a = train["answers"].astype(np.int64)
    for qi in range(len(QUESTIONS)):
        col = a[:, qi][a[:, qi] >= 0]
        if col.size:
            out[qi] = int(np.bincount(col).argmax())
    return out
