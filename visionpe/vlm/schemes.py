"""Imports every scheme module so that each registers itself with :func:`~visionpe.vlm.vlm_positions`."""
from . import cca, hope, mrope, rope1d, v2pe, vrope  # noqa: F401
