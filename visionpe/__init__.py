"""visionpe: position encodings for vision and multimodal transformers, behind one API.

>>> import visionpe
>>> visionpe.list_encoders()            # every registered encoder
>>> enc = visionpe.create_encoder("rope_mixed", dim=384, num_heads=6, depth=12, grid_size=(14, 14))

Importing ``visionpe`` also registers the ``vpe_vit_*`` models with timm (the wiring lives in
``visionpe.models``; ``timm.create_model('vpe_vit_small_patch16_224', pe='rope_mixed')``): at once when timm is
already imported, else as soon as timm is. The API names below load torch on first use only, so that
``import visionpe`` and ``visionpe --help`` stay fast.
"""
import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

__all__ = ["HOOKS", "Layout", "PositionEncoder", "create_encoder", "encoder_info", "list_encoders",
           "register_encoder", "split_pe_config", "__version__"]

_SUBPACKAGES = {"base", "layout", "encoders", "models", "train", "eval", "vlm", "cli", "cli_util", "extras", "recipes"}
_FROM_BASE = {"HOOKS", "PositionEncoder", "create_encoder", "encoder_info", "list_encoders", "register_encoder",
              "split_pe_config"}


def __getattr__(name):
    if name in _FROM_BASE or name == "Layout":
        base = importlib.import_module(".base", __name__)  # base registers the built-in encoders
        value = getattr(importlib.import_module(".layout", __name__), name) if name == "Layout" else getattr(base, name)
        globals()[name] = value
        _register_timm_models()
        return value
    if name in _SUBPACKAGES:  # `visionpe.models.swap_pe(...)` after a bare `import visionpe`
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


def _register_timm_models() -> None:
    if "timm" not in sys.modules:
        return
    importlib.import_module(".models", __name__)  # registers vpe_vit_* with timm


class _AfterTimm(importlib.abc.MetaPathFinder):
    """Registers the ``vpe_vit_*`` models right after the first ``import timm`` (then removes itself)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            try:
                _register_timm_models()
            except Exception as e:  # never break `import timm` itself
                import warnings
                warnings.warn(f"visionpe could not register its timm models: {type(e).__name__}: {e}")

        spec.loader.exec_module = exec_then_register
        return spec


if "timm" in sys.modules:
    _register_timm_models()
elif importlib.util.find_spec("timm") is not None and not any(isinstance(f, _AfterTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterTimm())
