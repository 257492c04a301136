"""Results of the VLM position diagnostic: ``results.csv`` (one row per variant, one column per test split and
question group), the markdown tables rendered **from that CSV** (:func:`render_tables`, also what
``docs/vlm_diagnostic.md`` quotes) and the accuracy-against-video-length chart.
"""
from __future__ import annotations

import csv
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

from .vlmdiag_data import GROUPS, QUESTIONS

__all__ = ["GROUP_TITLES", "write_csv", "read_csv", "render_tables", "render_times", "write_markdown",
           "plot_by_frames", "run_meta", "write_results"]

GROUP_TITLES = {"avg": "Average", "temporal": "Temporal (order, half)",
                "spatial": "Spatial within a frame (left of, same row, corner)",
                "across": "Across frames (moved left / right / stayed, up / down / stayed)"}
META = ["best_epoch", "epochs", "steps", "params", "wall_s", "cpu_s", "threads", "device", "error"]
MAJORITY = "label_majority"


KEYS = (*GROUPS, "avg", *QUESTIONS)  # per split: the groups, their average, then every question


def _cols(splits: list[str]) -> list[str]:
    return [f"{s}/{k}" for s in splits for k in KEYS]


def _values(test: dict, splits: list[str]) -> list[str]:
    """Accuracies of one row, ``""`` for a group or question the recipe does not ask."""
    def get(t, k):
        v = t.get(k, t["questions"].get(k) if k in QUESTIONS else None)
        return "" if v is None else f"{v:.2f}"
    return [get(test[s], k) for s in splits for k in KEYS]


