"""The scheme registry: name -> position builder, and :func:`vlm_positions`, which dispatches on the name.

The built-in schemes are listed here explicitly (this module imports the scheme modules; none of them
imports this one, so there is no import cycle). :func:`register_scheme` adds a user scheme: a function
``(layout, **options) -> VLMPositions``.
"""
from __future__ import annotations

from typing import Callable

from ._checks import short_repr
from .cca import cca_positions
from .hope import hope_positions
from .layout import VLMLayout
from .mrope import mrope_positions
from .positions import VLMPositions
from .rope1d import rope1d_positions
from .v2pe import v2pe_positions
from .vrope import vrope_positions

__all__ = ["vlm_positions", "list_schemes", "register_scheme"]

_SCHEMES: dict[str, Callable[..., VLMPositions]] = {
    "rope1d": rope1d_positions,
    "mrope": mrope_positions,
    "vrope": vrope_positions,
    "hope": hope_positions,
    "v2pe": v2pe_positions,
    "cca": cca_positions,
}


def register_scheme(name: str, fn: Callable[..., VLMPositions] | None = None):
    """Register ``fn`` under ``name`` (usable as a decorator: ``@register_scheme("mine")``)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a scheme name must be a non-empty string; got {short_repr(name)}")

    def deco(f):
        _SCHEMES[name] = f
        return f
    return deco if fn is None else deco(fn)


def list_schemes() -> list[str]:
    return sorted(_SCHEMES)


def vlm_positions(layout: VLMLayout, scheme: str, **options) -> VLMPositions:
    """Positions of ``layout`` under ``scheme`` (``rope1d``, ``mrope``, ``vrope``, ``hope``, ``v2pe``, ``cca``)."""
    if scheme not in _SCHEMES:
        raise ValueError(f"unknown scheme {short_repr(scheme)}; known: {sorted(_SCHEMES)}")
    return _SCHEMES[scheme](layout, **options)
