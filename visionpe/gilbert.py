"""The generalised Hilbert ("Gilbert") curve on any ``h x w`` grid, as LOOPE uses it.

The curve visits every cell of an ``h``-row, ``w``-column grid once, moving between 4-neighbours
(except for at most one diagonal step on some grids, see below). LOOPE gives each patch its visit rank
as a 1D position. Two entry points exist and are both provided:

* ``variant="official"`` (default): the LOOPE code always starts with the major axis along the width,
  ``(o=(0, 0), a=(w, 0), b=(0, h))``, whatever the aspect ratio.
* ``variant="branched"``: the supplement's Algorithm 1 and upstream gilbert: that entry when ``w >= h``,
  otherwise the major axis runs along the height, ``a=(0, h), b=(w, 0)``.

They agree on square and wide grids and differ on tall ones (e.g. 7x5, 14x7, 3x2). With the official
entry a diagonal step can appear only when ``h`` is even and ``w`` is odd; with the branched entry, on
wide/square grids with even ``h`` and odd ``w`` and on tall grids with odd ``h`` and even ``w``.

Points are ``(x, y)`` = (column, row) inside the recursion; the public functions return ``(row, col)``
and rank tables indexed ``[row, col]``. The recursion runs on an explicit stack (no Python recursion,
no list concatenation) and each straight leaf segment is emitted as one vectorised run (a 64x64 grid
takes well under 0.1 s on one busy CPU core); results are cached per ``(h, w, variant)``.
"""
from __future__ import annotations

from functools import lru_cache

import torch

__all__ = ["gilbert", "gilbert_rank", "nonunit_steps", "VARIANTS"]

VARIANTS = ("official", "branched")


def _check(h, w, variant) -> None:
    for name, v in (("h", h), ("w", w)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"gilbert: {name} must be an int; got {type(v).__name__} {v!r}")
        if v <= 0:
            raise ValueError(f"gilbert: the grid must be non-empty, h >= 1 and w >= 1; got (h, w) = ({h}, {w})")
    if variant not in VARIANTS:
        raise ValueError(f"gilbert: variant must be one of {VARIANTS}; got {variant!r}")


def _sgn(v: int) -> int:
    return (v > 0) - (v < 0)


@lru_cache(maxsize=64)
def _path(h: int, w: int, variant: str) -> torch.Tensor:
    """Visit order as an ``(h*w, 2)`` int64 tensor of ``(row, col)``; cached, callers must not mutate."""
    if variant == "branched" and w < h:
        start = (0, 0, 0, h, w, 0)
    else:
        start = (0, 0, w, 0, 0, h)
    # Straight runs (x0, y0, dx, dy, length) in visit order; the stack holds pending sub-rectangles
    # with the call that must run first on top.
    runs = []
    stack = [start]
    while stack:
        x, y, ax, ay, bx, by = stack.pop()
        ww, hh = abs(ax + ay), abs(bx + by)
        dax, day, dbx, dby = _sgn(ax), _sgn(ay), _sgn(bx), _sgn(by)
        if hh == 1:
            runs.append((x, y, dax, day, ww))
            continue
        if ww == 1:
            runs.append((x, y, dbx, dby, hh))
            continue
        # floor division (towards -inf) per component, as the reference recursion does
        ax2, ay2, bx2, by2 = ax // 2, ay // 2, bx // 2, by // 2
        w2, h2 = abs(ax2 + ay2), abs(bx2 + by2)
        if 2 * ww > 3 * hh:
            # elongated: split the long side in two (keep the first half even so the halves join up)
            if w2 % 2 and ww > 2:
                ax2, ay2 = ax2 + dax, ay2 + day
            stack.append((x + ax2, y + ay2, ax - ax2, ay - ay2, bx, by))
            stack.append((x, y, ax2, ay2, bx, by))
        else:
            # up, across, down; pushed in reverse so that "up" is processed first
            if h2 % 2 and hh > 2:
                bx2, by2 = bx2 + dbx, by2 + dby
            stack.append((x + (ax - dax) + (bx2 - dbx), y + (ay - day) + (by2 - dby),
                          -bx2, -by2, -(ax - ax2), -(ay - ay2)))
            stack.append((x + bx2, y + by2, ax, ay, bx - bx2, by - by2))
            stack.append((x, y, bx2, by2, ax2, ay2))
    # host-side index math: explicitly on the CPU, whatever the default device (a model built under
    # ``with torch.device('meta')`` must still get its curve)
    r = torch.tensor(runs, dtype=torch.int64, device="cpu")  # (R, 5)
    lengths = r[:, 4]
    step = torch.arange(int(lengths.sum()), dtype=torch.int64, device="cpu")
    first = torch.cumsum(lengths, 0) - lengths  # index of each run's first cell
    run_of = torch.repeat_interleave(torch.arange(len(runs), device="cpu"), lengths)
    k = step - first[run_of]  # position inside the run
    cols = r[run_of, 0] + k * r[run_of, 2]
    rows = r[run_of, 1] + k * r[run_of, 3]
    return torch.stack([rows, cols], dim=1)


def gilbert(h: int, w: int, variant: str = "official") -> torch.Tensor:
    """The Gilbert curve on an ``h x w`` grid.

    Args:
        h, w: rows and columns (each >= 1).
        variant: ``"official"`` (LOOPE code) or ``"branched"`` (supplement / upstream gilbert).

    Returns:
        ``(h*w, 2)`` int64 tensor: ``(row, col)`` of the k-th visited cell in row k. Starts at ``(0, 0)``.
    """
    _check(h, w, variant)
    return _path(h, w, variant).clone()


def gilbert_rank(h: int, w: int, variant: str = "official", start: int = 1) -> torch.Tensor:
    """Visit rank of every cell: ``(h, w)`` int64 with ``rank[row, col]`` in ``start .. start + h*w - 1``.

    ``start=1`` gives the 1-based ranks the LOOPE code uses as static positions ``X_G``; flatten
    row-major (``rank.reshape(-1)``) to get ``X_G`` per patch token.
    """
    _check(h, w, variant)
    if isinstance(start, bool) or not isinstance(start, int):
        raise TypeError(f"gilbert_rank: start must be an int; got {start!r}")
    path = _path(h, w, variant)
    rank = torch.empty(h * w, dtype=torch.int64, device="cpu")
    rank[path[:, 0] * w + path[:, 1]] = torch.arange(start, start + h * w, dtype=torch.int64, device="cpu")
    return rank.reshape(h, w)


def nonunit_steps(path: torch.Tensor) -> int:
    """Number of consecutive visits in ``path`` ``(K, 2)`` that are not 4-neighbours (diagonal steps)."""
    if not isinstance(path, torch.Tensor) or path.ndim != 2 or path.shape[1] != 2:
        raise ValueError(f"path must be a (K, 2) tensor of (row, col); got "
                         f"{tuple(path.shape) if isinstance(path, torch.Tensor) else type(path).__name__}")
    if path.shape[0] < 2:
        return 0
    dist = (path[1:] - path[:-1]).abs().sum(dim=1)
    return int((dist != 1).sum())
