"""``visionpe convert``: an official checkpoint -> a timm-loadable visionpe checkpoint folder.

    visionpe convert deit_small_patch16_224_ctx_product_50_shared_k.pth converted/irpe_k_small
    visionpe evalres --checkpoint converted/irpe_k_small --data-root /data/imagenet --resolutions 224

``DST`` (a folder) receives:

* ``model.safetensors``: the converted weights (visionpe keys);
* ``pretrained_cfg.json``: timm's ``pretrained_cfg`` of the weights (architecture, classifier, input size and the
  official eval preprocessing); ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=cfg |
  {"file": ".../model.safetensors"}, **kwargs)`` loads it;
* ``model.json``: ``{"name", "kwargs", "pe", "data_config"}``, the description ``visionpe evalres --checkpoint DST``
  (and ``visionpe.train.model.model_from_description``) rebuilds the model from.

``--list`` prints the released checkpoints; ``--verify DIR [--out FILE]`` checks the converters against a
folder of official reference outputs (``tests/reference/checkpoints``) and writes the max abs errors.
"""
from __future__ import annotations

import json
import os
import sys

from visionpe.cli_convert import build_parser

__all__ = ["main", "run_args", "convert_checkpoint"]

#: the official eval preprocessing of every family here (DeiT / DeiT-III / Twins: resize 256 -> crop 224, bicubic)
DATA_CONFIG = {"interpolation": "bicubic", "crop_pct": 0.875, "mean": [0.485, 0.456, 0.406],
               "std": [0.229, 0.224, 0.225]}


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


def convert_checkpoint(src, dst: str, family=None, **model_kwargs) -> dict:
    """Convert ``src`` into the folder ``dst`` (see the module docstring); returns the paths written."""
    from safetensors.torch import save_file
    from . import OFFICIAL_ARCH, load_official

    if os.path.isfile(dst):
        raise ValueError(f"DST {dst!r} is a file; give a folder (it receives model.safetensors, pretrained_cfg.json "
                         f"and model.json)")
    model = load_official(src, family, **model_kwargs)
    report = model.official_report
    kwargs = _jsonable(dict(report["spec"].model_kwargs))
    kwargs["img_size"] = list(model.patch_embed.img_size)
    pe = kwargs.pop("pe")
    h, w = model.patch_embed.img_size
    data_config = dict(DATA_CONFIG, input_size=[model.patch_embed.proj.in_channels, h, w])
    classifier = ["head", "head_dist"] if hasattr(model, "head_dist") else "head"
    cfg = dict(architecture=OFFICIAL_ARCH, num_classes=model.num_classes, input_size=data_config["input_size"],
               interpolation=data_config["interpolation"], crop_pct=data_config["crop_pct"],
               mean=data_config["mean"], std=data_config["std"], first_conv="patch_embed.proj",
               classifier=classifier, fixed_input_size=False,
               notes=[f"converted by `visionpe convert` from a {report['family']} checkpoint "
                      f"({os.path.basename(os.fspath(src)) if isinstance(src, (str, os.PathLike)) else 'state dict'})"]
               + [f"dropped {k}: {r}" for k, r in sorted(report["dropped"].items())])
    os.makedirs(dst, exist_ok=True)
    paths = {k: os.path.join(dst, f) for k, f in
             (("weights", "model.safetensors"), ("pretrained_cfg", "pretrained_cfg.json"), ("model", "model.json"))}
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, paths["weights"],
              metadata={"format": "pt", "source_family": report["family"]})
    with open(paths["pretrained_cfg"], "w") as f:
        json.dump(cfg, f, indent=1)
    with open(paths["model"], "w") as f:
        json.dump({"name": OFFICIAL_ARCH, "kwargs": kwargs, "pe": pe, "data_config": data_config}, f, indent=1)
    return paths


def releases_table() -> str:
    """Markdown table of the released checkpoints (reported accuracies, not measured here)."""
    from .releases import RELEASES
    lines = ["| timm name (`pretrained=True` downloads) | family | reported top-1 @224 | @384 | weights "
             "| layout tested by |", "|---|---|---|---|---|---|"]
    for r in RELEASES:
        where = r.url or f"hf-hub `{r.hf_hub_id}` / `{r.hf_hub_filename}`"
        at384 = r.top1.get(384)
        lines.append(f"| `{r.model_name}` | {r.family} | {r.top1[224]} | {at384 if at384 else '-'} | {where} | "
                     f"{f'`{r.reference}`' if r.reference else 'synthesised (tests/test_official_general.py)'} |")
    return "\n".join(lines) + "\n"


def release_commands(data_root: str = "/path/to/imagenet") -> str:
    """Shell lines that fetch each released checkpoint and evaluate it with ``visionpe evalres``."""
    from .releases import RELEASES
    lines = []
    for r in RELEASES:
        if r.url:
            fetch, file = f"curl -LO {r.url}", r.url.rsplit("/", 1)[-1]
        else:
            fetch = f"hf download {r.hf_hub_id} {r.hf_hub_filename} --local-dir {r.name}"
            file = f"{r.name}/{r.hf_hub_filename}"
        res = " ".join(str(k) for k in sorted(r.top1))
        lines += [f"# {r.name}: reported top-1 {r.top1}", fetch,
                  f"visionpe convert {file} converted/{r.name}",
                  f"visionpe evalres --checkpoint converted/{r.name} --data-root {data_root} --resolutions {res} "
                  f"--out evalres/{r.name}", ""]
    return "\n".join(lines)


def verify_table(rows) -> str:
    lines = ["| reference file | family | logits | features | tokens | within rtol=atol=1e-5 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        e = r["max_abs"]
        lines.append(f"| `{r['name']}` | {r['family']} | {e['logits']:.2e} | {e['features']:.2e} | {e['tokens']:.2e} | "
                     f"{'yes' if r['within_tol'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    try:
        return run_args(build_parser().parse_args(argv))
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"visionpe convert: error: {e}", file=sys.stderr)
        return 2


def run_args(args) -> int:
    """Carry out parsed ``visionpe convert`` arguments (the parser: :mod:`visionpe.cli_convert`); errors are
    raised (``visionpe convert`` turns them into one line)."""
    if args.list:
        print(releases_table())
        print(release_commands(), end="")
        return 0
    if args.verify:
        from .verify import verify_reference
        rows = verify_reference(args.verify)
        table = verify_table(rows)
        print(table, end="")
        if args.out:
            base = os.path.splitext(args.out)[0]
            os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
            with open(base + ".md", "w") as f:
                f.write("Converted official models vs the official outputs (max abs error, float32, eval mode).\n"
                        "Regenerate: `visionpe convert --verify tests/reference/checkpoints --out "
                        f"{os.path.relpath(base)}.md`\n\n" + table)
            with open(base + ".json", "w") as f:
                json.dump({"torch": __import__("torch").__version__, "rows": rows}, f, indent=1)
        return 0 if all(r["within_tol"] for r in rows) else 1
    if not (args.src and args.dst):
        raise ValueError("give SRC and DST (or --list / --verify DIR)")
    kwargs = dict(args.model_kwargs)
    if args.num_heads is not None:
        kwargs["num_heads"] = args.num_heads
    if args.rope is not None:
        kwargs["rope"] = args.rope
    paths = convert_checkpoint(args.src, args.dst, args.family, **kwargs)
    for k, v in paths.items():
        print(f"wrote {v}")
    return 0
