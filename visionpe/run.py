"""Run a Python script or module with the ``vpe_vit_*`` models registered in timm.

timm loads no plugins: its registry only knows the models whose module was imported. A config-driven tool
that only calls ``timm.create_model(name)`` (timm's ``train.py``, open_clip's training) therefore sees the
``vpe_vit_*`` names when started through this runner::

    python -m visionpe.run train.py --model vpe_vit_small_patch16_224_rope_mixed ...
    python -m visionpe.run -m open_clip_train.main --model ...

It imports :mod:`visionpe.models` (which registers the names), then runs the script (or module) as
``__main__`` with :mod:`runpy`: ``sys.argv`` is ``[SCRIPT, ARGS...]`` and the script's directory is
``sys.path[0]``, as with ``python SCRIPT ARGS...``; with ``-m`` the current directory stays on
``sys.path`` and ``sys.argv[0]`` is the module's file, as with ``python -m MODULE ARGS...``.
"""
from __future__ import annotations

import os
import runpy
import sys
from typing import Optional, Sequence

__all__ = ["main"]

USAGE = ("usage: python -m visionpe.run SCRIPT [ARGS...]\n"
         "       python -m visionpe.run -m MODULE [ARGS...]\n"
         "Registers the vpe_vit_* models in timm, then runs SCRIPT (or MODULE) as __main__ with ARGS.")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Register the models, then run ``argv`` (default ``sys.argv[1:]``) like the Python command line.

    Raises:
        SystemExit: code 2 with the usage text when no script or module is given; otherwise whatever the
            script raises (its own ``sys.exit`` included) propagates unchanged.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not args else sys.stdout)
        raise SystemExit(2 if not args else 0)

    import visionpe.models  # noqa: F401  (registers vpe_vit_* with timm)

    if args[0] == "-m":
        if len(args) < 2:
            print("visionpe.run: -m needs a module name\n" + USAGE, file=sys.stderr)
            raise SystemExit(2)
        module, rest = args[1], args[2:]
        sys.argv = [module, *rest]  # run_module(alter_sys=True) replaces argv[0] with the module's file
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return

    script, rest = args[0], args[1:]
    if script.startswith("-"):
        print(f"visionpe.run: unknown option {script!r}\n" + USAGE, file=sys.stderr)
        raise SystemExit(2)
    if not os.path.exists(script):
        print(f"visionpe.run: can't open file {script!r}: no such file", file=sys.stderr)
        raise SystemExit(2)
    sys.argv = [script, *rest]
    script_dir = os.path.dirname(os.path.abspath(script))
    if sys.path and sys.path[0] in ("", os.getcwd()):
        sys.path[0] = script_dir  # `python SCRIPT` puts the script's directory first, not the cwd
    else:
        sys.path.insert(0, script_dir)
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
