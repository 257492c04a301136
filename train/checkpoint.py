"""Atomic checkpoints: safetensors for tensors, JSON for everything else.

One checkpoint is a directory ``checkpoints/update_00000123/`` holding

* ``model.safetensors``: the model state dict, plus the EMA weights under ``ema.``;
* ``optim.safetensors``: optimizer tensors as ``state.<param index>.<name>``;
* ``state.json``: progress counters, optimizer hyper-parameters and scalar state, AMP scaler, metrics,
  the model description (rebuild without the recipe) and rank 0's RNG states;
* ``rng_rank<r>.json`` for the other ranks.

The directory is written under a temporary name and renamed, then ``latest.json`` is replaced atomically:
a crash at any moment leaves the previous checkpoint intact and readable.
"""
from __future__ import annotations

import base64
import json
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["rng_state", "set_rng_state", "optimizer_to_flat", "optimizer_from_flat", "write_json_atomic",
           "save_tensors_atomic", "CheckpointManager", "FORMAT", "read_checkpoint",
           "find_resume_dir"]

FORMAT = "visionpe-finetune/1"


# -- RNG -----------------------------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """Python, NumPy, torch CPU (and CUDA) generator states as JSON-able values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    v, keys, gauss = state["python"]
    random.setstate((v, tuple(keys), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# -- optimizer ---------------------------------------------------------------------------------------
def _jsonable(v):
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    raise TypeError(f"optimizer value of type {type(v).__name__} cannot be stored in JSON")


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """``(tensors, meta)``: tensors keyed ``state.<pid>.<name>``; the rest JSON-able."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = _jsonable(v)
    return tensors, {"param_groups": _jsonable(sd["param_groups"]), "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    live = optimizer.param_groups
    if len(live) != len(meta["param_groups"]):
        raise ValueError(f"checkpoint optimizer has {len(meta['param_groups'])} parameter groups, the run has "
                         f"{len(live)}: the model or optim settings changed since the checkpoint was written")
    groups = []
    for saved, cur in zip(meta["param_groups"], live):
        g = dict(saved)
        for k, v in g.items():  # JSON turned tuples (betas) into lists
            if isinstance(cur.get(k), tuple) and isinstance(v, list):
                g[k] = tuple(v)
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# -- atomic files ------------------------------------------------------------------------------------
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


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def save_tensors_atomic(path: str, tensors: dict, metadata: Optional[dict] = None) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


class CheckpointManager:
    """Writes, finds and prunes checkpoint directories under ``root`` (``<output_dir>/checkpoints``)."""

    def __init__(self, root: str, keep_last: int = 2):
        self.root = root
        self.keep_last = keep_last

    @staticmethod
    def name_for(update: int) -> str:
        return f"update_{update:08d}"

    def staging_dir(self, update: int) -> str:
        return os.path.join(self.root, f".{self.name_for(update)}.tmp")

    def begin(self, update: int) -> str:
        """Fresh staging directory (rank 0, before the other ranks write their RNG files into it)."""
        os.makedirs(self.root, exist_ok=True)
        tmp = self.staging_dir(update)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        return tmp

    def write_rank_rng(self, update: int, rank: int) -> None:
        write_json_atomic(os.path.join(self.staging_dir(update), f"rng_rank{rank}.json"), rng_state())

    def commit(self, update: int, model_tensors: dict, optim_tensors: dict, state: dict) -> str:
        """Write the rank-0 files into the staging dir, rename it into place, move ``latest.json``."""
        tmp = self.staging_dir(update)
        save_tensors_atomic(os.path.join(tmp, "model.safetensors"), model_tensors, {"format": FORMAT})
        save_tensors_atomic(os.path.join(tmp, "optim.safetensors"), optim_tensors, {"format": FORMAT})
        write_json_atomic(os.path.join(tmp, "state.json"), {"format": FORMAT, **state})
        final = os.path.join(self.root, self.name_for(update))
        if os.path.isdir(final):  # re-saving the same update (e.g. epoch end right after an in-epoch save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        write_json_atomic(os.path.join(self.root, "latest.json"), {"dir": self.name_for(update), "update": update})
        self._prune()
        return final

    def _prune(self) -> None:
        done = sorted(d for d in os.listdir(self.root) if d.startswith("update_") and
                      os.path.isdir(os.path.join(self.root, d)))
        for d in done[:-self.keep_last]:
            shutil.rmtree(os.path.join(self.root, d), ignore_errors=True)
        for d in os.listdir(self.root):  # staging dirs a crash left behind
            if d.startswith(".update_") and d.endswith(".tmp"):
                shutil.rmtree(os.path.join(self.root, d), ignore_errors=True)

    def latest(self) -> Optional[str]:
        """Directory of the newest committed checkpoint, or None."""
        ptr = os.path.join(self.root, "latest.json")
        if not os.path.isfile(ptr):
            return None
        with open(ptr) as f:
            d = os.path.join(self.root, json.load(f)["dir"])
        return d if os.path.isfile(os.path.join(d, "state.json")) else None


def read_checkpoint(path: str, rank: int = 0) -> dict:
    """Load a checkpoint directory: ``{"model": tensors, "optim": tensors, "state": dict, "rng": dict}``."""
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "state.json")):
        raise ValueError(f"{path!r} is not a checkpoint directory (no state.json); pass a checkpoints/update_* "
                         f"directory or the run's output_dir")
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path!r} has checkpoint format {state.get('format')!r}, expected {FORMAT!r}")
    rng = state.get("rng")
    if rank:
        rng_file = os.path.join(path, f"rng_rank{rank}.json")
        if not os.path.isfile(rng_file):
            raise ValueError(f"checkpoint {path!r} has no RNG state for rank {rank}: it was written by a run "
                             f"with fewer processes")
        with open(rng_file) as f:
            rng = json.load(f)
    return {"model": load_file(os.path.join(path, "model.safetensors")),
            "optim": load_file(os.path.join(path, "optim.safetensors")), "state": state, "rng": rng}


def find_resume_dir(spec, manager: "CheckpointManager"):
    """The checkpoint to resume from: ``spec`` is "auto" (the newest in ``manager``), a checkpoint
    directory, a run directory, or None/"" (start fresh)."""
    if spec is None or spec is False or spec == "":
        return None
    if spec == "auto":
        return manager.latest()
    if os.path.isfile(os.path.join(spec, "state.json")):
        return spec
    found = CheckpointManager(os.path.join(spec, "checkpoints")).latest()
    if found is None:
        raise ValueError(f"checkpoint.resume {spec!r} is neither a checkpoint directory nor a run directory "
                         f"with checkpoints")
    return found
