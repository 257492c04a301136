"""``visionpe`` command line: ``visionpe <command> [options]``.

Subcommands are imported only when they run, and ``visionpe`` itself imports torch and timm lazily, so
``visionpe --help``, ``visionpe --version`` and ``visionpe <command> --help`` answer at once. Errors are one line
(``visionpe <command>: error: ...``); ``--debug`` anywhere on the line shows the traceback instead.
"""
from __future__ import annotations

import importlib
import sys

from .cli_util import run_command

# command -> (module, function, one-line help)
COMMANDS = {
    "list": ("visionpe.cli", "cmd_list", "encoders with a one-line description and the hooks they use"),
    "bench": ("visionpe.eval.bench", "main", "speed/memory benchmark of every encoder in a ViT ('bench vlm' for VLM positions)"),
    "demo": ("visionpe.eval.demo", "main", "build each encoder in a small ViT and print a table"),
    "threecell": ("visionpe.eval.threecell", "main", "the Three-Cell spatial diagnostic (+ PESI metrics)"),
    "vlmdiag": ("visionpe.eval.vlmdiag", "main", "the VLM position-scheme diagnostic (where/when in videos, longer videos, larger frames)"),
    "pesi": ("visionpe.eval.pesi", "main", "PESI metrics and PE-similarity heatmaps of encoders"),
    "finetune": ("visionpe.train.finetune", "main", "ImageNet-style fine-tuning with any encoder"),
    "evalres": ("visionpe.eval.evalres", "main", "evaluate a checkpoint at several resolutions"),
    "convert": ("visionpe.cli_convert", "main", "official iRPE/RoPE-ViT/PEG/LOOPE checkpoint -> timm-loadable folder"),
}

#: commands with subcommands of their own (``visionpe bench sweep``): errors name the subcommand too
SUBCOMMANDS = {"bench": ("sweep", "vlm")}


def cmd_list(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="visionpe list", description="List the registered position encoders.")
    p.add_argument("--hook", choices=("embed", "bias", "rotate"), help="only encoders implementing this hook")
    args = p.parse_args(argv)
    import visionpe
    from visionpe.base import encoders_table
    rows = encoders_table(visionpe.list_encoders(args.hook))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"{'encoder':<{w0}}  {'hooks':<{w1}}  description")
    for name, hooks, desc in rows:
        print(f"{name:<{w0}}  {hooks:<{w1}}  {desc}")
    return 0


def _version() -> str:
    from . import __version__
    return __version__


def _usage() -> str:
    lines = ["usage: visionpe [--version] [--debug] <command> [options]", "", "commands:"]
    w = max(map(len, COMMANDS))
    lines += [f"  {name:<{w}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run 'visionpe <command> --help' for a command's options; add --debug to see an error's traceback."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = [a for a in argv if a == "--debug"]
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"visionpe {_version()}")
        return 0
    cmd, rest = argv[0], argv[1:] + debug
    if cmd not in COMMANDS:
        print(f"visionpe: error: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    mod_name, fn_name, _ = COMMANDS[cmd]

    def call(args):
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name:
                raise ValueError(f"command {cmd!r} is not available in this build ({mod_name} missing)") from None
            raise
        return getattr(mod, fn_name)(args)

    label = f"{cmd} {rest[0]}" if rest and rest[0] in SUBCOMMANDS.get(cmd, ()) else cmd
    return run_command(label, call, rest)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
