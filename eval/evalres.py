"""``visionpe evalres``: accuracy of checkpoints at several input resolutions (RoPE-ViT's table).

    visionpe evalres --checkpoint runs/ape runs/rope_mixed --data-root /data/imagenet \\
        --resolutions 144 192 224 256 320 384 512 --out results/evalres

Each model is rebuilt with ``dynamic_img_size=True`` and evaluated, without fine-tuning, on the validation
images resized to every resolution (resize to ``res / crop_pct``, centre crop ``res``: the DeiT/RoPE-ViT
protocol). APE tables are resampled on the fly (bicubic), RoPE positions extrapolate, bias tables are
resampled by their encoder. Writes ``evalres.{md,csv,json,png}``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from typing import Optional, Sequence

__all__ = ["main", "load_for_eval", "evaluate_resolutions", "write_outputs", "check_head_and_classes"]

DEFAULT_RESOLUTIONS = (160, 224, 320, 384, 512)


def _find_weights(path: str, ema: bool):
    """``(description, state_dict, label)`` from a run dir, a checkpoint dir or a .safetensors file."""
    from safetensors.torch import load_file
    from visionpe.train.checkpoint import InvalidCheckpoint, validate_checkpoint
    from visionpe.train.model import load_description

    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "meta.json")):  # checkpoints/update_*
        try:
            meta = validate_checkpoint(path)
        except InvalidCheckpoint as e:
            raise ValueError(f"checkpoint {path!r} cannot be used: {e}") from None
        desc = dict(meta["model"], classes=meta.get("classes", meta["model"].get("classes")))
        weights = os.path.join(path, "model_ema.safetensors" if ema else "model.safetensors")
        if not os.path.isfile(weights):
            raise ValueError(f"--ema: checkpoint {path!r} has no EMA weights")
        return desc, load_file(weights), os.path.basename(os.path.normpath(path)) + (" (EMA)" if ema else "")
    if os.path.isdir(path):  # a run directory
        weights = os.path.join(path, "model_ema.safetensors" if ema else "model.safetensors")
        desc_path = os.path.join(path, "model.json")
    elif path.endswith(".safetensors") and os.path.isfile(path):
        weights, desc_path = path, os.path.join(os.path.dirname(os.path.abspath(path)), "model.json")
    else:
        raise ValueError(f"checkpoint {path!r} does not exist (expected a run directory, a checkpoints/update_* "
                         f"directory or a .safetensors file)")
    if not os.path.isfile(weights):
        raise ValueError(f"checkpoint {path!r} has no {os.path.basename(weights)}")
    if not os.path.isfile(desc_path):
        raise ValueError(f"no model.json next to {weights!r}: evalres needs the model description a "
                         f"fine-tuning run writes (or use --model NAME --pretrained-file FILE)")
    run_dir = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    label = os.path.basename(os.path.normpath(run_dir))
    return load_description(desc_path), load_file(weights), label + (" (EMA)" if ema else "")


def check_head_and_classes(model, classes: Optional[list], data_classes: Optional[list], label: str,
                           data_what: str) -> None:
    """The model must score the classes the data has: same class names when the checkpoint stored them, and
    a head as wide as the data's class count. ``ValueError`` naming both sides otherwise."""
    from visionpe.train.data import check_classes
    check_classes(classes, data_classes, f"{label} (trained on)", data_what)
    head = getattr(model, "num_classes", None)
    if data_classes is not None and head is not None and head != len(data_classes):
        raise ValueError(f"{label}: the model's head has {head} classes, {data_what} has {len(data_classes)} "
                         f"({', '.join(data_classes[:6])}{', ...' if len(data_classes) > 6 else ''}); accuracy would "
                         f"be meaningless: evaluate a model trained on these classes (with --model: --num-classes "
                         f"{len(data_classes)} and weights whose head has them)")


