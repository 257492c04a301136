"""VLM adapter: positions (and rotations, and masks) for interleaved text / image / video sequences.

>>> from visionpe.vlm import VLMLayout, Text, Image, Video, vlm_positions
>>> lay = VLMLayout([Text(10), Image(4, 6), Text(5)])
>>> res = vlm_positions(lay, "mrope", variant="qwen2vl")   # res.positions: (3, 1, 39)
>>> cos, sin = res.cos_sin(head_dim=128)                    # (1, 39, 64) each

:class:`TinyVLMDecoder` runs a scheme end to end without transformers; :func:`attach_scheme` swaps the
positions of an HF Qwen2/Llama-style decoder or Qwen-VL model (:mod:`~visionpe.vlm.hf`);
:mod:`~visionpe.vlm.hf_inputs` converts to and from HF processor tensors; :mod:`~visionpe.vlm.hf_models`
builds tiny random HF models from local configs (transformers is imported only when they are called).

Schemes: ``rope1d``, ``mrope`` (qwen2vl / qwen25vl / qwen3vl), ``vrope``, ``hope``, ``v2pe``, ``cca``.
"""
from .layout import Image, Padding, SegmentTable, Text, Video, VLMLayout
from .positions import VLMPositions, causal_mask_from_positions
from .schemes import list_schemes, register_scheme, vlm_positions
from .tables import (Cyclic, FreqAllocation, Hybrid, Sections, SingleAxis, apply_multimodal_rotary, per_channel,
                     rotary_cos_sin)
from .rope1d import rope1d_positions
from .mrope import mrope_positions
from .vrope import vrope_positions
from .hope import hope_positions
from .v2pe import v2pe_positions, choose_delta, delta_from_stride
from .cca import cca_positions, ring_grid
from .decoder import TinyVLMDecoder
from .hf import SchemeHook, attach_scheme
from .hf_inputs import hf_rope_inputs, layout_from_token_types
from .hf_models import tiny_causal_lm, tiny_qwen_vl

__all__ = ["VLMLayout", "Text", "Image", "Video", "Padding", "SegmentTable", "VLMPositions", "vlm_positions",
           "list_schemes", "causal_mask_from_positions", "FreqAllocation", "SingleAxis", "Sections", "Cyclic",
           "Hybrid", "rotary_cos_sin", "apply_multimodal_rotary", "per_channel", "rope1d_positions",
           "mrope_positions", "vrope_positions", "hope_positions", "v2pe_positions", "choose_delta",
           "delta_from_stride", "cca_positions", "ring_grid", "TinyVLMDecoder", "SchemeHook", "attach_scheme",
           "hf_rope_inputs", "layout_from_token_types", "tiny_qwen_vl", "tiny_causal_lm", "register_scheme"]
