"""Docs tables generated from committed results files, so that the docs cannot drift from the results.

Every table of measured numbers in README.md and docs/*.md sits between two marker comments:

    <!-- table: benchmarks/results/vit_s16_cpu.json kind=bench encoders=rope_axial,rope_mixed cols=fwd224 -->
    | ... generated ... |
    <!-- /table -->

The first word after ``table:`` is the results file (relative to the repository root), ``kind=`` picks the
renderer below and the other ``key=value`` options go to it (lists comma-separated, no spaces).

    python tools/render_docs.py            # rewrite the generated blocks of README.md and docs/*.md
    python tools/render_docs.py --check    # exit 1 and name every block that differs (tests/test_docs.py)

Renderers copy numbers from the file at the file's own precision (a CSV's strings verbatim) or compute
same-run ratios from it; they never take a number from anywhere else.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^<!-- table: (?P<spec>[^\n]*?) -->\n(?P<body>.*?)^<!-- /table -->$", re.S | re.M)
OPENING = re.compile(r"^<!-- table:", re.M)


# -- helpers -----------------------------------------------------------------------------------------
def _list(value) -> list:
    return [] if value in (None, "") else value.split(",")


def _table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _pick(names: list, wanted: list, what: str) -> list:
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise ValueError(f"{what}: unknown name(s) {unknown}; the file has {names}")
    return wanted or names


def _options(opts: dict, allowed: tuple, kind: str) -> None:
    extra = sorted(set(opts) - set(allowed))
    if extra:
        raise ValueError(f"kind={kind}: unknown option(s) {extra}; allowed: {', '.join(allowed)}")


# -- Three-Cell (results.csv of `visionpe threecell`) ----------------------------------------------------
TC_TITLES = {"distance": "Distance", "orientation": "Orientation", "area": "Area", "vector_sum": "Vector Sum",
             "avg": "Average", "M_U": "M_U", "M_D": "M_D", "A_SU": "A_SU", "hooks": "hooks",
             "pesi_method": "PESI method", "best_epoch": "best epoch", "wall_s": "wall (s)", "cpu_s": "CPU (s)"}


def _tc_rows(path: Path) -> tuple[dict, list]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    majority = next(r for r in rows if r["encoder"] == "label_majority")
    return majority, [r for r in rows if r["encoder"] != "label_majority"]


def render_threecell(path: Path, opts: dict) -> str:
    """Rows = encoders, columns = ``cols`` (default the four groups and the average), verbatim from the CSV.

    Options: ``encoders`` (default all, file order), ``cols``, ``sort=<col>`` (descending), ``majority=0`` (no
    label-majority row), ``bold=<col>``, ``layout=wide`` (one row of ``cols[0]``, encoders as columns).
    """
    _options(opts, ("encoders", "cols", "sort", "majority", "bold", "layout"), "threecell")
    majority, rows = _tc_rows(path)
    by_name = {r["encoder"]: r for r in rows}
    names = _pick(list(by_name), _list(opts.get("encoders")), f"{path.name} encoders")
    cols = _list(opts.get("cols")) or ["distance", "orientation", "area", "vector_sum", "avg"]
    _pick(list(TC_TITLES), cols, "threecell cols")
    chosen = [by_name[n] for n in names]
    if "sort" in opts:
        chosen.sort(key=lambda r: -float(r[opts["sort"]]))
    show_majority = opts.get("majority", "1") != "0"
    if opts.get("layout") == "wide":
        col = cols[0]
        header = (["label majority"] if show_majority else []) + [r["encoder"] for r in chosen]
        return _table(header, [([majority[col]] if show_majority else []) + [r[col] or "n/a" for r in chosen]])
    bold = opts.get("bold")

    def cell(r, c):
        v = r[c] or ("n/a" if c in ("M_U", "M_D", "A_SU") else "")
        return f"**{v}**" if c == bold and v else v
    out = []
    if show_majority:
        out.append(["*label majority*"] + [majority[c] for c in cols])
    out += [[r["encoder"]] + [cell(r, c) for c in cols] for r in chosen]
    return _table(["Encoder"] + [TC_TITLES[c] for c in cols], out)


def render_threecell_cost(path: Path, opts: dict) -> str:
    """One sentence: how many encoders, threads and device, per-encoder wall and CPU seconds (from the CSV)."""
    _options(opts, (), "threecell_cost")
    _, rows = _tc_rows(path)
    ok = [r for r in rows if not r["error"]]
    wall = [float(r["wall_s"]) for r in ok]
    cpu = [float(r["cpu_s"]) for r in ok]
    threads = sorted({r["threads"] for r in ok})
    devices = sorted({r["device"] for r in ok})
    return (f"{len(ok)} encoders trained ({len(rows) - len(ok)} failed), {'/'.join(threads)} thread(s) each on "
            f"{'/'.join(devices)}: {min(wall):.0f} to {max(wall):.0f} s wall per encoder, summing to {sum(wall):.0f} s "
            f"(encoders in parallel workers overlap: the invocation's own wall time is in the results file's footer); "
            f"{sum(cpu):.0f} s of CPU time in all.")


def render_threecell_paper(path: Path, opts: dict) -> str:
    """Our rows (the CSV) next to the paper's Table 4 rows (``paper=<csv>`` with an ``id`` column), paired by
    ``pairs=<our encoder>:<paper id>,...``. The paper file is a citation (LOOPE Table 4 as quoted in the spec),
    not one of our runs; the table says so in its header."""
    _options(opts, ("paper", "pairs"), "threecell_paper")
    majority, rows = _tc_rows(path)
    ours = {r["encoder"]: r for r in rows}
    with open(ROOT / opts["paper"], newline="") as f:
        paper = {r["id"]: r for r in csv.DictReader(f)}
    pairs = [p.split(":") for p in _list(opts.get("pairs"))]
    _pick(list(ours), [a for a, _ in pairs], f"{path.name} encoders")
    _pick(list(paper), [b for _, b in pairs], f"{opts['paper']} ids")
    cols = ["distance", "orientation", "area", "vector_sum", "avg"]
    out = [["*label majority*"] + [majority[c] for c in cols] + ["", ""]]
    for a, b in pairs:
        out.append([a] + [ours[a][c] for c in cols] + [paper[b]["model"], " / ".join(paper[b][c] for c in cols)])
    return _table(["ours"] + [TC_TITLES[c] for c in cols] + ["paper row", "paper: Dist / Orient / Area / VecSum / Avg"],
                  out)


def render_threecell_recipes(path: Path, opts: dict) -> str:
    """The Three-Cell recipes' settings as ``load_config`` resolves them; ``path`` is a glob."""
    _options(opts, (), "threecell_recipes")
    from visionpe.eval.threecell_config import data_config, load_config, patch_size
    rows = []
    for f in sorted(glob.glob(str(path))):
        c = load_config(f)
        d, m, t = data_config(c), c["model"], c["train"]
        split = "/".join(str(n) for n in d.split_sizes())
        rows.append([f"`{os.path.basename(f)}`",
                     f"{d.grid[0]}x{d.grid[1]} cells of {d.cell_size} px ({d.img_size[0]} px), {d.num_samples} samples ({split})",
                     f"dim {m['embed_dim']}, depth {m['depth']}, heads {m['num_heads']}, MLP ratio {m['mlp_ratio']:g}, "
                     f"patch {patch_size(c)}" + (f", from {m['pretrained']}" if m["pretrained"] else ""),
                     f"{t['optimizer']} {t['lr']:g} -> {t['min_lr']:g} cosine, warmup {t['warmup_epochs']:g} epoch(s), "
                     f"wd {t['weight_decay']:g}, PE lr x{t['pe_lr_scale']:g}",
                     f"{t['epochs']} epochs, batch {t['batch_size']}" + (", bf16 autocast on CUDA" if t["amp"] else "")])
    return _table(["recipe", "data", "model", "optimiser", "schedule"], rows)