def write_csv(records: dict, majority: dict, splits: list[str], path) -> None:
    """One row per variant (plus the label-majority row first); accuracies in % with 2 decimals."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "scheme", "setting", *_cols(splits), *META])
        w.writerow([MAJORITY, "", "constant predictor", *_values({s: majority[s]["test"] for s in splits}, splits),
                    *[""] * len(META)])
        for n, r in records.items():
            if "error" in r:
                w.writerow([n, r.get("scheme", ""), "", *[""] * len(_cols(splits)), *[""] * (len(META) - 1),
                            r["error"]])
                continue
            w.writerow([n, r["scheme"], r["describe"], *_values(r["test"], splits),
                        r["best_epoch"], r["epochs"], r["steps"], r["params"], f"{r['wall_s']:.1f}",
                        f"{r['cpu_s']:.1f}", r["threads"], r["device"], ""])


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _splits_of(rows: list[dict]) -> list[str]:
    keys = [k for k in rows[0] if "/" in k]
    return list(dict.fromkeys(k.split("/")[0] for k in keys))


def _cell(r: dict, key: str) -> str:
    return f"{float(r[key]):.1f}" if r.get(key) else "-"


def _row_name(r: dict) -> str:
    return f"*{r['variant']} (constant predictor)*" if r["variant"] == MAJORITY else r["variant"]


def render_tables(rows: list[dict], questions: bool = True) -> str:
    """Markdown: one table per question group (Average first; rows = variants, columns = test splits), then
    (``questions``) one table per test split with every question, in a collapsed ``<details>`` block.

    Pure function of the CSV rows (:func:`read_csv`), so a committed CSV always renders the same text.
    """
    splits = _splits_of(rows)
    out = _group_tables(rows, splits)
    for s in splits if questions else ():
        qs = [q for q in QUESTIONS if any(r.get(f"{s}/{q}") for r in rows)]
        out += ["<details><summary>" + f"<code>{s}</code>: every question</summary>", "",
                "| variant | " + " | ".join(qs) + " |", "|---|" + "---:|" * len(qs)]
        out += [f"| {_row_name(r)} | " + " | ".join(_cell(r, f"{s}/{q}") for q in qs) + " |"
                for r in rows if not r.get("error")]
        out += ["", "</details>", ""]
    return "\n".join(out).rstrip() + "\n"


def _group_tables(rows: list[dict], splits: list[str]) -> list[str]:
    out = []
    for g, title in GROUP_TITLES.items():
        if not any(r.get(f"{s}/{g}") for r in rows for s in splits):
            continue  # a group the recipe does not ask
        out += [f"**{title}**", "", "| variant | " + " | ".join(splits) + " |",
                "|---|" + "---:|" * len(splits)]
        for r in rows:
            if r.get("error"):
                out.append(f"| {_row_name(r)} | failed: {r['error'][:60]} |" + " |" * (len(splits) - 1))
                continue
            out.append(f"| {_row_name(r)} | " + " | ".join(_cell(r, f"{s}/{g}") for s in splits) + " |")
        out.append("")
    return out


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    import torch
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}"


def write_markdown(cfg: dict, records: dict, rows: list[dict], summary: dict, path) -> None:
    """``results.md``: the recipe in words, the tables, the variants' settings and the timing."""
    from .vlmdiag_config import split_specs
    specs = split_specs(cfg)
    m, t = cfg["model"], cfg["train"]
    d = cfg["data"]
    split_words = "; ".join(
        f"`{n}`: {('T ' + str(s.frames[0])) if s.frames[0] == s.frames[1] else f'T {s.frames[0]}-{s.frames[1]}'}"
        f", {s.grid[0]}x{s.grid[1]}, {s.num_samples} videos" for n, s in specs.items())
    ok = [r for r in records.values() if "error" not in r]
    lines = [
        f"# VLM position diagnostic: `{cfg['name']}`", "",
        f"Test accuracy (%) of the epoch with the best validation average, per question group (mean of its "
        f"questions) and test split; Average = mean of the three groups. Splits: {split_words}. Text: "
        f"{d['text_before'][0]}-{d['text_before'][1]} filler tokens before the video, "
        f"{d['text_after'][0]}-{d['text_after'][1]} after it. Model: TinyVLMDecoder dim {m['dim']}, depth "
        f"{m['depth']}, {m['num_heads']} heads, RoPE base {m['theta'] if m['theta'] else 'of each scheme'}. "
        f"Train: AdamW lr {t['lr']} -> {t['min_lr']} cosine, {t['warmup_steps']} warmup steps, {t['epochs']} "
        f"epochs, batch {t['batch_size']}.", "",
        render_tables(rows).rstrip(), "",
        "| variant | setting | best epoch | params | time (s) | CPU (s) |", "|---|---|---:|---:|---:|---:|",
    ]
    for n, r in records.items():
        if "error" not in r:
            lines.append(f"| {n} | {r['describe']} | {r['best_epoch']}/{r['epochs']} | {r['params']} | "
                         f"{r['wall_s']:.0f} | {r['cpu_s']:.0f} |")
    load, load0 = summary.get("load_avg"), summary.get("load_avg_start")
    lines += [
        "",
        f"Machine: {_machine()}. This invocation: {summary['wall_s']:.0f} s wall, {summary['trained']} variant(s) "
        f"trained with {summary['workers']} worker(s) x {summary['threads']} thread(s), the others resumed; "
        f"sum of the per-variant wall times: {sum(r['wall_s'] for r in ok):.0f} s, of their CPU times: "
        f"{sum(r['cpu_s'] for r in ok):.0f} s"
        + (f"; load average (1 / 5 / 15 min) at the start {load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f}"
           if load0 else "")
        + (f", at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}" if load else "")
        + f". Written {datetime.now(timezone.utc).isoformat(timespec='seconds')}.",
        "",
        "Every video token is a cell whose content is only its colour, so positions reach the model only through "
        "the scheme's rotations and the causal mask. `none` (every position 0) still sees the causal mask, "
        "which leaks order: it is a measured baseline, not a floor. See docs/vlm_diagnostic.md.",
    ]
    Path(path).write_text("\n".join(lines) + "\n")


