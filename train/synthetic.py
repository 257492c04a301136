"""Small offline datasets as image folders (smoke runs, tests, docs): random colour classes and the
scikit-learn handwritten digits upscaled.

Both write ``root/train/<class>/*.png`` and ``root/val/<class>/*.png``, the layout ``data.root`` expects.
"""
from __future__ import annotations

import os

import numpy as np

__all__ = ["make_color_folder", "make_digits_folder", "tiny_vit_config"]


def make_color_folder(root: str, num_classes: int = 3, train_per_class: int = 16, val_per_class: int = 6,
                      size: int = 40, seed: int = 0) -> str:
    """Noise images whose class is the dominant colour channel (easy, but needs real gradients)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(num_classes):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 200, (size, size, 3), dtype=np.uint8)
                a[..., c % 3] = np.clip(a[..., c % 3].astype(int) + 80 + 20 * (c // 3), 0, 255)
                Image.fromarray(a).save(os.path.join(d, f"{i:04d}.png"))
    return root


def make_digits_folder(root: str, size: int = 32, val_fraction: float = 0.25, seed: int = 0) -> dict:
    """scikit-learn's 1797 handwritten digits (8x8, 16 grey levels), upscaled bilinearly to ``size``,
    split per class into train/val. Returns ``{"train": n, "val": n, "classes": 10}``."""
    from PIL import Image

    from visionpe.extras import require
    load_digits = require("sklearn.datasets", "digits", "make_digits_folder").load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).astype(np.uint8)
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for c in range(10):
        idx = np.flatnonzero(digits.target == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        for split, part in (("val", idx[:n_val]), ("train", idx[n_val:])):
            d = os.path.join(root, split, str(c))
            os.makedirs(d, exist_ok=True)
            for i in part:
                img = Image.fromarray(images[i]).resize((size, size), Image.Resampling.BILINEAR).convert("RGB")
                img.save(os.path.join(d, f"{i:04d}.png"))
            counts[split] += len(part)
    return {**counts, "classes": 10}


def tiny_vit_config(root: str, output_dir: str, pe="rope_mixed", img_size: int = 32, patch_size: int = 8,
                    embed_dim: int = 32, depth: int = 2, num_heads: int = 2, **sections) -> dict:
    """A config dict for a tiny ViT on CPU (tests, smoke runs); ``sections`` update sections by key."""
    cfg = {
        "model": {"name": "vpe_vit_tiny_patch16_224", "pe": pe, "img_size": img_size, "drop_path_rate": 0.0,
                  "kwargs": {"patch_size": patch_size, "embed_dim": embed_dim, "depth": depth,
                             "num_heads": num_heads}},
        "data": {"root": root, "batch_size": 8, "workers": 0, "auto_augment": None, "re_prob": 0.0,
                 "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0},
        "optim": {"lr": 1e-3, "weight_decay": 0.05},
        "sched": {"epochs": 2, "warmup_epochs": 0, "min_lr": 1e-5},
        "train": {"output_dir": output_dir, "log_every": 1, "progress": False, "plot": False},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg
