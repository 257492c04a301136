"""Moving weights between position encodings: checkpoint adaptation (and, later, in-place PE swap)."""
from __future__ import annotations

from typing import Optional

import torch

from visionpe.resample import resample_grid_table

__all__ = ["adapt_state_dict"]


def adapt_state_dict(sd: dict, model, pos_embed: Optional[torch.Tensor] = None) -> dict:
    """Map PE entries of a ViT-family state dict onto ``model`` (a ``VisionPEViT``).

    * ``pos_embed`` (timm APE) goes to ``pe.pos_embed`` when the model's encoder is a learned APE, resampled
      to the model's grid (square source grids are the only ones a bare timm checkpoint can describe);
      otherwise it is dropped (the new encoder has no table).
    * ``rope.freqs`` (timm/RoPE-ViT mixed) becomes ``pe.freqs``.
    * entries already under ``pe.`` are kept.
    """
    sd = dict(sd)
    own = model.state_dict()
    if "rope.freqs" in sd:
        sd["pe.freqs"] = sd.pop("rope.freqs")
    if pos_embed is not None and "pe.pos_embed" in own:
        pe = model.pe
        prefix = pe.table_prefix
        n_grid = pos_embed.shape[1] - prefix
        side = int(round(n_grid ** 0.5))
        if side * side != n_grid:
            raise ValueError(f"checkpoint pos_embed has {n_grid} grid rows (shape {tuple(pos_embed.shape)}), "
                             f"not a square grid; convert it with visionpe.resample.resample_grid_table first")
        sd["pe.pos_embed"] = resample_grid_table(pos_embed, pe.grid_size, (side, side), prefix)
    return sd
