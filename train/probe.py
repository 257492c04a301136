"""The Three-Cell/PESI probe alongside fine-tuning (``probe: {every: N, ...}`` in the recipe).

``visionpe.eval.probe.threecell_probe(model, **options) -> dict[str, float]`` is imported lazily, only
when the probe is on; it runs on a copy of the model with the training RNG streams untouched, so turning it
on does not change the run.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import random

import numpy as np
import torch

from .model import unwrap

__all__ = ["load_probe", "run_probe", "isolated_rng"]


@contextlib.contextmanager
def isolated_rng():
    """Run something (the probe) without moving the training RNG streams."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def load_probe():
    try:
        mod = importlib.import_module("visionpe.eval.probe")
    except ModuleNotFoundError as e:
        raise ValueError("probe.every > 0 needs visionpe.eval.probe (the Three-Cell/PESI probe), which is not "
                         "installed in this build; set probe.every: 0") from e
    fn = getattr(mod, "threecell_probe", None)
    if fn is None:
        raise ValueError("visionpe.eval.probe has no threecell_probe function; set probe.every: 0")
    return fn


def run_probe(fn, model, options: dict) -> dict:
    """Call the Three-Cell/PESI probe on a copy of the model, in eval mode, with isolated RNG."""
    m = copy.deepcopy(unwrap(model)).eval()
    with isolated_rng():
        res = fn(m, **options)
    if not isinstance(res, dict):
        raise TypeError(f"threecell_probe must return a dict of floats; got {type(res).__name__}")
    return {str(k): float(v) for k, v in res.items()}
