"""Three-Cell probe + PESI of a model being trained elsewhere (e.g. fine-tuning), without changing it.

:func:`threecell_probe` measures how much spatial information a model's **frozen** features keep:

1. Three-Cell images are generated at the model's own input size, with cells of the model's patch size
   (so every patch is one cell, as in the diagnostic; cached like any Three-Cell data);
2. features = ``model.forward_head(model.forward_features(x), pre_logits=True)``, the model's own pooled
   representation (class token or average pool), in eval mode under ``torch.no_grad``;
3. a linear probe (6 logistic outputs, BCE, AdamW on standardised features) is fit on the train split and
   scored on the test split with the grouped accuracy of the diagnostic (spec §8.4);
4. PESI of the model's encoder (:func:`visionpe.eval.pesi.model_pesi`).

The model's parameters, buffers, gradients and train/eval mode are left as they were. A linear probe of
pooled features is a lower bound on what the model "knows": a trained no-PE model still sits at the
label-majority rates, which are returned as ``threecell/majority_avg`` for reference.

:class:`ThreeCellProbeCallback` runs the probe every ``every`` epochs for a training loop.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .threecell_data import ThreeCellConfig, ThreeCellData, group_accuracies, render
from .threecell_train import majority_accuracies

__all__ = ["threecell_probe", "ThreeCellProbeCallback"]


def _unwrap(model):
    # DDP / DataParallel / torch.compile wrappers keep the real module here
    for attr in ("module", "_orig_mod"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), torch.nn.Module):
            model = getattr(model, attr)
    return model


@torch.no_grad()
def _features(model, coords, grid, cell, device, dtype, batch_size: int) -> torch.Tensor:
    out = []
    for i in range(0, len(coords), batch_size):
        x = render(coords[i:i + batch_size], grid, cell).to(device=device, dtype=dtype)
        f = model.forward_head(model.forward_features(x), pre_logits=True)
        out.append(f.float().reshape(f.shape[0], -1).cpu())
    return torch.cat(out)


def _standardise(ftr: torch.Tensor, fte: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-mean, unit-variance features (train statistics); dimensions that vary by less than
    ``tol`` x the feature RMS become 0.

    Why the floor: a model without position encoding gives the same features for every image up to float
    rounding, and that rounding depends on the token order, i.e. on where the cells are. Scaling it up to
    unit variance would let the probe read positions from noise (seen: 64% instead of the 59% majority).
    ``tol`` sits far above rounding noise (1e-3 for fp32 models, 3e-2 for half precision).
    """
    tol = 3e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3
    mean, std = ftr.mean(0), ftr.std(0)
    rms = ftr.pow(2).mean().sqrt().clamp_min(1e-30)
    keep = std > tol * rms
    scale = torch.where(keep, std, torch.ones_like(std))
    return (ftr - mean) / scale * keep, (fte - mean) / scale * keep


