"""Three-Cell probe + PESI of a model being trained elsewhere (e.g. fine-tuning), without changing it.

:func:`threecell_probe` measures how much spatial information a model's **frozen** features keep:

1. Three-Cell images are generated at the model's own input size, with cells of the model's patch size
   (so every patch is one cell, as in the diagnostic; cached like any Three-Cell data);
2. features = ``model.forward_head(model.forward_features(x), pre_logits=True)``, the model's own pooled
   representation (class token or average pool), in eval mode under ``torch.no_grad``;
3. a linear probe (6 logistic outputs, BCE, AdamW on standardised features) is fit on the train split and
   scored on the test split with the grouped accuracy of the diagnostic (spec §8.4);
4. PESI of the model's encoder (:func:`visionpe.eval.pesi.model_pesi`);
5. optionally (``test_grids``), the same linear probe, fit on the model's own grid, scored on Three-Cell
   images of other grids (same cell size), with the model run at those sizes the way the package runs a
   model at a new resolution (``dynamic_img_size``: :func:`visionpe.eval.threecell_model.any_grid_copy`).
   This tells, as a fine-tuning run goes, how well what the encoder gives the model carries over to another
   grid (see :mod:`visionpe.eval.threecell_generalise` for the trained-model version).

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
from .threecell_model import any_grid_copy
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


def _standardise(ftr: torch.Tensor, dtype):
    """A function that standardises features with ``ftr``'s statistics (zero mean, unit variance);
    dimensions that vary by less than ``tol`` x the feature RMS become 0.

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
    return lambda f: (f - mean) / scale * keep


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


def _probe_grids(test_grids, own) -> list[tuple[int, int]]:
    """``test_grids`` -> distinct ``(h, w)`` grids other than ``own``: a side ``n``, a tuple ``(h, w)``, or a
    list of sides and ``[h, w]`` pairs (a YAML list ``[20, 24]`` is two grids, ``[[20, 24]]`` one)."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_pair(v):
        return isinstance(v, (list, tuple)) and len(v) == 2 and all(is_int(x) for x in v)
    if test_grids is None:
        return []
    if is_int(test_grids) or (isinstance(test_grids, tuple) and is_pair(test_grids)):
        items = [test_grids]
    elif isinstance(test_grids, (list, tuple)):
        items = list(test_grids)
    else:
        raise ValueError(f"test_grids must be a grid side, an (h, w) tuple or a list of these; got {test_grids!r}")
    out = []
    for v in items:
        if not (is_int(v) or is_pair(v)):
            raise ValueError(f"test_grids must hold grid sides (ints) or [h, w] pairs of ints; got {test_grids!r}")
        g = (v, v) if is_int(v) else (int(v[0]), int(v[1]))
        if min(g) < 2:
            raise ValueError(f"test_grids: {v!r} is under 2x2 cells (three non-colinear cells need 2x2)")
        if g == tuple(own):
            raise ValueError(f"test_grids: {v!r} is the model's own grid {tuple(own)}, which the probe always scores")
        if g in out:
            raise ValueError(f"test_grids: {v!r} repeats the grid {g}")
        out.append(g)
    return out


def threecell_probe(model, *, num_samples: int = 2000, epochs: int = 30, seed: int = 0, pesi: bool = True,
                    pesi_buckets: int = 60, batch_size: int = 256, lr: float = 1e-2, weight_decay: float = 1e-4,
                    cache_dir=None, test_grids=None, **cfg) -> dict[str, float]:
    """Linear Three-Cell probe of ``model``'s frozen features, plus PESI of its encoder.

    Args:
        model: a ViT with ``patch_embed`` (``img_size``, ``patch_size``), ``forward_features`` and
            ``forward_head(..., pre_logits=True)`` (a :class:`visionpe.models.vit.VisionPEViT` or another
            timm ViT), possibly wrapped in DDP / ``torch.compile``.
        num_samples: Three-Cell images generated (split 80/10/10; the probe trains on train, reports test).
        epochs: passes of the linear probe over the training features.
        seed: data and probe seed.
        pesi: add ``pesi/*`` keys (NaN for encoders without a position signal, or for non-visionpe models).
        test_grids: other grids to score the same probe on (a side ``n``, a pair ``(h, w)`` or a list of
            these; cells of the model's patch size, so the images are ``h * patch x w * patch``). The probe
            is fit on the model's own grid only; each test grid gets its own Three-Cell set (``num_samples``,
            same seed and options) whose labels are those of that grid.
        **cfg: extra :class:`ThreeCellConfig` fields (``max_attempts``, ``reject_colinear``, ``split``).

    Returns a flat dict: ``threecell/{distance,orientation,area,vector_sum,avg}`` and
    ``threecell/majority_avg`` in percent, ``pesi/{M_U,M_D,A_SU}``; per test grid ``h x w`` also
    ``threecell_<h>x<w>/{distance,orientation,area,vector_sum,avg}`` and ``threecell_<h>x<w>/majority_avg``,
    the best constant predictor on that grid's test images (a probe of a model without position
    information cannot beat it).

    In a fine-tuning recipe: ``probe: {every: 5, test_grids: [20, 24]}`` (every key but ``every`` is passed
    here), e.g. a 14x14 ViT-S/16 also probed at 320 and 384 px.
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
    grids = _probe_grids(test_grids, data.cfg.grid)
    others = [ThreeCellData(ThreeCellConfig(img_size=(g[0] * ph, g[1] * ph), cell_size=ph, num_samples=num_samples,
                                            seed=seed, **cfg), cache_dir) for g in grids]
    param = next(core.parameters())
    was_training = core.training
    core.eval()
    other_feats = []
    try:
        feats = {s: _features(core, data.split(s)["coords"], data.cfg.grid, data.cfg.cell_size, param.device,
                              param.dtype, batch_size) for s in ("train", "test")}
        if others:
            anygrid = any_grid_copy(core)  # the model itself keeps its fixed input size
            other_feats = [_features(anygrid, d.split("test")["coords"], d.cfg.grid, ph, param.device, param.dtype,
                                     batch_size) for d in others]
            del anygrid
    finally:
        core.train(was_training)
    labels = {s: torch.from_numpy(data.split(s)["labels"].astype(np.float32)) for s in ("train", "test")}
    standardise = _standardise(feats["train"], param.dtype)
    head = _fit_linear(standardise(feats["train"]), labels["train"], epochs, seed, lr, weight_decay, batch_size)
    with torch.no_grad():
        acc = group_accuracies(head(standardise(feats["test"])), labels["test"])
    out = {f"threecell/{k}": 100.0 * v for k, v in acc.items()}
    out["threecell/majority_avg"] = majority_accuracies(data.split("train")["labels"],
                                                        data.split("test")["labels"])["avg"]
    for g, d, f in zip(grids, others, other_feats):
        y = d.split("test")["labels"]
        with torch.no_grad():
            acc = group_accuracies(head(standardise(f)), torch.from_numpy(y.astype(np.float32)))
        key = f"threecell_{g[0]}x{g[1]}"
        out.update({f"{key}/{k}": 100.0 * v for k, v in acc.items()})
        out[f"{key}/majority_avg"] = majority_accuracies(y, y)["avg"]
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
