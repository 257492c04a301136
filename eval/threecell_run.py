"""The Three-Cell runner behind ``visionpe threecell`` (:mod:`visionpe.eval.threecell`, the command line):
train every encoder of a recipe, resume finished ones, write the tables and the chart.

Encoders are trained in ``workers`` processes (``threads`` intra-op threads each): small models train
faster as two single-thread processes on two cores than as one two-thread process.
"""
from __future__ import annotations

import math
import os
import time
import traceback
from pathlib import Path

from .jobs import finished_record, run_jobs, split_finished
from .threecell_config import data_config, recipe_hash
from .threecell_data import ThreeCellData
from .threecell_report import summary_line, write_results
from .threecell_train import load_weights, majority_accuracies, train_encoder

__all__ = ["run", "loadavg"]


# -- the whole run ----------------------------------------------------------------------------------
def _load_done(out_dir: Path, name: str, cfg: dict, need_weights: bool = False):
    rec = finished_record(out_dir / "encoders" / f"{name}.json", recipe_hash(cfg))
    if rec is None:
        return None
    if need_weights and load_weights(name, cfg, out_dir, tensors=False) is None:
        return None  # finished, but its weights were not kept: a generalisation run must retrain it
    return rec


def _failed(name: str, e: Exception) -> dict:
    """The record of an encoder whose training raised (call inside the ``except``)."""
    return {"encoder": name, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def run(cfg: dict, encoders: list[str], out_dir, cache_dir=None, fresh: bool = False, show_progress: bool = True,
        need_weights: bool = False) -> dict:
    """Train every encoder not already finished, then write the tables and the chart. Returns
    ``{"records": {name: record}, "majority": {...}, "wall_s": ...}``. ``need_weights``: an encoder counts as
    finished only when its weights are stored too (for a generalisation run)."""
    from tqdm.auto import tqdm
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_cfg, tc = cfg["run"], cfg["train"]
    threads = run_cfg["threads"] or max(1, (os.cpu_count() or 1) // max(1, run_cfg["workers"]))
    data = ThreeCellData(data_config(cfg), cache_dir)  # generate (or hit) the cache once, before any worker
    records, todo = split_finished(encoders, lambda n: _load_done(out_dir, n, cfg, need_weights), fresh,
                                   "encoder(s)")
    (out_dir / "config.yaml").write_text(_dump_yaml(cfg))
    steps = math.ceil(data.cfg.split_sizes()[0] / tc["batch_size"]) * tc["epochs"]
    bar = tqdm(total=steps * len(todo), desc="three-cell", unit="step", disable=not show_progress or not todo,
               dynamic_ncols=True, mininterval=1.0)
    done, workers = run_jobs(todo, train_encoder, (cfg, str(out_dir), cache_dir), workers=run_cfg["workers"],
                             threads=threads, bar=bar, failed=_failed, report=lambda r: bar.write(summary_line(r)))
    records.update(done)
    bar.close()
    records = {n: records[n] for n in encoders}
    s = data.split("train")["labels"], data.split("test")["labels"]
    majority = majority_accuracies(*s)
    summary = {"records": records, "majority": majority, "wall_s": time.perf_counter() - t0,
               "workers": workers, "threads": threads, "trained": len(todo)}
    write_results(cfg, summary, out_dir)
    return summary


def loadavg():
    try:
        return os.getloadavg()
    except OSError:  # not available on this platform
        return None


def _dump_yaml(cfg: dict) -> str:
    import yaml
    return yaml.safe_dump(cfg, sort_keys=False)
