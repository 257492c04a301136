"""The runner behind ``visionpe vlmdiag`` (:mod:`visionpe.eval.vlmdiag`, the command line): train every
variant of a recipe, resume finished ones, write the tables and the chart.

Variants train in ``workers`` processes of ``threads`` intra-op threads each (two single-thread processes use
two cores better than one two-thread process for a model this small).
"""
from __future__ import annotations

import math
import os
import time
import traceback
from pathlib import Path

import numpy as np
from .jobs import finished_record, run_jobs, split_finished
from .vlmdiag_config import data_config, split_specs, variant_hash
from .vlmdiag_data import load_or_generate
from .vlmdiag_report import write_results
from .vlmdiag_train import majority_scores, train_variant

__all__ = ["run"]


def _load_done(out_dir: Path, name: str, h: str):
    return finished_record(out_dir / "variants" / f"{name}.json", h)


def _failed(name: str, e: Exception) -> dict:
    """The record of a variant whose training raised (call inside the ``except``)."""
    return {"variant": name, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def _steps(cfg: dict, cache_dir) -> int:
    """Optimiser steps of one variant (batches of one video length each)."""
    frames = load_or_generate(data_config(cfg), split_specs(cfg)["train"], cache_dir)[0]["frames"]
    bs = cfg["train"]["batch_size"]
    return sum(math.ceil(c / bs) for c in np.unique(frames, return_counts=True)[1]) * cfg["train"]["epochs"]


def run(cfg: dict, names: list[str], out_dir, cache_dir=None, fresh: bool = False, show_progress: bool = True) -> dict:
    """Train every selected variant not already finished, then write the tables and the chart. Returns
    ``{"records": {name: record}, "majority": {split: scores}, "wall_s": ...}``."""
    from tqdm.auto import tqdm
    t0 = time.perf_counter()
    load0 = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rc = cfg["run"]
    threads = rc["threads"] or max(1, (os.cpu_count() or 1) // max(1, rc["workers"]))
    specs = split_specs(cfg)
    data = {s: load_or_generate(data_config(cfg), spec, cache_dir)[0] for s, spec in specs.items()}  # once
    records, todo = split_finished(names, lambda n: _load_done(out_dir, n, variant_hash(cfg, n)), fresh,
                                   "variant(s)")
    import yaml
    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    bar = tqdm(total=_steps(cfg, cache_dir) * len(todo), desc="vlmdiag", unit="step", dynamic_ncols=True,
               disable=not show_progress or not todo, mininterval=1.0)
    done, workers = run_jobs(todo, train_variant, (cfg, str(out_dir), cache_dir), workers=rc["workers"],
                             threads=threads, bar=bar, failed=_failed, report=lambda r: _report(r, bar))
    records.update(done)
    bar.close()
    records = {n: records[n] for n in names}
    tests = [s for s in specs if s not in ("train", "val")]
    majority = {s: majority_scores(data["train"], data[s]) for s in tests}
    summary = {"records": records, "majority": majority, "wall_s": time.perf_counter() - t0, "workers": workers,
               "threads": threads, "trained": len(todo),
               "load_avg_start": load0, "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    write_results(cfg, summary, out_dir)
    return summary


def _report(rec: dict, bar) -> None:
    if "error" in rec:
        bar.write(f"  {rec['variant']}: FAILED {rec['error']}")
        return
    parts = ", ".join(f"{s} {v['avg']:.1f}" for s, v in rec["test"].items())
    bar.write(f"  {rec['variant']:<16} avg {parts}  ({rec['wall_s']:.0f} s)")
