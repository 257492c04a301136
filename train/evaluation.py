"""Evaluation over a rank-sharded loader: top-1/top-5 accuracy and cross-entropy, summed across ranks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import DistInfo, all_reduce_sum

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model, loader, device, autocast, info: DistInfo, num_classes: int) -> dict:
    """``{"loss", "top1", "top5"}``: mean cross-entropy and top-1/top-5 accuracy (%) over the rank-sharded
    loader (timm's names; top-5 is top-``min(5, num_classes)``, as a 4-class top-5 is 100 %). ``{}`` when
    the loader is empty. Labels outside the head raise ``ValueError`` naming both sizes."""
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, topk, count
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            out = model(x)
        out = out.float()
        if out.shape[-1] != num_classes or (len(y) and int(y.max()) >= num_classes):
            raise ValueError(f"the model's head has {out.shape[-1]} outputs for {num_classes} classes, and the "
                             f"labels reach {int(y.max())}: head and data do not match")
        top = out.topk(k, dim=1).indices
        hit = top.eq(y[:, None])
        sums += torch.stack([F.cross_entropy(out, y, reduction="sum").double(), hit[:, 0].sum().double(),
                             hit.any(dim=1).sum().double(), torch.tensor(float(len(y)), dtype=torch.float64,
                                                                         device=device)])
    loss, c1, ck, n = all_reduce_sum(sums.tolist(), info, device)
    model.train(was_training)
    if n == 0:
        return {}
    return {"loss": loss / n, "top1": 100.0 * c1 / n, "top5": 100.0 * ck / n}
