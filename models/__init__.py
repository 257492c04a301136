"""Wiring of visionpe encoders into timm (and, through timm towers, open_clip).

Importing this module registers the ``vpe_vit_*`` models in timm's registry.
"""
from .vit import PEAttention, PEBlock, VisionPEViT
from .registry import SIZES, create_vpe_vit, pe_checkpoint_filter, refresh, vpe_model_names
from .swap import adapt_state_dict

__all__ = ["PEAttention", "PEBlock", "VisionPEViT", "SIZES", "create_vpe_vit", "pe_checkpoint_filter",
           "refresh", "vpe_model_names", "adapt_state_dict"]
from .swap import create_swapped, swap_pe  # noqa: E402,F401  (PE swap on existing/pretrained ViTs)
from .official import load_official  # noqa: E402,F401  (the papers' released checkpoints)
