"""``visionpe threecell``: the Three-Cell spatial diagnostic (LOOPE §3.2/§4.3) for every encoder.

One YAML recipe (``configs/threecell.yaml`` = the paper's setting, ``configs/threecell_quick.yaml`` = the
2-core CPU demo) trains a small ViT per encoder on the Three-Cell data (:mod:`visionpe.eval.threecell_data`)
with 6 sigmoid outputs and BCE, keeps the epoch with the best validation average, and reports the
test accuracy of the four label groups (distance, orientation, area, vector sum) and their mean
(spec §8.4), plus the PESI metrics of the trained encoder (:mod:`visionpe.eval.pesi`).

This module is the command line; it imports torch only once a run starts, so ``--help`` answers at once.
The pieces live beside it:

* :mod:`~visionpe.eval.threecell_run`: the runner (workers, resume, tables);
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
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from visionpe.cli_util import add_encoders_argument

__all__ = ["build_parser", "main", "load_config", "resolve_encoders", "run", "BASELINES"]

# names this module used to hold, imported on first use (they pull in torch)
_LAZY = {"load_config": "threecell_config", "resolve_encoders": "threecell_config", "BASELINES": "threecell_config",
         "build_model": "threecell_model", "param_groups": "threecell_model", "train_encoder": "threecell_train",
         "run": "threecell_run"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _parse_grids(text: str) -> list:
    """``"10,12,16"`` or ``"10x12,16"`` -> ``[10, [10, 12], 16]`` (checked by the recipe reader)."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        parts = item.split("x")
        if not item or not all(p.strip().isdigit() for p in parts) or len(parts) > 2:
            raise ValueError(f"--grids: {item!r} is not a grid side (10) or h x w (10x12); got {text!r}")
        out.append(int(parts[0]) if len(parts) == 1 else [int(parts[0]), int(parts[1])])
    return out


def build_parser() -> argparse.ArgumentParser:
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
    return p


def main(argv=None) -> int:
    p = build_parser()
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
    from visionpe.cli_util import debug_enabled, warn_gpu_recipe_on_cpu

    from .threecell_config import load_config, resolve_encoders
    try:
        if args.grids is not None:
            overrides["generalise.grids"] = _parse_grids(args.grids)
        cfg = load_config(args.config, quick=args.quick, overrides=overrides)
        encoders = resolve_encoders(args.encoders if args.encoders is not None else cfg["run"]["encoders"])
        if args.generalise and not cfg["generalise"]["grids"]:
            raise ValueError(f"--generalise: recipe {cfg['name']!r} has no generalise.grids; add the section or "
                             f"pass --grids 10,12,16")
    except (ValueError, TypeError, FileNotFoundError) as e:
        if debug_enabled():
            raise
        print(f"visionpe threecell: error: {e}", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(encoders))
        return 0
    warn_gpu_recipe_on_cpu(cfg, len(encoders))  # the paper's recipe on a CPU: an estimate and a pointer to --quick
    out = Path(args.out) if args.out else Path("runs") / "threecell" / cfg["name"]
    print(f"Three-Cell `{cfg['name']}`: {len(encoders)} encoders -> {out}", flush=True)
    from .threecell_gen_report import run_meta, write_generalise
    from .threecell_generalise import run_generalise
    from .threecell_run import loadavg, run
    t0, load0 = time.perf_counter(), loadavg()
    summary = run(cfg, encoders, out, args.cache_dir, fresh=args.fresh, need_weights=args.generalise)
    if args.generalise:
        gsum = run_generalise(cfg, summary["records"], out, args.cache_dir, fresh=args.fresh)
        write_generalise(cfg, gsum, out, run_meta(cfg, summary, gsum, time.perf_counter() - t0, load0, loadavg()))
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
