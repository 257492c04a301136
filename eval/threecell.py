"""``visionpe threecell``: the Three-Cell spatial diagnostic (LOOPE §3.2/§4.3) for every encoder.

One YAML recipe (``configs/threecell.yaml`` = the paper's setting, ``configs/threecell_quick.yaml`` = the
2-core CPU demo) trains a small ViT per encoder on the Three-Cell data (:mod:`visionpe.eval.threecell_data`)
with 6 sigmoid outputs and BCE, keeps the epoch with the best validation average, and reports the
test accuracy of the four label groups (distance, orientation, area, vector sum) and their mean
(spec §8.4), plus the PESI metrics of the trained encoder (:mod:`visionpe.eval.pesi`).

Outputs in ``runs/threecell/<config name>/`` (``--out``):

* ``encoders/<name>.json``: one finished encoder, written atomically; a rerun skips encoders whose JSON
  exists with the same recipe hash (resume after an interruption);
* ``results.md``, ``results.csv``: the table, with the label-majority row (the best constant predictor,
  which is exactly what a no-PE ViT can reach: spec §8.7);
* ``threecell.png``: grouped bar chart; ``heatmaps/<name>.png``: PE-similarity maps of each trained encoder.

Encoders are trained in ``workers`` processes (``threads`` intra-op threads each): small models train
faster as two single-thread processes on two cores than as one two-thread process.
"""
from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import math
import os
import platform
import queue
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .threecell_data import ThreeCellConfig, ThreeCellData, group_accuracies, render

__all__ = ["load_config", "resolve_encoders", "train_encoder", "run", "main", "BASELINES"]

#: always part of the default encoder set (spec: every registered image encoder plus these)
BASELINES = ("none", "learned", "sincos2d")
GROUP_TITLES = {"distance": "Distance", "orientation": "Orientation", "area": "Area",
                "vector_sum": "Vector Sum", "avg": "Average"}
DEFAULTS = {
    "name": "threecell",
    "data": {"img_size": 224, "cell_size": 16, "num_samples": 10000, "split": [0.8, 0.1, 0.1], "seed": 0,
             "max_attempts": 100, "reject_colinear": True},
    "model": {"patch_size": None, "embed_dim": 192, "depth": 12, "num_heads": 3, "mlp_ratio": 4.0,
              "drop_path_rate": 0.0, "pretrained": None},
    "train": {"epochs": 150, "batch_size": 64, "optimizer": "adam", "lr": 1e-3, "min_lr": 2.5e-5,
              "weight_decay": 0.0, "pe_lr_scale": 1.0, "warmup_epochs": 0, "grad_clip": None, "seed": 0, "eval_batch_size": 500,
              "amp": False},
    "run": {"encoders": "default", "workers": 1, "threads": None, "device": "auto", "pesi": True,
            "pesi_buckets": 60},
}
# sections that define the result (the resume hash); "run" only says how to execute it
RECIPE_SECTIONS = ("data", "model", "train")


# -- configuration -----------------------------------------------------------------------------------
def load_config(path=None, quick: bool = False, overrides: dict | None = None) -> dict:
    """Merge ``DEFAULTS`` <- YAML file <- ``overrides`` (``{"train.epochs": 3, ...}``); validate keys.

    ``path``: a YAML file or a packaged recipe name (``threecell_grid14``); ``None`` uses ``threecell_quick``
    when ``quick`` else ``threecell`` (the paper's setting).
    """
    import yaml

    from visionpe.recipes import recipe_path
    path = recipe_path(path if path is not None else ("threecell_quick" if quick else "threecell"),
                       prefix="threecell")
    with open(path) as f:
        user = yaml.safe_load(f) or {}
    if not isinstance(user, dict):
        raise ValueError(f"{path}: a Three-Cell config must be a mapping; got {type(user).__name__}")
    cfg = copy.deepcopy(DEFAULTS)
    cfg["name"] = user.pop("name", Path(path).stem)
    for section, values in user.items():
        if section not in cfg or not isinstance(cfg[section], dict):
            raise ValueError(f"{path}: unknown section {section!r}; expected one of {sorted(k for k in DEFAULTS if k != 'name')}")
        if not isinstance(values, dict):
            raise ValueError(f"{path}: section {section!r} must be a mapping; got {values!r}")
        unknown = sorted(set(values) - set(cfg[section]))
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown} in section {section!r}; known: {sorted(cfg[section])}")
        cfg[section].update(values)
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".")
        if key not in cfg[section]:
            raise ValueError(f"unknown override {dotted!r}")
        cfg[section][key] = value
    data_config(cfg)  # validates the data section (cell size vs image, grid size)
    _check_model(cfg)
    return cfg


