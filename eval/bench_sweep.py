"""``visionpe bench sweep``: ViT-S/16 from 224 to 1024 px, bias encoders on SDPA and on the flex path.

Protocol:

* rows: learned APE (the baseline), each bias encoder with ``attn_impl="sdpa"`` (``name@sdpa``: the
  ``(B|1, H, N, N)`` mask; ``irpe_qkv``: the explicit path, its value term needs the probabilities) and
  ``attn_impl="flex"`` (``name@flex``: :mod:`visionpe.flex`; ``irpe_qkv``: the explicit path on blocks of query
  rows, :func:`visionpe.flex_rows.explicit_rows_attention`), and two outside anchors from timm:
  ``vit_small_patch16_rope_mixed_224`` and the relative-position ViT ``vit_relpos_small_patch16_224``, all
  built at ``img_size=res``;
* resolutions 224, 384, 512, 768, 1024 (N = 197 to 4097 with the class token); forward (eval,
  ``inference_mode``) at all of them, forward+backward (train) up to ``--fwdbwd-max-res``;
* per (resolution, mode): one warm-up step per row (builds caches, compiles the flex kernel), then
  ``--rounds`` interleaved round-robin rounds (order reversed every other round) so machine load hits every
  row alike; figure = median ms per image;
* peak memory: on CPU, the peak of live tensor bytes during one extra, untimed step, from the profiler's
  allocation events (:func:`tensor_peak_mib`; deterministic: a repeated step gives the same figure), and, in
  the timed steps, the growth of the process's peak RSS (``VmHWM``, reset before each step) over the RSS
  before it, median over the rounds (freed buffers go back to the OS because the malloc mmap threshold is
  pinned at 64 KiB): it also counts what no tensor holds (kernels' scratch, the allocator), but jumps by about
  half a MiB between identical steps, which at 224 px is a tenth of the figure. Ratios and goals use the
  tensor peak (``"tensor_mib"``), the absolute table gives both. On CUDA: ``torch.cuda.max_memory_allocated``
  growth in the timed steps (tensor bytes already);
* every figure is also a ratio against learned APE at the same resolution in the same run; the load average
  is recorded at the start, at every resolution and at the end;
* attention alone (:func:`measure_kernels`), at each resolution in the same run: SDPA without a mask, SDPA
  reading a prebuilt ``(1, 1, N, N)`` and ``(B, H, N, N)`` mask, and the flex kernel without a ``score_mod`` and
  with the iRPE terms: what each kernel costs before any model around it (forward, ratio to plain SDPA).

Results: ``benchmarks/results/<tag>.json`` and ``<tag>.md`` (:func:`render_sweep_markdown`), the plot
``docs/img/<tag>.png`` or ``--plot`` (:func:`plot_sweep`). ``--render FILE.json`` redoes the outputs from a
results file without measuring. The docs take the same markdown (without its title) from the JSON through
``tools/render_docs.py`` (``<!-- table: FILE.json kind=sweep -->``).

The markdown's goal table checks the issue's goals per encoder and resolution (:func:`goal_rows`), and its
"flex against SDPA" table gives the token counts from which the flex path is the faster one
(:func:`flex_crossover`), which ``attn_impl="auto"`` uses (:data:`visionpe.attn_impl.AUTO_MIN_TOKENS`).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from visionpe.cli_util import split_names

from .bench import _step, _sync

__all__ = ["DEFAULT_ROWS", "SWEEP_RESOLUTIONS", "BASELINE", "build_row", "run_sweep", "render_sweep_markdown",
           "goal_rows", "flex_crossover", "plot_sweep", "main"]

BASELINE = "learned"
SWEEP_RESOLUTIONS = (224, 384, 512, 768, 1024)
BIAS_ENCODERS = ("relpos_bias", "irpe_bias", "irpe", "irpe_qkv")
TIMM_ROPE = "timm:vit_small_patch16_rope_mixed_224"
TIMM_RELPOS = "timm:vit_relpos_small_patch16_224"
DEFAULT_ROWS = ([BASELINE] + [f"{e}@{impl}" for e in BIAS_ENCODERS for impl in ("sdpa", "flex")]
                + [TIMM_ROPE, TIMM_RELPOS])
GOAL_MEM = 1.10          # bias encoders' peak memory <= 1.10x APE at every resolution
GOAL_FAST_RES = (768, 1024)


def parse_row(row: str) -> tuple[str, str | None]:
    """``"irpe@flex"`` -> ``("irpe", "flex")``; ``"learned"`` -> ``("learned", None)``; timm rows -> (name, None)."""
    if not isinstance(row, str) or not row:
        raise ValueError(f"a sweep row must be an encoder name, 'name@impl' or 'timm:<model>'; got {row!r}")
    if row.startswith("timm:"):
        return row, None
    name, _, impl = row.partition("@")
    from visionpe.attn_impl import check_attn_impl
    import visionpe
    visionpe.encoder_info(name)  # unknown names fail here, listing the known ones
    return name, (check_attn_impl(impl) if impl else None)


def build_row(row: str, res: int):
    """The ViT-S/16 of one row at ``img_size=res`` (random weights)."""
    import timm
    import visionpe  # noqa: F401  (registers vpe_vit_*)
    name, impl = parse_row(row)
    if name.startswith("timm:"):
        return timm.create_model(name[5:], pretrained=False, img_size=res)
    return timm.create_model("vpe_vit_small_patch16_224", pretrained=False, pe=name, img_size=res,
                             attn_impl=impl or "sdpa")


# -- peak memory of one step ---------------------------------------------------------------------------------
def _pin_malloc_mmap_threshold() -> bool:
    """glibc: serve allocations >= 64 KiB by mmap (freed at once), so RSS growth per step is not hidden by
    heap memory kept from an earlier, larger step. Returns False where this is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 64 * 1024))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measured_step(model, x, mode: str, device) -> tuple[float, float]:
    """One step: (seconds, peak memory growth in MiB)."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        _step(model, x, mode)
        torch.cuda.synchronize()
        return time.perf_counter() - t0, (torch.cuda.max_memory_allocated() - base) / 2**20
    if mode == "fwdbwd":
        model.zero_grad(set_to_none=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status_mib("VmRSS")
    t0 = time.perf_counter()
    _step(model, x, mode)
    _sync(device)
    return time.perf_counter() - t0, _status_mib("VmHWM") - base


#: :func:`measure_kernels`' rows: attention alone, ``(B, 6, N, 64)`` (ViT-S/16's heads), forward
KERNEL_ROWS = ("sdpa", "sdpa, (1, 1, N, N) mask", "sdpa, (B, H, N, N) mask", "flex, no score_mod",
               "flex, irpe_bias term", "flex, irpe term")
KERNEL_BASELINE = "sdpa"


def measure_kernels(res: int, batch: int, rounds: int, device, dtype) -> dict:
    """Attention alone at ``res`` (``N = (res/16)^2 + 1``, 6 heads of 64): ms per call of each
    :data:`KERNEL_ROWS` kernel, interleaved rounds after one warm-up (compiles the flex kernels), median.

    The masks are built before timing (``irpe_bias``'s ``(1, 1, N, N)``, ``irpe``'s ``(B, H, N, N)``), so the
    SDPA rows are the cost of reading a mask, and the flex rows that of the kernel with (or without) the
    ``score_mod``: the floor each path starts from. Tables are random (std 0.02).
    """
    import torch
    import torch.nn.functional as F
    from visionpe import Layout, create_encoder
    from visionpe.flex import flex_attention_terms
    g, heads, head_dim = res // 16, 6, 64
    layout = Layout((g, g), 1)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, layout.num_tokens, head_dim, generator=gen).to(device=device, dtype=dtype)
               for _ in range(3))
    encs = {}
    for name in ("irpe_bias", "irpe"):
        enc = create_encoder(name, dim=heads * head_dim, num_heads=heads, grid_size=(g, g))
        with torch.no_grad():
            for prm in enc.parameters():
                prm.normal_(0, 0.02, generator=gen)
        encs[name] = enc.to(device=device, dtype=dtype)
    with torch.inference_mode():
        small, full = encs["irpe_bias"].bias(q, k, layout), encs["irpe"].bias(q, k, layout)
        fns = {
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
            "sdpa, (1, 1, N, N) mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=small),
            "sdpa, (B, H, N, N) mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=full),
            "flex, no score_mod": lambda: flex_attention_terms(q, k, v, []),
            "flex, irpe_bias term": lambda: flex_attention_terms(q, k, v, encs["irpe_bias"].flex_terms(q, k, layout)),
            "flex, irpe term": lambda: flex_attention_terms(q, k, v, encs["irpe"].flex_terms(q, k, layout)),
        }
        for fn in fns.values():
            fn()
        times = {name: [] for name in fns}
        for i in range(rounds):
            for name in (KERNEL_ROWS if i % 2 == 0 else reversed(KERNEL_ROWS)):
                _sync(device)
                t0 = time.perf_counter()
                fns[name]()
                _sync(device)
                times[name].append((time.perf_counter() - t0) * 1000)
    return {"tokens": layout.num_tokens, "ms": {n: statistics.median(t) for n, t in times.items()}, "samples": times}


def tensor_peak_mib(fn) -> float | None:
    """Peak of live tensor bytes (MiB) while ``fn()`` runs, over those live before it: the running sum of the
    CPU profiler's allocation events (``profile_memory=True``), in order. None where the profiler gives no
    allocation events (then only the RSS figure is kept)."""
    from torch.profiler import ProfilerActivity, profile
    # kineto logs every profiler start and stop to stderr at its default level; 6 keeps it quiet (set before
    # its first use, which reads it; a level set by the user wins)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:  # pragma: no cover - a torch without these event objects
        return None
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20 if events else None


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def run_sweep(rows, resolutions, fwdbwd_max_res: int, batch: int, rounds: int, warmup: int, device, dtype,
              progress=None, on_resolution=None, kernels: bool = True) -> dict:
    """Time and memory of every row at every resolution, and attention alone (``kernels``,
    :func:`measure_kernels`); returns the results dict (see the module doc).

    ``on_resolution(result)`` is called after each resolution (the caller writes partial results, so a run
    stopped by a time limit keeps the resolutions it finished).
    """
    import torch
    result = {"rows": list(rows), "resolutions": list(resolutions), "tokens": {}, "timing": {}, "memory": {},
              "load": {"start": _load()}}
    for res in resolutions:
        modes = ["fwd"] + (["fwdbwd"] if res <= fwdbwd_max_res else [])
        models = {r: build_row(r, res).to(device=device, dtype=dtype) for r in rows}
        result["tokens"][str(res)] = (res // 16) ** 2 + 1
        x = torch.randn(batch, 3, res, res, device=device, dtype=dtype)
        result["timing"][str(res)], result["memory"][str(res)] = {}, {}
        for mode in modes:
            for m in models.values():
                m.train(mode == "fwdbwd")
            for _ in range(warmup):
                for m in models.values():
                    _step(m, x, mode)
            secs = {r: [] for r in rows}
            mems = {r: [] for r in rows}
            for i in range(rounds):
                for r in (rows if i % 2 == 0 else list(reversed(rows))):
                    s, mib = _measured_step(models[r], x, mode, device)
                    secs[r].append(s * 1000 / batch)
                    mems[r].append(mib)
                if progress is not None:
                    progress.update(1)
            result["timing"][str(res)][mode] = {r: {"ms_per_img": statistics.median(v), "samples": v}
                                                for r, v in secs.items()}
            result["memory"][str(res)][mode] = {r: {"mib": statistics.median(v), "samples": v}
                                                for r, v in mems.items()}
            if device.type == "cpu":
                for r in rows:
                    if mode == "fwdbwd":
                        models[r].zero_grad(set_to_none=True)
                    peak = tensor_peak_mib(lambda m=models[r]: _step(m, x, mode))
                    if peak is not None:
                        result["memory"][str(res)][mode][r]["tensor_mib"] = peak
        del models
        if kernels:
            result.setdefault("kernels", {})[str(res)] = measure_kernels(res, batch, max(rounds, 3), device, dtype)
        result["load"][str(res)] = _load()
        result["resolutions_done"] = [r for r in resolutions if str(r) in result["load"]]
        if on_resolution is not None:
            on_resolution(result)
    result["load"]["end"] = _load()
    return result


# -- rendering --------------------------------------------------------------------------------------------
def _ratio(results: dict, kind: str, res, mode: str, row: str):
    block = results[kind].get(str(res), {}).get(mode)
    if not block or row not in block:
        return None
    key = "ms_per_img" if kind == "timing" else _mem_key(block)
    base = block[BASELINE][key]
    return block[row][key] / base if base > 0 else None


def _mem_key(block: dict) -> str:
    """The memory figure ratios use: the tensor peak where every row has one (CPU), else ``"mib"``."""
    return "tensor_mib" if all("tensor_mib" in v for v in block.values()) else "mib"


def _fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}x"


def _cell(value, goal_met: bool) -> str:
    return f"{'met' if goal_met else '**missed**'} ({value:.2f}x)"


def _time_over(results: dict, res, mode: str, row: str, ref: str):
    """``row``'s median time over ``ref``'s at ``res`` in ``mode`` (same run), or None if either is missing."""
    block = results["timing"].get(str(res), {}).get(mode, {})
    if row not in block or ref not in block or block[ref]["ms_per_img"] <= 0:
        return None
    return block[row]["ms_per_img"] / block[ref]["ms_per_img"]


def _goal_columns(rows) -> list[str]:
    """The bias encoders' rows the goals are checked on: each flex row."""
    return [f"{e}@flex" for e in BIAS_ENCODERS if f"{e}@flex" in rows]