def load_for_eval(checkpoint: Optional[str] = None, *, model_name: Optional[str] = None, pe=None,
                  pretrained_file: Optional[str] = None, ema: bool = False, pad: bool = False, num_classes=None,
                  model_kwargs: Optional[dict] = None, with_classes: bool = False):
    """``(model, data_config, label)`` ready for multi-resolution evaluation (``dynamic_img_size=True``);
    ``with_classes``: also the class names the checkpoint was trained on (None when it does not say)."""
    from timm.data import resolve_input_data_config
    from visionpe.models.swap import check_state_dict
    from visionpe.train.model import create_model_with_pe, model_from_description

    dyn = dict(dynamic_img_size=True, **({"dynamic_img_pad": True} if pad else {}))
    if checkpoint is not None:
        desc, sd, label = _find_weights(checkpoint, ema)
        model = model_from_description(desc, **dyn)
        check_state_dict(sd, model, what=f"checkpoint {checkpoint!r}")
        model.load_state_dict(sd)
        data_config = dict(desc.get("data_config") or resolve_input_data_config(model))
        classes = desc.get("classes")
    elif model_name is not None:
        kwargs = dict(model_kwargs or {}, **dyn, **({"num_classes": num_classes} if num_classes else {}))
        model = create_model_with_pe(model_name, kwargs, pe, pretrained_file, keep_head=True)
        data_config = dict(resolve_input_data_config(model))
        label = model_name + (f" pe={json.dumps(pe) if isinstance(pe, dict) else pe}" if pe else "")
        classes = None
    else:
        raise ValueError("give a checkpoint or a model name")
    if with_classes:
        return model.eval(), data_config, label, classes
    return model.eval(), data_config, label


def _check_resolutions(model, resolutions) -> None:
    from visionpe.train.model import check_resolution
    for r in resolutions:
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"resolutions must be positive ints; got {r!r}")
        check_resolution(model, r, f"resolution {r}:")


def evaluate_resolutions(model, dataset, data_config: dict, resolutions: Sequence[int], *, batch_size: int = 64,
                         workers: int = 0, device="cpu", limit: Optional[int] = None, progress: bool = False) -> dict:
    """``{res: {"top1", "top5", "loss"}}`` for a dataset of raw ``(PIL image, target)`` items."""
    from timm.data import create_transform
    from visionpe.train.data import SeededDataset, ShardSampler
    from contextlib import nullcontext

    import torch
    from visionpe.train.distributed import DistInfo
    from visionpe.train.evaluation import evaluate

    _check_resolutions(model, resolutions)
    model.to(device)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    num_classes = getattr(model, "num_classes", 1000)
    out = {}
    for r in resolutions:
        tf = create_transform(input_size=(3, r, r), is_training=False, interpolation=data_config["interpolation"],
                              mean=tuple(data_config["mean"]), std=tuple(data_config["std"]),
                              crop_pct=data_config.get("crop_pct"))
        loader = torch.utils.data.DataLoader(SeededDataset(dataset, tf, seeded=False), batch_size=batch_size,
                                             sampler=ShardSampler(n), num_workers=workers)
        out[r] = evaluate(model, loader, torch.device(device), nullcontext, DistInfo(), num_classes)
        if progress:
            print(f"  {r}px: top-1 {out[r]['top1']:.2f}%", file=sys.stderr)
    return out


