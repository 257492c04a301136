"""Fine-tuning configuration: YAML sections mapped onto dataclasses, unknown keys rejected by name.

A recipe is a YAML file with the sections below (every key optional except ``data.root``); command-line
``--set section.key=value`` overrides are parsed as YAML values. See ``configs/finetune_*.yaml``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = ["ModelConfig", "DataConfig", "OptimConfig", "SchedConfig", "EmaConfig", "CheckpointConfig",
           "ProbeConfig", "TrainConfig", "FinetuneConfig", "load_config", "config_from_dict", "config_to_dict",
           "apply_overrides", "config_changes"]


@dataclass
class ModelConfig:
    """Which network, its encoder and its starting weights."""
    name: str = "vpe_vit_small_patch16_224"  #: any timm name; vpe_vit_* take ``pe`` at creation
    pe: Any = None  #: encoder name or ``{name: ..., **options}``; None keeps the model's own
    pretrained_file: Optional[str] = None  #: local checkpoint, loaded via pretrained_cfg_overlay(file=...)
    keep_head: bool = False  #: keep the checkpoint's classifier (same classes) instead of a new one
    num_classes: Optional[int] = None  #: None: the number of classes in the training set
    img_size: Optional[Union[int, list]] = None  #: training resolution (None: the model's default)
    drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    kwargs: dict = field(default_factory=dict)  #: more ``timm.create_model`` arguments


@dataclass
class DataConfig:
    """Dataset, timm transforms and Mixup/CutMix."""
    root: Optional[str] = None  #: dataset root (ImageFolder: ``root/<train_split>/<class>/*.png``)
    dataset: str = ""  #: timm dataset name; "" or "folder" = image folders, e.g. "torch/cifar100"
    train_split: str = "train"
    val_split: str = "val"
    download: bool = False  #: for torch/* datasets
    batch_size: int = 128  #: per process and micro-batch (global batch = this x processes x accum_steps)
    eval_batch_size: Optional[int] = None
    workers: int = 4
    pin_memory: bool = True
    no_aug: bool = False
    scale: list = field(default_factory=lambda: [0.08, 1.0])
    ratio: list = field(default_factory=lambda: [3.0 / 4.0, 4.0 / 3.0])
    hflip: float = 0.5
    color_jitter: float = 0.4
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25
    re_mode: str = "pixel"
    re_count: int = 1
    interpolation: Optional[str] = None  #: None: the model's pretrained cfg (bicubic for ViTs)
    crop_pct: Optional[float] = None
    mean: Optional[list] = None
    std: Optional[list] = None
    mixup: float = 0.8  #: Mixup alpha (0 = off)
    cutmix: float = 1.0  #: CutMix alpha (0 = off)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    label_smoothing: float = 0.1


@dataclass
class OptimConfig:
    """timm ``create_optimizer_v2`` arguments, gradient clipping and accumulation."""
    opt: str = "adamw"
    lr: Optional[float] = None  #: absolute LR; None: lr_base * global_batch / lr_base_size (DeiT rule)
    lr_base: float = 5e-4
    lr_base_size: int = 512
    weight_decay: float = 0.05
    momentum: float = 0.9
    betas: Optional[list] = None
    eps: Optional[float] = None
    layer_decay: Optional[float] = None  #: layer-wise LR decay (PE params grouped by model.group_matcher)
    clip_grad: Optional[float] = None
    clip_mode: str = "norm"
    accum_steps: int = 1


@dataclass
class SchedConfig:
    """timm ``create_scheduler_v2`` arguments; the schedule advances per optimizer update."""
    sched: str = "cosine"
    epochs: int = 300
    warmup_epochs: float = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.99996
    warmup: bool = False


@dataclass
class CheckpointConfig:
    """When to save, how many to keep, what to continue from (see :mod:`visionpe.train.rundir`)."""
    every_updates: Optional[int] = None  #: also save inside epochs (always at every epoch end and on SIGTERM)
    keep_last: int = 2  #: newest checkpoints kept (the one just written always is)
    #: null: a new run (a used folder is refused); "latest" (--resume): the run folder's newest valid
    #: checkpoint; "auto": that when there is one, else a new run; or a checkpoint / run folder path
    resume: Optional[str] = None
    fresh: bool = False  #: start over in a used run folder, moving its files to <folder>.old-<time> (--fresh)


@dataclass
class ProbeConfig:
    """Three-Cell/PESI probe every ``every`` epochs (0 = off); other keys go to ``threecell_probe``."""
    every: int = 0
    options: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    output_dir: Optional[str] = None  #: the run folder; None: <output_root>/<date>-<time>-<model>-<pe>
    output_root: str = "runs/finetune"
    seed: int = 0
    device: str = "auto"  #: "auto", "cpu", "cuda", "cuda:1"
    amp: Union[bool, str] = "auto"  #: "auto" = on for CUDA
    amp_dtype: str = "bfloat16"  #: or "float16" (with a gradient scaler)
    loss: str = "ce"  #: "ce" (soft-target/label-smoothed cross-entropy) or "bce" (DeiT-III / RoPE-ViT)
    log_every: int = 50  #: updates between step records in metrics.jsonl
    eval_every: int = 1  #: epochs
    progress: bool = True
    plot: bool = True  #: curves.png at the end
    tensorboard: Union[bool, str] = "auto"  #: event files in <run>/tensorboard; "auto": when installed
    debug_crash_at_update: Optional[int] = None  #: raise SimulatedCrash after this update (resume tests)
    debug_pause_at_update: Optional[int] = None  #: after this update, wait (<= 120 s) for SIGTERM/SIGINT (tests)


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# -- dict <-> dataclass ------------------------------------------------------------------------------
def _coerce(value, hint, key: str):
    """Check/convert one value against its annotation (YAML reads ``5e-4`` as a string: accept it)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {hint}")
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be true or false; got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be an integer; got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key} must be a number; got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key} must be a string; got {value!r}")
    if hint in (list, dict) or origin in (list, dict):
        base = origin or hint
        if isinstance(value, base) or (base is list and isinstance(value, tuple)):
            return list(value) if base is list else dict(value)
        raise ValueError(f"{key} must be a {base.__name__}; got {value!r}")
    return value


