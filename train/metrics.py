"""Training metrics: ``metrics.jsonl`` (every record), ``metrics.csv`` (one row per epoch) and a plot."""
from __future__ import annotations

import csv
import json
import math
import os

__all__ = ["MetricsLog", "plot_curves"]


class MetricsLog:
    """Append-only JSON-lines log; records carry ``kind`` ("step" or "epoch") and ``update``."""

    def __init__(self, out_dir: str, enabled: bool = True):
        self.out_dir = out_dir
        self.enabled = enabled
        self.jsonl = os.path.join(out_dir, "metrics.jsonl")
        self.csv = os.path.join(out_dir, "metrics.csv")

    def records(self) -> list:
        if not os.path.isfile(self.jsonl):
            return []
        with open(self.jsonl) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate(self, update: int) -> None:
        """On resume: drop records written after the checkpoint (they will be produced again)."""
        if not self.enabled or not os.path.isfile(self.jsonl):
            return
        keep = [r for r in self.records() if r.get("update", 0) <= update]
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
        with open(self.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in cols})


def plot_curves(records: list, path: str) -> None:
    """Loss (per logged step and per epoch) and validation accuracy per epoch, side by side."""
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
        ep = [r["epoch"] + 1 for r in epochs]
        ax_l.plot(ep, [r["train_loss"] for r in epochs], "o-", label="train (epoch mean)")
        if any("val_loss" in r for r in epochs):
            ax_l.plot(ep, [r.get("val_loss", math.nan) for r in epochs], "s-", label="val")
        for key, style in (("val_top1", "o-"), ("ema_val_top1", "s--")):
            if any(key in r for r in epochs):
                ax_a.plot(ep, [r.get(key, math.nan) for r in epochs], style, label=key.replace("_", " "))
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