def goal_rows(results: dict) -> list[str]:
    """Markdown table: the issue's goals per bias encoder and resolution, each cell met or missed with its ratio.

    * peak memory <= ``GOAL_MEM`` x APE, forward at every resolution, forward+backward wherever it ran;
    * at ``GOAL_FAST_RES``, forward time below the encoder's own SDPA row (``name@sdpa``) and below timm's
      relative-position ViT (``TIMM_RELPOS``); the cell is the time ratio (< 1 is faster).
    """
    rows = results["rows"]
    cols = _goal_columns(rows)
    ress = _done(results)
    table = []  # (goal, cells)
    for mode, title in (("fwd", "forward"), ("fwdbwd", "forward+backward")):
        for res in ress:
            if mode not in results["memory"].get(str(res), {}):
                continue
            vals = [_ratio(results, "memory", res, mode, c) for c in cols]
            table.append((f"{title} peak memory / APE <= {GOAL_MEM:.2f}, {res} px",
                          ["-" if v is None else _cell(v, v <= GOAL_MEM) for v in vals]))
    for res in [r for r in GOAL_FAST_RES if r in ress]:
        for label, ref_of in (("own SDPA path", lambda c: c.replace("@flex", "@sdpa") if "@flex" in c else None),
                              ("timm's relpos ViT", lambda c: TIMM_RELPOS if TIMM_RELPOS in rows else None)):
            cells = []
            for c in cols:
                ref = ref_of(c)
                v = None if ref is None else _time_over(results, res, "fwd", c, ref)
                cells.append("n/a" if ref is None else "-" if v is None else _cell(v, v < 1))
            table.append((f"forward time / {label} < 1, {res} px", cells))
    lines = ["| goal | " + " | ".join(f"`{c}`" for c in cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {goal} | " + " | ".join(cells) + " |" for goal, cells in table]
    tally = [(sum(cells[i].startswith("met") for _, cells in table),
              sum(cells[i].startswith(("met", "**missed")) for _, cells in table)) for i in range(len(cols))]
    lines.append("| goals met | " + " | ".join(f"{m} of {n}" for m, n in tally) + " |")
    return lines


def flex_crossover(results: dict, mode: str, encoders=None):
    """The smallest measured token count from which on (at it and at every larger measured one) the flex row of
    every encoder in ``encoders`` (default: every bias encoder with both rows) is faster than its own SDPA row in
    ``mode``; None when there is none (flex not faster at the largest measured count, or no pair ran).

    Per encoder, this is ``attn_impl="auto"``'s threshold (:data:`visionpe.attn_impl.AUTO_MIN_TOKENS`).
    """
    if encoders is None:
        encoders = [e for e in BIAS_ENCODERS if f"{e}@flex" in results["rows"] and f"{e}@sdpa" in results["rows"]]
    points = []
    for res in _done(results):
        ratios = [_time_over(results, res, mode, f"{e}@flex", f"{e}@sdpa") for e in encoders]
        if encoders and all(v is not None for v in ratios):
            points.append((results["tokens"][str(res)], all(v < 1 for v in ratios)))
    threshold = None
    for n, flex_wins in sorted(points, reverse=True):
        if not flex_wins:
            break
        threshold = n
    return threshold


def _crossover_rows(results: dict) -> list[str]:
    """Markdown: each flex row's time over its own SDPA row per mode and resolution, and per encoder the token
    count from which flex is the faster (:func:`flex_crossover`; "none": not faster at the largest measured)."""
    encs = [e for e in BIAS_ENCODERS if f"{e}@flex" in results["rows"] and f"{e}@sdpa" in results["rows"]]
    if not encs:
        return []
    ress = _done(results)
    cols = [(r, m) for m in ("fwd", "fwdbwd") for r in ress if m in results["timing"].get(str(r), {})]
    modes = [m for m in ("fwd", "fwdbwd") if any(mm == m for _, mm in cols)]
    out = ["| encoder | " + " | ".join(f"{m} {r} px (N={results['tokens'][str(r)]})" for r, m in cols)
           + " | " + " | ".join(f"flex faster from N ({m})" for m in modes) + " |",
           "|---|" + "---|" * (len(cols) + len(modes))]
    for e in encs:
        cross = [flex_crossover(results, m, [e]) for m in modes]
        out.append(f"| `{e}` | " + " | ".join(_fmt(_time_over(results, r, m, f"{e}@flex", f"{e}@sdpa"))
                                          for r, m in cols)
                   + " | " + " | ".join("none" if n is None else str(n) for n in cross) + " |")
    return out


def _kernel_rows(results: dict) -> list[str]:
    """Markdown: :func:`measure_kernels`' figures per resolution as ratios to plain SDPA (empty if not measured)."""
    kern = results.get("kernels") or {}
    ress = [r for r in _done(results) if str(r) in kern]
    if not ress:
        return []
    out = ["| kernel | " + " | ".join(f"{r} px (N={kern[str(r)]['tokens']})" for r in ress) + " |",
           "|---|" + "---|" * len(ress)]
    for name in KERNEL_ROWS:
        cells = []
        for r in ress:
            ms = kern[str(r)]["ms"]
            cells.append(_fmt(ms[name] / ms[KERNEL_BASELINE]) if name in ms and ms[KERNEL_BASELINE] > 0 else "-")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out.append("| (sdpa, ms per call) | " + " | ".join(f"{kern[str(r)]['ms'][KERNEL_BASELINE]:.1f}" for r in ress)
               + " |")
    return out


def _done(results: dict) -> list:
    return results.get("resolutions_done", results["resolutions"])


def _memory_note(results: dict) -> str:
    blocks = [b for r in results["memory"].values() for b in r.values()]
    if not blocks or _mem_key(blocks[0]) != "tensor_mib":
        return ""
    return (" Peak memory is the peak of live tensor bytes in one untimed step (profiler allocation events; "
            "deterministic); the absolute table also gives each step's peak RSS growth (median), which counts "
            "non-tensor memory too but varies by about half a MiB between identical steps.")


def render_sweep_markdown(results: dict) -> str:
    """The sweep's markdown (meta, goal table, ratio tables, absolute figures) from a results dict."""
    meta = results["meta"]
    ress = _done(results)
    toks = [results["tokens"][str(r)] for r in ress]
    load = results.get("load", {})
    out = [f"# visionpe bench sweep: ViT-S/16, {meta['device']} ({meta['dtype']}), batch {meta['batch']}", "",
           f"Machine: {meta['machine']}; torch {meta['torch']}, timm {meta['timm']}; {meta['threads']} threads; "
           f"{meta['rounds']} interleaved rounds after {meta['warmup']} warm-up step(s), median; run {meta['date']}, "
           f"{meta.get('wall_s', 0) / 60:.1f} min. Load average (1, 5, 15 min) at start {load.get('start')}, "
           f"end {load.get('end')}. Every ratio is against `{BASELINE}` (learned APE) at the same resolution in "
           f"the same run. Rows `name@sdpa` hand SDPA the materialised mask, `name@flex` run the flex path "
           f"({meta.get('flex_note', '')}).{_memory_note(results)}", "",
           "## Goals (the bias encoders' flex rows)", "",
           f"Peak memory: ratio to APE, goal <= {GOAL_MEM:.2f}. Speed at {' and '.join(map(str, GOAL_FAST_RES))} px "
           "(forward): the row's time over the reference's, goal < 1.", ""] + goal_rows(results) + [""]
    cross = _crossover_rows(results)
    if cross:
        out += ["## flex path against its own SDPA path (time ratio; `attn_impl=\"auto\"`'s threshold)", ""] + cross + [""]
    kern = _kernel_rows(results)
    if kern:
        out += ["## attention alone: time ratio to SDPA without a mask (forward)", "",
                f"`(B={meta['batch']}, H=6, N, d=64)`, masks built before timing: what reading a mask costs SDPA, "
                "and what the flex kernel costs before and with a `score_mod` (the iRPE terms). "
                "A flex row can beat an SDPA row only from below its floor (`flex, no score_mod`).", ""] + kern + [""]
    if not results.get("complete", True):
        out[2:2] = [f"**Partial run**: stopped after {ress[-1] if ress else 'no'} px of {results['resolutions']}.", ""]
    for kind, title in (("timing", "time"), ("memory", "peak memory")):
        for mode, mode_title in (("fwd", "forward"), ("fwdbwd", "forward+backward")):
            cols = [(r, n) for r, n in zip(ress, toks) if mode in results[kind].get(str(r), {})]
            if not cols:
                continue
            out += [f"## {mode_title}: {title} ratio to APE", "",
                    "| row | " + " | ".join(f"{r} px (N={n})" for r, n in cols) + " |",
                    "|---|" + "---|" * len(cols)]
            for row in results["rows"]:
                out.append(f"| `{row}` | " + " | ".join(_fmt(_ratio(results, kind, r, mode, row)) for r, _ in cols)
                           + " |")
            out.append("")
    out += ["## absolute figures (ms/img; peak MiB)", "",
            "| row | " + " | ".join(f"{m} {r}" for r in ress for m in ("fwd", "fwdbwd")
                                    if m in results["timing"][str(r)]) + " |",
            "|---|" + "---|" * sum(len(results["timing"][str(r)]) for r in ress)]
    for row in results["rows"]:
        cells = []
        for r in ress:
            for m in ("fwd", "fwdbwd"):
                if m in results["timing"][str(r)]:
                    t = results["timing"][str(r)][m][row]["ms_per_img"]
                    mem = results["memory"][str(r)][m][row]
                    cells.append(f"{t:.0f} ms; " + (f"{mem['tensor_mib']:.1f} MiB tensors, {mem['mib']:.1f} MiB RSS"
                                                    if "tensor_mib" in mem else f"{mem['mib']:.0f} MiB"))
        out.append(f"| `{row}` | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot_sweep(results: dict, path) -> None:
    """Ratio to APE against token count, one line per row; time and memory panels, forward and fwd+bwd."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), sharex=True)
    ress = _done(results)
    bases = list(dict.fromkeys(r.partition("@")[0] for r in results["rows"]))
    color = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(bases)}  # an encoder's two paths share it
    for ci, (kind, ylabel) in enumerate((("timing", "time / APE"), ("memory", "peak memory / APE"))):
        for ri, (mode, title) in enumerate((("fwd", "forward"), ("fwdbwd", "forward+backward"))):
            ax = axes[ri][ci]
            for row in results["rows"]:
                pts = [(results["tokens"][str(r)], _ratio(results, kind, r, mode, row)) for r in ress]
                pts = [(n, v) for n, v in pts if v is not None]
                if not pts:
                    continue
                style = "-" if "@flex" in row else ("--" if "@sdpa" in row else ":")
                ax.plot(*zip(*pts), style, marker="o", ms=3, color=color[row.partition("@")[0]],
                        label=row.replace("timm:", "timm "))
            if kind == "memory":
                ax.axhline(GOAL_MEM, color="grey", lw=0.8)
            ax.set_xscale("log")
            toks = [results["tokens"][str(r)] for r in ress]
            ax.set_xticks(toks, [str(n) for n in toks])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(f"{title}: {ylabel}")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if ri == 1:
                ax.set_xlabel("tokens N")
    axes[0][1].legend(fontsize=7, loc="upper left")
    meta = results["meta"]
    fig.suptitle(f"ViT-S/16 resolution sweep, {meta['device']} {meta['dtype']}, batch {meta['batch']} "
                 f"(ratio to learned APE, same run)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: dict, out_dir, tag: str, img_dir=None, plot=None) -> list[Path]:
    """``<out_dir>/<tag>.json`` and ``.md`` (:func:`render_sweep_markdown`) and the plot (``plot``, else
    ``<img_dir>/<tag>.png`` when ``img_dir``); returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = render_sweep_markdown(results)
    paths = [out / f"{tag}.json", out / f"{tag}.md"]
    paths[0].write_text(json.dumps(results, indent=1))
    paths[1].write_text(md)
    if plot is not None or img_dir is not None:
        paths.append(Path(plot) if plot is not None else Path(img_dir) / f"{tag}.png")
        plot_sweep(results, paths[-1])
    return paths


def parse_args(argv):
    p = argparse.ArgumentParser(prog="visionpe bench sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="*", default=None,
                   help="rows: encoder, encoder@sdpa|flex|auto, timm:<model> (comma or space separated; "
                        f"default: {' '.join(DEFAULT_ROWS)})")
    p.add_argument("--resolutions", nargs="*", type=int, default=list(SWEEP_RESOLUTIONS))
    p.add_argument("--fwdbwd-max-res", type=int, default=512, help="forward+backward up to this resolution")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="benchmarks/results", help="output directory (JSON + markdown)")
    p.add_argument("--img-dir", default="docs/img", help="directory of the plot <tag>.png ('' for none)")
    p.add_argument("--plot", default=None, help="path of the plot (overrides --img-dir)")
    p.add_argument("--tag", default=None, help="file stem (default: vit_s16_sweep_<device>)")
    p.add_argument("--render", default=None, metavar="JSON", help="only re-render outputs from a results file")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the options (rows, resolutions, device string, output paths) and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    import torch
    tag = args.tag or f"vit_s16_sweep_{torch.device(args.device).type}"
    img_dir = args.img_dir or None
    if args.render:
        results = json.loads(Path(args.render).read_text())
        for p in write_outputs(results, args.out, Path(args.render).stem if not args.tag else tag, img_dir, args.plot):
            print(f"wrote {p}")
        return 0
    rows = split_names(args.rows) if args.rows else list(DEFAULT_ROWS)
    for r in rows:
        parse_row(r)
    rows = [BASELINE] + [r for r in rows if r != BASELINE]
    if not args.resolutions or any(r <= 0 or r % 16 for r in args.resolutions):
        raise ValueError(f"--resolutions must be positive multiples of the patch size 16; got {args.resolutions}")
    for name, val in (("--batch", args.batch), ("--rounds", args.rounds)):
        if val <= 0:
            raise ValueError(f"{name} must be > 0; got {val}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    ress = sorted(args.resolutions)
    if args.dry_run:
        print(f"dry run: {len(rows)} rows x resolutions {ress} (fwd+bwd up to {args.fwdbwd_max_res}) on "
              f"{device} {args.dtype}, batch {args.batch}, {args.rounds} rounds -> {Path(args.out) / tag}.json")
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here")
    import timm
    from tqdm import tqdm
    if args.threads:
        torch.set_num_threads(args.threads)
    pinned = device.type == "cpu" and _pin_malloc_mmap_threshold()
    flex_note = ("compiled flex_attention kernel for forward; forward+backward on CPU runs the same terms on "
                 "checkpointed blocks of query rows, torch's FlexAttention having no CPU backward"
                 if device.type == "cpu" else "compiled flex_attention kernel, forward and backward")
    flex_note += ("; irpe_qkv, whose value term FlexAttention cannot express: the explicit path on blocks of "
                  "query rows (checkpointed in training)")
    meta = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
        "device": str(device), "dtype": args.dtype, "batch": args.batch, "rounds": args.rounds,
        "warmup": args.warmup, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "timm": timm.__version__, "fwdbwd_max_res": args.fwdbwd_max_res, "malloc_mmap_threshold_pinned": pinned,
        "date": time.strftime("%Y-%m-%d %H:%M"), "flex_note": flex_note,
        "command": "visionpe bench sweep " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    torch.manual_seed(0)
    t0 = time.time()

    def save(result):
        result["meta"] = dict(meta, wall_s=round(time.time() - t0, 1))
        write_outputs(result, args.out, tag, img_dir, args.plot)

    total = args.rounds * sum(2 if r <= args.fwdbwd_max_res else 1 for r in ress)
    with tqdm(total=total, desc="sweep", unit="round") as bar:
        results = run_sweep(rows, ress, args.fwdbwd_max_res, args.batch, args.rounds, args.warmup, device, dtype,
                            progress=bar, on_resolution=save)
    results["complete"] = True
    save(results)
    print(render_sweep_markdown(results))
    plot = args.plot or (f"{img_dir}/{tag}.png" if img_dir else None)
    print(f"wrote {Path(args.out) / tag}.json, .md" + (f", {plot}" if plot else "")
          + "; `python tools/render_docs.py` fills the docs' kind=sweep blocks from the JSON")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
