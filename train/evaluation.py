"""Validation over a rank-sharded loader: top-1/top-k accuracy and cross-entropy, summed across ranks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import DistInfo, all_reduce_sum

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model, loader, device, autocast, info: DistInfo, num_classes: int) -> dict:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over the (rank-sharded) loader."""
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, topk, count
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            out = model(x)
        out = out.float()
        top = out.topk(k, dim=1).indices
        hit = top.eq(y[:, None])
        sums += torch.stack([F.cross_entropy(out, y, reduction="sum").double(), hit[:, 0].sum().double(),
                             hit.any(dim=1).sum().double(), torch.tensor(float(len(y)), dtype=torch.float64,
                                                                         device=device)])
    loss, c1, ck, n = all_reduce_sum(sums.tolist(), info, device)
    model.train(was_training)
    if n == 0:
        return {}
    return {"val_loss": loss / n, "val_top1": 100.0 * c1 / n, f"val_top{k}": 100.0 * ck / n}
