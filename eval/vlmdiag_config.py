"""Recipes of the VLM position diagnostic: lookup by name or path, defaults, validation, the variant list.

A recipe (``configs/vlmdiag.yaml``, ``configs/vlmdiag_quick.yaml``) has the sections ``data`` (the shared
sequence settings, :class:`~visionpe.eval.vlmdiag_data.DataConfig`), ``splits`` (``train``, ``val`` and the
named ``test`` splits: frames, grid, sample count), ``model`` (the tiny decoder's size and its RoPE base),
``train``, ``variants`` (name -> scheme and its options) and ``run`` (how to execute; not part of the result).

A variant is ``{scheme, options, train, test}``: ``scheme`` is a :func:`visionpe.vlm.list_schemes` name or
``none`` (the decoder with every position at 0: no rotation, causal mask only); ``options`` go to the scheme
everywhere, ``train`` / ``test`` add to them for the training and the evaluation positions (e.g. HoPE's
``gamma: random`` in training and a fixed value at test, as in the paper).
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .vlmdiag_data import DataConfig, SplitSpec

__all__ = ["DEFAULTS", "Variant", "resolve_recipe", "load_config", "data_config", "split_specs", "variants",
           "select_variants", "variant_hash"]

DEFAULTS = {
    "name": "vlmdiag",
    "data": {"questions": "all", "text_before": [0, 8], "text_after": [0, 8], "distractors": 0, "filler": 16,
             "seed": 0},
    "splits": {"train": {"frames": [2, 8], "grid": [4, 4], "num_samples": 20000},
               "val": {"frames": [2, 8], "grid": [4, 4], "num_samples": 500},
               "test": {"in_dist": {"frames": [2, 8], "grid": [4, 4], "num_samples": 1000}}},
    "model": {"dim": 64, "depth": 2, "num_heads": 2, "theta": None},
    "train": {"epochs": 10, "batch_size": 64, "lr": 3.0e-3, "min_lr": 1.0e-5, "weight_decay": 0.01,
              "warmup_steps": 100, "grad_clip": 1.0, "seed": 0, "eval_batch_size": 100},
    "variants": {"none": {"scheme": "none"}, "rope1d": {"scheme": "rope1d"}},
    "run": {"variants": "default", "workers": 1, "threads": None, "device": "cpu"},
}
#: sections that define every variant's result (with the variant's own entry: the resume hash)
RECIPE_SECTIONS = ("data", "splits", "model", "train")


@dataclass(frozen=True)
class Variant:
    """One trained row: ``scheme`` with ``options`` (plus ``train`` / ``test`` extras for each phase)."""

    name: str
    scheme: str
    options: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    test: dict = field(default_factory=dict)

    def phase_options(self, phase: str) -> dict:
        """Scheme options for ``phase`` (``"train"`` or ``"test"``)."""
        return {**self.options, **(self.train if phase == "train" else self.test)}

    def describe(self) -> str:
        """``scheme(k=v, ...)`` with the train / test extras, for tables."""
        def fmt(d):
            return ", ".join(f"{k}={_short(v)}" for k, v in d.items() if k != "sections")
        s = self.scheme + (f"({fmt(self.options)})" if fmt(self.options) else "")
        if self.train or self.test:
            s += f"; train {fmt(self.train) or '-'}, test {fmt(self.test) or '-'}"
        return s


def _short(v) -> str:
    if isinstance(v, float) and 0 < v < 1 and (1 / v).is_integer():
        return f"1/{int(1 / v)}"
    return str(v)


# -- recipe lookup ---------------------------------------------------------------------------------------
def resolve_recipe(name_or_path=None, quick: bool = False) -> Path:
    """Path of a recipe given as a file path or as a packaged recipe name (``vlmdiag_quick`` or
    ``vlmdiag_quick.yaml``, :func:`visionpe.recipes.recipe_path`); ``None`` = ``vlmdiag_quick`` when ``quick``
    else ``vlmdiag``. Raises ``FileNotFoundError`` listing the packaged vlmdiag recipes."""
    from visionpe.recipes import recipe_path
    if name_or_path is None:
        name_or_path = "vlmdiag_quick" if quick else "vlmdiag"
    return recipe_path(name_or_path, prefix="vlmdiag")


def load_config(name_or_path=None, quick: bool = False, overrides: dict | None = None) -> dict:
    """Merge ``DEFAULTS`` <- recipe <- ``overrides`` (``{"train.epochs": 3, ...}``) and validate.

    ``splits`` and ``variants`` replace the defaults' entries wholesale (a recipe lists its own); the other
    sections merge key by key and reject unknown keys.
    """
    import yaml
    path = resolve_recipe(name_or_path, quick)
    with open(path) as f:
        user = yaml.safe_load(f) or {}
    if not isinstance(user, dict):
        raise ValueError(f"{path}: a vlmdiag recipe must be a mapping; got {type(user).__name__}")
    cfg = copy.deepcopy(DEFAULTS)
    cfg["name"] = str(user.pop("name", path.stem))
    for section, values in user.items():
        if section not in cfg or section == "name":
            raise ValueError(f"{path}: unknown section {section!r}; expected one of "
                             f"{sorted(k for k in DEFAULTS if k != 'name')}")
        if not isinstance(values, dict):
            raise ValueError(f"{path}: section {section!r} must be a mapping; got {values!r}")
        if section in ("splits", "variants"):
            cfg[section] = {**cfg[section], **values} if section == "splits" else values
            continue
        unknown = sorted(set(values) - set(cfg[section]))
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown} in section {section!r}; known: {sorted(cfg[section])}")
        cfg[section].update(values)
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".")
        if section not in ("data", "model", "train", "run") or key not in cfg[section]:
            raise ValueError(f"unknown override {dotted!r}")
        cfg[section][key] = value
    data_config(cfg)
    split_specs(cfg)
    variants(cfg)
    _check_numbers(cfg)
    return cfg


def data_config(cfg: dict) -> DataConfig:
    d = dict(cfg["data"])
    q = d.pop("questions")
    return DataConfig(questions=tuple(q if q != "all" else ()) or DataConfig().questions, **d)


def split_specs(cfg: dict) -> dict[str, SplitSpec]:
    """``{"train": ..., "val": ..., <test name>: ...}`` in recipe order (train and val first)."""
    s = cfg["splits"]
    missing = [k for k in ("train", "val", "test") if k not in s]
    if missing:
        raise ValueError(f"splits needs train, val and test; missing {missing}")
    unknown = sorted(set(s) - {"train", "val", "test"})
    if unknown:
        raise ValueError(f"unknown split section(s) {unknown}; expected train, val and test (a mapping of test "
                         f"splits)")
    if not isinstance(s["test"], dict) or not s["test"]:
        raise ValueError(f"splits.test must map test names to {{frames, grid, num_samples}}; got {s['test']!r}")
    out = {}
    for name, spec in [("train", s["train"]), ("val", s["val"]), *s["test"].items()]:
        if name in out:
            raise ValueError(f"test split name {name!r} collides with another split")
        if not isinstance(spec, dict) or sorted(spec) != ["frames", "grid", "num_samples"]:
            raise ValueError(f"split {name!r} must be a mapping with exactly frames, grid and num_samples; "
                             f"got {spec!r}")
        out[name] = SplitSpec(name, **spec)
    return out


def variants(cfg: dict) -> dict[str, Variant]:
    """The recipe's variants, validated against the registered schemes."""
    from visionpe.vlm import list_schemes
    known = list_schemes()
    v = cfg["variants"]
    if not isinstance(v, dict) or not v:
        raise ValueError(f"variants must be a non-empty mapping name -> {{scheme, options, train, test}}; got {v!r}")
    out = {}
    for name, spec in v.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(name)):
            raise ValueError(f"variant name {name!r} must be letters, digits, '_', '.' or '-' (it names a file)")
        if not isinstance(spec, dict) or "scheme" not in spec:
            raise ValueError(f"variant {name!r} must be a mapping with a 'scheme'; got {spec!r}")
        extra = sorted(set(spec) - {"scheme", "options", "train", "test"})
        if extra:
            raise ValueError(f"variant {name!r}: unknown key(s) {extra}; expected scheme, options, train, test")
        if spec["scheme"] != "none" and spec["scheme"] not in known:
            raise ValueError(f"variant {name!r}: unknown scheme {spec['scheme']!r}; known: none, {', '.join(known)}")
        parts = {k: dict(spec.get(k) or {}) for k in ("options", "train", "test")}
        if spec["scheme"] == "none" and any(parts.values()):
            raise ValueError(f"variant {name!r}: scheme 'none' takes no options")
        out[str(name)] = Variant(str(name), spec["scheme"], **parts)
    return out