def write_outputs(rows: list, resolutions: Sequence[int], out_dir: str, train_res: Optional[int] = None) -> dict:
    """Markdown/CSV/JSON tables (rows = models, columns = resolutions, top-1 %) and a plot."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"evalres.{k}") for k in ("md", "csv", "json", "png")}
    head = "| model | " + " | ".join(str(r) for r in resolutions) + " |"
    lines = [head, "|---|" + "---|" * len(resolutions)]
    for row in rows:
        cells = [f"{row['top1'][r]:.2f}" for r in resolutions]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    with open(paths["md"], "w") as f:
        f.write("top-1 accuracy (%) by evaluation resolution\n\n" + md)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model"] + [str(r) for r in resolutions])
        for row in rows:
            w.writerow([row["label"]] + [f"{row['top1'][r]:.4f}" for r in resolutions])
    with open(paths["json"], "w") as f:
        json.dump({"resolutions": list(resolutions), "models": [
            {"label": r["label"], "metrics": {str(k): v for k, v in r["metrics"].items()}} for r in rows]}, f, indent=1)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        ax.plot(list(resolutions), [row["top1"][r] for r in resolutions], "o-", label=row["label"])
    if train_res:
        ax.axvline(train_res, color="grey", ls=":", lw=1, label=f"train res {train_res}")
    ax.set_xlabel("evaluation resolution (px)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_xticks(list(resolutions))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=110)
    plt.close(fig)
    paths["table"] = md
    return paths


def _pe_arg(value: str):
    """``--pe``: an encoder name, or a JSON object ``{"name": ..., **options}``."""
    if not value.lstrip().startswith("{"):
        return value
    try:
        pe = json.loads(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(pe, dict):
        raise argparse.ArgumentTypeError("give an encoder name or a JSON object")
    return pe


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visionpe evalres", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("models (one or more checkpoints, or one timm model)")
    src.add_argument("--checkpoint", nargs="+", default=[], metavar="PATH",
                     help="run directories, checkpoints/update_* directories or .safetensors files (with model.json)")
    src.add_argument("--model", help="timm model name instead of a checkpoint (e.g. vpe_vit_small_patch16_224)")
    src.add_argument("--pe", type=_pe_arg, metavar="NAME|JSON",
                     help="encoder for --model: a name, or JSON with options, e.g. '{\"name\": \"rope_mixed\", "
                          "\"theta\": 100}' (swaps plain timm ViTs)")
    src.add_argument("--pretrained-file", help="weights for --model (loaded via pretrained_cfg_overlay)")
    src.add_argument("--num-classes", type=int, help="classifier size for --model")
    src.add_argument("--model-kwargs", type=json.loads, default={}, metavar="JSON",
                     help="more timm.create_model arguments for --model, e.g. '{\"img_size\": 384}'")
    src.add_argument("--labels", nargs="+", help="row labels (default: directory names)")
    p.add_argument("--data-root", required=True, help="dataset root (image folders: <root>/<split>/<class>/...)")
    p.add_argument("--dataset", default="", help="timm dataset name ('' = image folders)")
    p.add_argument("--split", default="val")
    p.add_argument("--resolutions", nargs="+", type=int, default=list(DEFAULT_RESOLUTIONS))
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--pad", action="store_true", help="pad images whose size is not a multiple of the patch size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="evalres", help="output directory")
    return p


def main(argv=None) -> int:
    from visionpe.cli_util import run_command
    return run_command("evalres", lambda a: _main(build_parser().parse_args(a)), argv)


def _main(args) -> int:
    import torch
    from visionpe.train.config import DataConfig
    from visionpe.train.data import build_dataset, class_names_of

    if not args.checkpoint and not args.model:
        raise ValueError("give --checkpoint PATH [PATH ...] or --model NAME")
    if args.labels and len(args.labels) != max(len(args.checkpoint), 1):
        raise ValueError(f"--labels has {len(args.labels)} entries for {max(len(args.checkpoint), 1)} models")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dataset = build_dataset(DataConfig(root=args.data_root, dataset=args.dataset), args.split, is_training=False)
    dataset.transform = None
    data_classes = class_names_of(dataset)
    data_what = f"the data ({args.data_root}, split {args.split!r})"
    sources = args.checkpoint or [None]
    models = []
    for src in sources:  # build (and check) every model before the long part
        model, dc, label, classes = load_for_eval(
            src, model_name=args.model, pe=args.pe, pretrained_file=args.pretrained_file, ema=args.ema, pad=args.pad,
            num_classes=args.num_classes, model_kwargs=args.model_kwargs, with_classes=True)
        check_head_and_classes(model, classes, data_classes, f"model {label!r}", data_what)
        _check_resolutions(model, args.resolutions)
        models.append((model, dc, label))
    rows = []
    for i, (model, dc, label) in enumerate(models):
        label = args.labels[i] if args.labels else label
        print(f"{label}:", file=sys.stderr)
        metrics = evaluate_resolutions(model, dataset, dc, args.resolutions, batch_size=args.batch_size,
                                       workers=args.workers, device=device, limit=args.limit, progress=True)
        rows.append({"label": label, "metrics": metrics, "top1": {r: metrics[r]["top1"] for r in metrics}})
    train_res = models[0][1]["input_size"][-1] if models[0][1].get("input_size") else None
    paths = write_outputs(rows, args.resolutions, args.out, train_res)
    print(paths["table"])
    print(f"wrote {paths['md']}, {paths['csv']}, {paths['json']}, {paths['png']}", file=sys.stderr)
    return 0 if all(not math.isnan(v) for r in rows for v in r["top1"].values()) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