def data_config(cfg: dict) -> ThreeCellConfig:
    d = cfg["data"]
    return ThreeCellConfig(img_size=d["img_size"], cell_size=d["cell_size"], num_samples=d["num_samples"],
                           seed=d["seed"], split=tuple(d["split"]), max_attempts=d["max_attempts"],
                           reject_colinear=d["reject_colinear"])


def _patch_size(cfg: dict) -> int:
    p = cfg["model"]["patch_size"]
    return cfg["data"]["cell_size"] if p is None else p


def _check_model(cfg: dict) -> None:
    cell, patch = cfg["data"]["cell_size"], _patch_size(cfg)
    if isinstance(patch, bool) or not isinstance(patch, int) or patch <= 0:
        raise ValueError(f"model.patch_size must be a positive int or null (= cell_size); got {patch!r}")
    if cell % patch:
        # a patch straddling two cells mixes colours by position: a no-PE model could then read positions
        # from content (spec §8.7), so the diagnostic would be void
        raise ValueError(f"model.patch_size={patch} must divide data.cell_size={cell} so that every patch lies "
                         f"inside one cell")
    m = cfg["model"]
    if m["embed_dim"] % m["num_heads"]:
        raise ValueError(f"model.embed_dim={m['embed_dim']} must be divisible by model.num_heads={m['num_heads']}")
    t = cfg["train"]
    if t["optimizer"] not in ("adam", "adamw"):
        raise ValueError(f"train.optimizer must be 'adam' or 'adamw'; got {t['optimizer']!r}")
    if not (isinstance(t["epochs"], int) and t["epochs"] >= 1):
        raise ValueError(f"train.epochs must be an int >= 1; got {t['epochs']!r}")


def recipe_hash(cfg: dict) -> str:
    blob = json.dumps({k: cfg[k] for k in RECIPE_SECTIONS}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_encoders(spec=None) -> list[str]:
    """Encoder names to run: ``None``/``"default"`` = the baselines plus every registered encoder;
    else a comma-separated string or a list. Unknown names raise ``ValueError`` listing the known ones."""
    import visionpe
    known = visionpe.list_encoders()
    if spec is None or spec == "default":
        rest = [n for n in known if n not in BASELINES]
        return list(BASELINES) + rest
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"no encoder selected (got {spec!r}); known encoders: {', '.join(known)}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown encoder(s) {unknown}; known encoders: {', '.join(known)}")
    return list(dict.fromkeys(names))


# -- one encoder ------------------------------------------------------------------------------------
def build_model(name: str, cfg: dict):
    """The recipe's ViT with encoder ``name`` (the encoder's own ``model_kwargs`` win, e.g. GAP variants)."""
    import timm
    import visionpe
    m = cfg["model"]
    kwargs = dict(pe=name, img_size=tuple(data_config(cfg).img_size), patch_size=_patch_size(cfg),
                  embed_dim=m["embed_dim"], depth=m["depth"], num_heads=m["num_heads"], mlp_ratio=m["mlp_ratio"],
                  drop_path_rate=m["drop_path_rate"], num_classes=6)
    kwargs.update(visionpe.encoder_info(name).model_kwargs)
    model = timm.create_model("vpe_vit_tiny_patch16_224", **kwargs)
    if m["pretrained"]:
        _load_pretrained(model, m["pretrained"])
    return model


