"""``visionpe vlmdiag``: which VLM position scheme keeps where and when in a video, and does it survive longer
videos and larger frames?

One recipe (``configs/vlmdiag_quick.yaml`` = the 2-core CPU run, ``configs/vlmdiag.yaml`` = a longer one)
trains the package's tiny decoder once per variant (a position scheme with its options) on short videos of
small frames (:mod:`visionpe.eval.vlmdiag_data`), and scores it on the in-distribution split and on longer
videos and larger grids (:mod:`visionpe.eval.vlmdiag_train`).

Outputs in ``runs/vlmdiag/<config name>/`` (``--out``):

* ``variants/<name>.json``: one finished variant, written atomically; a rerun skips variants whose JSON exists
  with the same recipe hash (resume after a stop);
* ``results.csv``, ``results.md``: per question group and test split, with the label-majority row
  (:mod:`visionpe.eval.vlmdiag_report`);
* ``vlmdiag.png``: accuracy against video length per variant.

This module is the command line (torch is imported only once a run starts, so ``--help`` answers at once);
the runner is :mod:`visionpe.eval.vlmdiag_run`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["build_parser", "main", "run"]


def __getattr__(name: str):
    if name == "run":  # the runner imports torch: loaded on first use
        from .vlmdiag_run import run
        return run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visionpe vlmdiag", description=(
        "VLM position diagnostic: train a tiny decoder per position scheme on synthetic text + video + question "
        "sequences and report which schemes keep where and when, on longer videos and larger frames too."))
    p.add_argument("--quick", action="store_true", help="the 2-core CPU recipe (vlmdiag_quick)")
    p.add_argument("--config", default=None, help="recipe name in configs/ or a YAML path (default: vlmdiag)")
    p.add_argument("--schemes", nargs="+", default=None, metavar="NAME",
                   help="variant or scheme names, comma- or space-separated (a scheme name selects all its "
                        "variants; default: every variant of the recipe)")
    p.add_argument("--out", default=None, help="output folder (default: runs/vlmdiag/<config name>[_seed<seed>])")
    p.add_argument("--cache-dir", default=None, help="dataset cache (default: ~/.cache/visionpe/vlmdiag)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="training seed (model init, batch order, random "
                                                         "scheme options); the data keep data.seed")
    p.add_argument("--workers", type=int, default=None, help="parallel variant processes")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    p.add_argument("--device", default=None, help="cpu, cuda, auto ...")
    p.add_argument("--fresh", action="store_true", help="retrain variants even if their results exist")
    p.add_argument("--list", action="store_true", help="print the variants that would run and exit")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.quick and args.config:
        p.error("use either --quick or --config, not both")
    overrides = {k: v for k, v in (("train.epochs", args.epochs), ("train.seed", args.seed),
                                   ("run.workers", args.workers), ("run.threads", args.threads),
                                   ("run.device", args.device)) if v is not None}
    from visionpe.cli_util import split_names
    from .vlmdiag_config import load_config, select_variants
    try:
        cfg = load_config(args.config, quick=args.quick, overrides=overrides)
        names = select_variants(cfg, split_names(args.schemes) if args.schemes is not None else cfg["run"]["variants"])
    except (ValueError, TypeError, FileNotFoundError) as e:
        from visionpe.cli_util import debug_enabled
        if debug_enabled():
            raise
        print(f"visionpe vlmdiag: error: {e}", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(names))
        return 0
    default = cfg["name"] + (f"_seed{args.seed}" if args.seed is not None else "")
    out = Path(args.out) if args.out else Path("runs") / "vlmdiag" / default
    print(f"vlmdiag `{cfg['name']}`: {len(names)} variant(s) -> {out}", flush=True)
    from .vlmdiag_run import run
    summary = run(cfg, names, out, args.cache_dir, fresh=args.fresh)
    failed = [n for n, r in summary["records"].items() if "error" in r]
    print(f"\nwrote {out / 'results.md'}, results.csv, vlmdiag.png ({summary['wall_s']:.0f} s)")
    if failed:
        print(f"failed variants: {', '.join(failed)} (see results.md)", file=sys.stderr)
        return 1
    return 0
