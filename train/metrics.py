"""Training records: ``metrics.jsonl`` (every record), ``summary.csv`` (one row per epoch, timm's column
names), TensorBoard event files (optional extra ``visionpe[tensorboard]``) and ``curves.png``.

Epochs are numbered from 1 everywhere (records, CSV, console, TensorBoard); ``update`` counts optimizer
updates from 1. Evaluation columns are named as in timm: ``eval_loss``, ``eval_top1``, ``eval_top5``
(top-5 is top-``min(5, classes)``), ``ema_eval_*`` for the EMA weights.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Optional

__all__ = ["MetricsLog", "plot_curves", "TensorBoardLog", "format_epoch_line"]


class MetricsLog:
    """Append-only JSON-lines log; records carry ``kind`` ("step" or "epoch") and ``update``."""

    def __init__(self, out_dir: str, enabled: bool = True):
        self.out_dir = out_dir
        self.enabled = enabled
        self.jsonl = os.path.join(out_dir, "metrics.jsonl")
        self.csv = os.path.join(out_dir, "summary.csv")

    def records(self) -> list:
        if not os.path.isfile(self.jsonl):
            return []
        with open(self.jsonl) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate(self, update: int, source: Optional[str] = None) -> None:
        """On resume: keep the records up to ``update`` (from ``source``'s log when a run continues another
        run's checkpoint in a new folder); later ones will be produced again."""
        if not self.enabled:
            return
        src = MetricsLog(source) if source else self
        keep = [r for r in src.records() if r.get("update", 0) <= update]
        os.makedirs(self.out_dir, exist_ok=True)
        tmp = self.jsonl + ".tmp"
        with open(tmp, "w") as f:
            for r in keep:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.jsonl)
        self.write_csv()

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        if record.get("kind") == "epoch":
            self.write_csv()

    def write_csv(self) -> None:
        rows = [r for r in self.records() if r.get("kind") == "epoch"]
        cols = []
        for r in rows:
            cols += [k for k in r if k not in cols and k != "kind"]
        tmp = self.csv + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in cols})
        os.replace(tmp, self.csv)


class TensorBoardLog:
    """Scalars to TensorBoard event files under ``<run>/tensorboard`` (``torch.utils.tensorboard``).

    ``mode``: True (required: a missing package is an error naming the extra), "auto" (when installed),
    False. ``purge_step`` hides the events a crashed attempt wrote after the checkpoint a run resumes from.
    """

    def __init__(self, out_dir: str, mode, purge_step: Optional[int] = None, enabled: bool = True):
        self.writer = None
        self.path = os.path.join(out_dir, "tensorboard")
        self.missing = False
        if not enabled or mode is False:
            return
        if mode == "auto":
            import importlib.util
            if importlib.util.find_spec("tensorboard") is None:
                self.missing = True
                return
        else:
            from visionpe.extras import require
            require("tensorboard", "tensorboard", "train.tensorboard: true")
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(self.path, purge_step=purge_step)

    @staticmethod
    def check(mode) -> None:
        """Fail early (before any step) when ``mode`` is True and the package is missing."""
        if mode is True:
            from visionpe.extras import require
            require("tensorboard", "tensorboard", "train.tensorboard: true")

    def scalars(self, values: dict, step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.writer.add_scalar(prefix + k, v, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def format_epoch_line(rec: dict, epochs: int, seconds: float) -> str:
    """``epoch 3/300  train_loss 1.234  eval_loss 1.1  eval_top1 45.67  eval_top5 80.1  lr 0.00119  (12.3 s)``."""
    parts = [f"epoch {rec['epoch']}/{epochs}"]
    for k, v in rec.items():
        if k in ("kind", "epoch", "update", "lr") or not isinstance(v, (int, float)):
            continue
        parts.append(f"{k} {v:.2f}" if "top" in k else f"{k} {v:.4g}")
    parts.append(f"lr {rec['lr']:.3g}")
    return "  ".join(parts) + f"  ({seconds:.1f} s)"


def plot_curves(records: list, path: str) -> None:
    """Loss (per logged step and per epoch) and evaluation accuracy per epoch, side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 3.8))
    if steps:
        ax_l.plot([r["epoch_float"] for r in steps], [r["train_loss"] for r in steps], lw=0.8, alpha=0.6,
                  label="train (logged steps)")
    if epochs:
        ep = [r["epoch"] for r in epochs]
        ax_l.plot(ep, [r["train_loss"] for r in epochs], "o-", label="train (epoch mean)")
        if any("eval_loss" in r for r in epochs):
            ax_l.plot(ep, [r.get("eval_loss", math.nan) for r in epochs], "s-", label="eval")
        for key, style in (("eval_top1", "o-"), ("ema_eval_top1", "s--")):
            if any(key in r for r in epochs):
                ax_a.plot(ep, [r.get(key, math.nan) for r in epochs], style, label=key)
    ax_l.set_xlabel("epoch")
    ax_l.set_ylabel("loss")
    ax_l.legend(fontsize=8)
    ax_a.set_xlabel("epoch")
    ax_a.set_ylabel("top-1 accuracy (%)")
    if ax_a.lines:
        ax_a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
