"""Three-Cell outputs: ``results.csv``, ``results.md`` and the ``threecell.png`` bar chart from the per-encoder
records, and the one-line summary printed per finished encoder."""
from __future__ import annotations

import csv
import math
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .threecell_config import data_config, patch_size

__all__ = ["GROUP_TITLES", "CSV_COLUMNS", "write_results", "plot_results", "summary_line", "machine"]

GROUP_TITLES = {"distance": "Distance", "orientation": "Orientation", "area": "Area",
                "vector_sum": "Vector Sum", "avg": "Average"}
CSV_COLUMNS = ["encoder", "hooks", *GROUP_TITLES, "M_U", "M_D", "A_SU", "pesi_method", "best_epoch", "epochs",
               "params", "wall_s", "cpu_s", "threads", "device", "error"]


def machine() -> str:
    """OS, CPU model, logical CPUs, GPU (if any) and torch version, for the results footer."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} logical CPUs{gpu}, torch {torch.__version__}"


def _f(v, nd=1) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def summary_line(rec: dict) -> str:
    """One line per finished (or failed) encoder, printed under the progress bar."""
    if "error" in rec:
        return f"  {rec['encoder']}: FAILED {rec['error']}"
    t = rec["test"]
    line = (f"  {rec['encoder']:<16} test avg {t['avg']:5.1f}  (dist {t['distance']:.1f}, orient "
            f"{t['orientation']:.1f}, area {t['area']:.1f}, sum {t['vector_sum']:.1f})  {rec['wall_s']:.0f}s")
    pre = rec.get("pretrained")
    if pre and (pre["missing"] or pre["unexpected"]):
        line += (f"\n    pretrained {pre['source']}: {pre['loaded']} tensors loaded, {len(pre['missing'])} missing "
                 f"(kept at init), {len(pre['unexpected'])} unexpected (ignored)")
    return line


def _write_csv(path: Path, recs: dict, maj: dict) -> None:
    cols = list(GROUP_TITLES)
    blank = [""] * (len(CSV_COLUMNS) - 2 - len(cols))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        w.writerow(["label_majority", "", *[f"{maj[c]:.2f}" for c in cols], *blank])
        for n, r in recs.items():
            if "error" in r:
                w.writerow([n, "", *[""] * len(cols), *blank[:-1], r["error"]])
                continue
            p = r["pesi"]
            w.writerow([n, "+".join(r["hooks"]), *[f"{r['test'][c]:.2f}" for c in cols],
                        *["" if p[k] is None else f"{p[k]:.4f}" for k in ("M_U", "M_D", "A_SU")], r["pesi_method"],
                        r["best_epoch"], r["epochs"], r["params"], f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}",
                        r["threads"], r["device"], ""])


def _recipe_sentence(cfg: dict) -> str:
    d = data_config(cfg)
    m, t = cfg["model"], cfg["train"]
    return (
        f"Test accuracy (%) of the epoch with the best validation average; groups as in LOOPE Table 4. "
        f"Data: {d.grid[0]}x{d.grid[1]} cells of {d.cell_size} px ({d.img_size[0]}x{d.img_size[1]} images), "
        f"{d.num_samples} samples split {'/'.join(str(s) for s in d.split_sizes())}, seed {d.seed}. "
        f"Model: ViT patch {patch_size(cfg)}, dim {m['embed_dim']}, depth {m['depth']}, heads {m['num_heads']}"
        f"{', from ' + str(m['pretrained']) if m['pretrained'] else ', from scratch'}. "
        f"Train: {t['optimizer']} lr {t['lr']} -> {t['min_lr']} cosine"
        f"{' (PE parameters x' + str(t['pe_lr_scale']) + ')' if t['pe_lr_scale'] != 1 else ''}, "
        f"{t['warmup_epochs']} warmup epoch(s), {t['epochs']} epochs, batch {t['batch_size']}.")


def write_results(cfg: dict, summary: dict, out_dir) -> None:
    """``results.csv``, ``results.md`` and ``threecell.png`` from ``summary`` (:func:`visionpe.eval.threecell.run`'s
    ``{"records", "majority", "wall_s", "workers", "threads", "trained"}``)."""
    out_dir = Path(out_dir)
    cols = list(GROUP_TITLES)
    recs, maj = summary["records"], summary["majority"]
    _write_csv(out_dir / "results.csv", recs, maj)
    ok = [r for r in recs.values() if "error" not in r]
    enc_time = sum(r["wall_s"] for r in ok)
    lines = [
        f"# Three-Cell results: `{cfg['name']}`", "", _recipe_sentence(cfg), "",
        "| Encoder | hooks | Distance | Orientation | Area | Vector Sum | Average | M_U | M_D | A_SU | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| *label majority (constant predictor)* | | {' | '.join(_f(maj[c]) for c in cols)} | | | | |",
    ]
    for n, r in recs.items():
        if "error" in r:
            lines.append(f"| {n} | | failed: {r['error'][:80]} | | | | | | | | |")
            continue
        p = r["pesi"]
        lines.append(f"| {n} | {'+'.join(r['hooks']) or '-'} | {' | '.join(_f(r['test'][c]) for c in cols)} | "
                     f"{_f(p['M_U'], 4)} | {_f(p['M_D'], 4)} | {_f(p['A_SU'], 4)} | {r['wall_s']:.0f} |")
    loads = [(n, r["pretrained"]) for n, r in recs.items() if r.get("pretrained")]
    if loads:
        lines += ["", "Pretrained backbone (`model.pretrained`), per encoder: tensors loaded / missing in the "
                      "checkpoint (kept at init) / unexpected (ignored): "
                  + "; ".join(f"{n} {p['loaded']} / {len(p['missing'])} / {len(p['unexpected'])}" for n, p in loads)
                  + ". The key names are in `encoders/<name>.json`."]
    lines += [
        "",
        f"Machine: {machine()}. This invocation: {summary['wall_s']:.0f} s wall, {summary['trained']} encoder(s) "
        f"trained with {summary['workers']} worker(s) x {summary['threads']} thread(s), the others resumed; sum of "
        f"the per-encoder wall times (from the runs that trained them): {enc_time:.0f} s. "
        f"Written {datetime.now(timezone.utc).isoformat(timespec='seconds')}.",
        "",
        "A ViT without position encoding sees every Three-Cell image as the same multiset of tokens, so it "
        "can only reach the label-majority row; an encoder that keeps spatial information must sit well above it. "
        "PESI (M_U, M_D, A_SU) is computed on the trained encoder (see docs/threecell.md for how).",
    ]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    plot_results(recs, maj, out_dir / "threecell.png", cfg["name"])


def plot_results(records: dict, majority: dict, path: Path, title: str) -> None:
    """Grouped bar chart: encoders on x, one bar per group and the average; dashed majority average."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = {n: r for n, r in records.items() if "error" not in r}
    cols = list(GROUP_TITLES)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(ok) + 3.5), 4.0))
    width = 0.8 / len(cols)
    xs = np.arange(len(ok))
    for j, c in enumerate(cols):
        ax.bar(xs + (j - (len(cols) - 1) / 2) * width, [r["test"][c] for r in ok.values()], width,
               label=GROUP_TITLES[c])
    ax.axhline(majority["avg"], color="k", ls="--", lw=1, label=f"label majority avg ({majority['avg']:.1f})")
    ax.set_xticks(xs)
    ax.set_xticklabels(list(ok), rotation=30, ha="right")
    ax.set_ylim(30, 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Three-Cell ({title})")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