def _build(cls, data, path: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config section {path or '<top level>'!r} must be a mapping; got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    data = dict(data)
    if cls is ProbeConfig:  # free-form: everything but `every` goes to the probe function
        every = data.pop("every", 0)
        opts = data.pop("options", {}) or {}
        return ProbeConfig(every=_coerce(every, int, f"{path}.every"), options={**opts, **data})
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"section {path!r}" if path else "the top level"
        raise ValueError(f"unknown config key(s) {', '.join(repr(f'{path}.{k}' if path else k) for k in unknown)}; "
                         f"{where} accepts: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        key = f"{path}.{name}" if path else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, data[name], key)
        else:
            kwargs[name] = _coerce(data[name], hint, key)
    return cls(**kwargs)


def config_from_dict(data: dict) -> FinetuneConfig:
    """Nested dict -> :class:`FinetuneConfig`; unknown keys raise ``ValueError`` naming them."""
    cfg = _build(FinetuneConfig, data, "")
    validate(cfg)
    return cfg


def config_to_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    probe = d.pop("probe")
    d["probe"] = {"every": probe["every"], **probe["options"]}
    return d


def apply_overrides(data: dict, overrides) -> dict:
    """``["optim.lr=1e-3", "model.pe=rope_mixed"]`` -> nested updates (values parsed as YAML)."""
    data = dict(data or {})
    for item in overrides or ():
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for i, p in enumerate(parts[:-1]):
            have = node.get(p)
            if isinstance(have, str) and parts[:i + 1] == ["model", "pe"]:
                have = {"name": have}  # an encoder given by name gets an option: {name, option}
            elif have is not None and not isinstance(have, dict):
                where = ".".join(parts[:i + 1])
                raise ValueError(f"override {item!r}: {where} is {have!r}, not a section with keys; set it whole "
                                 f"(--set {where}=...)")
            node[p] = dict(have or {})
            node = node[p]
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: Optional[str] = None, overrides=()) -> FinetuneConfig:
    """Read a YAML recipe (optional: a file or a packaged recipe name such as ``finetune_digits_cpu``), apply
    ``section.key=value`` overrides, validate."""
    from visionpe.recipes import recipe_path
    data = {}
    if path is not None:
        try:
            path = recipe_path(path, prefix="finetune")
        except FileNotFoundError:
            from visionpe.recipes import list_recipes
            raise ValueError(f"config file {str(path)!r} does not exist and is no packaged recipe; packaged: "
                             f"{', '.join(list_recipes('finetune'))}") from None
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path!r} must hold a mapping of sections; got {type(data).__name__}")
    return config_from_dict(apply_overrides(data, overrides))


