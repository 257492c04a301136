"""The fine-tuning loop: timm data/optim/scheduler/EMA pieces, DDP, AMP, accumulation, exact resume.

Exact resume rests on four things: seeded per-sample augmentation and a resumable global-batch sampler
(``data.py``), a schedule that is a pure function of the update count (timm's ``step_update``),
checkpoints only at update boundaries, and restoring every RNG stream (Python, NumPy for Mixup, torch for
dropout/drop-path) together with model, EMA, optimizer, scheduler and AMP-scaler state (``checkpoint.py``).

Everything that can be checked without training (data folders and class lists, head size, the run folder and
the checkpoint to continue from, the config of that checkpoint) is checked before anything is written.
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

from .checkpoint import (CheckpointManager, generator_states, load_optimizer_state, optimizer_state, read_checkpoint,
                         save_tensors_atomic, set_generator_states, set_rng_state)
from .config import FinetuneConfig, config_changes, config_to_dict
from .data import (build_dataset, build_mixup, build_transforms, check_classes, check_labels, class_names_of,
                   GlobalBatchSampler, ignore_sigint, SeededDataset, ShardSampler)
from .distributed import DistInfo, all_reduce_sum, barrier, init_distributed, on_rank0, shutdown_distributed
from .evaluation import evaluate
from .metrics import format_epoch_line, MetricsLog, plot_curves, TensorBoardLog
from .model import build_model, write_description
from .probe import load_probe, run_probe
from .report import startup_summary
from .rundir import BEST_WEIGHTS, adopt_best_weights, apply_moves, plan_run
from .signals import GracefulStop, signal_name

__all__ = ["run", "SimulatedCrash"]

_logger = logging.getLogger(__name__)


class SimulatedCrash(RuntimeError):
    """Raised by ``train.debug_crash_at_update`` to test that a killed run resumes exactly."""


# -- pieces ------------------------------------------------------------------------------------------
def _resolve_lr(cfg: FinetuneConfig, global_batch: int) -> float:
    if cfg.optim.lr is not None:
        return cfg.optim.lr
    return cfg.optim.lr_base * global_batch / cfg.optim.lr_base_size


def _check_optimizer_name(opt: str) -> None:
    """``ValueError`` naming the closest timm optimizers for a name timm does not know (read as timm reads it:
    the part after the last ``_`` names the optimizer, e.g. ``lookahead_adamw``)."""
    import difflib

    from timm.optim import list_optimizers
    known = list_optimizers()
    base = opt.lower().split("_")[-1]
    if base not in known:
        close = difflib.get_close_matches(base, known, n=4, cutoff=0.6)
        raise ValueError(f"optim.opt {opt!r} is not a timm optimizer"
                         + (f"; did you mean {', '.join(close)}?" if close else "")
                         + " (timm.optim.list_optimizers() names them)")


def _make_optimizer(cfg: FinetuneConfig, model, lr: float):
    from timm.optim import create_optimizer_v2
    _check_optimizer_name(cfg.optim.opt)
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


def _tensorboard_names(rec: dict) -> dict:
    """Epoch record -> TensorBoard tags: ``train/epoch_loss``, ``eval/top1``, ``ema_eval/top1``, probe keys as is."""
    tags = {}
    for k, v in rec.items():
        if k == "train_loss":
            tags["train/epoch_loss"] = v
        elif k.startswith("ema_eval_"):
            tags["ema_eval/" + k[len("ema_eval_"):]] = v
        elif k.startswith("eval_"):
            tags["eval/" + k[len("eval_"):]] = v
        elif k not in ("kind", "epoch", "update", "lr"):
            tags[k] = v
    return tags


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- the run -----------------------------------------------------------------------------------------
def run(cfg: FinetuneConfig) -> dict:
    """Fine-tune as the config says; returns the final metrics and output paths.

    Under ``torchrun`` each process calls this; the process group comes from the environment. After SIGTERM or
    SIGINT the run writes a checkpoint at the next update boundary and returns early with ``"stopped"`` set to
    the signal's name.
    """
    info = init_distributed(cfg.train.device)
    try:
        return _Run(cfg, info).fit()
    finally:
        shutdown_distributed(info)


class _Run:
    def __init__(self, cfg: FinetuneConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.device = info.device
        self.probe_fn = load_probe() if cfg.probe.every > 0 else None
        TensorBoardLog.check(cfg.train.tensorboard)
        _seed_all(cfg.train.seed)  # identical model init on every rank; per-rank streams afterwards
        self._build_data()
        self._build_model()
        self._build_training()
        self._resume_or_start()

    # -- construction (no files written) --------------------------------------------------------------
    def _build_data(self) -> None:
        cfg = self.cfg
        self.train_base = build_dataset(cfg.data, cfg.data.train_split, is_training=True)
        self.val_base = build_dataset(cfg.data, cfg.data.val_split, is_training=False)
        root = cfg.data.root
        names, val_names = class_names_of(self.train_base), class_names_of(self.val_base)
        check_classes(names, val_names, f"the training data ({root}, split {cfg.data.train_split!r})",
                      f"the evaluation data ({root}, split {cfg.data.val_split!r})")
        self.class_names = names
        n_data = len(names) if names is not None else None
        if cfg.model.num_classes is not None and n_data is not None and cfg.model.num_classes != n_data:
            raise ValueError(f"model.num_classes is {cfg.model.num_classes}, but the training data ({root}) has "
                             f"{n_data} classes; leave model.num_classes unset to size the head from the data")
        self.num_classes = cfg.model.num_classes or n_data
        if not self.num_classes:
            raise ValueError("model.num_classes is not set and the dataset does not report its classes")
        check_labels(self.train_base, self.num_classes, f"the training data ({root})")
        check_labels(self.val_base, self.num_classes, f"the evaluation data ({root})")

    def _build_model(self) -> None:
        cfg = self.cfg
        model, self.description = build_model(cfg.model, self.num_classes)
        head = getattr(model, "num_classes", self.num_classes)
        if head != self.num_classes:
            raise ValueError(f"the model's head has {head} classes (model.keep_head with {cfg.model.pretrained_file!r}) "
                             f"and the training data has {self.num_classes}: set model.keep_head: false for a new head")
        self.data_config = _data_config(cfg, model)
        self.description["data_config"] = {k: (list(v) if isinstance(v, tuple) else v)
                                           for k, v in self.data_config.items()}
        self.description["classes"] = self.class_names
        self.raw_model = model.to(self.device)

    def _build_training(self) -> None:
        cfg, info = self.cfg, self.info
        seed = cfg.train.seed
        train_tf, eval_tf = build_transforms(cfg.data, self.data_config)
        for ds in (self.train_base, self.val_base):
            ds.transform = None  # SeededDataset applies the transforms
        self.sampler = GlobalBatchSampler(len(self.train_base), cfg.data.batch_size, info.rank, info.world_size, seed)
        accum = cfg.optim.accum_steps
        self.updates_per_epoch = self.sampler.num_batches // accum
        if self.updates_per_epoch == 0:
            raise ValueError(f"one epoch has {self.sampler.num_batches} micro-batches, fewer than optim.accum_steps="
                             f"{accum}: lower data.batch_size or accum_steps")
        self.sampler.num_batches = self.updates_per_epoch * accum  # the loop never reads the tail
        loader_kw = dict(num_workers=cfg.data.workers, persistent_workers=cfg.data.workers > 0,
                         pin_memory=cfg.data.pin_memory and self.device.type == "cuda",
                         worker_init_fn=ignore_sigint if cfg.data.workers > 0 else None,
                         generator=torch.Generator().manual_seed(seed))  # keeps the global RNG untouched
        self.train_loader = torch.utils.data.DataLoader(
            SeededDataset(self.train_base, train_tf, seed=seed), batch_size=cfg.data.batch_size,
            sampler=self.sampler, drop_last=True, **loader_kw)
        self.val_loader = torch.utils.data.DataLoader(
            SeededDataset(self.val_base, eval_tf, seed=seed, seeded=False),
            batch_size=cfg.data.eval_batch_size or cfg.data.batch_size,
            sampler=ShardSampler(len(self.val_base), info.rank, info.world_size), **loader_kw)

        self.global_batch = cfg.data.batch_size * info.world_size * accum
        self.lr = _resolve_lr(cfg, self.global_batch)
        self.optimizer = _make_optimizer(cfg, self.raw_model, self.lr)
        from timm.scheduler import create_scheduler_v2
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=cfg.sched.sched, num_epochs=cfg.sched.epochs, warmup_epochs=cfg.sched.warmup_epochs,
            warmup_lr=cfg.sched.warmup_lr, min_lr=cfg.sched.min_lr, step_on_epochs=False,
            updates_per_epoch=self.updates_per_epoch)
        self.ema = None
        if cfg.ema.enabled:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.raw_model, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup)
        model = self.raw_model
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel
            model = DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.model = model
        self.amp = cfg.train.amp is True or (cfg.train.amp == "auto" and self.device.type == "cuda")
        self.amp_dtype = torch.bfloat16 if cfg.train.amp_dtype == "bfloat16" else torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp and self.amp_dtype == torch.float16)
        self.mixup = build_mixup(cfg.data, self.num_classes)
        self.criterion = _criterion(cfg, self.mixup)

    # -- run folder and resume -------------------------------------------------------------------------
    def _check_resumable(self, ck: dict, path: str) -> None:
        cfg, meta = self.cfg, ck["meta"]
        check_classes(meta.get("classes"), self.class_names, f"checkpoint {path}", f"the training data ({cfg.data.root})")
        if meta["global_batch"] != self.global_batch:
            raise ValueError(f"checkpoint {path} was trained with a global batch of {meta['global_batch']}, this run "
                             f"has {self.global_batch} ({cfg.data.batch_size} x {self.info.world_size} processes x "
                             f"{cfg.optim.accum_steps}): keep batch x processes x accum_steps equal to resume")
        changed = config_changes(meta["config"], cfg)
        named = cfg.checkpoint.resume not in ("latest", "auto")
        if changed and not named:
            raise ValueError(f"the run in {self.out!r} was started with other settings ({', '.join(changed)}): resume "
                             f"with the same recipe, or name the checkpoint (--resume {path}) to continue on purpose")
        if changed and self.info.is_main:
            _logger.warning("resuming %s with changed settings %s: the run is no longer reproducible", path, changed)

    def _resume_or_start(self) -> None:
        cfg, info = self.cfg, self.info
        plan = on_rank0(lambda: plan_run(cfg), info)
        self.out = plan.out
        self.manager = CheckpointManager(os.path.join(self.out, "checkpoints"), cfg.checkpoint.keep_last)
        # rank 0 validated it (sizes and hashes) while planning
        ck = read_checkpoint(plan.resume, info.rank, validate=False) if plan.resume else None
        if ck is not None:
            self._check_resumable(ck, plan.resume)
        # every check passed: now the disk may change
        if info.is_main:
            apply_moves(plan)
            os.makedirs(self.out, exist_ok=True)
        barrier(info)
        self.update, self.epoch, self.update_in_epoch = 0, 0, 0
        self.epoch_loss = [0.0, 0]  # running sum and count of this epoch's update losses
        self.best = {"eval_top1": None, "epoch": None}
        self.saved_at = None
        if ck is not None:
            self._restore(ck, plan.resume)
            if info.is_main:
                adopt_best_weights(plan, self.best["epoch"])
        else:
            # per-rank streams: dropout/drop-path and Mixup differ between ranks, as with separate GPUs
            _seed_all(cfg.train.seed + info.rank)
        self.resumed_from = plan.resume
        self.metrics = MetricsLog(self.out, enabled=info.is_main)
        self.metrics.truncate(self.update, source=plan.copy_metrics_from)
        self.tb = TensorBoardLog(self.out, cfg.train.tensorboard, purge_step=self.update + 1 if ck else None,
                                 enabled=info.is_main)
        if info.is_main:
            with open(os.path.join(self.out, "config.yaml"), "w") as f:
                yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
            write_description(os.path.join(self.out, "model.json"), self.description)
            for line in startup_summary(self):
                _logger.info(line)

    def _restore(self, ck: dict, path: str) -> None:
        from visionpe.models.swap import check_state_dict
        meta, st, info = ck["meta"], ck["training"], self.info
        check_state_dict(ck["model"], self.raw_model, what=f"checkpoint {path!r}")
        self.raw_model.load_state_dict(ck["model"])
        if self.ema is not None:
            if ck["model_ema"] is None:
                raise ValueError(f"ema.enabled but checkpoint {path!r} has no EMA weights")
            self.ema.module.load_state_dict(ck["model_ema"])
            set_generator_states(self.ema, st.get("ema_generators", {}))
        load_optimizer_state(self.raw_model, self.optimizer, st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        if st.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(st["scaler"])
        self.update, self.epoch, self.update_in_epoch = meta["update"], meta["epoch"], meta["update_in_epoch"]
        self.epoch_loss = list(meta["epoch_loss"])
        self.best = meta["best"]
        self.saved_at = self.update
        if meta["world_size"] == info.world_size and ck["rank"] is not None:
            set_rng_state(ck["rank"]["rng"])
            self.epoch_loss = list(ck["rank"]["epoch_loss"])
        else:  # same global batches and optimizer state; the per-process random draws start anew
            _seed_all(self.cfg.train.seed + 7919 * self.update + info.rank)
            if info.is_main:
                _logger.warning("checkpoint %s was written by %d process(es), this run has %d: dropout, drop-path "
                                "and Mixup draws differ from an uninterrupted run from here on", path,
                                meta["world_size"], info.world_size)

    # -- helpers ------------------------------------------------------------------------------------
    def autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def save_checkpoint(self) -> None:
        """A checkpoint of the current update (all ranks take part; rank 0 writes the shared files)."""
        if self.saved_at == self.update:
            return
        info = self.info
        if info.is_main:
            self.manager.begin(self.update)
        barrier(info)
        local = {"epoch_loss": list(self.epoch_loss)}  # this process's running sum (its own micro-batches)
        if not info.is_main:
            self.manager.write_rank_state(self.update, info.rank, local)
        barrier(info)
        if info.is_main:
            training = {"optimizer": optimizer_state(self.raw_model, self.optimizer),
                        "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                        "ema_generators": generator_states(self.ema) if self.ema is not None else {}}
            meta = {"update": self.update, "epoch": self.epoch, "update_in_epoch": self.update_in_epoch,
                    "epoch_loss": self.epoch_loss, "best": self.best, "world_size": info.world_size,
                    "global_batch": self.global_batch, "classes": self.class_names, "model": self.description,
                    "config": config_to_dict(self.cfg), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
            self.manager.commit(self.update, self.raw_model.state_dict(),
                                self.ema.module.state_dict() if self.ema is not None else None, training, meta, local)
        barrier(info)
        self.saved_at = self.update

    def _mean_over_ranks(self, value: float) -> float:
        return all_reduce_sum([value], self.info, self.device)[0] / self.info.world_size

    def _lr(self) -> float:
        return max(g["lr"] for g in self.optimizer.param_groups)

    def _debug_pause(self, stop: GracefulStop) -> None:
        if self.cfg.train.debug_pause_at_update == self.update:
            deadline = time.time() + 120
            while stop.signum is None and time.time() < deadline:
                time.sleep(0.01)

    # -- training -----------------------------------------------------------------------------------
    def train_epoch(self, stop: GracefulStop):
        """Train to the end of the epoch; returns the signal number when a stop was requested (after saving)."""
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
        try:
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
                    lr = self._lr()
                    rec = {"kind": "step", "update": self.update, "epoch": self.epoch + 1,
                           "epoch_float": self.epoch + self.update_in_epoch / self.updates_per_epoch,
                           "train_loss": mean, "lr": lr}
                    self.metrics.log(rec)
                    self.tb.scalars({"train/loss": mean, "train/lr": lr}, self.update)
                    bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.3g}")
                    window = [0.0, 0]
                if cfg.train.debug_crash_at_update is not None and self.update == cfg.train.debug_crash_at_update:
                    raise SimulatedCrash(f"simulated crash after update {self.update} (train.debug_crash_at_update)")
                self._debug_pause(stop)
                signum = stop.requested(self.info, self.device)
                if signum is not None:
                    self.save_checkpoint()
                    return signum
                every = cfg.checkpoint.every_updates
                if every and self.update % every == 0 and self.update_in_epoch < self.updates_per_epoch:
                    self.save_checkpoint()
        finally:
            bar.close()
        return None

    def end_epoch(self) -> dict:
        cfg = self.cfg
        rec = {"kind": "epoch", "epoch": self.epoch + 1, "update": self.update,
               "train_loss": self._mean_over_ranks(self.epoch_loss[0] / max(self.epoch_loss[1], 1))}
        last = self.epoch + 1 == cfg.sched.epochs
        improved = False
        if (self.epoch + 1) % cfg.train.eval_every == 0 or last:
            ev = evaluate(self.model, self.val_loader, self.device, self.autocast, self.info, self.num_classes)
            rec.update({f"eval_{k}": v for k, v in ev.items()})
            if self.ema is not None:
                ema = evaluate(self.ema.module, self.val_loader, self.device, self.autocast, self.info, self.num_classes)
                rec.update({f"ema_eval_{k}": v for k, v in ema.items()})
            if "eval_top1" in rec and (self.best["eval_top1"] is None or rec["eval_top1"] > self.best["eval_top1"]):
                self.best = {"eval_top1": rec["eval_top1"], "epoch": self.epoch + 1}
                improved = True
        rec["lr"] = self._lr()
        if self.probe_fn is not None and ((self.epoch + 1) % cfg.probe.every == 0 or last):
            if self.info.is_main:
                rec.update(run_probe(self.probe_fn, self.raw_model, cfg.probe.options))
            barrier(self.info)
        self.metrics.log(rec)
        self.tb.scalars(_tensorboard_names(rec), self.update)
        self.tb.scalars({"epoch": rec["epoch"]}, self.update)
        self.tb.flush()
        if improved and self.info.is_main:
            save_tensors_atomic(os.path.join(self.out, BEST_WEIGHTS), self.raw_model.state_dict(),
                                {"format": "pt", "epoch": str(self.best["epoch"]),
                                 "eval_top1": repr(float(self.best["eval_top1"]))})
        self.epoch += 1
        self.update_in_epoch = 0
        self.epoch_loss = [0.0, 0]
        self.save_checkpoint()
        return rec

    def _finish(self, last: dict, stopped, t0: float) -> dict:
        cfg, info = self.cfg, self.info
        out = {**{k: v for k, v in last.items() if k not in ("kind", "epoch")}, "update": self.update,
               "epochs_done": self.epoch, "best_eval_top1": self.best["eval_top1"], "best_epoch": self.best["epoch"],
               "output_dir": self.out, "checkpoint": self.manager.path_for(self.update),
               "stopped": signal_name(stopped) if stopped else None, "time_s": time.time() - t0}
        if info.is_main:
            if not stopped:
                save_tensors_atomic(os.path.join(self.out, "model.safetensors"), self.raw_model.state_dict(),
                                    {"format": "pt"})
                if self.ema is not None:
                    save_tensors_atomic(os.path.join(self.out, "model_ema.safetensors"), self.ema.module.state_dict(),
                                        {"format": "pt"})
            if cfg.train.plot:
                plot_curves(self.metrics.records(), os.path.join(self.out, "curves.png"))
        self.tb.close()
        barrier(info)
        return out

    def fit(self) -> dict:
        cfg, info = self.cfg, self.info
        last, stopped = {}, None
        t0 = time.time()
        try:
            with GracefulStop() as stop:
                while self.epoch < cfg.sched.epochs and stopped is None:
                    start = time.time()
                    stopped = self.train_epoch(stop)
                    if stopped is not None:
                        break
                    last = self.end_epoch()
                    if info.is_main:
                        _logger.info(format_epoch_line(last, cfg.sched.epochs, time.time() - start))
                    stopped = stop.requested(info, self.device)
        finally:
            self.tb.close()
        if stopped is not None and info.is_main:
            _logger.warning("stopped by %s after update %d (epoch %d, update %d of %d); checkpoint %s; continue "
                            "with --resume %s", signal_name(stopped), self.update, self.epoch + 1, self.update_in_epoch,
                            self.updates_per_epoch, self.manager.path_for(self.update), self.out)
        return self._finish(last, stopped, t0)
