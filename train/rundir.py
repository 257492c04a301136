"""Where a run writes and what it continues from: run folders, ``--resume`` and ``--fresh``.

* A run writes into its own folder: ``train.output_dir`` when set (``--output-dir``), else
  ``<train.output_root>/<YYYYmmdd-HHMMSS>-<model>-<pe>`` (timm's ``<date>-<model>-...`` naming).
* ``checkpoint.resume``: ``null`` starts a new run and refuses a folder that already holds one; ``latest``
  (``--resume``) continues the run folder's newest *valid* checkpoint (without ``--output-dir``: the newest
  run folder of the same model and PE under ``output_root``); ``auto`` does that when there is one and starts
  otherwise (for jobs that a scheduler restarts with the same command); a path names a checkpoint or a run
  folder (without ``--output-dir`` the run continues in that folder; with one, into that unused folder, or into
  a folder where the same command stopped before its first checkpoint, which is then set aside).
* ``checkpoint.fresh`` (``--fresh``) starts over in a used folder after moving its files to
  ``<folder>.old-<time>``: nothing is deleted, and old and new checkpoints are never mixed.

:func:`plan_run` only decides (and raises ``ValueError`` for every refusal) and :func:`apply_moves` carries the
moves out, so a run that fails its checks leaves the disk as it found it.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Optional

import yaml

from .checkpoint import CheckpointManager, InvalidCheckpoint, _replace, validate_checkpoint

__all__ = ["RunPlan", "plan_run", "apply_moves", "run_suffix", "auto_run_dir", "holds_run", "scan_checkpoints",
           "BEST_WEIGHTS", "best_weights_epoch", "adopt_best_weights"]

#: the best-validation weights of a run, next to its last weights (``model.safetensors``)
BEST_WEIGHTS = "model_best.safetensors"

_logger = logging.getLogger(__name__)


@dataclass
class RunPlan:
    out: str  #: the run folder
    resume: Optional[str] = None  #: checkpoint directory to continue from
    moves: list = field(default_factory=list)  #: ``(src, dst, why)``, carried out by :func:`apply_moves`
    copy_metrics_from: Optional[str] = None  #: run folder whose metrics.jsonl a forked run starts from


def _safe(s: str) -> str:
    return re.sub(r"[^\w.]+", "_", str(s)).strip("_") or "x"


def run_suffix(model_name: str, pe) -> str:
    """``<model>-<pe>`` part of an automatic run folder name."""
    if isinstance(pe, dict):
        pe = pe.get("name")
    return f"{_safe(model_name)}-{_safe(pe or 'default')}"


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def auto_run_dir(root: str, model_name: str, pe) -> str:
    """A new ``<root>/<date>-<time>-<model>-<pe>`` folder name (``-1``, ``-2``... if taken)."""
    base = os.path.join(root, f"{_stamp()}-{run_suffix(model_name, pe)}")
    path, i = base, 0
    while os.path.exists(path):
        i += 1
        path = f"{base}-{i}"
    return path


def holds_run(out: str) -> bool:
    """Whether ``out`` holds (part of) an earlier run: checkpoints or a metrics log."""
    ck = os.path.join(out, "checkpoints")
    return bool(CheckpointManager(ck).committed()) or os.path.isfile(os.path.join(out, "metrics.jsonl"))


def scan_checkpoints(run_dir: str) -> tuple:
    """``(newest valid checkpoint or None, [(invalid newer checkpoint, reason), ...])``; warns for each
    invalid one."""
    invalid = []
    for _, path in reversed(CheckpointManager(os.path.join(run_dir, "checkpoints")).committed()):
        try:
            validate_checkpoint(path)
            return path, invalid
        except InvalidCheckpoint as e:
            _logger.warning("skipping checkpoint %s: %s", path, e)
            invalid.append((path, str(e)))
    return None, invalid


def _latest_run_dir(root: str, suffix: str) -> Optional[str]:
    if not os.path.isdir(root):
        return None
    pat = re.compile(r"^\d{8}-\d{6}-" + re.escape(suffix) + r"(-\d+)?$")
    found = [(m.group(0)[:15], int(m.group(1)[1:]) if m.group(1) else 0, m.group(0))
             for m in map(pat.match, os.listdir(root)) if m and os.path.isdir(os.path.join(root, m.group(0)))]
    runs = [d for _, _, d in sorted(found)]
    for d in reversed(runs):
        if holds_run(os.path.join(root, d)):
            return os.path.join(root, d)
    return None


def _set_aside(invalid: list, run_dir: str) -> list:
    dest = os.path.join(run_dir, "checkpoints", "invalid")
    return [(p, os.path.join(dest, f"{os.path.basename(p)}-{_stamp()}"), f"invalid: {why}") for p, why in invalid]


def _resolve_path(spec: str) -> str:
    """A checkpoint directory from ``--resume PATH`` (a checkpoint or a run folder)."""
    if not os.path.exists(spec):
        raise ValueError(f"--resume {spec!r} does not exist (give a run folder or a checkpoints/update_* folder)")
    if os.path.isfile(os.path.join(spec, "meta.json")) or os.path.basename(os.path.normpath(spec)).startswith("update_"):
        try:
            validate_checkpoint(spec)
        except InvalidCheckpoint as e:
            raise ValueError(f"--resume {spec!r} is not a valid checkpoint: {e}") from None
        return spec
    if not os.path.isdir(os.path.join(spec, "checkpoints")):
        raise ValueError(f"--resume {spec!r} is neither a checkpoint folder nor a run folder (no checkpoints/ in it)")
    found, invalid = scan_checkpoints(spec)
    if found is None:
        why = "; ".join(f"{p}: {w}" for p, w in invalid) or "none written"
        raise ValueError(f"--resume {spec!r}: the run folder has no valid checkpoint ({why})")
    return found


def _update_of(ck: str) -> int:
    return int(os.path.basename(os.path.normpath(ck)).split("_")[1])


def _same(a: str, b: str) -> bool:
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def plan_run(cfg) -> RunPlan:
    """Decide the run folder and the checkpoint to continue from (see the module docstring)."""
    spec, fresh = cfg.checkpoint.resume, cfg.checkpoint.fresh
    model, pe = cfg.model.name, cfg.model.pe
    root, explicit = cfg.train.output_root, cfg.train.output_dir
    if fresh and spec not in (None, "auto"):
        raise ValueError("--fresh starts over and --resume continues a run: give one of them")
    if fresh:
        out = explicit or auto_run_dir(root, model, pe)
        moves = [(out, f"{os.path.normpath(out)}.old-{_stamp()}", "--fresh")] if holds_run(out) else []
        return RunPlan(out, None, moves)

    if spec in ("latest", "auto"):
        out = explicit or _latest_run_dir(root, run_suffix(model, pe))
        if out is None:
            if spec == "latest":
                raise ValueError(f"--resume: no earlier run of {model} with pe {pe!r} under {root!r} (folders named "
                                 f"<date>-<time>-{run_suffix(model, pe)}); name one with --resume PATH or --output-dir")
            return RunPlan(auto_run_dir(root, model, pe))
        found, invalid = scan_checkpoints(out)
        if found is None:
            if spec == "latest":
                why = "; ".join(f"{p}: {w}" for p, w in invalid) or "none written"
                raise ValueError(f"--resume: {out!r} has no valid checkpoint to continue ({why}); start over "
                                 f"there with --fresh")
            moves = [(out, f"{os.path.normpath(out)}.old-{_stamp()}", "nothing valid to resume")] \
                if holds_run(out) else []
            return RunPlan(out, None, moves)
        return RunPlan(out, found, _set_aside(invalid, out))

    if spec is None:
        out = explicit or auto_run_dir(root, model, pe)
        if holds_run(out):
            newest = CheckpointManager(os.path.join(out, "checkpoints")).committed()
            what = f"checkpoints up to update {newest[-1][0]}" if newest else "a metrics log"
            raise ValueError(f"{out!r} already holds a run ({what}): continue it with --resume, start over with "
                             f"--fresh (its files are moved to {os.path.normpath(out)}.old-<time>), or choose "
                             f"another --output-dir")
        return RunPlan(out)

    ck = _resolve_path(str(spec))
    src_run = os.path.dirname(os.path.dirname(os.path.abspath(ck)))
    out = explicit or src_run
    if _same(out, src_run):
        later = [(p, os.path.join(out, "checkpoints", f"superseded-{_stamp()}", os.path.basename(p)),
                  f"newer than the resumed {os.path.basename(ck)}")
                 for u, p in CheckpointManager(os.path.join(out, "checkpoints")).committed() if u > _update_of(ck)]
        return RunPlan(out, ck, later)
    moves = []
    if holds_run(out):
        if not _unfinished_fork_of(out, str(spec)):
            raise ValueError(f"--resume {spec!r} would continue into {out!r}, which holds another run: choose an "
                             f"unused --output-dir, or leave it out to continue in {src_run!r}")
        # the same command again after a crash before the fork's first checkpoint: that attempt is set aside
        moves = [(out, f"{os.path.normpath(out)}.old-{_stamp()}", f"an unfinished earlier attempt of --resume {spec}")]
    return RunPlan(out, ck, moves, copy_metrics_from=src_run)


def _unfinished_fork_of(out: str, spec: str) -> bool:
    """Whether ``out`` holds only an attempt, stopped before its first checkpoint, to continue ``spec`` there
    (its ``config.yaml`` names the same ``--resume`` path): nothing in it can be continued, and a scheduler
    that restarts the same command must not be refused."""
    if CheckpointManager(os.path.join(out, "checkpoints")).committed():
        return False
    try:
        with open(os.path.join(out, "config.yaml")) as f:
            earlier = ((yaml.safe_load(f) or {}).get("checkpoint") or {}).get("resume")
    except (OSError, yaml.YAMLError, AttributeError):
        return False
    return isinstance(earlier, str) and os.path.realpath(earlier) == os.path.realpath(spec)


def apply_moves(plan: RunPlan) -> None:
    """Carry out the plan's moves (rank 0 only), logging each."""
    for src, dst, why in plan.moves:
        if not os.path.exists(src):
            continue
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        shutil.move(src, dst)
        _logger.warning("moved %s to %s (%s)", src, dst, why)