def render_threecell_gen(path: Path, opts: dict) -> str:
    """``generalise.csv`` of ``visionpe threecell --generalise``: rows = encoders, one column per grid with
    ``accuracy (accuracy - label majority of that grid)``, both verbatim from the CSV; the label-majority row
    first and the encoder's "on a new grid" column.

    Options: ``col`` (a group or ``avg``, the default), ``encoders`` (default all, file order), ``sort=<grid>``
    (descending by that grid's value), ``delta=0`` (no bracket).
    """
    _options(opts, ("col", "encoders", "sort", "delta"), "threecell_gen")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    col = opts.get("col", "avg")
    _pick(["distance", "orientation", "area", "vector_sum", "avg"], [col], "threecell_gen col")
    grids = list(dict.fromkeys(r["grid"] for r in rows))
    train = {r["grid"] for r in rows if r["train_grid"] == "1"}
    by = {}
    for r in rows:
        by.setdefault(r["encoder"], {})[r["grid"]] = r
    majority = by.pop("label_majority")
    names = _pick(list(by), _list(opts.get("encoders")), f"{path.name} encoders")
    if "sort" in opts:
        _pick(grids, [opts["sort"]], "threecell_gen sort")
        names = sorted(names, key=lambda n: -float(by[n][opts["sort"]][col] or "-inf"))
    show_delta = opts.get("delta", "1") != "0"

    def cell(r):
        if r["error"]:
            return f"n/a: {r['error']}"
        return f"{r[col]} ({r['delta_' + col]})" if show_delta else r[col]
    out = [["*label majority*", ""] + [majority[g][col] for g in grids]]
    out += [[n, next(iter(by[n].values()))["new_grid"]] + [cell(by[n][g]) for g in grids] for n in names]
    return _table(["Encoder", "on a new grid"] + [f"{g} (train)" if g in train else g for g in grids], out)


