"""Imports of optional dependencies with an error that names the extra to install."""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` or raise ``ImportError`` naming ``pip install 'visionpe[extra]'``.

    Args:
        module: the module to import, e.g. ``"sklearn.datasets"``.
        extra: the optional-dependency group of ``visionpe`` that provides it, e.g. ``"digits"``.
        feature: what needs it, for the message, e.g. ``"make_digits_folder"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{feature} needs the optional dependency {module.split('.')[0]!r}, which is not "
                          f"installed: pip install 'visionpe[{extra}]'") from e
