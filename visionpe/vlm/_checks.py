"""Short renderings of values for error messages: a message never quotes a whole tensor or list."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["preview", "short_repr"]


def preview(values, limit: int = 5) -> str:
    """At most ``limit`` values of a tensor / array / sequence, plus the total count when cut:
    ``[3, 7, 9]`` or ``[3, 7, 9, 11, 12, ...] (1234 values)``."""
    if isinstance(values, torch.Tensor):
        flat = values.detach().reshape(-1)[:limit].cpu().tolist()
        total = values.numel()
    elif isinstance(values, np.ndarray):
        flat = values.reshape(-1)[:limit].tolist()
        total = values.size
    else:
        values = list(values)
        flat, total = values[:limit], len(values)
    body = ", ".join(repr(v) for v in flat)
    return f"[{body}]" if total <= limit else f"[{body}, ...] ({total} values)"


def short_repr(obj, limit: int = 80) -> str:
    """``repr(obj)`` cut to ``limit`` characters; tensors and arrays of more than 5
    values as ``Tensor(shape=..., dtype=...)``."""
    if isinstance(obj, (torch.Tensor, np.ndarray)) and (obj.size if isinstance(obj, np.ndarray) else obj.numel()) > 5:
        kind = "Tensor" if isinstance(obj, torch.Tensor) else "ndarray"
        return f"{kind}(shape={tuple(obj.shape)}, dtype={obj.dtype})"
    text = repr(obj)
    return text if len(text) <= limit else text[:limit - 3] + "..."
