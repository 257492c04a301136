"""visionpe: position encodings for vision and multimodal transformers, behind one API.

>>> import visionpe
>>> visionpe.list_encoders()            # every registered encoder
>>> enc = visionpe.create_encoder("rope_mixed", dim=384, num_heads=6, depth=12, grid_size=(14, 14))

Importing ``visionpe`` also registers the ``vpe_vit_*`` models with timm when timm is installed (the
wiring lives in ``visionpe.models``; ``timm.create_model('vpe_vit_small_patch16_224', pe='rope_mixed')``).
"""
from .base import (HOOKS, PositionEncoder, create_encoder, encoder_info, list_encoders, register_encoder,
                   split_pe_config)
from .layout import Layout
from . import encoders as _encoders  # noqa: F401  (registers built-in encoders)

__version__ = "0.1.0"

__all__ = ["HOOKS", "Layout", "PositionEncoder", "create_encoder", "encoder_info", "list_encoders",
           "register_encoder", "split_pe_config", "__version__"]


def _register_timm_models() -> None:
    try:
        import timm  # noqa: F401
    except ImportError:  # pragma: no cover - timm is a dependency, but the encoders don't need it
        return
    from . import models  # noqa: F401  (registers vpe_vit_* with timm)


_register_timm_models()
