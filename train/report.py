"""The start-up summary a run prints before its first step (what timm users look for in the first lines)."""
from __future__ import annotations

__all__ = ["startup_summary", "count_params"]


def count_params(model) -> tuple:
    """``(all, trainable)`` parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def startup_summary(run) -> list:
    """Lines describing run folder, model, data, optimisation and outputs of a ``_Run``."""
    cfg, info = run.cfg, run.info
    total, trainable = count_params(run.raw_model)
    pe = run.description.get("pe") or cfg.model.pe
    pe_name = pe.get("name") if isinstance(pe, dict) else pe
    img = run.data_config["input_size"][-2:]
    if run.resumed_from:
        start = f"resumed from {run.resumed_from} (epoch {run.epoch + 1}, update {run.update})"
    else:
        start = "new run"
    lr_rule = ("absolute" if cfg.optim.lr is not None
               else f"{cfg.optim.lr_base:g} x {run.global_batch} / {cfg.optim.lr_base_size}")
    tb = run.tb
    tb_note = (f"TensorBoard in {tb.path}" if tb.writer is not None else
               "TensorBoard off (pip install 'visionpe[tensorboard]')" if tb.missing else "TensorBoard off")
    every = cfg.checkpoint.every_updates
    cls = run.class_names or []
    shown = ", ".join(cls[:6]) + (", ..." if len(cls) > 6 else "")
    return [
        f"run folder {run.out} ({start})",
        f"  model      {cfg.model.name}, pe {pe_name or 'the model default'}, {_millions(total)} parameters "
        f"({_millions(trainable)} trainable), input {img[0]}x{img[1]}, {run.num_classes}-way head"
        + (f", from {cfg.model.pretrained_file}" if cfg.model.pretrained_file else ""),
        f"  data       {len(run.train_base)} train / {len(run.val_base)} eval images, {len(cls) or run.num_classes} "
        f"classes ({shown}) from {cfg.data.root}",
        f"  batch      {cfg.data.batch_size} x {info.world_size} process(es) x {cfg.optim.accum_steps} accumulation "
        f"= {run.global_batch}; {run.updates_per_epoch} updates per epoch, {cfg.sched.epochs} epochs",
        f"  optimizer  {cfg.optim.opt}, lr {run.lr:.3g} ({lr_rule}), weight decay {cfg.optim.weight_decay:g}, "
        f"{cfg.sched.sched} schedule, {cfg.sched.warmup_epochs:g} warmup epochs, min lr {cfg.sched.min_lr:.3g}",
        f"  device     {run.device}, AMP {'on (' + cfg.train.amp_dtype + ')' if run.amp else 'off'}, "
        f"EMA {'on (decay ' + format(cfg.ema.decay, 'g') + ')' if run.ema is not None else 'off'}, seed {cfg.train.seed}",
        f"  outputs    summary.csv, metrics.jsonl, {tb_note}; checkpoints at epoch ends"
        + (f" and every {every} updates" if every else "") + f", newest {cfg.checkpoint.keep_last} kept; "
        f"model_best.safetensors by eval top-1",
    ]
