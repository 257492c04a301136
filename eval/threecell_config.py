"""Three-Cell recipes: the YAML sections, their defaults and checks, the recipe hash, the encoder list.

A recipe (``configs/threecell*.yaml``) has five sections plus a ``name``:

* ``data``: the Three-Cell data (:class:`visionpe.eval.threecell_data.ThreeCellConfig`);
* ``model``: the ViT trained per encoder;
* ``train``: optimiser, schedule, epochs;
* ``run``: how to execute it (encoders, worker processes, threads, device, PESI); not part of the result;
* ``generalise``: the grids the trained weights are tested on by ``visionpe threecell --generalise``
  (:mod:`visionpe.eval.threecell_generalise`); not part of the training result, so a generalisation run
  reuses the weights of a main run with the same data, model and train sections.

Sections are dataclasses read by the fine-tuning config reader (:mod:`visionpe.train.config`): unknown keys
and values of the wrong type raise ``ValueError`` naming the full key (``train.epochz``). :func:`load_config`
returns a plain nested dict (``cfg["train"]["epochs"]``), which is what the runner, the worker processes and
the recipe hash use.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from .threecell_data import ThreeCellConfig

__all__ = ["BASELINES", "RECIPE_SECTIONS", "DataSection", "ModelSection", "TrainSection", "RunSection",
           "GeneraliseSection", "ThreeCellRecipe", "DEFAULTS", "load_config", "data_config", "patch_size",
           "recipe_hash", "generalise_grids", "generalise_hash", "resolve_encoders"]

#: always part of the default encoder set (spec: every registered image encoder plus these)
BASELINES = ("none", "learned", "sincos2d")
#: sections that define the result (the resume hash); ``run`` only says how to execute it
RECIPE_SECTIONS = ("data", "model", "train")
_OTHER_SECTIONS = ("run", "generalise")


@dataclass
class DataSection:
    """The Three-Cell data (the paper's 14x14 cells of 16 px by default)."""
    img_size: Union[int, list] = 224  #: int or [height, width]
    cell_size: int = 16
    num_samples: int = 10000
    split: list = field(default_factory=lambda: [0.8, 0.1, 0.1])  #: train/val/test fractions
    seed: int = 0
    max_attempts: int = 100
    reject_colinear: bool = True


@dataclass
class ModelSection:
    """The ViT trained per encoder (``vpe_vit_tiny_patch16_224`` resized)."""
    patch_size: Optional[int] = None  #: None: the cell size (every patch is one cell)
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    pretrained: Optional[str] = None  #: a checkpoint file or a timm model name (backbone only)


@dataclass
class TrainSection:
    epochs: int = 150
    batch_size: int = 64
    optimizer: str = "adam"  #: "adam" or "adamw"
    lr: float = 1e-3
    min_lr: float = 2.5e-5
    weight_decay: float = 0.0
    pe_lr_scale: float = 1.0  #: the encoder's own parameters (``pe.*``) train at lr x this
    warmup_epochs: Union[int, float] = 0
    grad_clip: Optional[float] = None
    seed: int = 0
    eval_batch_size: int = 500
    amp: bool = False  #: bf16 autocast, CUDA only


@dataclass
class RunSection:
    encoders: Union[str, list] = "default"  #: "default", "a,b" or a list
    workers: int = 1
    threads: Optional[int] = None  #: torch threads per worker (None: cores / workers)
    device: str = "auto"
    pesi: bool = True
    pesi_buckets: int = 60
    save_weights: bool = True  #: keep the best-validation weights (``encoders/<name>.safetensors``)


@dataclass
class GeneraliseSection:
    """Grids the trained weights are tested on, without further training (``--generalise``)."""
    grids: list = field(default_factory=list)  #: grid sides (ints) or [h, w] pairs, cells of data.cell_size
    samples: Optional[int] = None  #: Three-Cell samples generated per test grid (null: data.num_samples)


@dataclass
class ThreeCellRecipe:
    name: str = "threecell"
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    run: RunSection = field(default_factory=RunSection)
    generalise: GeneraliseSection = field(default_factory=GeneraliseSection)


#: the defaults as a nested dict
DEFAULTS = dataclasses.asdict(ThreeCellRecipe())


def load_config(path=None, quick: bool = False, overrides: dict | None = None) -> dict:
    """Read a recipe, apply ``overrides`` (``{"train.epochs": 3, ...}``), validate; returns a nested dict.

    ``path``: a YAML file or a packaged recipe name (``threecell_grid14``); ``None`` uses ``threecell_quick``
    when ``quick`` else ``threecell`` (the paper's setting). Missing keys take the :data:`DEFAULTS`.

    Raises:
        ValueError: an unknown section or key, a value of the wrong type, or an inconsistent recipe (patch
            size vs cell size, heads vs width, ...); the message names the key.
        FileNotFoundError: ``path`` is neither a file nor a packaged recipe.
    """
    import yaml

    # the generic section reader of the fine-tuning configs (key names and types checked there)
    from visionpe.recipes import recipe_path
    from visionpe.train.config import _build

    path = recipe_path(path if path is not None else ("threecell_quick" if quick else "threecell"),
                       prefix="threecell")
    with open(path) as f:
        user = yaml.safe_load(f) or {}
    if not isinstance(user, dict):
        raise ValueError(f"{path}: a Three-Cell config must be a mapping; got {type(user).__name__}")
    user.setdefault("name", Path(path).stem)
    for dotted, value in (overrides or {}).items():
        parts = dotted.split(".")
        if len(parts) != 2 or parts[0] not in RECIPE_SECTIONS + _OTHER_SECTIONS:
            raise ValueError(f"override {dotted!r} must look like section.key with section one of "
                             f"{', '.join(RECIPE_SECTIONS + _OTHER_SECTIONS)}")
        section = user.get(parts[0])
        user[parts[0]] = {**(section if isinstance(section, dict) else {}), parts[1]: value}
    try:
        recipe = _build(ThreeCellRecipe, user, "")
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    cfg = dataclasses.asdict(recipe)
    data_config(cfg)  # validates the data section (cell size vs image, grid size)
    _check(cfg)
    generalise_grids(cfg)  # validates the generalise section
    return cfg


def data_config(cfg: dict) -> ThreeCellConfig:
    """The recipe's data section as a :class:`ThreeCellConfig` (validated there)."""
    d = cfg["data"]
    return ThreeCellConfig(img_size=d["img_size"], cell_size=d["cell_size"], num_samples=d["num_samples"],
                           seed=d["seed"], split=tuple(d["split"]), max_attempts=d["max_attempts"],
                           reject_colinear=d["reject_colinear"])


def patch_size(cfg: dict) -> int:
    """The ViT's patch size: ``model.patch_size``, or the cell size when that is null."""
    p = cfg["model"]["patch_size"]
    return cfg["data"]["cell_size"] if p is None else p


def _check(cfg: dict) -> None:
    cell, patch = cfg["data"]["cell_size"], patch_size(cfg)
    if patch <= 0:
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
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if t[key] < 1:
            raise ValueError(f"train.{key} must be an int >= 1; got {t[key]!r}")
    if cfg["run"]["workers"] < 1:
        raise ValueError(f"run.workers must be an int >= 1; got {cfg['run']['workers']!r}")


def recipe_hash(cfg: dict) -> str:
    """16 hex digits over the sections that define the result (data, model, train)."""
    blob = json.dumps({k: cfg[k] for k in RECIPE_SECTIONS}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _grid_of(value, key: str) -> tuple[int, int]:
    """A grid side ``n`` (meaning ``(n, n)``) or a pair ``[h, w]``; each at least 2 (three non-colinear cells)."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)
    if is_int(value):
        value = (value, value)
    elif not (isinstance(value, (list, tuple)) and len(value) == 2 and all(is_int(v) for v in value)):
        raise ValueError(f"{key} must be a grid side (int) or a pair [h, w] of ints; got {value!r}")
    if min(value) < 2:
        raise ValueError(f"{key} must be at least 2x2 cells (three non-colinear cells); got {value!r}")
    return int(value[0]), int(value[1])


def generalise_grids(cfg: dict) -> list[tuple[int, int]]:
    """The recipe's test grids ``[(h, w), ...]`` (``generalise.grids``), in the recipe's order.

    Raises ``ValueError`` naming the key for a value that is not a side or an ``[h, w]`` pair, a grid under
    2x2, a repeated grid or the training grid itself (always tested; listing it again is a mistake), and for
    ``generalise.samples`` under 3.
    """
    g = cfg["generalise"]
    train_grid = data_config(cfg).grid
    out = []
    for i, value in enumerate(g["grids"]):
        grid = _grid_of(value, f"generalise.grids[{i}]")
        if grid == train_grid:
            raise ValueError(f"generalise.grids[{i}]={value!r} is the training grid {train_grid}, which is always "
                             f"tested; list only other grids")
        if grid in out:
            raise ValueError(f"generalise.grids[{i}]={value!r} repeats the grid {grid}")
        out.append(grid)
    if g["samples"] is not None and g["samples"] < 3:
        raise ValueError(f"generalise.samples must be an int >= 3 or null (= data.num_samples); got {g['samples']!r}")
    return out


def generalise_hash(cfg: dict) -> str:
    """16 hex digits over the training sections and ``generalise`` (what a generalisation record depends on)."""
    blob = json.dumps({k: cfg[k] for k in RECIPE_SECTIONS + ("generalise",)}, sort_keys=True, default=str)
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