def best_weights_epoch(path: str) -> Optional[int]:
    """The epoch (1-based) stored in a ``model_best.safetensors`` header, or None (absent, unreadable, or
    written before the epoch was recorded)."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            epoch = (f.metadata() or {}).get("epoch")
        return int(epoch) if epoch is not None else None
    except Exception:  # a damaged or foreign file is simply not adopted
        return None


def adopt_best_weights(plan: RunPlan, best_epoch: Optional[int]) -> Optional[str]:
    """On resume, make the run folder's ``model_best.safetensors`` agree with the resumed checkpoint's record of
    its best epoch (rank 0 only). Returns what was done, or None.

    * continuing another run in a new folder (``plan.copy_metrics_from``): the source run's best weights are
      copied in (atomically) when they are those of ``best_epoch``;
    * continuing in the same folder: best weights written by a later, now superseded, stretch of the run (another
      epoch than ``best_epoch``) are moved aside with the superseded checkpoints, never mixed in;
    * otherwise (no file, or best weights of another epoch in the source run) nothing is copied and the next
      improvement writes the file; a warning says so.
    """
    src_dir = plan.copy_metrics_from or plan.out
    src, dst = os.path.join(src_dir, BEST_WEIGHTS), os.path.join(plan.out, BEST_WEIGHTS)
    if not os.path.isfile(src):
        return None
    epoch = best_weights_epoch(src)
    if best_epoch is not None and epoch == best_epoch:
        if _same(src, dst):
            return None
        tmp = f"{dst}.tmp-{os.getpid()}"
        shutil.copyfile(src, tmp)
        _replace(tmp, dst)
        return f"copied {src} (best epoch {epoch}) to {dst}"
    have = f"epoch {epoch}" if epoch is not None else "an unrecorded epoch"
    want = f"epoch {best_epoch}" if best_epoch is not None else "no evaluated epoch yet"
    if _same(src, dst):
        aside = os.path.join(plan.out, "checkpoints", f"superseded-{_stamp()}", BEST_WEIGHTS)
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        shutil.move(dst, aside)
        msg = f"moved {dst} ({have}) to {aside}: the resumed checkpoint's best is {want}"
    else:
        msg = (f"not copying {src}: it holds {have}, the resumed checkpoint's best is {want}; "
               f"{BEST_WEIGHTS} is written at the next improvement")
    _logger.warning(msg)
    return msg

