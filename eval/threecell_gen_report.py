"""Outputs of the Three-Cell generalisation run (:mod:`visionpe.eval.threecell_generalise`):
``generalise.csv``, ``generalise.md``, ``generalise.png`` and ``generalise.json`` (the invocation)."""
from __future__ import annotations

import csv
import json
import math
from datetime import datetime, timezone
from pathlib import Path

from .threecell_config import data_config
from .threecell_report import GROUP_TITLES, machine
from .threecell_train import resolve_device

__all__ = ["GEN_COLUMNS", "write_generalise", "plot_generalise", "generalise_rows", "run_meta"]

_GROUPS = list(GROUP_TITLES)  # distance, orientation, area, vector_sum, avg
#: one row per (encoder, grid); ``label_majority`` rows hold each grid's best constant predictor
GEN_COLUMNS = ["encoder", "grid", "grid_h", "grid_w", "train_grid", *_GROUPS, *[f"delta_{g}" for g in _GROUPS],
               "new_grid", "error"]


def generalise_rows(cfg: dict, gsummary: dict) -> list[dict]:
    """The CSV rows (strings, 2 decimals): the label-majority rows first, then each encoder's grids."""
    train = "{}x{}".format(*data_config(cfg).grid)
    maj = gsummary["majority"]
    rows = []

    def base(name, label):
        h, w = label.split("x")
        return {"encoder": name, "grid": label, "grid_h": h, "grid_w": w, "train_grid": int(label == train)}
    for label in gsummary["grids"]:
        rows.append({**base("label_majority", label), **{g: f"{maj[label][g]:.2f}" for g in _GROUPS}})
    for name, rec in gsummary["records"].items():
        entries = {"{}x{}".format(*e["grid"]): e for e in rec.get("grids", [])}
        for label in gsummary["grids"]:
            row = {**base(name, label), "new_grid": rec.get("new_grid", "")}
            e = entries.get(label)
            err = rec.get("error") or (e or {}).get("error") or ("" if e else "not tested")
            if err:
                row["error"] = err
            else:
                row.update({g: f"{e['test'][g]:.2f}" for g in _GROUPS})
                row.update({f"delta_{g}": f"{e['test'][g] - maj[label][g]:+.2f}" for g in _GROUPS})
            rows.append(row)
    return rows