def plot_by_frames(records: dict, majority: dict, specs: dict, path, title: str) -> None:
    """Accuracy against video length, one line per variant, one panel per group and the average; only the
    test splits on the training grid (the other grids are in the tables). The training lengths are shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = specs["train"]
    tests = [n for n, s in specs.items() if n not in ("train", "val") and s.grid == train.grid]
    ok = {n: r for n, r in records.items() if "error" not in r}
    asked = {g for s in tests for g in majority[s]["test"]}
    panels = ["avg", *(g for g in GROUPS if g in asked)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.8), sharey=True, squeeze=False)
    axes = axes[0]
    cmap = plt.get_cmap("tab10" if len(ok) <= 10 else "tab20")
    for ax, g in zip(axes, panels):
        for i, (n, r) in enumerate(ok.items()):
            pts = sorted((int(t), v[g]) for s in tests for t, v in r["by_frames"][s].items() if g in v)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", ms=3, lw=1.2, color=cmap(i), ls="-" if i < 10 else "--", label=n)
        mpts = sorted((int(t), v[g]) for s in tests for t, v in majority[s]["by_frames"].items() if g in v)
        if mpts:
            xs, ys = zip(*mpts)
            ax.plot(xs, ys, color="k", ls=":", lw=1, label=MAJORITY)
        ax.axvspan(train.frames[0], train.frames[1], color="0.9", zorder=0)
        ax.set_xscale("log", base=2)
        ticks = sorted({int(t) for s in tests for t in majority[s]["by_frames"]})
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("video length T (frames)")
        ax.set_title(GROUP_TITLES[g].split(" (")[0])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"VLM position diagnostic ({title}); grey: training lengths, grid "
                 f"{train.grid[0]}x{train.grid[1]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_meta(cfg: dict, summary: dict) -> dict:
    """What one invocation did and what it cost (``run.json``): wall time, variants trained, workers and threads,
    the variants' summed wall and CPU seconds, the load average at the start and the end, the machine."""
    ok = [r for r in summary["records"].values() if "error" not in r]
    return {"config": cfg["name"], "variants": len(summary["records"]), "trained": summary["trained"],
            "wall_s": summary["wall_s"], "workers": summary["workers"], "threads": summary["threads"],
            "variant_wall_s_sum": sum(r["wall_s"] for r in ok), "variant_cpu_s_sum": sum(r["cpu_s"] for r in ok),
            "loadavg_start": summary.get("load_avg_start"), "loadavg_end": summary.get("load_avg"),
            "machine": _machine(), "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_results(cfg: dict, summary: dict, out_dir) -> None:
    """``results.csv``, ``results.md``, ``run.json`` (:func:`run_meta`) and ``vlmdiag.png`` in ``out_dir``."""
    import json
    from .vlmdiag_config import split_specs
    out_dir = Path(out_dir)
    specs = split_specs(cfg)
    tests = [n for n in specs if n not in ("train", "val")]
    write_csv(summary["records"], summary["majority"], tests, out_dir / "results.csv")
    rows = read_csv(out_dir / "results.csv")
    write_markdown(cfg, summary["records"], rows, summary, out_dir / "results.md")
    (out_dir / "run.json").write_text(json.dumps(run_meta(cfg, summary), indent=1) + "\n")
    plot_by_frames(summary["records"], summary["majority"], specs, out_dir / "vlmdiag.png", cfg["name"])


def render_times(rows: list[dict]) -> str:
    """Markdown: each variant's training wall and CPU seconds and best epoch (from the CSV)."""
    out = ["| variant | setting | best epoch | wall (s) | CPU (s) |", "|---|---|---:|---:|---:|"]
    for r in rows:
        if r["variant"] != MAJORITY and not r.get("error"):
            out.append(f"| {r['variant']} | {r['setting']} | {r['best_epoch']}/{r['epochs']} | "
                       f"{float(r['wall_s']):.0f} | {float(r['cpu_s']):.0f} |")
    ok = [r for r in rows if r["variant"] != MAJORITY and not r.get("error")]
    out.append(f"| *sum* | | | {sum(float(r['wall_s']) for r in ok):.0f} | {sum(float(r['cpu_s']) for r in ok):.0f} |")
    return "\n".join(out) + "\n"