def _fit_linear(xtr, ytr, epochs: int, seed: int, lr: float, weight_decay: float, batch_size: int):
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(xtr.shape[1], 6)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=gen)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(xtr) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(len(xtr), generator=gen)
            for i in range(0, len(xtr), batch_size):
                idx = perm[i:i + batch_size]
                loss = loss_fn(head(xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    return head


def threecell_probe(model, *, num_samples: int = 2000, epochs: int = 30, seed: int = 0, pesi: bool = True,
                    pesi_buckets: int = 60, batch_size: int = 256, lr: float = 1e-2, weight_decay: float = 1e-4,
                    cache_dir=None, **cfg) -> dict[str, float]:
    """Linear Three-Cell probe of ``model``'s frozen features, plus PESI of its encoder.

    Args:
        model: a ViT with ``patch_embed`` (``img_size``, ``patch_size``), ``forward_features`` and
            ``forward_head(..., pre_logits=True)`` (a :class:`visionpe.models.vit.VisionPEViT` or another
            timm ViT), possibly wrapped in DDP / ``torch.compile``.
        num_samples: Three-Cell images generated (split 80/10/10; the probe trains on train, reports test).
        epochs: passes of the linear probe over the training features.
        seed: data and probe seed.
        pesi: add ``pesi/*`` keys (NaN for encoders without a position signal, or for non-visionpe models).
        **cfg: extra :class:`ThreeCellConfig` fields (``max_attempts``, ``reject_colinear``, ``split``).

    Returns a flat dict: ``threecell/{distance,orientation,area,vector_sum,avg}`` and
    ``threecell/majority_avg`` in percent, ``pesi/{M_U,M_D,A_SU}``.
    """
    from .pesi import model_pesi
    core = _unwrap(model)
    pe_mod = getattr(core, "patch_embed", None)
    if pe_mod is None or not hasattr(core, "forward_features") or not hasattr(core, "forward_head"):
        raise TypeError(f"model must be a ViT with patch_embed, forward_features and forward_head; "
                        f"got {type(core).__name__}")
    ph, pw = tuple(pe_mod.patch_size)
    if ph != pw:
        raise ValueError(f"the probe needs square patches (cells are square); got patch_size {(ph, pw)}")
    img_size = tuple(pe_mod.img_size)
    data = ThreeCellData(ThreeCellConfig(img_size=img_size, cell_size=ph, num_samples=num_samples, seed=seed,
                                         **cfg), cache_dir)
    param = next(core.parameters())
    was_training = core.training
    core.eval()
    try:
        feats = {s: _features(core, data.split(s)["coords"], data.cfg.grid, data.cfg.cell_size, param.device,
                              param.dtype, batch_size) for s in ("train", "test")}
    finally:
        core.train(was_training)
    labels = {s: torch.from_numpy(data.split(s)["labels"].astype(np.float32)) for s in ("train", "test")}
    xtr, xte = _standardise(feats["train"], feats["test"], param.dtype)
    head = _fit_linear(xtr, labels["train"], epochs, seed, lr, weight_decay, batch_size)
    with torch.no_grad():
        acc = group_accuracies(head(xte), labels["test"])
    out = {f"threecell/{k}": 100.0 * v for k, v in acc.items()}
    out["threecell/majority_avg"] = majority_accuracies(data.split("train")["labels"],
                                                        data.split("test")["labels"])["avg"]
    if pesi:
        try:
            metrics = model_pesi(core, num_buckets=pesi_buckets)
        except TypeError:  # not a visionpe model: no encoder to measure
            metrics = {"M_U": math.nan, "M_D": math.nan, "A_SU": math.nan}
        out.update({f"pesi/{k}": v for k, v in metrics.items()})
    return out


class ThreeCellProbeCallback:
    """Run :func:`threecell_probe` every ``every`` epochs (and on the last one) of a training loop.

    >>> probe = ThreeCellProbeCallback(every=5, num_samples=2000)
    >>> for epoch in range(num_epochs):
    ...     train_one_epoch(...)
    ...     metrics.update(probe(model, epoch, last=epoch == num_epochs - 1))   # {} when not due

    Only the process with ``rank == 0`` runs it under DDP (pass ``rank``); the result is a flat dict to
    log next to the training metrics.
    """

    def __init__(self, every: int = 1, rank: int = 0, **probe_kwargs):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1; got {every!r}")
        self.every, self.rank, self.kwargs = every, rank, probe_kwargs

    def due(self, epoch: int, last: bool = False) -> bool:
        """``epoch`` is 0-based: with ``every=5`` the probe runs after epochs 4, 9, ... (and the last)."""
        return self.rank == 0 and (last or (epoch + 1) % self.every == 0)

    def __call__(self, model, epoch: int, last: bool = False) -> dict[str, float]:
        if not self.due(epoch, last):
            return {}
        return threecell_probe(model, **self.kwargs)