def _f(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def write_generalise(cfg: dict, gsummary: dict, out_dir, meta: dict | None = None) -> None:
    """``generalise.csv``, ``generalise.md``, ``generalise.png`` and, when ``meta`` (the invocation: wall
    time, load average ...) is given, ``generalise.json``."""
    out_dir = Path(out_dir)
    rows = generalise_rows(cfg, gsummary)
    with open(out_dir / "generalise.csv", "w", newline="") as f:
        w = csv.DictWriter(f, GEN_COLUMNS, restval="")
        w.writeheader()
        w.writerows(rows)
    d = data_config(cfg)
    grids, maj = gsummary["grids"], gsummary["majority"]
    train = "{}x{}".format(*d.grid)
    head = [f"{g} (train)" if g == train else g for g in grids]
    lines = [
        f"# Three-Cell across grid sizes: `{cfg['name']}`", "",
        f"Trained on {train} cells of {d.cell_size} px (best-validation weights of the main run), tested without "
        f"further training on each grid's own Three-Cell test split (same generator, cell size, seed and split; "
        f"{cfg['generalise']['samples'] or d.num_samples} samples per test grid). Cells: average test accuracy (%) "
        f"of the four groups, and in brackets minus the label majority of that grid (its best constant predictor, "
        f"which a model without position information cannot beat).", "",
        "| Encoder | on a new grid | " + " | ".join(head) + " |",
        "|---|---|" + "---|" * len(grids),
        "| *label majority* | | " + " | ".join(_f(maj[g]["avg"]) for g in grids) + " |",
    ]
    for name, rec in gsummary["records"].items():
        if "error" in rec:
            lines.append(f"| {name} | n/a: {rec['error'][:90]} |" + " |" * len(grids))
            continue
        cells = []
        for e in rec["grids"]:
            g = "{}x{}".format(*e["grid"])
            cells.append(f"n/a: {e['error'][:60]}" if "error" in e else
                         f"{e['test']['avg']:.1f} ({e['test']['avg'] - maj[g]['avg']:+.1f})")
        lines.append(f"| {name} | {rec['new_grid']} | " + " | ".join(cells) + " |")
    lines += ["", "What each encoder does on a grid it was not trained on:", ""]
    seen = {}
    for name, rec in gsummary["records"].items():
        if "new_grid_long" in rec:
            seen.setdefault(rec["new_grid_long"], []).append(name)
    lines += [f"* {', '.join(names)}: {text}." for text, names in seen.items()]
    if meta:
        load = meta.get("loadavg_start"), meta.get("loadavg_end")
        lines += ["", f"Machine: {meta['machine']}. This invocation: {meta['wall_s']:.0f} s wall ({meta['trained']} "
                      f"encoder(s) trained, {meta['tested']} tested on the grids, the others resumed); load average "
                      f"(1/5/15 min) {_load(load[0])} at the start, {_load(load[1])} at the end. Written "
                      f"{meta['written']}."]
    (out_dir / "generalise.md").write_text("\n".join(lines) + "\n")
    plot_generalise(gsummary, out_dir / "generalise.png", cfg["name"], train)
    if meta:
        (out_dir / "generalise.json").write_text(json.dumps(meta, indent=1) + "\n")


def _load(v) -> str:
    return "n/a" if not v else " / ".join(f"{x:.2f}" for x in v)


def run_meta(cfg: dict, summary: dict, gsummary: dict, wall_s: float, load_start, load_end) -> dict:
    """The invocation's facts for ``generalise.json`` (and the docs' cost sentence). CPU seconds are summed
    over the encoder processes (from the runs that trained or tested them): on a shared machine they say what
    the work costs when the wall time says mostly how busy the machine was."""
    ok = [r for r in summary["records"].values() if "error" not in r]
    gok = [r for r in gsummary["records"].values() if "error" not in r]
    return {"config": cfg["name"], "grids": gsummary["grids"], "wall_s": wall_s, "train_wall_s": summary["wall_s"],
            "generalise_wall_s": gsummary["wall_s"], "trained": summary["trained"], "tested": gsummary["tested"],
            "encoders": len(summary["records"]), "workers": summary["workers"], "threads": summary["threads"],
            "encoder_wall_s_sum": sum(r["wall_s"] for r in ok), "encoder_cpu_s_sum": sum(r["cpu_s"] for r in ok),
            "generalise_cpu_s_sum": sum(r.get("cpu_s", 0.0) for r in gok), "loadavg_start": list(load_start or []),
            "loadavg_end": list(load_end or []), "machine": machine(),
            "device": str(resolve_device(cfg["run"]["device"])),
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def plot_generalise(gsummary: dict, path: Path, title: str, train_label: str) -> None:
    """Average accuracy (left) and accuracy minus the label majority (right) against the grid side, one line
    per encoder; the label majority dashed, the training grid dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    maj = gsummary["majority"]
    sides = {g: int(g.split("x")[1]) for g in gsummary["grids"]}
    order = sorted(gsummary["grids"], key=lambda g: sides[g])
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.8))
    cmap = plt.get_cmap("tab20")
    styles = ["-", "--", "-.", ":"]
    for i, (name, rec) in enumerate(gsummary["records"].items()):
        pts = {"{}x{}".format(*e["grid"]): e["test"]["avg"] for e in rec.get("grids", []) if "test" in e}
        xs = [sides[g] for g in order if g in pts]
        if not xs:
            continue
        kw = dict(color=cmap(i % 20), ls=styles[(i // 10) % 4], marker="o", ms=3, lw=1.2, label=name)
        axes[0].plot(xs, [pts[g] for g in order if g in pts], **kw)
        axes[1].plot(xs, [pts[g] - maj[g]["avg"] for g in order if g in pts], **kw)
    axes[0].plot([sides[g] for g in order], [maj[g]["avg"] for g in order], "k--", lw=1.5, label="label majority")
    axes[1].axhline(0, color="k", ls="--", lw=1.5)
    for ax, ylabel in zip(axes, ("average test accuracy (%)", "accuracy minus label majority (points)")):
        ax.axvline(sides[train_label], color="grey", ls=":", lw=1)
        ax.set_xticks([sides[g] for g in order])
        ax.set_xlabel("grid side (cells; dotted: training grid)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"Three-Cell across grids ({title})")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
