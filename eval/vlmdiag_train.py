"""Train and score one variant of the VLM position diagnostic: the package's :class:`~visionpe.vlm.TinyVLMDecoder`
with one position scheme, trained on the ``train`` split, the epoch with the best validation average kept,
then scored on every test split.

The loss is cross-entropy of the answer token after each question (the other positions carry no loss). A
prediction is the most likely of the question's own answer words (multiple choice). Batches hold videos of
one length (bucketed per epoch), so left padding stays small.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from visionpe.train.checkpoint import write_json_atomic

from .vlmdiag_config import Variant, data_config, split_specs, variant_hash, variants
from .vlmdiag_data import GROUPS, QUESTIONS, load_or_generate, majority_answers, tokens_and_layout

__all__ = ["build_model", "positions", "evaluate", "scores", "majority_scores", "train_variant"]


def build_model(variant: Variant, cfg: dict, vocab_size: int):
    """The recipe's decoder for ``variant`` (``none``: built as ``rope1d``; its positions are zeroed)."""
    from visionpe.vlm import TinyVLMDecoder
    m = cfg["model"]
    scheme = "rope1d" if variant.scheme == "none" else variant.scheme
    return TinyVLMDecoder(vocab_size, m["dim"], m["depth"], m["num_heads"], scheme=scheme, theta=m["theta"],
                          **variant.phase_options("test"))


def positions(variant: Variant, layout, phase: str, generator: torch.Generator | None = None):
    """Scheme positions of ``layout`` for ``phase`` (``"train"``/``"test"``); ``none`` = every position 0
    (no rotation at all; the mask stays causal). ``generator`` feeds ``"random"`` options (HoPE gamma, V2PE
    delta)."""
    from visionpe.vlm import vlm_positions
    if variant.scheme == "none":
        res = vlm_positions(layout, "rope1d")
        return dataclasses.replace(res, positions=torch.zeros_like(res.positions))
    opts = variant.phase_options(phase)
    if "random" in opts.values():
        opts["generator"] = generator
    return vlm_positions(layout, variant.scheme, **opts)


def _batches(frames: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices in batches of one video length each, in random order."""
    out = []
    for t in np.unique(frames):
        idx = np.nonzero(frames == t)[0]
        rng.shuffle(idx)
        out += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def _forward(model, variant, arrays, idx, grid, vocab, phase, generator, device):
    ids, layout, asked, target, qpos = tokens_and_layout(arrays, idx, grid, vocab)
    res = positions(variant, layout, phase, generator)
    logits = model(ids.to(device), layout, positions=res)[:, qpos.to(device)]  # (B, Q, vocab)
    return logits, asked.to(device), target.to(device)


@torch.no_grad()
def evaluate(model, variant: Variant, arrays: dict, grid, vocab, batch_size: int, device) -> dict:
    """Correct answers per question and video length: ``{"correct": (7, T_max + 1), "count": (7, T_max + 1)}``
    int arrays (index ``[question, T]``)."""
    model.eval()
    answer_ids = torch.from_numpy(vocab.answer_tokens()).to(device)
    T_all = arrays["frames"].astype(np.int64)
    correct = np.zeros((len(QUESTIONS), T_all.max() + 1), dtype=np.int64)
    count = np.zeros_like(correct)
    order = np.argsort(T_all, kind="stable")
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        logits, asked, target = _forward(model, variant, arrays, idx, grid, vocab, "test", None, device)
        allowed = answer_ids[asked]  # (B, Q, 4), -1 past a question's last answer
        score = logits.gather(2, allowed.clamp(min=0)).masked_fill(allowed < 0, -torch.inf)
        pred = allowed.gather(2, score.argmax(2, keepdim=True))[..., 0]
        ok = (pred == target).cpu().numpy()
        q = asked.cpu().numpy()
        t = np.broadcast_to(T_all[idx][:, None], q.shape)
        np.add.at(correct, (q, t), ok)
        np.add.at(count, (q, t), 1)
    model.train()
    return {"correct": correct, "count": count}


def scores(correct: np.ndarray, count: np.ndarray) -> dict:
    """Accuracy (%) per question, per group (mean of its questions) and ``avg`` (mean of the groups), from
    ``(7, ...)`` counts summed over the trailing axes; questions never asked are left out."""
    c = correct.reshape(len(QUESTIONS), -1).sum(1)
    n = count.reshape(len(QUESTIONS), -1).sum(1)
    per_q = {q: 100.0 * c[i] / n[i] for i, q in enumerate(QUESTIONS) if n[i]}
    out = {}
    for g, qs in GROUPS.items():
        vals = [per_q[q] for q in qs if q in per_q]
        if vals:
            out[g] = float(np.mean(vals))
    out["avg"] = float(np.mean([out[g] for g in GROUPS if g in out]))
    out["questions"] = {q: float(v) for q, v in per_q.items()}
    return out


def by_frames(result: dict) -> dict:
    """``{T: scores}`` for every video length present in an :func:`evaluate` result."""
    n = result["count"].sum(0)
    return {int(t): scores(result["correct"][:, t], result["count"][:, t]) for t in np.nonzero(n)[0]}


def majority_scores(train: dict, test: dict) -> dict:
    """Scores of the label-majority predictor (each question's most frequent training answer) on ``test``."""
    maj = majority_answers(train)
    a = test["answers"].astype(np.int64)
    T = test["frames"].astype(np.int64)
    correct = np.zeros((len(QUESTIONS), T.max() + 1), dtype=np.int64)
    count = np.zeros_like(correct)
    for qi in range(len(QUESTIONS)):
        asked = (test["asked"] == qi).any(1)
        np.add.at(correct[qi], T[asked], (a[asked, qi] == maj[qi]).astype(np.int64))
        np.add.at(count[qi], T[asked], 1)
    return {"test": scores(correct, count), "by_frames": by_frames({"correct": correct, "count": count})}


def _lr_factor(step: int, total: int, warmup: int, base: float, floor: float) -> float:
    """Linear warmup, then cosine from ``base`` to ``floor``, as a factor of ``base``."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return (floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * t))) / base


def train_variant(name: str, cfg: dict, out_dir, cache_dir=None, progress=None) -> dict:
    """Train and score variant ``name``; write ``variants/<name>.json`` atomically and return its record.

    ``progress(n_steps, info)`` is called every few optimiser steps (for the progress bar).
    """
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    variant = variants(cfg)[name]
    tc = cfg["train"]
    device = torch.device(cfg["run"]["device"] if cfg["run"]["device"] != "auto"
                          else ("cuda" if torch.cuda.is_available() else "cpu"))
    dcfg = data_config(cfg)
    vocab = dcfg.vocab
    specs = split_specs(cfg)
    data = {s: load_or_generate(dcfg, spec, cache_dir)[0] for s, spec in specs.items()}
    train, grid = data["train"], specs["train"].grid

    torch.manual_seed(tc["seed"])
    model = build_model(variant, cfg, vocab.size).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc["lr"])
    rng = np.random.default_rng(tc["seed"])
    gen = torch.Generator().manual_seed(tc["seed"])
    frames = train["frames"].astype(np.int64)
    steps_per_epoch = len(_batches(frames, tc["batch_size"], np.random.default_rng(0)))
    total = steps_per_epoch * tc["epochs"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, total, tc["warmup_steps"], tc["lr"], tc["min_lr"]))

    best, best_state, best_epoch, history = None, None, -1, []
    for epoch in range(tc["epochs"]):
        loss_sum, done = 0.0, 0
        for i, idx in enumerate(_batches(frames, tc["batch_size"], rng)):
            logits, _, target = _forward(model, variant, train, idx, grid, vocab, "train", gen, device)
            loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
            opt.step()
            sched.step()
            loss_sum += float(loss.detach())
            done += 1
            if progress is not None and (i % 10 == 9 or i == steps_per_epoch - 1):
                progress(10 if i % 10 == 9 else (i % 10) + 1, None)
        val = scores(**evaluate(model, variant, data["val"], specs["val"].grid, vocab, tc["eval_batch_size"], device))
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(done, 1), "val_avg": val["avg"]})
        if progress is not None:
            progress(0, f"{name} ep{epoch + 1} val {val['avg']:.1f}")
        if best is None or val["avg"] > best["avg"]:
            best, best_epoch = val, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    test, frames_acc = {}, {}
    for split, spec in specs.items():
        if split in ("train", "val"):
            continue
        res = evaluate(model, variant, data[split], spec.grid, vocab, tc["eval_batch_size"], device)
        test[split], frames_acc[split] = scores(**res), by_frames(res)
    record = {
        "variant": name, "scheme": variant.scheme, "options": variant.options, "train_options": variant.train,
        "test_options": variant.test, "describe": variant.describe(), "recipe_hash": variant_hash(cfg, name),
        "config_name": cfg["name"], "test": test, "by_frames": frames_acc, "val_best": best,
        "best_epoch": best_epoch, "epochs": tc["epochs"], "steps": total, "history": history, "params": n_params,
        "wall_s": time.perf_counter() - t_wall, "cpu_s": time.process_time() - t_cpu,
        "threads": torch.get_num_threads(), "device": str(device), "torch": torch.__version__,
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = Path(out_dir) / "variants" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(str(path), record)  # a stop never leaves a half-written record
    return record
