"""``visionpe`` command line: ``visionpe <command> [options]``.

Subcommands are looked up lazily so that ``visionpe list`` does not import the training stack.
"""
from __future__ import annotations

import importlib
import sys

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
}


def cmd_list(argv=None) -> int:
    import argparse
    import visionpe
    from visionpe.base import encoders_table
    p = argparse.ArgumentParser(prog="visionpe list", description="List the registered position encoders.")
    p.add_argument("--hook", choices=visionpe.HOOKS, help="only encoders implementing this hook")
    args = p.parse_args(argv)
    rows = encoders_table(visionpe.list_encoders(args.hook))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"{'encoder':<{w0}}  {'hooks':<{w1}}  description")
    for name, hooks, desc in rows:
        print(f"{name:<{w0}}  {hooks:<{w1}}  {desc}")
    return 0


def _usage() -> str:
    lines = ["usage: visionpe <command> [options]", "", "commands:"]
    w = max(map(len, COMMANDS))
    lines += [f"  {name:<{w}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run 'visionpe <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"visionpe: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    mod_name, fn_name, _ = COMMANDS[cmd]
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name == mod_name:
            print(f"visionpe: command {cmd!r} is not available in this build ({mod_name} missing)", file=sys.stderr)
            return 2
        raise
    rc = getattr(mod, fn_name)(rest)
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
