"""Train and evaluate one encoder on the Three-Cell data: BCE over the 6 label bits, warmup + cosine, the
test pass with the weights of the best validation epoch, then PESI of the trained encoder."""
from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .threecell_config import data_config, recipe_hash
from .threecell_data import ThreeCellData, group_accuracies, render
from .threecell_model import build_model, param_groups

__all__ = ["Split", "evaluate", "majority_accuracies", "lr_factor", "resolve_device", "train_encoder",
           "weights_path", "load_weights"]


def lr_factor(step: int, total: int, warmup: int, base: float, floor: float) -> float:
    """Linear warmup, then cosine from ``base`` to ``floor``, as a factor of ``base`` (the same factor for
    every group, so scaled groups keep their ratio)."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return (floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))) / base


def resolve_device(spec: str) -> torch.device:
    """``"auto"``: CUDA when torch sees a GPU, else CPU; anything else as ``torch.device`` reads it."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


class Split:
    """Images of one split: pre-rendered when they fit in ``max_bytes``, else rendered per batch from the
    cell coordinates. ``batch(idx)`` gives ``(images (B, 3, H, W), labels (B, 6))`` on ``device``."""

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
def evaluate(model, split: Split, batch_size: int, amp: bool = False) -> dict[str, float]:
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


def _fit(model, name: str, tc: dict, train: Split, val: Split, device, amp: bool, progress) -> tuple:
    """The epochs; returns ``(best val accuracies, best epoch, best state dict, history)``."""
    opt_cls = torch.optim.AdamW if tc["optimizer"] == "adamw" else torch.optim.Adam
    opt = opt_cls(param_groups(model, tc["lr"], tc["weight_decay"], tc["pe_lr_scale"]), lr=tc["lr"])
    steps_per_epoch = math.ceil(len(train) / tc["batch_size"])
    total = steps_per_epoch * tc["epochs"]
    warmup = int(round(tc["warmup_epochs"] * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, tc["lr"], tc["min_lr"]))
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
    return best, best_epoch, best_state, history


def _pesi(model, name: str, run_cfg: dict, out_dir: Path, best_epoch: int) -> tuple[dict, str]:
    """PESI metrics and heatmap of the trained encoder; an error is reported as the method, not raised."""
    from .pesi import pesi_from_similarity, plot_similarity, position_similarity
    pesi, method = {"M_U": None, "M_D": None, "A_SU": None}, "none"
    if not run_cfg["pesi"]:
        return pesi, method
    try:
        sim, method = position_similarity(model)
        if sim is not None:
            grid = tuple(model.patch_embed.grid_size)
            pesi = pesi_from_similarity(sim, grid, run_cfg["pesi_buckets"])
            plot_similarity(sim, grid, out_dir / "heatmaps" / f"{name}.png",
                            f"{name}: {method} after Three-Cell training (best epoch {best_epoch})")
    except Exception as e:  # keep the trained result; say why PESI is missing
        method = f"error: {type(e).__name__}: {e}"
    return pesi, method


def weights_path(out_dir, name: str) -> Path:
    """Where :func:`train_encoder` keeps an encoder's best-validation weights."""
    return Path(out_dir) / "encoders" / f"{name}.safetensors"


def load_weights(name: str, cfg: dict, out_dir, tensors: bool = True) -> dict | None:
    """The best-validation state dict of encoder ``name`` trained with this recipe, or ``None`` when the file
    is missing, unreadable, or was written by another recipe (its ``recipe_hash`` metadata differs).
    ``tensors=False`` only checks: it returns ``{}`` instead of the tensors."""
    from safetensors import safe_open
    path = weights_path(out_dir, name)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("recipe_hash") != recipe_hash(cfg):
                return None
            return {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception:  # a truncated or foreign file counts as missing: the encoder is retrained
        return None


def train_encoder(name: str, cfg: dict, out_dir, cache_dir=None, progress=None) -> dict:
    """Train and evaluate one encoder; write ``encoders/<name>.json`` atomically and return its record.

    ``progress(n_steps, info)`` is called after every 10 optimiser steps and after every epoch (progress bar).
    The record holds the test accuracies (%), the best validation accuracies and epoch, the per-epoch history,
    PESI, the pretrained-load report (``pretrained``: loaded / missing / unexpected keys, or null), times.
    With ``run.save_weights`` the best-validation weights go to ``encoders/<name>.safetensors`` first (with
    the recipe hash as metadata; :func:`load_weights`), so a generalisation run can test them later.
    """
    import visionpe
    from visionpe.train.checkpoint import save_tensors_atomic, write_json_atomic
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    out_dir = Path(out_dir)
    tc, run_cfg = cfg["train"], cfg["run"]
    device = resolve_device(run_cfg["device"])
    amp = bool(tc["amp"]) and device.type == "cuda"
    data = ThreeCellData(data_config(cfg), cache_dir)
    train, val, test = (Split(data, s, device) for s in ("train", "val", "test"))

    torch.manual_seed(tc["seed"])
    model, load_report = build_model(name, cfg)
    model = model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    best, best_epoch, best_state, history = _fit(model, name, tc, train, val, device, amp, progress)
    model.load_state_dict(best_state)  # strict: the same model's own state
    test_acc = evaluate(model, test, tc["eval_batch_size"], amp)
    pesi, method = _pesi(model, name, run_cfg, out_dir, best_epoch)
    record = {
        "encoder": name, "hooks": list(visionpe.encoder_info(name).hooks), "recipe_hash": recipe_hash(cfg),
        "config_name": cfg["name"], "test": test_acc, "val_best": best, "best_epoch": best_epoch,
        "epochs": tc["epochs"], "history": history, "pesi": pesi, "pesi_method": method, "params": n_params,
        "pretrained": load_report, "wall_s": time.perf_counter() - t_wall, "cpu_s": time.process_time() - t_cpu,
        "threads": torch.get_num_threads(), "device": str(device), "torch": torch.__version__,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (out_dir / "encoders").mkdir(parents=True, exist_ok=True)
    if run_cfg["save_weights"]:  # before the record: a record with this hash implies the weights are there
        save_tensors_atomic(str(weights_path(out_dir, name)), best_state,
                            metadata={"recipe_hash": record["recipe_hash"], "encoder": name,
                                      "best_epoch": str(best_epoch)})
        record["weights"] = weights_path(out_dir, name).name
    write_json_atomic(str(out_dir / "encoders" / f"{name}.json"), record)
    return record