def render_threecell_gen_paper(path: Path, opts: dict) -> str:
    """Our ``generalise.csv`` next to RoPE-ViT's multi-resolution curve (``paper=<csv>``: a citation with rows
    ``id, model, <px>..., approx``), test sizes paired by ``res=<px>:<grid>,...`` (the first pair is the
    training size) and models by ``models=<our encoder>:<paper id>,...`` (the first pair is the baseline).
    Cells: paper top-1 / our average accuracy, verbatim (``≈``: a value the citation digitised from a figure);
    then, per other model, its difference from the baseline in the paper and in our run (``col``: our column,
    default ``avg``)."""
    _options(opts, ("paper", "res", "models", "col"), "threecell_gen_paper")
    with open(path, newline="") as f:
        ours = {(r["encoder"], r["grid"]): r for r in csv.DictReader(f)}
    with open(ROOT / opts["paper"], newline="") as f:
        paper = {r["id"]: r for r in csv.DictReader(f)}
    res = [p.split(":") for p in _list(opts.get("res"))]
    models = [p.split(":") for p in _list(opts.get("models"))]
    col = opts.get("col", "avg")
    _pick(sorted({e for e, _ in ours}), [a for a, _ in models], f"{path.name} encoders")
    _pick(sorted({g for _, g in ours}), [g for _, g in res], f"{path.name} grids")
    _pick(list(paper), [b for _, b in models], f"{opts['paper']} ids")

    def pv(pid, px):
        row = paper[pid]
        return ("≈" if px in row["approx"].split(";") else "") + row[px]
    header = ["paper px", "our grid"] + [f"{paper[b]['model']} / {a}" for a, b in models]
    header += [f"{paper[b]['model'].split()[-1]} − {paper[models[0][1]]['model'].split()[-1]}: paper / "
               f"{a} − {models[0][0]}: ours" for a, b in models[1:]]
    rows = []
    for px, grid in res:
        row = [px, grid + (" (train)" if ours[(models[0][0], grid)]["train_grid"] == "1" else "")]
        row += [f"{pv(b, px)} / {ours[(a, grid)][col] or 'n/a'}" for a, b in models]
        base_a, base_b = models[0]
        for a, b in models[1:]:
            dp = float(paper[b][px]) - float(paper[base_b][px])
            o, ob = ours[(a, grid)][col], ours[(base_a, grid)][col]
            row.append(f"{dp:+.1f} / " + (f"{float(o) - float(ob):+.2f}" if o and ob else "n/a"))
        rows.append(row)
    return _table(header, rows)


