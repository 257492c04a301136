"""The one cache for tables that encoders derive from a layout (indices, coordinates, rotations).

Tables are *derived*, not state: they are rebuilt on demand and never saved or moved by ``.to()``. Every
entry is keyed by what it is (a name), the layout (or grid) it describes, the device and dtype it was built
for and the autograd mode (:func:`cache_mode`), so that

* after ``model.to(device)`` / ``model.half()`` the next forward builds tables for the new device/dtype
  instead of reusing stale ones (the old entries age out of the cache);
* a table built during an ``inference_mode`` forward (an inference tensor, which cannot be saved for
  backward) is never reused by a later training step.

The cache is bounded (least recently used entries are dropped beyond ``maxsize``), so a long run over many
resolutions keeps only the recent tables.
"""
from __future__ import annotations

from typing import Callable, Hashable, TypeVar

import torch

__all__ = ["TableCache", "cache_mode", "DEFAULT_MAXSIZE"]

T = TypeVar("T")

#: entries per encoder; a few tables per layout, so this covers several resolutions at once
DEFAULT_MAXSIZE = 16


def cache_mode() -> tuple[bool, bool]:
    """The autograd-mode part of a cache key: ``(compiling, inference_mode)``.

    Tensors made under ``torch.inference_mode`` cannot be saved for backward later, so a table cached during
    an inference-mode forward must not be reused in training: entries made in eager inference mode are kept
    apart. Under ``torch.compile`` this is a constant (dynamo never traces ``is_inference_mode_enabled``).
    """
    compiling = torch.compiler.is_compiling()
    return (compiling, (not compiling) and torch.is_inference_mode_enabled())


def _layout_key(layout) -> Hashable:
    # plain tuples: a Layout built inside a compiled forward cannot be stored by dynamo without a graph break
    grid = getattr(layout, "grid", None)
    if grid is not None:
        return (tuple(grid), layout.num_prefix_tokens)
    return tuple(layout) if isinstance(layout, (list, tuple)) else layout


class TableCache:
    """A bounded LRU of derived tables.

    Args:
        maxsize: entries kept; the least recently used one is dropped when a new entry would exceed it.

    ``get(name, layout, device, dtype, build)`` returns the entry for ``(name, layout, device, dtype,``
    :func:`cache_mode` ``())``, calling ``build()`` (no arguments) on a miss. ``layout`` is a
    :class:`~visionpe.Layout` (keyed by grid and prefix count) or any hashable (e.g. a grid tuple). ``dtype``
    is the dtype the table is built in: the input's dtype for tables cast to it, the fixed working dtype
    (float32 angles, int64 indices) otherwise. ``per_mode=False`` leaves the autograd mode out of the key;
    only for host-side integer tables that are made before any forward and never reach autograd as they
    are (e.g. the Gilbert ranks, built eagerly so that ``torch.compile`` finds them).
    """

    def __init__(self, maxsize: int = DEFAULT_MAXSIZE):
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize must be an int >= 1; got {maxsize!r}")
        self.maxsize = maxsize
        self._entries: dict = {}

    def get(self, name: str, layout, device, dtype: torch.dtype | None, build: Callable[[], T], *,
            per_mode: bool = True) -> T:
        key = (name, _layout_key(layout), str(device), dtype, cache_mode() if per_mode else None)
        entries = self._entries
        if key in entries:
            value = entries.pop(key)   # re-insert: dicts keep insertion order, the last entry is the newest
            entries[key] = value
            return value
        value = build()
        entries[key] = value
        while len(entries) > self.maxsize:
            del entries[next(iter(entries))]
        return value

    def clear(self) -> None:
        self._entries.clear()

    def keys(self) -> list:
        """Current keys ``(name, layout, device, dtype, mode)``, oldest first (for tests and debugging)."""
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"TableCache({len(self)}/{self.maxsize})"
