"""``visionpe threecell``: the Three-Cell spatial diagnostic (LOOPE §3.2/§4.3) for every encoder.

One YAML recipe (``configs/threecell.yaml`` = the paper's setting, ``configs/threecell_quick.yaml`` = the
2-core CPU demo) trains a small ViT per encoder on the Three-Cell data (:mod:`visionpe.eval.threecell_data`)
with 6 sigmoid outputs and BCE, keeps the epoch with the best validation average, and reports the
test accuracy of the four label groups (distance, orientation, area, vector sum) and their mean
(spec §8.4), plus the PESI metrics of the trained encoder (:mod:`visionpe.eval.pesi`).

This module is the runner and the command line; the pieces live beside it:

* :mod:`~visionpe.eval.threecell_config`: recipe sections, defaults, checks, recipe hash, encoder list;
* :mod:`~visionpe.eval.threecell_model`: the ViT per encoder, pretrained backbones (key report), optimiser groups;
* :mod:`~visionpe.eval.threecell_train`: training and evaluation of one encoder;
* :mod:`~visionpe.eval.threecell_report`: the CSV, markdown table and chart.

Outputs in ``runs/threecell/<config name>/`` (``--out``):

* ``encoders/<name>.json``: one finished encoder, written atomically; a rerun skips encoders whose JSON
  exists with the same recipe hash (resume after an interruption);
* ``results.md``, ``results.csv``: the table, with the label-majority row (the best constant predictor,
  which is exactly what a no-PE ViT can reach: spec §8.7);
* ``threecell.png``: grouped bar chart; ``heatmaps/<name>.png``: PE-similarity maps of each trained encoder;
* ``encoders/<name>.safetensors``: the best-validation weights (``run.save_weights``);
* with ``--generalise``: the same weights tested on the grids of the recipe's ``generalise`` section
  (:mod:`~visionpe.eval.threecell_generalise`): ``generalise.{md,csv,png,json}`` and ``generalise/<name>.json``.
  Encoders already trained by a main run into the same folder with the same recipe hash are not retrained.

Encoders are trained in ``workers`` processes (``threads`` intra-op threads each): small models train
faster as two single-thread processes on two cores than as one two-thread process.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import queue
import sys
import time
import traceback
from pathlib import Path

import torch

from visionpe.cli_util import add_encoders_argument, warn_gpu_recipe_on_cpu

from .threecell_config import BASELINES, data_config, load_config, recipe_hash, resolve_encoders
from .threecell_data import ThreeCellData
from .threecell_gen_report import run_meta, write_generalise
from .threecell_generalise import run_generalise
from .threecell_model import build_model, param_groups
from .threecell_report import summary_line, write_results
from .threecell_train import load_weights, majority_accuracies, train_encoder

__all__ = ["load_config", "resolve_encoders", "build_model", "param_groups", "train_encoder", "run", "main",
           "BASELINES"]


# -- the whole run ----------------------------------------------------------------------------------
def _load_done(out_dir: Path, name: str, cfg: dict, need_weights: bool = False):
    path = out_dir / "encoders" / f"{name}.json"
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    if rec.get("recipe_hash") != recipe_hash(cfg):
        return None
    if need_weights and load_weights(name, cfg, out_dir, tensors=False) is None:
        return None  # finished, but its weights were not kept: a generalisation run must retrain it
    return rec


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker(name, cfg, out_dir, cache_dir, q):
    def progress(n, info):
        q.put((name, n, info))
    try:
        return train_encoder(name, cfg, out_dir, cache_dir, progress)
    except Exception as e:  # reported in the table; the other encoders still run
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
    records, todo = {}, []
    for name in encoders:
        rec = None if fresh else _load_done(out_dir, name, cfg, need_weights)
        if rec is not None:
            records[name] = rec
        else:
            todo.append(name)
    if records:
        print(f"resuming: {len(records)} encoder(s) already finished ({', '.join(records)})", flush=True)
    (out_dir / "config.yaml").write_text(_dump_yaml(cfg))
    steps = math.ceil(data.cfg.split_sizes()[0] / tc["batch_size"]) * tc["epochs"]
    bar = tqdm(total=steps * len(todo), desc="three-cell", unit="step", disable=not show_progress or not todo,
               dynamic_ncols=True, mininterval=1.0)
    workers = max(1, min(run_cfg["workers"], len(todo)))
    if workers == 1:
        old_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for name in todo:
                bar.set_postfix_str(name)
                def progress(n, info, _bar=bar):
                    _bar.update(n)
                    if info:
                        _bar.set_postfix_str(info)
                try:
                    records[name] = train_encoder(name, cfg, out_dir, cache_dir, progress)
                except Exception as e:
                    records[name] = {"encoder": name, "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc()}
                bar.write(summary_line(records[name]))
        finally:
            torch.set_num_threads(old_threads)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        ctx = mp.get_context("spawn")
        with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                                           initargs=(threads,)) as pool:
            q = manager.Queue()
            futs = {pool.submit(_worker, n, cfg, str(out_dir), cache_dir, q): n for n in todo}
            pending = set(futs)
            while pending:
                try:
                    name, n, info = q.get(timeout=0.5)
                    bar.update(n)
                    if info:
                        bar.set_postfix_str(info)
                except queue.Empty:
                    pass
                for f in [f for f in pending if f.done()]:
                    pending.discard(f)
                    records[futs[f]] = f.result()
                    bar.write(summary_line(records[futs[f]]))
            while not q.empty():
                bar.update(q.get()[1])
    bar.close()
    records = {n: records[n] for n in encoders}
    s = data.split("train")["labels"], data.split("test")["labels"]
    majority = majority_accuracies(*s)
    summary = {"records": records, "majority": majority, "wall_s": time.perf_counter() - t0,
               "workers": workers, "threads": threads, "trained": len(todo)}
    write_results(cfg, summary, out_dir)
    return summary


def _parse_grids(text: str) -> list:
    """``"10,12,16"`` or ``"10x12,16"`` -> ``[10, [10, 12], 16]`` (checked by the recipe reader)."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        parts = item.split("x")
        if not item or not all(p.strip().isdigit() for p in parts) or len(parts) > 2:
            raise ValueError(f"--grids: {item!r} is not a grid side (10) or h x w (10x12); got {text!r}")
        out.append(int(parts[0]) if len(parts) == 1 else [int(parts[0]), int(parts[1])])
    return out