def render_threecell_gen_cost(path: Path, opts: dict) -> str:
    """One sentence from ``generalise.json``: what the invocation did, its wall time and the load average."""
    _options(opts, (), "threecell_gen_cost")
    m = json.loads(path.read_text())

    def load(v):
        return " / ".join(f"{x:.2f}" for x in v) if v else "n/a"
    return (f"`{m['config']}`: {m['encoders']} encoders, {m['trained']} encoder(s) trained and {m['tested']} tested on "
            f"{', '.join(m['grids'])} in {m['wall_s']:.0f} s wall ({m['train_wall_s']:.0f} s training phase, "
            f"{m['generalise_wall_s']:.0f} s testing phase; {m['workers']} worker(s) x {m['threads']} thread(s) on "
            f"{m['device']}); load average (1/5/15 min) {load(m['loadavg_start'])} at the start and "
            f"{load(m['loadavg_end'])} at the end; CPU time of the encoder processes: {m['encoder_cpu_s_sum']:.0f} s "
            f"training, {m['generalise_cpu_s_sum']:.0f} s testing; {m['machine']}.")


# -- `visionpe bench` (benchmarks/results/vit_s16_cpu.json) ---------------------------------------------
def _bench_cols(data: dict, cols: list) -> list:
    out = []
    for c in cols:
        m = re.fullmatch(r"(fwd|fwdbwd)(\d+)", c)
        if not m or m.group(2) not in data["timing"] or m.group(1) not in data["timing"][m.group(2)]:
            raise ValueError(f"bench column {c!r}: expected fwd<res> or fwdbwd<res> with a resolution of the file "
                             f"({', '.join(data['timing'])})")
        out.append((m.group(1), m.group(2)))
    return out


def _ratio(data: dict, mode: str, res: str, name: str, baseline: str) -> float:
    t = data["timing"][res][mode]
    return t[name]["ms_per_img"] / t[baseline]["ms_per_img"]


def render_bench(path: Path, opts: dict) -> str:
    """Ratios (median ms/img over the baseline's, same run) per encoder and column.

    Options: ``encoders`` (default all), ``cols`` (``fwd224,fwdbwd224,fwd384,fwdbwd384`` by default),
    ``baseline`` (``learned``), ``goals=<name>:<max ratio>,...`` with ``goal_col`` (default the first column):
    adds a goal column that says met / missed from the file's ratio.
    """
    _options(opts, ("encoders", "cols", "baseline", "goals", "goal_col"), "bench")
    data = json.loads(path.read_text())
    base = opts.get("baseline", "learned")
    names = _pick(data["names"], _list(opts.get("encoders")), f"{path.name} encoders")
    cols = _bench_cols(data, _list(opts.get("cols")) or [f"{m}{r}" for r in data["timing"] for m in data["modes"]])
    goals = dict(g.split(":") for g in _list(opts.get("goals")))
    _pick(data["names"], list(goals), "bench goals")
    gmode, gres = _bench_cols(data, [opts.get("goal_col", f"{cols[0][0]}{cols[0][1]}")])[0]
    label = {"fwd": "fwd", "fwdbwd": "fwd+bwd"}
    header = ["encoder"] + [f"{label[m]} {r}" for m, r in cols] + ([f"goal ({label[gmode]} {gres})"] if goals else [])
    rows = []
    for n in names:
        row = [f"`{n}`"] + [f"{_ratio(data, m, r, n, base):.3f}x" for m, r in cols]
        if goals:
            g = goals.get(n)
            row.append("" if g is None else
                       f"<= {g}x: {'met' if _ratio(data, gmode, gres, n, base) <= float(g) else '**missed**'}")
        rows.append(row)
    return _table(header, rows)


def render_bench_memory(path: Path, opts: dict) -> str:
    """Peak memory growth of forward+backward (fresh process), MiB and ratio to the baseline, per resolution."""
    _options(opts, ("encoders", "baseline", "mode"), "bench_memory")
    data = json.loads(path.read_text())
    base, mode = opts.get("baseline", "learned"), opts.get("mode", "fwdbwd")
    names = _pick(data["names"], _list(opts.get("encoders")), f"{path.name} encoders")
    res = list(data["memory"])
    rows = [[f"`{n}`"] + [f"{data['memory'][r][n][mode]:.0f} ({data['memory'][r][n][mode] / data['memory'][r][base][mode]:.2f}x)"
                          for r in res] for n in names]
    return _table(["encoder"] + [f"{mode.replace('fwdbwd', 'fwd+bwd')} {r} MiB (ratio)" for r in res], rows)