def _load_pretrained(model, source: str) -> None:
    """Backbone weights from a checkpoint file or a timm model name (downloaded by timm); the head is new."""
    from visionpe.models.registry import pe_checkpoint_filter
    if os.path.isfile(source):
        if source.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(source)
        else:
            sd = torch.load(source, map_location="cpu", weights_only=True)
    else:
        import timm
        sd = timm.create_model(source, pretrained=True).state_dict()
    sd = pe_checkpoint_filter(sd, model)
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if k in own and v.shape == own[k].shape and not k.startswith("head.")}
    model.load_state_dict(sd, strict=False)


def param_groups(model, lr: float, weight_decay: float, pe_lr_scale: float = 1.0) -> list[dict]:
    """Optimiser groups: no weight decay on 1-D parameters and ``model.no_weight_decay()``; the encoder's own
    parameters (``pe.*``) get ``lr * pe_lr_scale``.

    Why the scale: learned tables start tiny (std 0.02, or zero-mean biases) next to patch features of order
    1, and with a from-scratch ViT and a short budget they barely move; fixed tables (sin-cos, RoPE) need no
    learning. A larger step for PE parameters only lets the learned encoders compete within the quick
    budget; it applies to every encoder alike (1.0 in the paper recipe).
    """
    skip = model.no_weight_decay()
    buckets: dict = {}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if p.ndim <= 1 or pname in skip else weight_decay
        scale = pe_lr_scale if pname.startswith("pe.") else 1.0
        buckets.setdefault((wd, scale), []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr": lr * scale} for (wd, scale), ps in buckets.items()]


def _lr_lambda(step: int, total: int, warmup: int, base: float, floor: float) -> float:
    """Linear warmup, then cosine from ``base`` to ``floor``, as a factor of ``base`` (the same factor for
    every group, so scaled groups keep their ratio)."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return (floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))) / base


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


class _Split:
    """Images of one split: pre-rendered when small, else rendered per batch from the cell coordinates."""

    def __init__(self, data: ThreeCellData, name: str, device, max_bytes: int = 1 << 29):
        s = data.split(name)
        self.coords, self.grid, self.cell = s["coords"], data.cfg.grid, data.cfg.cell_size
        self.labels = torch.from_numpy(s["labels"].astype(np.float32)).to(device)
        self.device = device
        H, W = data.cfg.img_size
        self.images = None
        if len(self.coords) * 3 * H * W * 4 <= max_bytes:
            self.images = render(self.coords, self.grid, self.cell).to(device)

    def __len__(self):
        return len(self.coords)

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        if self.images is not None:
            return self.images[idx], self.labels[idx]
        idx_np = idx.cpu().numpy() if isinstance(idx, torch.Tensor) else idx
        return render(self.coords[idx_np], self.grid, self.cell).to(self.device), self.labels[idx]


@torch.no_grad()
def evaluate(model, split: _Split, batch_size: int, amp: bool = False) -> dict[str, float]:
    """Group accuracies in percent (spec §8.4) of ``model`` on ``split``."""
    model.eval()
    logits = []
    for i in range(0, len(split), batch_size):
        x, _ = split.batch(torch.arange(i, min(i + batch_size, len(split))))
        with torch.autocast(split.device.type, dtype=torch.bfloat16, enabled=amp):
            logits.append(model(x).float())
    acc = group_accuracies(torch.cat(logits), split.labels)
    return {k: 100.0 * v for k, v in acc.items()}


def majority_accuracies(train_labels: np.ndarray, test_labels: np.ndarray) -> dict[str, float]:
    """Test accuracy (%) of the best constant predictor fit on train: each bit's majority value. A
    no-PE ViT sees every image as the same multiset of tokens, so this is its ceiling (spec §8.7)."""
    guess = (train_labels.mean(0) > 0.5).astype(np.float32)
    logits = torch.from_numpy(np.where(guess > 0, 1.0, -1.0)).float().expand(len(test_labels), 6)
    acc = group_accuracies(logits, torch.from_numpy(test_labels.astype(np.float32)))
    return {k: 100.0 * v for k, v in acc.items()}


def _atomic_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def train_encoder(name: str, cfg: dict, out_dir, cache_dir=None, progress=None) -> dict:
    """Train and evaluate one encoder; write ``encoders/<name>.json`` atomically and return its record.

    ``progress(n_steps, info)`` is called after every optimiser step batch (for the progress bar).
    """
    from .pesi import plot_similarity, pesi_from_similarity, position_similarity
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    out_dir = Path(out_dir)
    tc, run_cfg = cfg["train"], cfg["run"]
    device = _device(run_cfg["device"])
    amp = bool(tc["amp"]) and device.type == "cuda"
    data = ThreeCellData(data_config(cfg), cache_dir)
    train, val, test = (_Split(data, s, device) for s in ("train", "val", "test"))

    torch.manual_seed(tc["seed"])
    model = build_model(name, cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt_cls = torch.optim.AdamW if tc["optimizer"] == "adamw" else torch.optim.Adam
    opt = opt_cls(param_groups(model, tc["lr"], tc["weight_decay"], tc["pe_lr_scale"]), lr=tc["lr"])
    steps_per_epoch = math.ceil(len(train) / tc["batch_size"])
    total = steps_per_epoch * tc["epochs"]
    warmup = int(round(tc["warmup_epochs"] * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_lambda(s, total, warmup, tc["lr"], tc["min_lr"]))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(tc["seed"])

    best, best_state, best_epoch, history = None, None, -1, []
    for epoch in range(tc["epochs"]):
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        loss_sum = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * tc["batch_size"]:(i + 1) * tc["batch_size"]].to(device)
            x, y = train.batch(idx)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = loss_fn(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
            opt.step()
            sched.step()
            loss_sum += loss.detach()
            if progress is not None and (i % 10 == 9 or i == steps_per_epoch - 1):
                progress(10 if i % 10 == 9 else (i % 10) + 1, None)
        acc = evaluate(model, val, tc["eval_batch_size"], amp)
        history.append({"epoch": epoch + 1, "train_loss": float(loss_sum) / steps_per_epoch, "val_avg": acc["avg"]})
        if progress is not None:
            progress(0, f"{name} ep{epoch + 1} val {acc['avg']:.1f}")
        if best is None or acc["avg"] > best["avg"]:
            best, best_epoch = acc, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    test_acc = evaluate(model, test, tc["eval_batch_size"], amp)

    pesi, method = {"M_U": None, "M_D": None, "A_SU": None}, "none"
    if run_cfg["pesi"]:
        try:
            sim, method = position_similarity(model)
            if sim is not None:
                grid = tuple(model.patch_embed.grid_size)
                pesi = pesi_from_similarity(sim, grid, run_cfg["pesi_buckets"])
                plot_similarity(sim, grid, out_dir / "heatmaps" / f"{name}.png",
                                f"{name}: {method} after Three-Cell training (best epoch {best_epoch})")
        except Exception as e:  # keep the trained result; say why PESI is missing
            method = f"error: {type(e).__name__}: {e}"
    import visionpe
    record = {
        "encoder": name, "hooks": list(visionpe.encoder_info(name).hooks), "recipe_hash": recipe_hash(cfg),
        "config_name": cfg["name"], "test": test_acc, "val_best": best, "best_epoch": best_epoch,
        "epochs": tc["epochs"], "history": history, "pesi": pesi, "pesi_method": method, "params": n_params,
        "wall_s": time.perf_counter() - t_wall, "cpu_s": time.process_time() - t_cpu,
        "threads": torch.get_num_threads(), "device": str(device), "torch": torch.__version__,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _atomic_json(out_dir / "encoders" / f"{name}.json", record)
    return record


# -- the whole run ----------------------------------------------------------------------------------
def _load_done(out_dir: Path, name: str, h: str):
    path = out_dir / "encoders" / f"{name}.json"
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    return rec if rec.get("recipe_hash") == h else None


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker(name, cfg, out_dir, cache_dir, q):
    def progress(n, info):
        q.put((name, n, info))
    try:
        return train_encoder(name, cfg, out_dir, cache_dir, progress)
    except Exception as e:  # reported in the table; the other encoders still run
        return {"encoder": name, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def run(cfg: dict, encoders: list[str], out_dir, cache_dir=None, fresh: bool = False, show_progress: bool = True) -> dict:
    """Train every encoder not already finished, then write the tables and the chart. Returns
    ``{"records": {name: record}, "majority": {...}, "wall_s": ...}``."""
    from tqdm.auto import tqdm
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_cfg, tc = cfg["run"], cfg["train"]
    threads = run_cfg["threads"] or max(1, (os.cpu_count() or 1) // max(1, run_cfg["workers"]))
    data = ThreeCellData(data_config(cfg), cache_dir)  # generate (or hit) the cache once, before any worker
    h = recipe_hash(cfg)
    records, todo = {}, []
    for name in encoders:
        rec = None if fresh else _load_done(out_dir, name, h)
        if rec is not None:
            records[name] = rec
        else:
            todo.append(name)
    if records:
        print(f"resuming: {len(records)} encoder(s) already finished ({', '.join(records)})", flush=True)
    (out_dir / "config.yaml").write_text(_dump_yaml(cfg))
    steps = math.ceil(data.cfg.split_sizes()[0] / tc["batch_size"]) * tc["epochs"]
    bar = tqdm(total=steps * len(todo), desc="three-cell", unit="step", disable=not show_progress or not todo,
               dynamic_ncols=True, mininterval=1.0)
    workers = max(1, min(run_cfg["workers"], len(todo)))
    if workers == 1:
        old_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for name in todo:
                bar.set_postfix_str(name)
                def progress(n, info, _bar=bar):
                    _bar.update(n)
                    if info:
                        _bar.set_postfix_str(info)
                try:
                    records[name] = train_encoder(name, cfg, out_dir, cache_dir, progress)
                except Exception as e:
                    records[name] = {"encoder": name, "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc()}
                _report(records[name], bar)
        finally:
            torch.set_num_threads(old_threads)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        ctx = mp.get_context("spawn")
        with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                                           initargs=(threads,)) as pool:
            q = manager.Queue()
            futs = {pool.submit(_worker, n, cfg, str(out_dir), cache_dir, q): n for n in todo}
            pending = set(futs)
            while pending:
                try:
                    name, n, info = q.get(timeout=0.5)
                    bar.update(n)
                    if info:
                        bar.set_postfix_str(info)
                except queue.Empty:
                    pass
                for f in [f for f in pending if f.done()]:
                    pending.discard(f)
                    records[futs[f]] = f.result()
                    _report(records[futs[f]], bar)
            while not q.empty():
                bar.update(q.get()[1])
    bar.close()
    records = {n: records[n] for n in encoders}
    s = data.split("train")["labels"], data.split("test")["labels"]
    majority = majority_accuracies(*s)
    summary = {"records": records, "majority": majority, "wall_s": time.perf_counter() - t0,
               "workers": workers, "threads": threads, "trained": len(todo)}
    write_results(cfg, summary, out_dir)
    return summary


def _report(rec: dict, bar) -> None:
    if "error" in rec:
        bar.write(f"  {rec['encoder']}: FAILED {rec['error']}")
    else:
        t = rec["test"]
        bar.write(f"  {rec['encoder']:<16} test avg {t['avg']:5.1f}  (dist {t['distance']:.1f}, orient "
                  f"{t['orientation']:.1f}, area {t['area']:.1f}, sum {t['vector_sum']:.1f})  {rec['wall_s']:.0f}s")


def _dump_yaml(cfg: dict) -> str:
    import yaml
    return yaml.safe_dump(cfg, sort_keys=False)


def _machine() -> str:
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


def write_results(cfg: dict, summary: dict, out_dir: Path) -> None:
    """``results.csv``, ``results.md`` and ``threecell.png`` from the per-encoder records."""
    out_dir = Path(out_dir)
    cols = list(GROUP_TITLES)
    recs, maj = summary["records"], summary["majority"]
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["encoder", "hooks", *cols, "M_U", "M_D", "A_SU", "pesi_method", "best_epoch", "epochs",
                    "params", "wall_s", "cpu_s", "threads", "device", "error"])
        w.writerow(["label_majority", "", *[f"{maj[c]:.2f}" for c in cols], "", "", "", "", "", "", "", "", "", "", "", ""])
        for n, r in recs.items():
            if "error" in r:
                w.writerow([n, "", *[""] * len(cols), "", "", "", "", "", "", "", "", "", "", "", r["error"]])
                continue
            p = r["pesi"]
            w.writerow([n, "+".join(r["hooks"]), *[f"{r['test'][c]:.2f}" for c in cols],
                        *["" if p[k] is None else f"{p[k]:.4f}" for k in ("M_U", "M_D", "A_SU")], r["pesi_method"],
                        r["best_epoch"], r["epochs"], r["params"], f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}",
                        r["threads"], r["device"], ""])
    d = data_config(cfg)
    m, t = cfg["model"], cfg["train"]
    ok = [r for r in recs.values() if "error" not in r]
    enc_time = sum(r["wall_s"] for r in ok)
    lines = [
        f"# Three-Cell results: `{cfg['name']}`", "",
        f"Test accuracy (%) of the epoch with the best validation average; groups as in LOOPE Table 4. "
        f"Data: {d.grid[0]}x{d.grid[1]} cells of {d.cell_size} px ({d.img_size[0]}x{d.img_size[1]} images), "
        f"{d.num_samples} samples split {'/'.join(str(s) for s in d.split_sizes())}, seed {d.seed}. "
        f"Model: ViT patch {_patch_size(cfg)}, dim {m['embed_dim']}, depth {m['depth']}, heads {m['num_heads']}"
        f"{', from ' + str(m['pretrained']) if m['pretrained'] else ', from scratch'}. "
        f"Train: {t['optimizer']} lr {t['lr']} -> {t['min_lr']} cosine"
        f"{' (PE parameters x' + str(t['pe_lr_scale']) + ')' if t['pe_lr_scale'] != 1 else ''}, "
        f"{t['warmup_epochs']} warmup epoch(s), {t['epochs']} epochs, batch {t['batch_size']}.",
        "",
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
    lines += [
        "",
        f"Machine: {_machine()}. This invocation: {summary['wall_s']:.0f} s wall, {summary['trained']} encoder(s) "
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="visionpe threecell", description=(
        "Three-Cell spatial diagnostic: train a small ViT per position encoder and report how much spatial "
        "information each keeps (LOOPE Table 4), plus PESI of the trained encoders."))
    p.add_argument("--quick", action="store_true", help="the 2-core CPU demo recipe (configs/threecell_quick.yaml)")
    p.add_argument("--config", default=None, help="YAML recipe (default: configs/threecell.yaml, the paper's setting)")
    p.add_argument("--encoders", default=None, help="comma-separated encoders (default: none, learned, sincos2d "
                                                    "and every registered encoder)")
    p.add_argument("--out", default=None, help="output folder (default: runs/threecell/<config name>)")
    p.add_argument("--cache-dir", default=None, help="dataset cache (default: ~/.cache/visionpe/threecell)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="parallel encoder processes")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--no-pesi", action="store_true", help="skip PESI and heatmaps")
    p.add_argument("--fresh", action="store_true", help="retrain encoders even if their results exist")
    p.add_argument("--list", action="store_true", help="print the encoders that would run and exit")
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
    try:
        cfg = load_config(args.config, quick=args.quick, overrides=overrides)
        encoders = resolve_encoders(args.encoders if args.encoders is not None else cfg["run"]["encoders"])
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"visionpe threecell: error: {e}", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(encoders))
        return 0
    out = Path(args.out) if args.out else Path("runs") / "threecell" / cfg["name"]
    print(f"Three-Cell `{cfg['name']}`: {len(encoders)} encoders -> {out}", flush=True)
    summary = run(cfg, encoders, out, args.cache_dir, fresh=args.fresh)
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
    if failed:
        print(f"failed encoders: {', '.join(failed)} (see results.md)", file=sys.stderr)
        return 1
    return 0
