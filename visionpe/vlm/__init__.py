"""VLM adapter: positions (and rotations, and masks) for interleaved text / image / video sequences.

>>> from visionpe.vlm import VLMLayout, Text, Image, Video, vlm_positions
>>> lay = VLMLayout([Text(10), Image(4, 6), Text(5)])
>>> res = vlm_positions(lay, "mrope", variant="qwen2vl")   # res.positions: (3, 1, 39)
>>> cos, sin = res.cos_sin(head_dim=128)                    # (1, 39, 64) each

:class:`TinyVLMDecoder` runs a scheme end to end without transformers; :func:`attach_scheme` swaps the
positions of an HF Qwen2/Llama-style decoder.

Schemes: ``rope1d``, ``mrope`` (qwen2vl / qwen25vl / qwen3vl), ``vrope``, ``hope``, ``v2pe``, ``cca``.
"""
from .layout import Image, Padding, SegmentTable, Text, Video, VLMLayout
from .positions import VLMPositions, causal_mask_from_positions, list_schemes, vlm_positions
from .tables import (Cyclic, FreqAllocation, Hybrid, Sections, SingleAxis, apply_multimodal_rotary, per_channel,
                     rotary_cos_sin)
from .rope1d import rope1d_positions
from .mrope import mrope_positions
from .vrope import vrope_positions
from .hope import hope_positions
from .v2pe import v2pe_positions, choose_delta, delta_from_stride
from .cca import cca_positions, ring_grid
from .decoder import TinyVLMDecoder
from .hf import SchemeHook, attach_scheme, hf_rope_inputs

__all__ = ["VLMLayout", "Text", "Image", "Video", "Padding", "SegmentTable", "VLMPositions", "vlm_positions",
           "list_schemes", "causal_mask_from_positions", "FreqAllocation", "SingleAxis", "Sections", "Cyclic",
           "Hybrid", "rotary_cos_sin", "apply_multimodal_rotary", "per_channel", "rope1d_positions",
           "mrope_positions", "vrope_positions", "hope_positions", "v2pe_positions", "choose_delta",
           "delta_from_stride", "cca_positions", "ring_grid", "TinyVLMDecoder", "SchemeHook", "attach_scheme",
           "hf_rope_inputs"]
