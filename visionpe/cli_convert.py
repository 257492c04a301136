"""``visionpe convert``: an official checkpoint -> a timm-loadable visionpe checkpoint folder.

This module is the command line only (argparse, no torch), so ``visionpe convert --help`` answers at once; the
work is done by :mod:`visionpe.models.official.cli`, imported once the arguments are parsed.
"""
from __future__ import annotations

import argparse
import json

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visionpe convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="?", help="official checkpoint (.pth, .safetensors)")
    p.add_argument("dst", nargs="?", help="output folder")
    p.add_argument("--family", choices=["irpe", "ropevit", "peg", "loope"], help="default: detected from the keys")
    p.add_argument("--num-heads", type=int, help="attention heads, for checkpoints that do not store them")
    p.add_argument("--rope", choices=["axial", "mixed", "none"], help="RoPE-ViT: RoPE kind (default: from the keys)")
    p.add_argument("--model-kwargs", type=json.loads, default={}, metavar="JSON",
                   help="more load_official arguments, e.g. '{\"pe\": {\"ratio\": 2.0}}'")
    p.add_argument("--list", action="store_true", help="print the released checkpoints and exit")
    p.add_argument("--verify", metavar="DIR", help="check the converters on a reference folder and exit")
    p.add_argument("--out", help="with --verify: write the table (.md) and the numbers (.json) next to it")
    return p


def main(argv=None) -> int:
    """Parse ``argv``, then run the conversion (:func:`visionpe.models.official.cli.run_args`)."""
    args = build_parser().parse_args(argv)
    from visionpe.models.official.cli import run_args
    return run_args(args)