def _loadavg():
    try:
        return os.getloadavg()
    except OSError:  # not available on this platform
        return None


def _dump_yaml(cfg: dict) -> str:
    import yaml
    return yaml.safe_dump(cfg, sort_keys=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="visionpe threecell", description=(
        "Three-Cell spatial diagnostic: train a small ViT per position encoder and report how much spatial "
        "information each keeps (LOOPE Table 4), plus PESI of the trained encoders."))
    p.add_argument("--quick", action="store_true", help="the 2-core CPU demo recipe (configs/threecell_quick.yaml)")
    p.add_argument("--config", default=None, help="YAML recipe (default: configs/threecell.yaml, the paper's setting)")
    add_encoders_argument(p, help="none, learned, sincos2d and every registered encoder")
    p.add_argument("--out", default=None, help="output folder (default: runs/threecell/<config name>)")
    p.add_argument("--cache-dir", default=None, help="dataset cache (default: ~/.cache/visionpe/threecell)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="parallel encoder processes")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--no-pesi", action="store_true", help="skip PESI and heatmaps")
    p.add_argument("--generalise", action="store_true", help="also test the trained weights, without further "
                   "training, on the grids of the recipe's generalise section (reuses a main run's weights)")
    p.add_argument("--grids", default=None, help="test grids for --generalise, e.g. 10,12,16 or 10x12 "
                                                 "(default: generalise.grids of the recipe)")
    p.add_argument("--gen-samples", type=int, default=None, help="Three-Cell samples per test grid "
                                                                 "(default: generalise.samples)")
    p.add_argument("--fresh", action="store_true", help="retrain encoders even if their results exist")
    p.add_argument("--list", action="store_true", help="print the encoders that would run and exit")
    args = p.parse_args(argv)
    if args.quick and args.config:
        p.error("use either --quick or --config, not both")
    overrides = {}
    for key, val in (("train.epochs", args.epochs), ("data.num_samples", args.num_samples),
                     ("run.workers", args.workers), ("run.threads", args.threads), ("run.device", args.device)):
        if val is not None:
            overrides[key] = val
    if args.no_pesi:
        overrides["run.pesi"] = False
    if (args.grids is not None or args.gen_samples is not None) and not args.generalise:
        p.error("--grids and --gen-samples need --generalise")
    if args.generalise:
        overrides["run.save_weights"] = True  # the grids are tested from the stored weights
        if args.gen_samples is not None:
            overrides["generalise.samples"] = args.gen_samples
    try:
        if args.grids is not None:
            overrides["generalise.grids"] = _parse_grids(args.grids)
        cfg = load_config(args.config, quick=args.quick, overrides=overrides)
        encoders = resolve_encoders(args.encoders if args.encoders is not None else cfg["run"]["encoders"])
        if args.generalise and not cfg["generalise"]["grids"]:
            raise ValueError(f"--generalise: recipe {cfg['name']!r} has no generalise.grids; add the section or "
                             f"pass --grids 10,12,16")
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"visionpe threecell: error: {e}", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(encoders))
        return 0
    warn_gpu_recipe_on_cpu(cfg, len(encoders))  # the paper's recipe on a CPU: an estimate and a pointer to --quick
    out = Path(args.out) if args.out else Path("runs") / "threecell" / cfg["name"]
    print(f"Three-Cell `{cfg['name']}`: {len(encoders)} encoders -> {out}", flush=True)
    t0, load0 = time.perf_counter(), _loadavg()
    summary = run(cfg, encoders, out, args.cache_dir, fresh=args.fresh, need_weights=args.generalise)
    if args.generalise:
        gsum = run_generalise(cfg, summary["records"], out, args.cache_dir, fresh=args.fresh)
        write_generalise(cfg, gsum, out, run_meta(cfg, summary, gsum, time.perf_counter() - t0, load0, _loadavg()))
        print(f"wrote {out / 'generalise.md'}, generalise.csv, generalise.png ({gsum['tested']} encoder(s) tested "
              f"on {', '.join(gsum['grids'])} in {gsum['wall_s']:.0f} s)")
    recs = summary["records"]
    failed = [n for n, r in recs.items() if "error" in r]
    print(f"\nwrote {out / 'results.md'}, results.csv, threecell.png ({summary['wall_s']:.0f} s)")
    if "none" in recs and "error" not in recs["none"]:
        best = max((r for n, r in recs.items() if n != "none" and "error" not in r),
                   key=lambda r: r["test"]["avg"], default=None)
        line = (f"no PE: {recs['none']['test']['avg']:.1f} (label majority {summary['majority']['avg']:.1f})")
        if best is not None:
            line += f"; best PE: {best['encoder']} {best['test']['avg']:.1f}"
        print(line)
    if args.generalise:
        gfailed = [n for n, r in gsum["records"].items() if "error" in r or any("error" in e for e in r["grids"])]
        if gfailed:
            print(f"not tested on every grid: {', '.join(gfailed)} (n/a with the reason in generalise.md)",
                  file=sys.stderr)
            failed += [n for n in gfailed if n not in failed]
    if failed:
        print(f"failed encoders: {', '.join(failed)} (see results.md)", file=sys.stderr)
        return 1
    return 0
