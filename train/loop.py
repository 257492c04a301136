"""The fine-tuning loop: timm data/optim/scheduler/EMA pieces, DDP, AMP, accumulation, exact resume.

Exact resume rests on four things: seeded per-sample augmentation and a resumable global-batch sampler
(``data.py``), a schedule that is a pure function of the update count (timm's ``step_update``),
checkpoints only at update boundaries, and restoring every RNG stream (Python, NumPy for Mixup, torch for
dropout/drop-path) together with model, EMA, optimizer and AMP-scaler state.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time

import numpy as np
import torch
import yaml

from .checkpoint import (CheckpointManager, find_resume_dir, optimizer_from_flat, optimizer_to_flat, read_checkpoint,
                         rng_state, save_tensors_atomic, set_rng_state)
from .config import FinetuneConfig, config_changes, config_to_dict
from .data import build_dataset, build_mixup, build_transforms, GlobalBatchSampler, num_classes_of, SeededDataset, \
    ShardSampler
from .distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown_distributed
from .evaluation import evaluate
from .metrics import MetricsLog, plot_curves
from .model import build_model, write_description
from .probe import load_probe, run_probe

__all__ = ["run", "SimulatedCrash"]

_logger = logging.getLogger(__name__)


class SimulatedCrash(RuntimeError):
    """Raised by ``train.debug_crash_at_update`` to test that a killed run resumes exactly."""


# -- pieces ------------------------------------------------------------------------------------------
def _resolve_lr(cfg: FinetuneConfig, global_batch: int) -> float:
    if cfg.optim.lr is not None:
        return cfg.optim.lr
    return cfg.optim.lr_base * global_batch / cfg.optim.lr_base_size


def _make_optimizer(cfg: FinetuneConfig, model, lr: float):
    from timm.optim import create_optimizer_v2
    extra = {}
    if cfg.optim.betas is not None:
        extra["betas"] = tuple(cfg.optim.betas)
    if cfg.optim.eps is not None:
        extra["eps"] = cfg.optim.eps
    # layer decay uses model.group_matcher(): VisionPEViT puts per-block PE params in their block's group
    return create_optimizer_v2(model, opt=cfg.optim.opt, lr=lr, weight_decay=cfg.optim.weight_decay,
                               momentum=cfg.optim.momentum, layer_decay=cfg.optim.layer_decay, **extra)


def _criterion(cfg: FinetuneConfig, mixup):
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if cfg.train.loss == "bce":  # DeiT-III: per-class sigmoid on (Mixup-softened) targets
        return BinaryCrossEntropy(smoothing=0.0 if mixup is not None else cfg.data.label_smoothing)
    if mixup is not None:
        return SoftTargetCrossEntropy()  # Mixup already smoothed the targets
    if cfg.data.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.data.label_smoothing)
    return torch.nn.CrossEntropyLoss()


def _data_config(cfg: FinetuneConfig, model) -> dict:
    from timm.data import resolve_input_data_config
    dc = dict(resolve_input_data_config(model))  # follows the model's real input size (not the cfg's)
    for key in ("interpolation", "crop_pct", "mean", "std"):
        val = getattr(cfg.data, key)
        if val is not None:
            dc[key] = tuple(val) if isinstance(val, list) else val
    return dc


# -- the run -----------------------------------------------------------------------------------------
def run(cfg: FinetuneConfig) -> dict:
    """Fine-tune as the config says; returns the final metrics and output paths.

    Under ``torchrun`` each process calls this; the process group comes from the environment.
    """
    info = init_distributed(cfg.train.device)
    try:
        return _Run(cfg, info).fit()
    finally:
        shutdown_distributed(info)


class _Run:
    def __init__(self, cfg: FinetuneConfig, info: DistInfo):
        from visionpe.models.swap import check_state_dict

        self.cfg, self.info = cfg, info
        self.device = info.device
        self.out = cfg.train.output_dir
        self.probe_fn = load_probe() if cfg.probe.every > 0 else None
        seed = cfg.train.seed
        # identical model init on every rank; per-rank streams for dropout / Mixup afterwards
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

        train_base = build_dataset(cfg.data, cfg.data.train_split, is_training=True)
        val_base = build_dataset(cfg.data, cfg.data.val_split, is_training=False)
        self.num_classes = cfg.model.num_classes or num_classes_of(train_base)
        if not self.num_classes:
            raise ValueError("model.num_classes is not set and the dataset does not report its classes")

        model, self.description = build_model(cfg.model, self.num_classes)
        self.data_config = _data_config(cfg, model)
        self.description["data_config"] = {k: (list(v) if isinstance(v, tuple) else v)
                                           for k, v in self.data_config.items()}
        model.to(self.device)

        train_tf, eval_tf = build_transforms(cfg.data, self.data_config)
        for ds in (train_base, val_base):
            ds.transform = None  # SeededDataset applies the transforms
        self.sampler = GlobalBatchSampler(len(train_base), cfg.data.batch_size, info.rank, info.world_size, seed)
        accum = cfg.optim.accum_steps
        self.updates_per_epoch = self.sampler.num_batches // accum
        if self.updates_per_epoch == 0:
            raise ValueError(f"one epoch has {self.sampler.num_batches} micro-batches, fewer than optim.accum_steps="
                             f"{accum}: lower data.batch_size or accum_steps")
        self.sampler.num_batches = self.updates_per_epoch * accum  # the loop never reads the tail
        loader_kw = dict(num_workers=cfg.data.workers, persistent_workers=cfg.data.workers > 0,
                         pin_memory=cfg.data.pin_memory and self.device.type == "cuda",
                         generator=torch.Generator().manual_seed(seed))  # keeps the global RNG untouched
        self.train_loader = torch.utils.data.DataLoader(
            SeededDataset(train_base, train_tf, seed=seed), batch_size=cfg.data.batch_size, sampler=self.sampler,
            drop_last=True, **loader_kw)
        self.val_loader = torch.utils.data.DataLoader(
            SeededDataset(val_base, eval_tf, seed=seed, seeded=False),
            batch_size=cfg.data.eval_batch_size or cfg.data.batch_size,
            sampler=ShardSampler(len(val_base), info.rank, info.world_size), **loader_kw)

        self.global_batch = cfg.data.batch_size * info.world_size * accum
        self.lr = _resolve_lr(cfg, self.global_batch)
        self.optimizer = _make_optimizer(cfg, model, self.lr)
        from timm.scheduler import create_scheduler_v2
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=cfg.sched.sched, num_epochs=cfg.sched.epochs, warmup_epochs=cfg.sched.warmup_epochs,
            warmup_lr=cfg.sched.warmup_lr, min_lr=cfg.sched.min_lr, step_on_epochs=False,
            updates_per_epoch=self.updates_per_epoch)
        self.ema = None
        if cfg.ema.enabled:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(model, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup)
        self.raw_model = model
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel
            model = DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.model = model

        amp = cfg.train.amp is True or (cfg.train.amp == "auto" and self.device.type == "cuda")
        self.amp_dtype = torch.bfloat16 if cfg.train.amp_dtype == "bfloat16" else torch.float16
        self.amp = amp
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp and self.amp_dtype == torch.float16)
        self.mixup = build_mixup(cfg.data, self.num_classes)
        self.criterion = _criterion(cfg, self.mixup)

        self.manager = CheckpointManager(os.path.join(self.out, "checkpoints"), cfg.checkpoint.keep_last)
        self.metrics = MetricsLog(self.out, enabled=info.is_main)
        self.update, self.epoch, self.update_in_epoch = 0, 0, 0
        self.epoch_loss = [0.0, 0]  # running sum and count of this epoch's update losses
        self.best = {"val_top1": None, "epoch": None}

        resume = find_resume_dir(cfg.checkpoint.resume, self.manager)
        if resume is not None:
            ck = read_checkpoint(resume, info.rank)
            changed = config_changes(ck["state"]["config"], cfg)
            if changed and cfg.checkpoint.resume == "auto":
                raise ValueError(f"{self.out!r} holds a run whose config differs in {changed}: use another "
                                 f"train.output_dir, or resume on purpose with checkpoint.resume: <path>")
            if changed and info.is_main:
                _logger.warning("resuming %s with changed settings %s: the run is no longer reproducible",
                                resume, changed)
            msd = {k: v for k, v in ck["model"].items() if not k.startswith("ema.")}
            check_state_dict(msd, self.raw_model, what=f"checkpoint {resume!r}")
            self.raw_model.load_state_dict(msd)
            if self.ema is not None:
                esd = {k[4:]: v for k, v in ck["model"].items() if k.startswith("ema.")}
                if not esd:
                    raise ValueError(f"ema.enabled but checkpoint {resume!r} has no EMA weights")
                self.ema.module.load_state_dict(esd)
            st = ck["state"]
            optimizer_from_flat(self.optimizer, ck["optim"], st["optimizer"])
            if st.get("scaler"):
                self.scaler.load_state_dict(st["scaler"])
            self.update, self.epoch, self.update_in_epoch = st["update"], st["epoch"], st["update_in_epoch"]
            self.epoch_loss = list(st["epoch_loss"])
            self.best = st["best"]
            set_rng_state(ck["rng"])
            self.metrics.truncate(self.update)
            if info.is_main:
                _logger.info("resumed from %s (epoch %d, update %d)", resume, self.epoch, self.update)
        else:
            # per-rank streams: dropout/drop-path and Mixup differ between ranks, as with separate GPUs
            random.seed(seed + info.rank)
            np.random.seed(seed + info.rank)
            torch.manual_seed(seed + info.rank)
            self.metrics.truncate(0)
        self.resumed_from = resume
        if info.is_main:
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "config.yaml"), "w") as f:
                yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
            write_description(os.path.join(self.out, "model.json"), self.description)

    # -- helpers ------------------------------------------------------------------------------------
    def autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def save_checkpoint(self) -> None:
        info = self.info
        if info.is_main:
            self.manager.begin(self.update)
        barrier(info)
        if not info.is_main:
            self.manager.write_rank_rng(self.update, info.rank)
        barrier(info)
        if info.is_main:
            tensors = dict(self.raw_model.state_dict())
            if self.ema is not None:
                tensors.update({f"ema.{k}": v for k, v in self.ema.module.state_dict().items()})
            otensors, ometa = optimizer_to_flat(self.optimizer)
            state = {"update": self.update, "epoch": self.epoch, "update_in_epoch": self.update_in_epoch,
                     "epoch_loss": self.epoch_loss, "best": self.best, "optimizer": ometa,
                     "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                     "world_size": info.world_size, "global_batch": self.global_batch,
                     "model": self.description, "config": config_to_dict(self.cfg), "rng": rng_state()}
            self.manager.commit(self.update, tensors, otensors, state)
        barrier(info)

    def _mean_over_ranks(self, value: float) -> float:
        return all_reduce_sum([value], self.info, self.device)[0] / self.info.world_size

    # -- training -----------------------------------------------------------------------------------
    def train_epoch(self) -> None:
        from tqdm.auto import tqdm
        from timm.utils import dispatch_clip_grad

        cfg, accum = self.cfg, self.cfg.optim.accum_steps
        model = self.model
        model.train()
        self.sampler.set_epoch(self.epoch, start_batch=self.update_in_epoch * accum)
        batches = iter(self.train_loader)
        bar = tqdm(total=self.updates_per_epoch, initial=self.update_in_epoch, leave=False,
                   desc=f"epoch {self.epoch + 1}/{cfg.sched.epochs}",
                   disable=not (cfg.train.progress and self.info.is_main))
        window = [0.0, 0]
        while self.update_in_epoch < self.updates_per_epoch:
            self.scheduler.step_update(self.update)  # lr of this update: a function of the update count
            loss_sum = torch.zeros((), device=self.device)
            for micro in range(accum):
                x, y = next(batches)
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                if self.mixup is not None:
                    x, y = self.mixup(x, y)
                sync = micro == accum - 1 or not self.info.distributed
                with (contextlib.nullcontext() if sync else model.no_sync()):
                    with self.autocast():
                        loss = self.criterion(model(x), y)
                    self.scaler.scale(loss / accum).backward()
                loss_sum += loss.detach().float()
            if cfg.optim.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                dispatch_clip_grad(self.raw_model.parameters(), cfg.optim.clip_grad, mode=cfg.optim.clip_mode)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.update += 1
            self.update_in_epoch += 1
            if self.ema is not None:
                self.ema.update(self.raw_model, step=self.update)
            loss_val = loss_sum.item() / accum
            if not math.isfinite(loss_val):
                raise FloatingPointError(f"loss is {loss_val} at update {self.update}: lower optim.lr or enable "
                                         f"optim.clip_grad")
            self.epoch_loss[0] += loss_val
            self.epoch_loss[1] += 1
            window[0] += loss_val
            window[1] += 1
            bar.update(1)
            if self.update % cfg.train.log_every == 0:
                mean = self._mean_over_ranks(window[0] / window[1])
                lr = max(g["lr"] for g in self.optimizer.param_groups)
                self.metrics.log({"kind": "step", "update": self.update, "epoch": self.epoch,
                                  "epoch_float": self.epoch + self.update_in_epoch / self.updates_per_epoch,
                                  "train_loss": mean, "lr": lr})
                bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
                window = [0.0, 0]
            if cfg.train.debug_crash_at_update is not None and self.update == cfg.train.debug_crash_at_update:
                bar.close()
                raise SimulatedCrash(f"simulated crash after update {self.update} (train.debug_crash_at_update)")
            every = cfg.checkpoint.every_updates
            if every and self.update % every == 0 and self.update_in_epoch < self.updates_per_epoch:
                self.save_checkpoint()
        bar.close()

    def end_epoch(self) -> dict:
        cfg = self.cfg
        rec = {"kind": "epoch", "epoch": self.epoch, "update": self.update,
               "train_loss": self._mean_over_ranks(self.epoch_loss[0] / max(self.epoch_loss[1], 1)),
               "lr": max(g["lr"] for g in self.optimizer.param_groups)}
        last = self.epoch + 1 == cfg.sched.epochs
        if (self.epoch + 1) % cfg.train.eval_every == 0 or last:
            rec.update(evaluate(self.model, self.val_loader, self.device, self.autocast, self.info, self.num_classes))
            if self.ema is not None:
                ema = evaluate(self.ema.module, self.val_loader, self.device, self.autocast, self.info,
                               self.num_classes)
                rec.update({f"ema_{k}": v for k, v in ema.items()})
            if "val_top1" in rec and (self.best["val_top1"] is None or rec["val_top1"] > self.best["val_top1"]):
                self.best = {"val_top1": rec["val_top1"], "epoch": self.epoch}
        if self.probe_fn is not None and ((self.epoch + 1) % cfg.probe.every == 0 or last):
            if self.info.is_main:
                rec.update(run_probe(self.probe_fn, self.raw_model, cfg.probe.options))
            barrier(self.info)
        self.metrics.log(rec)
        self.epoch += 1
        self.update_in_epoch = 0
        self.epoch_loss = [0.0, 0]
        self.save_checkpoint()
        return rec

    def fit(self) -> dict:
        cfg, info = self.cfg, self.info
        last = {}
        t0 = time.time()
        while self.epoch < cfg.sched.epochs:
            start = time.time()
            self.train_epoch()
            last = self.end_epoch()
            if info.is_main:
                _logger.info("epoch %d/%d: %s (%.1fs)", self.epoch, cfg.sched.epochs,
                             {k: round(v, 4) for k, v in last.items() if isinstance(v, float)}, time.time() - start)
        out = {**{k: v for k, v in last.items() if k not in ("kind", "epoch")}, "update": self.update,
               "epochs_done": self.epoch, "best_val_top1": self.best["val_top1"], "output_dir": self.out,
               "time_s": time.time() - t0}
        if info.is_main:
            save_tensors_atomic(os.path.join(self.out, "model.safetensors"), self.raw_model.state_dict(),
                                {"format": "visionpe-model"})
            if self.ema is not None:
                save_tensors_atomic(os.path.join(self.out, "model_ema.safetensors"), self.ema.module.state_dict(),
                                    {"format": "visionpe-model"})
            if cfg.train.plot:
                plot_curves(self.metrics.records(), os.path.join(self.out, "curves.png"))
        barrier(info)
        return out
