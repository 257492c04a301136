"""``visionpe finetune`` / ``python -m visionpe.train``: fine-tune a ViT with any position encoding.

    visionpe finetune --config configs/finetune_deit_s_rope_mixed.yaml --set data.root=/data/imagenet
    torchrun --nproc_per_node 8 -m visionpe.train --config ... --set train.output_dir=runs/rope_mixed
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .config import load_config
from .loop import run

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visionpe finetune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help="YAML recipe (configs/finetune_*.yaml)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one recipe value (YAML syntax), e.g. --set optim.lr=1e-4; repeatable")
    p.add_argument("--output-dir", help="shortcut for --set train.output_dir=...")
    p.add_argument("--resume", help="checkpoint or run directory (shortcut for --set checkpoint.resume=...)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={json.dumps(args.output_dir)}")
    if args.resume:
        overrides.append(f"checkpoint.resume={json.dumps(args.resume)}")
    try:
        cfg = load_config(args.config, overrides)
        if args.print_config:
            import yaml
            from .config import config_to_dict
            print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            return 0
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        result = run(cfg)
    except ValueError as e:
        print(f"visionpe finetune: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