def _check_numbers(cfg: dict) -> None:
    m, t = cfg["model"], cfg["train"]
    for key in ("dim", "depth", "num_heads"):
        if isinstance(m[key], bool) or not isinstance(m[key], int) or m[key] < 1:
            raise ValueError(f"model.{key} must be an int >= 1; got {m[key]!r}")
    if m["dim"] % m["num_heads"] or (m["dim"] // m["num_heads"]) % 2:
        raise ValueError(f"model.dim={m['dim']} must split into model.num_heads={m['num_heads']} heads of even size")
    if m["theta"] is not None and not (isinstance(m["theta"], (int, float)) and m["theta"] > 1):
        raise ValueError(f"model.theta must be null (each scheme's own base) or a number > 1; got {m['theta']!r}")
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if isinstance(t[key], bool) or not isinstance(t[key], int) or t[key] < 1:
            raise ValueError(f"train.{key} must be an int >= 1; got {t[key]!r}")


def select_variants(cfg: dict, spec=None) -> list[str]:
    """Variant names to run: ``None``/``"default"`` = all of the recipe's; else a comma-separated string or a
    list of variant names or scheme names (a scheme name selects every variant of that scheme)."""
    vs = variants(cfg)
    if spec is None or spec == "default":
        return list(vs)
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"no variant selected (got {spec!r}); known: {', '.join(vs)}")
    out = []
    for n in names:
        hit = [n] if n in vs else [k for k, v in vs.items() if v.scheme == n]
        if not hit:
            raise ValueError(f"unknown variant or scheme {n!r}; this recipe has variants {', '.join(vs)} "
                             f"(schemes {', '.join(dict.fromkeys(v.scheme for v in vs.values()))})")
        out += hit
    return list(dict.fromkeys(out))


def variant_hash(cfg: dict, name: str) -> str:
    """Hash of what defines variant ``name``'s result (the shared sections and its own entry)."""
    blob = json.dumps({"common": {k: cfg[k] for k in RECIPE_SECTIONS}, "variant": cfg["variants"][name]},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
