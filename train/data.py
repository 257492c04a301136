"""Datasets, timm transforms, resumable samplers and loaders.

Reproducibility is what shapes this file: a run killed mid-epoch must resume to the same weights, and a
run on W processes must see the same global batches as a run on one. So

* every sample's augmentation is seeded from ``(seed, epoch, index)`` (:class:`SeededDataset`), which makes
  it independent of worker processes, ranks and restarts;
* :class:`GlobalBatchSampler` shuffles once per epoch with a seeded generator, cuts the permutation into
  *global* micro-batches and hands rank ``r`` the ``r``-th slice of each, starting at any micro-batch.

timm's ``create_loader`` builds its own sampler (no resume offset), so the loop uses a plain
``DataLoader`` around timm's datasets and transforms.
"""
from __future__ import annotations

import os
import random
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["SeededDataset", "GlobalBatchSampler", "ShardSampler", "build_dataset", "build_transforms",
           "build_mixup", "num_classes_of", "class_names_of", "labels_of", "check_classes", "check_labels",
           "ignore_sigint"]


class SeededDataset(Dataset):
    """Wrap a map-style dataset whose samplers yield ``(epoch, index)``: the transform runs under RNG
    states seeded by ``(seed, epoch, index)``; the caller's RNG states are restored afterwards."""

    def __init__(self, dataset, transform, seed: int = 0, seeded: bool = True):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.seeded = seeded

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        epoch, index = item if isinstance(item, tuple) else (0, item)
        img, target = self.dataset[index]
        if self.transform is None:
            return img, target
        if not self.seeded:
            return self.transform(img), target
        s = np.random.SeedSequence([self.seed, epoch, index]).generate_state(2)
        if torch.utils.data.get_worker_info() is not None:  # a worker's own streams matter to nobody
            self._seed_all(s)
            return self.transform(img), target
        # main process (workers=0): the training streams (dropout, Mixup) must not move
        py_state, np_state, t_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            self._seed_all(s)
            img = self.transform(img)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(t_state)
        return img, target

    @staticmethod
    def _seed_all(s) -> None:
        random.seed(int(s[0]))
        np.random.seed(int(s[1]))
        torch.default_generator.manual_seed(int(s[0]) ^ int(s[1]))  # CPU only: torch.manual_seed is 100x slower


class GlobalBatchSampler(Sampler):
    """Per-rank sample order of one training epoch: ``(epoch, index)`` items.

    The epoch permutation (``seed + epoch``) is cut into global micro-batches of ``batch_size * world_size``
    samples (an incomplete last one is dropped); rank ``r`` yields slice ``r`` of micro-batches
    ``start_batch, start_batch + 1, ...``. Single-process and W-process runs therefore see the same
    global batches.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_batch = 0, 0
        self.num_batches = num_samples // (batch_size * world_size)
        if self.num_batches == 0:
            raise ValueError(f"the training set has {num_samples} samples, fewer than one global batch "
                             f"({batch_size} x {world_size} processes); lower data.batch_size")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.num_batches - self.start_batch) * self.batch_size

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        g_batch = self.batch_size * self.world_size
        order = order[:self.num_batches * g_batch].view(self.num_batches, self.world_size, self.batch_size)
        for idx in order[self.start_batch:, self.rank].reshape(-1).tolist():
            yield self.epoch, idx


class ShardSampler(Sampler):
    """Evaluation order: rank ``r`` takes samples ``r, r + W, ...`` (no padding, so counts stay exact)."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, num_samples, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter((0, i) for i in self.indices)


def _is_folder(name: str) -> bool:
    return name in ("", "folder", "imagefolder")


def build_dataset(data_cfg, split: str, is_training: bool):
    """A timm dataset (image folders by default) for ``split``; clear errors for missing directories."""
    from timm.data import create_dataset

    root = data_cfg.root
    if root is None:
        raise ValueError("data.root is not set: point it at the dataset directory")
    if _is_folder(data_cfg.dataset):
        if not os.path.isdir(root):
            raise ValueError(f"data.root {root!r} does not exist or is not a directory")
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
            raise ValueError(f"data.root {root!r} has no {split!r} folder (found: {found}); set "
                             f"data.train_split / data.val_split")
        try:
            ds = create_dataset("", root=split_dir, split=split, is_training=is_training, search_split=False)
        except RuntimeError as e:  # timm's folder reader: "Found 0 images in subfolders of ..."
            if "Found 0 images" not in str(e):
                raise
            ds = []
        if len(ds) == 0:
            raise ValueError(f"no images found under {split_dir!r}: expected {split_dir}/<class name>/<image> "
                             f"(.png, .jpg, .jpeg)")
        return ds
    if not data_cfg.download and not os.path.isdir(root):
        raise ValueError(f"data.root {root!r} does not exist (set data.download: true for torch/* datasets)")
    return create_dataset(data_cfg.dataset, root=root, split=split, is_training=is_training,
                          download=data_cfg.download)


