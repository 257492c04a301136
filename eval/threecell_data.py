"""The Three-Cell dataset (LOOPE, Chowdhury et al. 2025, Supp. A.4): a seeded, cached generator.

Every image is a grid of ``(h, w)`` square cells of ``cell_size`` pixels on a black background with
exactly one red (R), one green (G) and one blue (B) cell. The six binary labels ask where the cells are
relative to each other (the paper's 14x14 grid of 16 px cells in a 224 image is the default).

Coordinates: ``x`` is the **column** and ``y`` the **row** (row index grows downwards), origin at cell
``(0, 0)`` in the top-left corner. With ``p_r = (x_r, y_r)`` etc. the label bits are

====  ====================================================================  ===========
bit   condition                                                             group
====  ====================================================================  ===========
0     ``|RG|^2 > |RB|^2``                                                   distance
1     ``|RB|^2 > |RG|^2``  (both 0 when the distances are equal)            distance
2     ``cross = (x_g-x_r)(y_b-y_r) - (y_g-y_r)(x_b-x_r) > 0``               orientation
3     ``A_RG > A_RB`` with ``2 A_RG = |(y_r+y_g)(x_g-x_r)|``                area
4     ``A_RB > A_RG``  (both 0 when the areas are equal)                    area
5     ``x_r+x_g+x_b > w-1`` **and** ``y_r+y_g+y_b > h-1``                   vector sum
====  ====================================================================  ===========

All comparisons are on integers (squared distances, doubled areas), so they are exact.

Generation follows the supplement's Algorithm 4 (spec loope_threecell.md §8.2) with these choices: keys
are drawn uniformly and independently (``k1 == k2`` is allowed), ``max_attempts = 100``, colinear
triples (``cross == 0``) are rejected because the paper asserts ``cross != 0``, colours are pure 255 in
one channel. Samples are drawn independently, so on small grids the same triple can occur in two splits.

Arrays are cached as ``.npz`` files named by a hash of ``(seed, config)`` and never regenerated.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["ThreeCellConfig", "ThreeCellData", "GROUPS", "LABEL_NAMES", "labels_for_grid",
           "offset_table", "generate", "load_or_generate", "render", "default_cache_dir", "group_accuracies"]

LABEL_NAMES = ("d_rg_gt_d_rb", "d_rb_gt_d_rg", "ccw", "area_rg_gt_area_rb", "area_rb_gt_area_rg", "sum_gt_center")
#: group -> label bits (spec §8.4); the group accuracy averages its bits
GROUPS = {"distance": (0, 1), "orientation": (2,), "area": (3, 4), "vector_sum": (5,)}
#: the cache file layout version; bump when the generator changes its output
FORMAT_VERSION = 1


def _pair(value, name: str) -> tuple[int, int]:
    """An int ``v`` (meaning ``(v, v)``) or a pair of ints, validated positive."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints; got {value!r}")
    if isinstance(value, (int, np.integer)):
        value = (int(value), int(value))
    try:
        value = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair (h, w) of ints; got {type(value).__name__}") from None
    if len(value) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        raise TypeError(f"{name} must be an int or a pair (h, w) of ints; got {value!r}")
    if min(value) <= 0:
        raise ValueError(f"{name} must be positive; got {value!r}")
    return int(value[0]), int(value[1])


@dataclass(frozen=True)
class ThreeCellConfig:
    """What defines a Three-Cell dataset (everything that goes into the cache key).

    Args:
        img_size: image size ``(H, W)`` in pixels (an int means a square image).
        cell_size: cell side in pixels; it must divide both image sides. The grid is
            ``(H // cell_size, W // cell_size)`` and must be at least 2x2, or three non-colinear cells
            cannot be placed.
        num_samples: total number of images, split ``split`` (fractions, train/val/test).
        seed: generator seed.
        max_attempts: Algorithm 4's inner retry count before a new reference cell is drawn.
        reject_colinear: reject ``cross == 0`` triples (the paper asserts non-colinear cells).
    """

    img_size: tuple = (224, 224)
    cell_size: int = 16
    num_samples: int = 10000
    seed: int = 0
    split: tuple = (0.8, 0.1, 0.1)
    max_attempts: int = 100
    reject_colinear: bool = True

    def __post_init__(self):
        object.__setattr__(self, "img_size", _pair(self.img_size, "img_size"))
        cs = self.cell_size
        if isinstance(cs, bool) or not isinstance(cs, (int, np.integer)) or cs <= 0:
            raise ValueError(f"cell_size must be a positive int; got {cs!r}")
        object.__setattr__(self, "cell_size", int(cs))
        H, W = self.img_size
        if H % cs or W % cs:
            raise ValueError(f"cell_size={cs} does not divide the image size {self.img_size} "
                             f"(remainders {H % cs}, {W % cs}); choose a cell size that divides both sides")
        h, w = H // cs, W // cs
        if h < 2 or w < 2:
            raise ValueError(f"the grid {(h, w)} (img_size {self.img_size} / cell_size {cs}) is too small to place "
                             f"three non-colinear cells; it needs at least 2x2 cells")
        ns = self.num_samples
        if isinstance(ns, bool) or not isinstance(ns, (int, np.integer)) or ns < 3:
            raise ValueError(f"num_samples must be an int >= 3 (train, val and test need one each); got {ns!r}")
        object.__setattr__(self, "num_samples", int(ns))
        split = tuple(float(s) for s in self.split)
        if len(split) != 3 or min(split) <= 0 or abs(sum(split) - 1.0) > 1e-6:
            raise ValueError(f"split must be three positive fractions summing to 1 (train, val, test); got {self.split!r}")
        object.__setattr__(self, "split", split)
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an int >= 1; got {self.max_attempts!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise TypeError(f"seed must be an int; got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def grid(self) -> tuple[int, int]:
        """``(h, w)`` cells."""
        return self.img_size[0] // self.cell_size, self.img_size[1] // self.cell_size

    def split_sizes(self) -> tuple[int, int, int]:
        n = self.num_samples
        n_val = max(1, int(round(n * self.split[1])))
        n_test = max(1, int(round(n * self.split[2])))
        n_train = n - n_val - n_test
        if n_train < 1:
            raise ValueError(f"num_samples={n} leaves no training samples with split {self.split}")
        return n_train, n_val, n_test

    def key(self) -> str:
        """Stable hash of the config (the cache key)."""
        blob = json.dumps({"v": FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def offset_table(grid) -> dict[int, np.ndarray]:
    """Algorithm 4's table: squared length ``n`` -> all offsets ``(dy, dx)`` with ``dy^2 + dx^2 = n``.

    Offsets range over ``[-m, m]^2`` with ``m = isqrt(n_max)``, ``n_max = (h-1)^2 + (w-1)^2`` (the longest
    squared distance in the grid; 338 and m = 18 for 14x14), and keys with a single representation are
    dropped (only ``n = 0``), leaving 125 keys on 14x14. Returns ``{n: (k, 2) int array}``, keys sorted.
    """
    h, w = _pair(grid, "grid")
    nmax = (h - 1) ** 2 + (w - 1) ** 2
    m = math.isqrt(nmax)
    a, b = np.meshgrid(np.arange(-m, m + 1), np.arange(-m, m + 1), indexing="ij")
    a, b = a.ravel(), b.ravel()
    n = a * a + b * b
    keep = n <= nmax
    a, b, n = a[keep], b[keep], n[keep]
    table = {}
    for key in np.unique(n):
        sel = n == key
        if sel.sum() >= 2:
            table[int(key)] = np.stack([a[sel], b[sel]], axis=1)
    return table


def labels_for_grid(coords, grid) -> np.ndarray:
    """The 6 label bits (``uint8``, shape ``(..., 6)``) of cell triples ``coords`` ``(..., 3, 2)``.

    ``coords[..., i, :]`` is ``(row, col)`` of R (i=0), G (1), B (2); ``grid`` is ``(h, w)`` (bit 5 tests
    the coordinate sums against ``w - 1`` and ``h - 1``, i.e. 13 and 13 on 14x14).
    """
    h, w = _pair(grid, "grid")
    c = np.asarray(coords, dtype=np.int64)
    if c.shape[-2:] != (3, 2):
        raise ValueError(f"coords must have shape (..., 3, 2) (R, G, B) x (row, col); got {c.shape}")
    y, x = c[..., 0], c[..., 1]
    xr, xg, xb = x[..., 0], x[..., 1], x[..., 2]
    yr, yg, yb = y[..., 0], y[..., 1], y[..., 2]
    d_rg = (xg - xr) ** 2 + (yg - yr) ** 2
    d_rb = (xb - xr) ** 2 + (yb - yr) ** 2
    cross = (xg - xr) * (yb - yr) - (yg - yr) * (xb - xr)
    a_rg = np.abs((yr + yg) * (xg - xr))  # doubled trapezium area under RG
    a_rb = np.abs((yr + yb) * (xb - xr))
    sum_bit = ((xr + xg + xb) > (w - 1)) & ((yr + yg + yb) > (h - 1))
    bits = np.stack([d_rg > d_rb, d_rb > d_rg, cross > 0, a_rg > a_rb, a_rb > a_rg, sum_bit], axis=-1)
    return bits.astype(np.uint8)


def generate(cfg: ThreeCellConfig) -> dict[str, np.ndarray]:
    """Draw ``cfg.num_samples`` triples (Algorithm 4). Returns ``coords (n,3,2) int16`` (row, col of R, G,
    B), ``labels (n,6) uint8`` and ``modes (n,) uint8`` (1: equal distances, 2: ``d_RG <= d_RB``, 3:
    ``d_RG >= d_RB``).

    Vectorised over samples: each round draws, for every sample still open, a reference cell R, then
    ``max_attempts`` candidate (G, B) pairs at once, and keeps the first valid one; samples without a
    valid candidate draw a new R in the next round. This is Algorithm 4's loop structure (same
    distribution), just not one sample at a time.
    """
    h, w = cfg.grid
    table = offset_table(cfg.grid)
    keys = sorted(table)
    counts = np.array([len(table[k]) for k in keys])
    offs = np.zeros((len(keys), counts.max(), 2), dtype=np.int64)  # padded (K, max reps, 2)
    for i, k in enumerate(keys):
        offs[i, :counts[i]] = table[k]
    rng = np.random.default_rng(cfg.seed)
    n, A = cfg.num_samples, cfg.max_attempts
    modes = rng.integers(1, 4, size=n).astype(np.uint8)
    coords = np.zeros((n, 3, 2), dtype=np.int64)
    todo = np.arange(n)
    for _round in range(10000):
        if todo.size == 0:
            break
        m = todo.size
        r = np.stack([rng.integers(0, h, m), rng.integers(0, w, m)], axis=1)  # (m, 2)
        mode = modes[todo]
        # mode 1: one key per R, A attempts at two distinct representations of it
        k_eq = rng.integers(0, len(keys), m)
        c_eq = counts[k_eq][:, None]
        i1 = np.floor(rng.random((m, A)) * c_eq).astype(np.int64)
        i2 = np.floor(rng.random((m, A)) * (c_eq - 1)).astype(np.int64)
        i2 += i2 >= i1  # uniform over the other representations
        g_eq = offs[k_eq[:, None], i1]
        b_eq = offs[k_eq[:, None], i2]
        # modes 2/3: two independent keys per attempt; the smaller goes to G (mode 2) or to B (mode 3)
        k1, k2 = rng.integers(0, len(keys), (m, A)), rng.integers(0, len(keys), (m, A))
        lo, hi = np.minimum(k1, k2), np.maximum(k1, k2)  # keys are sorted, so index order = length order
        kg = np.where((mode == 2)[:, None], lo, hi)
        kb = np.where((mode == 2)[:, None], hi, lo)
        j1 = np.floor(rng.random((m, A)) * counts[kg]).astype(np.int64)
        j2 = np.floor(rng.random((m, A)) * counts[kb]).astype(np.int64)
        g_ne, b_ne = offs[kg, j1], offs[kb, j2]
        eq = (mode == 1)[:, None, None]
        g = r[:, None] + np.where(eq, g_eq, g_ne)  # (m, A, 2)
        b = r[:, None] + np.where(eq, b_eq, b_ne)
        ok = _valid(r[:, None], g, b, (h, w), cfg.reject_colinear)  # (m, A)
        hit = ok.any(axis=1)
        first = ok.argmax(axis=1)
        rows = np.nonzero(hit)[0]
        coords[todo[rows], 0] = r[rows]
        coords[todo[rows], 1] = g[rows, first[rows]]
        coords[todo[rows], 2] = b[rows, first[rows]]
        todo = todo[~hit]
    else:  # pragma: no cover - a >= 2x2 grid always has valid triples
        raise RuntimeError(f"could not place three cells on grid {cfg.grid}")
    coords = coords.astype(np.int16)
    return {"coords": coords, "labels": labels_for_grid(coords, cfg.grid), "modes": modes}


def _valid(r, g, b, grid, reject_colinear: bool) -> np.ndarray:
    """Boolean mask: G and B inside the grid, all three cells distinct, optionally not colinear."""
    h, w = grid
    inside = ((g >= 0) & (g < (h, w))).all(-1) & ((b >= 0) & (b < (h, w))).all(-1)
    distinct = (g != r).any(-1) & (b != r).any(-1) & (g != b).any(-1)
    ok = inside & distinct
    if reject_colinear:
        cross = (g[..., 1] - r[..., 1]) * (b[..., 0] - r[..., 0]) - (g[..., 0] - r[..., 0]) * (b[..., 1] - r[..., 1])
        ok &= cross != 0
    return ok


def default_cache_dir() -> Path:
    """``$VISIONPE_CACHE/threecell`` or ``~/.cache/visionpe/threecell``."""
    root = os.environ.get("VISIONPE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "visionpe")
    return Path(root) / "threecell"


def load_or_generate(cfg: ThreeCellConfig, cache_dir=None) -> tuple[dict[str, np.ndarray], Path, bool]:
    """Arrays of ``cfg`` from the cache, generating (and atomically saving) them on the first call.

    Returns ``(arrays, path, generated)``; ``generated`` is False when the cache was hit.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"threecell_{cfg.key()}.npz"
    if path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in ("coords", "labels", "modes")}, path, False
    arrays = generate(cfg)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, config=json.dumps(asdict(cfg)), **arrays)
    os.replace(tmp, path)  # atomic: a concurrent or interrupted run never sees a half-written file
    return arrays, path, True


def render(coords, grid, cell_size: int, dtype=torch.float32) -> torch.Tensor:
    """Images ``(n, 3, h*cell, w*cell)`` in ``[0, 1]`` from ``coords`` ``(n, 3, 2)`` (row, col of R, G, B)."""
    h, w = _pair(grid, "grid")
    c = torch.as_tensor(np.asarray(coords), dtype=torch.long)
    if c.ndim != 3 or c.shape[1:] != (3, 2):
        raise ValueError(f"coords must have shape (n, 3, 2); got {tuple(c.shape)}")
    n = c.shape[0]
    cells = torch.zeros(n, 3, h * w, dtype=dtype)
    flat = c[..., 0] * w + c[..., 1]  # (n, 3): cell index of R, G, B
    cells[torch.arange(n)[:, None], torch.arange(3)[None, :], flat] = 1.0  # channel i lights colour i
    cells = cells.view(n, 3, h, w)
    if cell_size == 1:
        return cells
    return cells.repeat_interleave(cell_size, dim=2).repeat_interleave(cell_size, dim=3)


class ThreeCellData:
    """The three splits of one config: ``coords``/``labels`` arrays plus :meth:`images` rendering.

    >>> data = ThreeCellData(ThreeCellConfig(img_size=56, cell_size=8, num_samples=1000))
    >>> x, y = data.tensors("train")     # (800, 3, 56, 56) float, (800, 6) float
    """

    def __init__(self, cfg: ThreeCellConfig, cache_dir=None):
        self.cfg = cfg
        self.arrays, self.path, self.generated = load_or_generate(cfg, cache_dir)
        n_train, n_val, _ = cfg.split_sizes()
        self.bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val),
                       "test": (n_train + n_val, cfg.num_samples)}

    def split(self, name: str) -> dict[str, np.ndarray]:
        if name not in self.bounds:
            raise ValueError(f"split must be one of {sorted(self.bounds)}; got {name!r}")
        lo, hi = self.bounds[name]
        return {k: v[lo:hi] for k, v in self.arrays.items()}

    def tensors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images (n, 3, H, W) float32, labels (n, 6) float32)`` of split ``name``."""
        s = self.split(name)
        x = render(s["coords"], self.cfg.grid, self.cfg.cell_size)
        return x, torch.from_numpy(s["labels"].astype(np.float32))


def group_accuracies(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Spec §8.4: sigmoid > 0.5 per bit; group accuracy = mean over its bits and samples; ``avg`` = mean
    of the four groups. ``logits``/``labels``: ``(n, 6)``. Values are fractions in ``[0, 1]``."""
    if logits.shape != labels.shape or logits.ndim != 2 or logits.shape[1] != 6:
        raise ValueError(f"logits and labels must both be (n, 6); got {tuple(logits.shape)} and {tuple(labels.shape)}")
    correct = ((logits > 0) == (labels > 0.5)).float()  # sigmoid(z) > 0.5  <=>  z > 0
    out = {g: correct[:, list(bits)].mean().item() for g, bits in GROUPS.items()}
    out["avg"] = sum(out[g] for g in GROUPS) / len(GROUPS)
    return out
