"""Checkpoints: model weights as timm-loadable safetensors, training state through ``torch.save``.

One checkpoint is a directory ``<run>/checkpoints/update_00000123/`` holding

* ``model.safetensors`` (and ``model_ema.safetensors``): plain state dicts, loadable by timm with
  ``pretrained_cfg_overlay=dict(file=...)`` and by ``visionpe evalres``;
* ``training_state.pt``: optimizer (keyed by parameter name, see :func:`optimizer_state`), LR scheduler,
  AMP scaler and the random generators some optimizers own, written with ``torch.save`` and read back with
  ``torch.load(weights_only=True)`` (tensors, numbers, strings, tuples, dtypes: no code runs on load);
* ``rank<r>.pt``: each process's own state: Python, NumPy and torch RNG states and its running epoch loss;
* ``meta.json``, written last: format, progress counters, class names, config, model description, and the
  size and SHA-256 of every other file. A checkpoint is *valid* when ``meta.json`` reads and every file matches
  it (:func:`validate_checkpoint`).

The directory is written under a hidden staging name and renamed into place (atomic on POSIX), so a crash
leaves either the complete checkpoint or none; a checkpoint damaged later is detected by its hashes and
skipped (:func:`visionpe.train.rundir.scan_checkpoints`).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch

__all__ = ["FORMAT", "rng_state", "set_rng_state", "optimizer_state", "load_optimizer_state", "generator_states",
           "set_generator_states", "write_json_atomic", "save_tensors_atomic", "save_torch", "load_torch",
           "validate_checkpoint", "InvalidCheckpoint", "CheckpointManager", "read_checkpoint", "file_digest"]

FORMAT = "visionpe-finetune/2"
_NAME = re.compile(r"^update_(\d{8})$")


# -- RNG -----------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """This process's Python, NumPy and torch (CPU, CUDA) generator states, as ``torch.save``-able values
    that ``torch.load(weights_only=True)`` reads back (NumPy's key array becomes an int64 tensor)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def generator_states(obj) -> dict:
    """States of the ``torch.Generator`` attributes an object owns (e.g. timm's AdaHessian draws its
    Hutchinson probes from ``self.generator``, ``ModelEmaV3`` its stochastic rounding): their
    ``state_dict()`` leaves them out, exact resume needs them."""
    return {k: v.get_state() for k, v in sorted(vars(obj).items()) if isinstance(v, torch.Generator)}


def set_generator_states(obj, states: dict) -> None:
    for k, s in states.items():
        gen = getattr(obj, k, None)
        if not isinstance(gen, torch.Generator):
            raise ValueError(f"checkpoint has a random generator {k!r} for {type(obj).__name__}, which has none")
        gen.set_state(s)


# -- optimizer -----------------------------------------------------------------------------------------
def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list:
    """Parameter names in the order ``optimizer.state_dict()`` numbers them (group by group)."""
    name_of = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    names = []
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) not in name_of:
                raise ValueError(f"the optimizer holds a parameter of shape {tuple(p.shape)} that is not in the model")
            names.append(name_of[id(p)])
    return names


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with parameters named by their model FQN instead of their index.

    Everything else (hyper-parameters, tensors or dtypes in ``param_groups``, extra top-level entries such as
    Kron's ``rng_state``) is kept as the optimizer returns it; its random generators are added under
    ``"generators"``. The FQN keys are those of ``torch.distributed.checkpoint.state_dict``: the state does
    not depend on the number of processes or on the DDP/FSDP wrapper.
    """
    sd = optimizer.state_dict()
    names = _param_names(model, optimizer)
    out = {k: v for k, v in sd.items() if k not in ("state", "param_groups")}
    out["state"] = {names[i]: st for i, st in sd["state"].items()}
    out["param_groups"] = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    out["generators"] = generator_states(optimizer)
    return out


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Inverse of :func:`optimizer_state`; a changed parameter grouping is a ``ValueError`` naming it."""
    names = _param_names(model, optimizer)
    live = [[names[i] for i in range(start, start + len(g["params"]))]
            for start, g in zip(np.cumsum([0] + [len(g["params"]) for g in optimizer.param_groups]),
                                optimizer.param_groups)]
    saved_groups = [g["params"] for g in saved["param_groups"]]
    if saved_groups != live:
        if len(saved_groups) != len(live):
            detail = f"{len(saved_groups)} parameter groups in the checkpoint, {len(live)} now"
        else:
            i = next(i for i, (a, b) in enumerate(zip(saved_groups, live)) if a != b)
            extra, missing = sorted(set(saved_groups[i]) - set(live[i])), sorted(set(live[i]) - set(saved_groups[i]))
            detail = f"group {i} differs (only in the checkpoint: {extra[:5]}, only now: {missing[:5]})"
        raise ValueError(f"the checkpoint's optimizer does not fit this run: {detail}; the model or the optim "
                         f"settings changed since it was written")
    index = {n: i for i, n in enumerate(names)}
    sd = {k: v for k, v in saved.items() if k not in ("state", "param_groups", "generators")}
    sd["state"] = {index[n]: st for n, st in saved["state"].items()}
    sd["param_groups"] = [{**g, "params": [index[n] for n in g["params"]]} for g in saved["param_groups"]]
    optimizer.load_state_dict(sd)
    set_generator_states(optimizer, saved.get("generators", {}))


# -- files ---------------------------------------------------------------------------------------------
def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace(tmp: str, path: str) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to ``path`` through a temporary file and a rename (readers never see half a file)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    _replace(tmp, path)


def save_tensors_atomic(path: str, tensors: dict, metadata: Optional[dict] = None) -> None:
    """A safetensors file (contiguous CPU copies), atomically."""
    from safetensors.torch import save_file
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    _replace(tmp, path)


def save_torch(path: str, obj) -> None:
    """``torch.save`` atomically; read it back with :func:`load_torch`."""
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    _replace(tmp, path)


def load_torch(path: str):
    """``torch.load(path, weights_only=True)`` on CPU: plain data only, no code runs."""
    return torch.load(path, map_location="cpu", weights_only=True)


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# -- one checkpoint ------------------------------------------------------------------------------------
class InvalidCheckpoint(ValueError):
    """A checkpoint directory that is incomplete, damaged or of another format."""


def validate_checkpoint(path: str) -> dict:
    """``meta.json`` of a complete, undamaged checkpoint; :class:`InvalidCheckpoint` saying what is wrong."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        raise InvalidCheckpoint(f"{path} has no meta.json (not a checkpoint, or an unfinished one)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise InvalidCheckpoint(f"{meta_path} is unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise InvalidCheckpoint(f"{path} has checkpoint format {found!r}, expected {FORMAT!r}")
    for name, want in meta.get("files", {}).items():
        fp = os.path.join(path, name)
        if not os.path.isfile(fp):
            raise InvalidCheckpoint(f"{path} lacks {name}")
        size = os.path.getsize(fp)
        if size != want["bytes"]:
            raise InvalidCheckpoint(f"{fp} has {size} bytes, {want['bytes']} were written")
        if file_digest(fp) != want["sha256"]:
            raise InvalidCheckpoint(f"{fp} is damaged (its SHA-256 differs from the one recorded when it was written)")
    return meta


def read_checkpoint(path: str, rank: int = 0, validate: bool = True) -> dict:
    """Load a checkpoint directory: ``{"meta", "model", "model_ema" (or None), "training", "rank"}``.

    ``rank`` is this process's own state (``{"rng": ..., ...}``), or None when the checkpoint was written by
    fewer processes.
    """
    from safetensors.torch import load_file
    if validate:
        meta = validate_checkpoint(path)
    else:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
    ema = os.path.join(path, "model_ema.safetensors")
    own = os.path.join(path, f"rank{rank}.pt")
    return {"meta": meta, "model": load_file(os.path.join(path, "model.safetensors")),
            "model_ema": load_file(ema) if os.path.isfile(ema) else None,
            "training": load_torch(os.path.join(path, "training_state.pt")),
            "rank": load_torch(own) if os.path.isfile(own) else None}


class CheckpointManager:
    """Writes, finds and prunes the checkpoints of one run (``<run>/checkpoints``)."""

    def __init__(self, root: str, keep_last: int = 2):
        self.root = root
        self.keep_last = keep_last

    @staticmethod
    def name_for(update: int) -> str:
        return f"update_{update:08d}"

    def path_for(self, update: int) -> str:
        return os.path.join(self.root, self.name_for(update))

    def staging_dir(self, update: int) -> str:
        return os.path.join(self.root, f".{self.name_for(update)}.tmp")

    def begin(self, update: int) -> str:
        """A fresh staging directory (rank 0, before the other ranks write their RNG files into it)."""
        os.makedirs(self.root, exist_ok=True)
        tmp = self.staging_dir(update)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        return tmp

    def write_rank_state(self, update: int, rank: int, local: dict) -> None:
        """``rank<r>.pt`` for ranks > 0: their RNG states and ``local`` (per-process progress)."""
        save_torch(os.path.join(self.staging_dir(update), f"rank{rank}.pt"), {"rng": rng_state(), **local})

    def commit(self, update: int, model_sd: dict, ema_sd: Optional[dict], training: dict, meta: dict,
               local: Optional[dict] = None) -> str:
        """Write rank 0's files into the staging directory, ``meta.json`` last, rename it into place, prune."""
        tmp = self.staging_dir(update)
        save_tensors_atomic(os.path.join(tmp, "model.safetensors"), model_sd, {"format": "pt"})
        if ema_sd is not None:
            save_tensors_atomic(os.path.join(tmp, "model_ema.safetensors"), ema_sd, {"format": "pt"})
        save_torch(os.path.join(tmp, "training_state.pt"), training)
        save_torch(os.path.join(tmp, "rank0.pt"), {"rng": rng_state(), **(local or {})})
        files = {n: {"bytes": os.path.getsize(os.path.join(tmp, n)), "sha256": file_digest(os.path.join(tmp, n))}
                 for n in sorted(os.listdir(tmp)) if not n.startswith((".", "meta.json"))}
        write_json_atomic(os.path.join(tmp, "meta.json"), {"format": FORMAT, **meta, "files": files})
        final = self.path_for(update)
        if os.path.isdir(final):  # the same update saved again (an in-epoch save right before a stop)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        self.prune(keep=final)
        return final

    def committed(self) -> list:
        """``(update, path)`` of every committed checkpoint directory, oldest first (not validated)."""
        if not os.path.isdir(self.root):
            return []
        found = [(int(m.group(1)), os.path.join(self.root, d)) for d in os.listdir(self.root)
                 if (m := _NAME.match(d)) and os.path.isdir(os.path.join(self.root, d))]
        return sorted(found)

    def prune(self, keep: str) -> None:
        """Delete all but the ``keep_last`` newest checkpoints of this run; never ``keep`` (the one just
        written), nothing outside ``self.root``. Staging directories a crash left behind go too."""
        done = self.committed()
        doomed = [p for _, p in done[:-self.keep_last]] if self.keep_last else []
        for p in doomed:
            if os.path.abspath(p) != os.path.abspath(keep):
                shutil.rmtree(p, ignore_errors=True)
        for d in os.listdir(self.root):
            if d.startswith(".update_") and d.endswith(".tmp"):
                shutil.rmtree(os.path.join(self.root, d), ignore_errors=True)