def validate(cfg: FinetuneConfig) -> None:
    """Value checks that need no data or model (those are checked when the run builds them)."""
    def positive(v, key, allow_none=False):
        if v is None and allow_none:
            return
        if v is None or v <= 0:
            raise ValueError(f"{key} must be > 0; got {v!r}")
    positive(cfg.data.batch_size, "data.batch_size")
    positive(cfg.data.eval_batch_size, "data.eval_batch_size", allow_none=True)
    positive(cfg.optim.accum_steps, "optim.accum_steps")
    positive(cfg.sched.epochs, "sched.epochs")
    positive(cfg.optim.lr, "optim.lr", allow_none=True)
    positive(cfg.checkpoint.every_updates, "checkpoint.every_updates", allow_none=True)
    positive(cfg.train.log_every, "train.log_every")
    positive(cfg.train.eval_every, "train.eval_every")
    if cfg.data.workers < 0:
        raise ValueError(f"data.workers must be >= 0; got {cfg.data.workers}")
    if cfg.probe.every < 0:
        raise ValueError(f"probe.every must be >= 0 (0 = off); got {cfg.probe.every}")
    if cfg.checkpoint.keep_last < 1:
        raise ValueError(f"checkpoint.keep_last must be >= 1; got {cfg.checkpoint.keep_last}")
    if cfg.train.amp_dtype not in ("bfloat16", "float16"):
        raise ValueError(f"train.amp_dtype must be 'bfloat16' or 'float16'; got {cfg.train.amp_dtype!r}")
    if cfg.train.loss not in ("ce", "bce"):
        raise ValueError(f"train.loss must be 'ce' or 'bce'; got {cfg.train.loss!r}")
    if cfg.train.amp not in (True, False, "auto"):
        raise ValueError(f"train.amp must be true, false or 'auto'; got {cfg.train.amp!r}")
    if cfg.train.tensorboard not in (True, False, "auto"):
        raise ValueError(f"train.tensorboard must be true, false or 'auto'; got {cfg.train.tensorboard!r}")
    if cfg.checkpoint.resume == "":
        raise ValueError("checkpoint.resume is empty: use null (a new run), 'latest', 'auto' or a path")
    if (cfg.data.mixup > 0 or cfg.data.cutmix > 0) and cfg.data.batch_size % 2:
        raise ValueError(f"Mixup/CutMix need an even data.batch_size; got {cfg.data.batch_size}")
    img = cfg.model.img_size
    if img is not None and not (isinstance(img, int) or (isinstance(img, list) and len(img) == 2)):
        raise ValueError(f"model.img_size must be an int or [height, width]; got {img!r}")


# settings that may change between a run and its resumption without changing what it computes
# (per-process batch and accumulation may change with the process count: the global batch is compared instead)
_RESUME_FREE = {"train.output_dir", "train.output_root", "train.progress", "train.plot", "train.tensorboard",
                "train.debug_crash_at_update", "train.debug_pause_at_update", "train.device", "train.log_every",
                "train.eval_every", "data.workers", "data.pin_memory", "data.eval_batch_size", "data.root",
                "data.batch_size", "optim.accum_steps", "checkpoint.every_updates", "checkpoint.keep_last",
                "checkpoint.resume", "checkpoint.fresh", "probe.every"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key.count(".") == 0:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(saved: dict, cfg: FinetuneConfig) -> list:
    """Keys whose values differ between a checkpoint's config and ``cfg`` (ignoring harmless ones)."""
    a, b = _flat(saved), _flat(config_to_dict(cfg))
    return sorted(k for k in set(a) | set(b) if k not in _RESUME_FREE and a.get(k) != b.get(k))
