"""``visionpe finetune`` / ``python -m visionpe.train``: fine-tune a ViT with any position encoding.

    visionpe finetune -c finetune_deit_s_rope_mixed --set data.root=/data/imagenet
    visionpe finetune -c ... --resume                 # continue the newest run of this model and PE
    visionpe finetune -c ... --output-dir runs/x --fresh
    torchrun --nproc_per_node 8 -m visionpe.train -c ... --output-dir runs/rope_mixed

Each run writes into its own folder (default ``runs/finetune/<date>-<time>-<model>-<pe>``). SIGTERM or Ctrl-C
finishes the current step, writes a checkpoint and exits with 128 + the signal number; ``--resume`` continues
bit for bit.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visionpe finetune", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help="YAML recipe: a file or a packaged name (finetune_digits_cpu, ...)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one recipe value (YAML syntax), e.g. --set optim.lr=1e-4; repeatable")
    p.add_argument("--output-dir", help="the run folder (default: <train.output_root>/<date>-<time>-<model>-<pe>)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="PATH",
                   help="continue a run: without PATH the newest valid checkpoint of the run folder (or of the newest "
                        "run of this model and PE); PATH: a run folder or a checkpoints/update_* folder")
    p.add_argument("--fresh", action="store_true",
                   help="start over in a used --output-dir (its files are moved to <dir>.old-<time>)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def main(argv=None) -> int:
    from visionpe.cli_util import run_command
    return run_command("finetune", _main, argv)


def _main(argv=None) -> int:
    import logging

    from .config import config_to_dict, load_config

    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={json.dumps(args.output_dir)}")
    if args.resume:
        overrides.append(f"checkpoint.resume={json.dumps(args.resume)}")
    if args.fresh:
        overrides.append("checkpoint.fresh=true")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        import yaml
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0
    main_rank = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    from .loop import run
    result = run(cfg)
    if main_rank:
        print(json.dumps(result, indent=1))
    if result.get("stopped"):
        import signal
        return 128 + int(getattr(signal, result["stopped"], signal.SIGTERM))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