def num_classes_of(dataset) -> Optional[int]:
    """Class count of a timm/torchvision dataset, when it can tell."""
    names = class_names_of(dataset)
    return len(names) if names is not None else None


def class_names_of(dataset) -> Optional[list]:
    """Class names in label order (label ``i`` is ``names[i]``), when the dataset can tell."""
    reader = getattr(dataset, "reader", None)
    for obj in (reader, dataset):
        c2i = getattr(obj, "class_to_idx", None)
        if c2i:
            return [str(c) for c, _ in sorted(c2i.items(), key=lambda kv: kv[1])]
        classes = getattr(obj, "classes", None)
        if classes:
            return [str(c) for c in classes]
    return None


def labels_of(dataset) -> Optional[list]:
    """Every sample's label without loading an image (timm folder readers, torchvision datasets), or None."""
    reader = getattr(dataset, "reader", None)
    samples = getattr(reader, "samples", None) or getattr(dataset, "samples", None)
    if samples is not None:
        return [int(t) for _, t in samples]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return [int(t) for t in targets]
    return None


def _differ(a: list, b: list) -> str:
    only_a, only_b = [c for c in a if c not in set(b)], [c for c in b if c not in set(a)]
    parts = []
    if only_a:
        parts.append(f"only in the first: {only_a[:8]}{' ...' if len(only_a) > 8 else ''}")
    if only_b:
        parts.append(f"only in the second: {only_b[:8]}{' ...' if len(only_b) > 8 else ''}")
    if not parts:
        i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        parts.append(f"same names, different order from label {i} ({a[i]!r} vs {b[i]!r})")
    return "; ".join(parts)


def check_classes(names: Optional[list], other: Optional[list], what: str, other_what: str) -> None:
    """Two class lists must be equal (same names, same label order); ``ValueError`` naming both sides."""
    if names is None or other is None or list(names) == list(other):
        return
    raise ValueError(f"{what} has {len(names)} classes and {other_what} has {len(other)}, and they differ "
                     f"({_differ(list(names), list(other))}): labels would not mean the same class")


def check_labels(dataset, num_classes: int, what: str) -> None:
    """Every label of ``dataset`` must be a valid index of a ``num_classes``-way head."""
    labels = labels_of(dataset)
    if labels:
        lo, hi = min(labels), max(labels)
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{what} has labels {lo}..{hi}, but the model's head has {num_classes} classes "
                             f"(labels 0..{num_classes - 1})")


def ignore_sigint(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a Ctrl-C reaches the whole process group; only the main process
    handles it (it finishes the step and saves), workers must not die under it."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_transforms(data_cfg, data_config: dict):
    """timm train/eval transforms from the resolved model data config plus the recipe's augmentation."""
    from timm.data import create_transform

    common = dict(input_size=data_config["input_size"], interpolation=data_config["interpolation"],
                  mean=data_config["mean"], std=data_config["std"])
    train_tf = create_transform(
        is_training=True, no_aug=data_cfg.no_aug, scale=tuple(data_cfg.scale), ratio=tuple(data_cfg.ratio),
        hflip=data_cfg.hflip, color_jitter=data_cfg.color_jitter, auto_augment=data_cfg.auto_augment,
        re_prob=data_cfg.re_prob, re_mode=data_cfg.re_mode, re_count=data_cfg.re_count, **common)
    eval_tf = create_transform(is_training=False, crop_pct=data_config["crop_pct"], **common)
    return train_tf, eval_tf


def build_mixup(data_cfg, num_classes: int):
    """timm ``Mixup`` (soft targets, label smoothing folded in) or None when both alphas are 0."""
    if data_cfg.mixup <= 0 and data_cfg.cutmix <= 0:
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=data_cfg.mixup, cutmix_alpha=data_cfg.cutmix, prob=data_cfg.mixup_prob,
                 switch_prob=data_cfg.mixup_switch_prob, mode=data_cfg.mixup_mode,
                 label_smoothing=data_cfg.label_smoothing, num_classes=num_classes)