def render_bench_meta(path: Path, opts: dict) -> str:
    """One sentence: the run's machine, versions and settings, and the baseline's ms/img."""
    _options(opts, ("baseline",), "bench_meta")
    data = json.loads(path.read_text())
    m, base = data["meta"], opts.get("baseline", "learned")
    first = next(iter(data["timing"]))
    ms = data["timing"][first]["fwd"][base]["ms_per_img"]
    return (f"Run of {m['date']} on {m['machine']} ({m['device']}, {m['dtype']}), batch {m['batch']}, {m['threads']} "
            f"thread(s), {m['rounds']} interleaved rounds, torch {m['torch']}, timm {m['timm']}; `{base}` ran at "
            f"{ms:.1f} ms/img forward at {first}.")


# -- `visionpe bench vlm` (benchmarks/results/vlm_positions_cpu.json) -----------------------------------
def _vlm_pairs(data: dict) -> list:
    """(row, HF row) for each of our calls that has an HF get_rope_index row of the same variant and case."""
    rows = data["rows"]
    hf = {(r["case"], r["call"].split()[-1]): r for r in rows if r["call"].startswith("HF get_rope_index")}
    out = []
    for r in rows:
        m = re.fullmatch(r"mrope-(\w+)( \(HF tensors\))?", r["call"])
        if m and (r["case"], m.group(1)) in hf:
            out.append((r, hf[(r["case"], m.group(1))]))
    return out


def render_vlm(path: Path, opts: dict) -> str:
    """Rows of the VLM bench (``cases`` filter), with HF/ours ratios (minima and medians) where HF was timed."""
    _options(opts, ("cases",), "vlm")
    data = json.loads(path.read_text())
    cases = _list(opts.get("cases"))
    ratio = {id(r): (h["min_ms"] / r["min_ms"], h["median_ms"] / r["median_ms"]) for r, h in _vlm_pairs(data)}
    rows = []
    for r in data["rows"]:
        if cases and r["case"] not in cases:
            continue
        q = ratio.get(id(r))
        rows.append([r["case"], r["call"], f"{r['tokens']:,}", f"{r['median_ms']:.2f}", f"{r['min_ms']:.2f}",
                     f"{q[0]:.1f}x" if q else "", f"{q[1]:.1f}x" if q else ""])
    return _table(["case", "call", "tokens", "median ms", "min ms", "HF / ours (min)", "HF / ours (median)"], rows)


def render_vlm_goals(path: Path, opts: dict) -> str:
    """The two goals of the VLM bench, checked on the file: every 1M-token build under ``max_ms`` (median),
    and at least ``speedup``x HF ``get_rope_index`` on the 8x32k batch (ratio of minima; medians beside)."""
    _options(opts, ("max_ms", "speedup"), "vlm_goals")
    data = json.loads(path.read_text())
    max_ms, speedup = float(opts.get("max_ms", 100)), float(opts.get("speedup", 20))
    big = [r for r in data["rows"] if r["case"].startswith("1M") and not r["call"].startswith("HF")]
    worst = max(big, key=lambda r: r["median_ms"])
    lines = [f"* every 1M-token build under {max_ms:g} ms (median): slowest `{worst['call']}` ({worst['case']}) "
             f"{worst['median_ms']:.1f} ms: {'met' if worst['median_ms'] < max_ms else '**missed**'};"]
    for r, h in _vlm_pairs(data):
        q_min, q_med = h["min_ms"] / r["min_ms"], h["median_ms"] / r["median_ms"]
        lines.append(f"* `{r['call']}` on {r['case']}: {q_min:.1f}x HF `get_rope_index` (minima; medians "
                     f"{q_med:.1f}x), goal >= {speedup:g}x: {'met' if q_min >= speedup else '**missed**'};")
    m = data["meta"]
    lines.append(f"* run: {m['machine']}, {m['threads']} thread(s), {m['rounds']} interleaved rounds, torch {m['torch']}, "
                 f"transformers {m['transformers']}.")
    return "\n".join(lines)


# -- fine-tuning: the digits runs and their evalres (docs/results/finetune_digits/) ----------------------
def render_digits(path: Path, opts: dict) -> str:
    """One row per encoder of ``tools/digits_results.py``'s JSON."""
    _options(opts, (), "digits")
    data = json.loads(path.read_text())
    best = max(r["val_top1"] for r in data["runs"])
    rows = [[r["encoder"], f"**{r['val_top1']:.2f}**" if r["val_top1"] == best else f"{r['val_top1']:.2f}",
             f"{r['val_loss']:.3f}", f"{r['train_loss']:.3f}", f"{r['wall_s']:.0f} s"] for r in data["runs"]]
    return _table(["encoder", "val top-1 (%)", "val loss", "final train loss", "wall time"], rows)


def render_evalres(path: Path, opts: dict) -> str:
    """``visionpe evalres``'s JSON: rows = models, columns = resolutions, top-1 %."""
    _options(opts, (), "evalres")
    data = json.loads(path.read_text())
    res = [str(r) for r in data["resolutions"]]
    rows = [[m["label"]] + [f"{m['metrics'][r]['val_top1']:.2f}" for r in res] for m in data["models"]]
    return _table(["model"] + res, rows)


# -- recipes (configs/finetune_*.yaml) ------------------------------------------------------------------
def render_recipes(path: Path, opts: dict) -> str:
    """The fine-tuning recipes' settings as the config reader resolves them (defaults filled in). ``path`` is a
    glob relative to the repository root."""
    _options(opts, (), "recipes")
    from visionpe.train import load_config
    rows = []
    for f in sorted(glob.glob(str(path))):
        c = load_config(f)
        lr = f"{c.optim.lr:g}" if c.optim.lr is not None else f"{c.optim.lr_base:g} x batch / {c.optim.lr_base_size}"
        mix = f"{c.data.mixup:g} / {c.data.cutmix:g}" if c.data.mixup or c.data.cutmix else "off"
        aug = ("off" if c.data.no_aug else f"`{c.data.auto_augment}`, jitter {c.data.color_jitter:g}, "
               f"erasing {c.data.re_prob:g}")
        kw = ", ".join(f"{k} {v}" for k, v in c.model.kwargs.items() if k not in ("patch_size", "embed_dim", "depth", "num_heads"))
        rows.append([f"`{os.path.basename(f)}`", f"`{c.model.name}`{' (' + kw + ')' if kw else ''}", f"`{c.model.pe}`",
                     c.sched.epochs, f"{c.sched.warmup_epochs:g}", c.data.batch_size, c.optim.accum_steps, c.optim.opt,
                     lr, f"{c.sched.min_lr:g}", f"{c.optim.weight_decay:g}", c.train.loss,
                     f"{c.data.label_smoothing:g}", mix, f"{c.model.drop_path_rate:g}", aug,
                     "model's" if c.data.crop_pct is None else f"{c.data.crop_pct:g}"])
    return _table(["recipe", "model", "model.pe", "epochs", "warmup", "batch / process", "accum", "optimizer", "lr",
                   "min lr", "weight decay", "loss", "label smoothing", "Mixup / CutMix", "drop-path", "augmentation",
                   "eval crop"], rows)


# -- counted from the code (no results file: path "-") ----------------------------------------------------
def render_encoder_params(path: Path, opts: dict) -> str:
    """Parameters of each encoder built as ``VisionPEViT`` builds it in a ViT-S/16 at 224 (dim 384, 6 heads, 12
    blocks, 14x14 grid, a class token unless the encoder's model drops it); a learned APE table
    (``pos_embed``) is listed apart."""
    _options(opts, ("encoders",), "encoder_params")
    import visionpe
    rows = []
    for name in _list(opts.get("encoders")):
        prefix = 0 if visionpe.encoder_info(name).model_kwargs.get("class_token") is False else 1
        enc = visionpe.create_encoder(name, dim=384, num_heads=6, depth=12, grid_size=(14, 14),
                                      num_prefix_tokens=prefix)
        table = enc.absolute_table()  # the declared APE-table holder (LearnedAPE, iRPE's ape), or None
        ape = table.pos_embed.numel() if table is not None else 0
        total = sum(p.numel() for p in enc.parameters())
        rows.append([f"`{name}`", f"{total - ape:,}", f"{ape:,}" if ape else "-"])
    return _table(["encoder", "PE parameters (without the APE table)", "learned APE table"], rows)


RENDERERS = {"threecell": render_threecell, "threecell_cost": render_threecell_cost,
             "threecell_paper": render_threecell_paper, "threecell_recipes": render_threecell_recipes, "bench": render_bench,
             "bench_memory": render_bench_memory, "bench_meta": render_bench_meta, "vlm": render_vlm,
             "vlm_goals": render_vlm_goals, "digits": render_digits, "evalres": render_evalres,
             "recipes": render_recipes, "encoder_params": render_encoder_params}


