"""Regenerate the committed digits results behind docs/finetune.md ("Measured"): one fine-tuning run per
encoder with the shipped CPU recipe (configs/finetune_digits_cpu.yaml), then ``visionpe evalres`` on the runs.

    python tools/digits_results.py            # about 3-4 min on 2 idle cores; writes docs/results/finetune_digits/

Writes ``<out>/finetune_digits.json`` (per encoder: final val top-1, val loss, train loss, wall time; the
machine and versions) and ``<out>/evalres.{md,csv,json,png}``; the chart is copied to
``docs/img/finetune_digits_evalres.png``. ``python tools/render_docs.py`` then updates the docs tables.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENCODERS = ("none", "learned", "sincos2d", "rope_axial", "rope_mixed", "relpos_bias")
RESOLUTIONS = (16, 24, 32, 40, 48, 64)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "finetune_digits"))
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "digits_docs"), help="data and run folders")
    p.add_argument("--encoders", nargs="+", default=list(ENCODERS))
    args = p.parse_args(argv)

    import timm
    import torch

    from visionpe.eval.evalres import main as evalres_main
    from visionpe.train import load_config, run
    from visionpe.train.synthetic import make_digits_folder

    torch.set_num_threads(1)  # the recipe's setting: one intra-op thread (see its header)
    data = os.path.join(args.work, "data")
    if os.path.isdir(data):
        shutil.rmtree(data)
    counts = make_digits_folder(data, size=32, val_fraction=0.25, seed=0)
    rows, dirs = [], []
    for pe in args.encoders:
        out_dir = os.path.join(args.work, pe)
        shutil.rmtree(out_dir, ignore_errors=True)
        cfg = load_config("finetune_digits_cpu", [f"data.root={data}", f"model.pe={pe}", f"train.output_dir={out_dir}",
                                                   "train.progress=false", "checkpoint.resume=null"])
        t0 = time.perf_counter()
        res = run(cfg)
        wall = time.perf_counter() - t0
        rows.append({"encoder": pe, "val_top1": res["val_top1"], "val_loss": res["val_loss"],
                     "train_loss": res["train_loss"], "epochs": res["epochs_done"], "wall_s": wall})
        dirs.append(out_dir)
        print(f"{pe}: val top-1 {res['val_top1']:.2f}  ({wall:.0f} s)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    meta = {"recipe": "configs/finetune_digits_cpu.yaml", "data": counts, "threads": 1,
            "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs", "torch": torch.__version__,
            "timm": timm.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "python tools/digits_results.py"}
    with open(os.path.join(args.out, "finetune_digits.json"), "w") as f:
        json.dump({"meta": meta, "runs": rows}, f, indent=1)
    rc = evalres_main(["--checkpoint", *dirs, "--labels", *args.encoders, "--data-root", data,
                       "--resolutions", *map(str, RESOLUTIONS), "--workers", "0", "--device", "cpu",
                       "--out", args.out])
    shutil.copy(os.path.join(args.out, "evalres.png"), os.path.join(ROOT, "docs", "img", "finetune_digits_evalres.png"))
    return rc


if __name__ == "__main__":
    sys.exit(main())
