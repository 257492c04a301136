"""Helpers shared by the ``visionpe`` commands; nothing here imports torch at module level.

* :func:`run_command`: one-line errors (``visionpe <command>: error: ...``), the traceback only with ``--debug``
  (or ``VISIONPE_DEBUG=1``; :func:`debug_enabled` tells a command that prints its own errors);
* :func:`add_encoders_argument` / :func:`split_names` / :func:`check_encoders`: ``--encoders a,b`` and
  ``--encoders a b`` alike, unknown names answered with the known ones;
* :func:`gpu_recipe_warning`: the warning for a GPU-sized Three-Cell recipe about to run on a CPU.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Callable, Iterable, Optional, Sequence

__all__ = ["run_command", "debug_enabled", "error_line", "USER_ERRORS", "add_encoders_argument", "split_names",
           "check_encoders", "gpu_recipe_warning", "warn_gpu_recipe_on_cpu", "estimate_threecell_flops", "cpu_flops_per_second"]

#: errors that describe bad input (exit code 2); anything else is a bug or an environment failure (exit 1)
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, ImportError, KeyError)
_debug_depth = 0  # > 0 while an outer run_command was given --debug (nested commands re-raise too)


def error_line(command: str, exc: BaseException) -> str:
    """``visionpe <command>: error: <message on one line>`` (an unexpected error also names its type)."""
    msg = " ".join(part.strip() for part in str(exc).splitlines() if part.strip()) or type(exc).__name__
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        msg = f"missing key {exc.args[0]!r}"
    if not isinstance(exc, USER_ERRORS):
        msg = f"{type(exc).__name__}: {msg} (run with --debug for the traceback)"
    return f"visionpe {command}: error: {msg}"


def run_command(command: str, fn: Callable[[list], Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """Call ``fn(argv)`` and turn any exception into one line on stderr and an exit code (2: bad input,
    1: other failures, 130: Ctrl-C). ``--debug`` (anywhere in ``argv``) or ``VISIONPE_DEBUG=1`` re-raises."""
    global _debug_depth
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or _debug_depth > 0 or os.environ.get("VISIONPE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    _debug_depth += int(debug)
    try:
        return int(fn(argv) or 0)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"visionpe {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the point of this function
        if debug:
            raise
        print(error_line(command, e), file=sys.stderr)
        return 2 if isinstance(e, USER_ERRORS) else 1
    finally:
        _debug_depth -= int(debug)


def debug_enabled() -> bool:
    """Whether the running command was given ``--debug`` (or ``VISIONPE_DEBUG=1``): a command that reports its
    own errors re-raises them then, so that the traceback shows."""
    return _debug_depth > 0 or os.environ.get("VISIONPE_DEBUG", "") not in ("", "0")


# -- --encoders -----------------------------------------------------------------------------------------
def split_names(values: Optional[Iterable[str]]) -> Optional[list]:
    """``["a,b", "c d"]`` / ``"a, b"`` -> ``["a", "b", "c", "d"]``: names separated by commas and/or spaces,
    within one argument or across several (order kept, duplicates and blanks dropped); None stays None (the
    command's default set)."""
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    names = [n for v in values for n in re.split(r"[,\s]+", str(v))]
    return list(dict.fromkeys(n for n in names if n))


def add_encoders_argument(parser: argparse.ArgumentParser, help: str = "every registered encoder") -> None:
    """``--encoders`` taking ``a,b``, ``a b`` or a mix; the parsed value is a list of names or None."""
    class _Names(argparse.Action):
        def __call__(self, p, namespace, values, option_string=None):
            names = split_names(values)
            if not names:
                p.error(f"{option_string} needs at least one encoder name")
            setattr(namespace, self.dest, names)

    parser.add_argument("--encoders", nargs="+", action=_Names, default=None, metavar="NAME",
                        help=f"encoders, comma- or space-separated (default: {help}); see 'visionpe list'")


def check_encoders(names: Optional[Iterable[str]], known: Optional[Sequence[str]] = None) -> list:
    """The names, checked against the registry (``known``: default ``visionpe.list_encoders()``);
    ``ValueError`` listing the known ones for any other name."""
    if known is None:
        import visionpe
        known = visionpe.list_encoders()
    names = split_names(names) or []
    if not names:
        raise ValueError(f"--encoders: no encoder named; known encoders: {', '.join(known)}")
    unknown = [n for n in names if n not in known]
    if unknown:
        what = f"unknown encoder {unknown[0]!r}" if len(unknown) == 1 else \
            f"unknown encoders {', '.join(map(repr, unknown))}"
        raise ValueError(f"--encoders: {what}; known encoders: {', '.join(known)}")
    return names


# -- Three-Cell on a CPU --------------------------------------------------------------------------------
def estimate_threecell_flops(cfg: dict, num_encoders: int) -> float:
    """Floating-point operations of a Three-Cell run: ViT training (3 x forward) over the training split
    for every epoch, plus a forward over validation and test, for each encoder.

    ``cfg`` is a Three-Cell recipe dict (sections ``data``, ``model``, ``train``). Forward cost per image and
    block: ``2 * tokens * (4 + 2 * mlp_ratio) * dim**2`` (projections) ``+ 4 * tokens**2 * dim`` (attention).
    """
    d, m, t = cfg["data"], cfg["model"], cfg["train"]
    patch = m.get("patch_size") or d["cell_size"]
    tokens = (d["img_size"] // patch) ** 2 + 1
    dim, depth, ratio = m["embed_dim"], m["depth"], m.get("mlp_ratio", 4.0)
    fwd = depth * (2 * tokens * (4 + 2 * ratio) * dim ** 2 + 4 * tokens ** 2 * dim)
    n = d["num_samples"]
    split = d.get("split", [0.8, 0.1, 0.1])
    per_epoch = 3 * fwd * n * split[0] + fwd * n * split[1]
    return num_encoders * (t["epochs"] * per_epoch + fwd * n * split[2])


def cpu_flops_per_second(seconds: float = 0.2) -> float:
    """float32 matmul throughput of this CPU with torch's current thread count (a short measurement)."""
    import time

    import torch
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return n * 2 * 512 ** 3 / (time.perf_counter() - t0)


def _duration(seconds: float) -> str:
    for unit, s in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * s:
            return f"{seconds / s:.0f} {unit}"
    return f"{seconds:.0f} seconds"


def gpu_recipe_warning(cfg: dict, num_encoders: int, *, cuda_available: Optional[bool] = None,
                       flops_per_s: Optional[float] = None, threshold_s: float = 3600.0) -> Optional[str]:
    """The warning to print before a Three-Cell run that would take longer than ``threshold_s`` on this CPU,
    or None (a GPU is used, or the recipe is small). The estimate is a lower bound: model FLOPs over the
    measured matmul speed, ignoring data loading and small-kernel overheads."""
    device = str((cfg.get("run") or {}).get("device", "auto"))
    if cuda_available is None:
        import torch
        cuda_available = torch.cuda.is_available()
    if device.startswith("cuda") or (device == "auto" and cuda_available):
        return None
    seconds = estimate_threecell_flops(cfg, num_encoders) / (flops_per_s or cpu_flops_per_second())
    if seconds < threshold_s:
        return None
    d, m, t = cfg["data"], cfg["model"], cfg["train"]
    return (f"recipe {cfg.get('name', '?')!r} is sized for a GPU (ViT {m['depth']}x{m['embed_dim']} at "
            f"{d['img_size']} px, {d['num_samples']} images, {t['epochs']} epochs, {num_encoders} encoders) and this "
            f"run is on the CPU{'' if cuda_available else ' (no CUDA device found)'}: it would take at least "
            f"{_duration(seconds)} (model FLOPs over this CPU's matmul speed). For a CPU run use --quick; "
            f"stop with Ctrl-C")


def warn_gpu_recipe_on_cpu(cfg: dict, num_encoders: int, command: str = "threecell", stream=None) -> Optional[str]:
    """Print :func:`gpu_recipe_warning` (if any) as ``visionpe <command>: warning: ...``; returns it."""
    msg = gpu_recipe_warning(cfg, num_encoders)
    if msg:
        print(f"visionpe {command}: warning: {msg}", file=stream or sys.stderr, flush=True)
    return msg