# Three-Cell across grid sizes (`visionpe threecell --generalise`)
RENDERERS.update({"threecell_gen": render_threecell_gen, "threecell_gen_cost": render_threecell_gen_cost,
                  "threecell_gen_paper": render_threecell_gen_paper})


# VLM position diagnostic (results.csv of `visionpe vlmdiag`)
def render_vlmdiag(path: Path, opts: dict) -> str:
    """One table per question group (variants x test splits) of a ``visionpe vlmdiag`` results CSV, verbatim.

    Options: ``questions=1`` (also every question per split, collapsed), ``times=1`` (also the training-time table).
    """
    _options(opts, ("questions", "times"), "vlmdiag")
    from visionpe.eval.vlmdiag_report import read_csv, render_tables, render_times
    rows = read_csv(path)
    text = render_tables(rows, questions=opts.get("questions") == "1")
    if opts.get("times") == "1":
        text += "\n" + render_times(rows)
    return text.rstrip("\n")


# The resolution sweep (JSON of `visionpe bench sweep`)
def render_sweep(path: Path, opts: dict) -> str:
    """The sweep's goals and ratio tables, as ``visionpe bench sweep`` writes them in its markdown file (without
    the file's title line).

    Option: ``level=<n>``: the file's ``##`` headings become level ``n`` (to sit under a page's own headings).
    """
    _options(opts, ("level",), "sweep")
    from visionpe.eval.bench_sweep import render_sweep_markdown
    md = render_sweep_markdown(json.loads(path.read_text()))
    md = (md.split("\n", 2)[2] if md.startswith("# ") else md).strip("\n")
    if "level" in opts:
        level = int(opts["level"]) if opts["level"].isdigit() else 0
        if not 2 <= level <= 6:
            raise ValueError(f"kind=sweep: level must be 2 to 6; got {opts['level']!r}")
        md = re.sub(r"^## ", "#" * level + " ", md, flags=re.M)
    return md


def render_vlmdiag_avg(path: Path, opts: dict) -> str:
    """Only the Average table of a ``visionpe vlmdiag`` results CSV (variants x test splits), verbatim."""
    _options(opts, (), "vlmdiag_avg")
    from visionpe.eval.vlmdiag_report import read_csv, render_tables
    text = render_tables(read_csv(path), questions=False)
    table = text.split("**Average**", 1)[1].strip("\n").split("\n\n", 1)[0]
    return table


def render_vlmdiag_cost(path: Path, opts: dict) -> str:
    """One sentence from a vlmdiag ``run.json``: variants trained, wall time (against ``budget_min`` minutes when
    given: met or missed), workers, the variants' CPU time, the load average, the machine."""
    _options(opts, ("budget_min",), "vlmdiag_cost")
    m = json.loads(path.read_text())

    def load(v):
        return " / ".join(f"{x:.2f}" for x in v) if v else "n/a"
    text = (f"`{m['config']}`: {m['trained']} of {m['variants']} variants trained in {m['wall_s']:.0f} s wall "
            f"({m['wall_s'] / 60:.1f} min; {m['workers']} worker(s) x {m['threads']} thread(s))")
    if "budget_min" in opts:
        budget = float(opts["budget_min"])
        text += f", {'within' if m['wall_s'] <= 60 * budget else '**over**'} the {budget:g}-minute budget"
    return (text + f"; CPU time of the variant processes {m['variant_cpu_s_sum']:.0f} s; load average (1/5/15 min) "
            f"{load(m['loadavg_start'])} at the start and {load(m['loadavg_end'])} at the end; {m['machine']}.")


RENDERERS.update({"vlmdiag": render_vlmdiag, "vlmdiag_avg": render_vlmdiag_avg, "vlmdiag_cost": render_vlmdiag_cost,
                  "sweep": render_sweep})


# timm's own test suite on the registered models (tools/timm_suite.sh ... -v, output kept in docs/results/)
_PYTEST_V = re.compile(r"^\S*::(?P<test>test_\w+)\[(?P<param>[^\]]*)\] (?P<outcome>PASSED|SKIPPED|FAILED|ERROR)", re.M)
_TIME = re.compile(r"^(?P<what>real|user)\s+(?P<m>\d+)m(?P<s>[\d.]+)s$", re.M)


