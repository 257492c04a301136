"""What the HF integration reads from transformers, in one place: the tested release range and the public
config fields (RoPE base, RoPE type, M-RoPE sections) under their 4.x and 5.x names.

Only public, documented names are read: ``transformers.__version__``, ``transformers.Cache`` and config
attributes (``rope_parameters`` in 5.x; ``rope_theta`` / ``rope_scaling`` in 4.x; ``model_type``).
"""
from __future__ import annotations

import re
import warnings

__all__ = ["TESTED_TRANSFORMERS", "check_transformers_version", "transformers_major", "config_theta",
           "config_rope_type", "config_mrope", "QWEN_VL_FAMILIES", "model_family"]

# the releases tools/test_compat.sh runs the HF tests against (requirements/compat/transformers-*.txt)
TESTED_TRANSFORMERS = ("4.57.6", "5.23.0", "5.24.0")
_TESTED_RANGE = ((4, 57), (5, 24))  # (major, minor) bounds, inclusive
_warned = False


def _major_minor(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        raise ValueError(f"cannot parse a transformers version from {version!r}")
    return int(m.group(1)), int(m.group(2))


def check_transformers_version(version: str | None = None) -> bool:
    """Warn once per process when transformers is outside the tested range; True when inside it.

    ``version`` defaults to the installed ``transformers.__version__``.
    """
    global _warned
    if version is None:
        import transformers
        version = transformers.__version__
    lo, hi = _TESTED_RANGE
    inside = lo <= _major_minor(version) <= hi
    if not inside and not _warned:
        _warned = True
        warnings.warn(f"visionpe.vlm's HF integration is tested with transformers {lo[0]}.{lo[1]} to "
                      f"{hi[0]}.{hi[1]}.x (exactly: {', '.join(TESTED_TRANSFORMERS)}); found {version}. "
                      "Run tools/test_compat.sh to check this release.", RuntimeWarning, stacklevel=3)
    return inside


def transformers_major() -> int:
    import transformers
    return _major_minor(transformers.__version__)[0]


def _rope_dict(cfg) -> dict:
    """The RoPE settings dict: ``rope_parameters`` (5.x) or ``rope_scaling`` (4.x), else empty."""
    for name in ("rope_parameters", "rope_scaling"):
        d = getattr(cfg, name, None)
        if isinstance(d, dict) and d:
            return d
    return {}


def config_theta(cfg) -> float:
    """RoPE base of an HF text config (``rope_parameters["rope_theta"]`` in 5.x, ``rope_theta`` in 4.x)."""
    theta = _rope_dict(cfg).get("rope_theta")
    if theta is None:
        theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        raise ValueError("could not read rope_theta from the model config; pass theta=")
    return float(theta)


def config_rope_type(cfg) -> str:
    """``"default"`` for plain RoPE; else the scaling type (``"llama3"``, ``"yarn"``, ...)."""
    d = _rope_dict(cfg)
    rope_type = d.get("rope_type", d.get("type", "default"))
    return "default" if rope_type in (None, "mrope") else str(rope_type)


# Qwen-VL text decoders: HF applies the M-RoPE sections itself, chunked or interleaved
QWEN_VL_FAMILIES = {"qwen2_vl": False, "qwen2_5_vl": False, "qwen3_vl": True}  # family -> interleaved


def model_family(cfg) -> str:
    """``qwen2_vl`` / ``qwen2_5_vl`` / ``qwen3_vl`` for the Qwen-VL text decoders, ``mrope-other`` for any
    other model whose config has M-RoPE sections, ``plain`` otherwise (Llama, Qwen2, Mistral, ...)."""
    model_type = str(getattr(cfg, "model_type", "") or "")
    family = model_type[:-5] if model_type.endswith("_text") else model_type
    if family in QWEN_VL_FAMILIES:
        return family
    return "mrope-other" if "mrope_section" in _rope_dict(cfg) else "plain"


def config_mrope(cfg) -> tuple[tuple[int, ...], bool] | None:
    """``(mrope_section, interleaved)`` of a Qwen-VL text config, None for other models."""
    family = model_family(cfg)
    if family not in QWEN_VL_FAMILIES:
        return None
    sections = _rope_dict(cfg).get("mrope_section")
    if sections is None:
        return None
    return tuple(int(s) for s in sections), QWEN_VL_FAMILIES[family]