def render_timm_suite(path: Path, opts: dict) -> str:
    """Per test function of timm's suite: cases run, passed, skipped, failed (from pytest's ``-v`` lines), then
    one line with the totals and the ``time`` of the run (``real`` and ``user``)."""
    _options(opts, (), "timm_suite")
    text = path.read_text()
    counts: dict = {}
    models = set()
    for m in _PYTEST_V.finditer(text):
        c = counts.setdefault(m["test"], {"PASSED": 0, "SKIPPED": 0, "FAILED": 0, "ERROR": 0})
        c[m["outcome"]] += 1
        models.add(m["param"].split("-")[-1].split(".")[0])  # "1-name.untrained" -> "name"
    if not counts:
        raise ValueError(f"{path.name}: no 'test_x[...] PASSED|SKIPPED|FAILED' lines (run pytest with -v)")
    rows = [[f"`{t}`", sum(c.values()), c["PASSED"], c["SKIPPED"], c["FAILED"] + c["ERROR"]] for t, c in counts.items()]
    total = [sum(r[i] for r in rows) for i in range(1, 5)]
    times = {m["what"]: int(m["m"]) * 60 + float(m["s"]) for m in _TIME.finditer(text)}

    def mmss(sec):
        return f"{int(sec // 60)} min {sec % 60:.0f} s"
    line = (f"{len(models)} model names, {total[0]} cases: {total[1]} passed, {total[2]} skipped, {total[3]} failed"
            + (f"; {mmss(times['real'])} wall clock, {mmss(times['user'])} of CPU" if "real" in times else "") + ".")
    return _table(["test", "run", "pass", "skip", "fail"], rows) + "\n\n" + line


RENDERERS.update({"timm_suite": render_timm_suite})


# -- markers -----------------------------------------------------------------------------------------
def parse_spec(spec: str) -> tuple[str, str, dict]:
    """``"path kind=k a=1 b=x,y"`` -> ``(path, kind, {"a": "1", "b": "x,y"})``."""
    words = spec.split()
    if not words or "=" in words[0]:
        raise ValueError(f"table marker {spec!r}: the first word must be the results file")
    opts = {}
    for w in words[1:]:
        if "=" not in w:
            raise ValueError(f"table marker {spec!r}: option {w!r} must look like key=value")
        k, v = w.split("=", 1)
        opts[k] = v
    kind = opts.pop("kind", None)
    if kind not in RENDERERS:
        raise ValueError(f"table marker {spec!r}: kind={kind!r} is not one of {', '.join(RENDERERS)}")
    return words[0], kind, opts


def render_block(spec: str, root: Path = ROOT) -> str:
    """The generated text of one marker (without the markers)."""
    rel, kind, opts = parse_spec(spec)
    path = root / rel
    if kind not in ("recipes", "threecell_recipes", "encoder_params") and not path.is_file():
        raise ValueError(f"table marker {spec!r}: results file {rel!r} does not exist")
    return RENDERERS[kind](path, opts)


def blocks(text: str) -> list[tuple[str, str]]:
    """``(spec, body)`` of every generated block in a markdown text (body without the final newline)."""
    return [(m.group("spec"), m.group("body").rstrip("\n")) for m in MARKER.finditer(text)]


def render_text(text: str, root: Path = ROOT) -> str:
    """``text`` with every generated block re-rendered from its results file."""
    if len(OPENING.findall(text)) != len(blocks(text)):
        raise ValueError("a '<!-- table: ... -->' marker has no matching '<!-- /table -->' (or is malformed)")
    return MARKER.sub(lambda m: f"<!-- table: {m.group('spec')} -->\n{render_block(m.group('spec'), root)}\n"
                                f"<!-- /table -->", text)


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md"] + sorted((root / "docs").glob("*.md"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", help="markdown files (default: README.md and docs/*.md)")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block differs")
    args = p.parse_args(argv)
    stale = []
    for f in [Path(x) for x in args.files] or doc_files():
        text = f.read_text()
        new = render_text(text)
        if new != text:
            stale.append(f)
            if not args.check:
                f.write_text(new)
    verb = "differ from their results files" if args.check else "re-rendered"
    for f in stale:
        print(f"{f}: generated tables {verb}", file=sys.stderr)
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
