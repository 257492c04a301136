"""ImageNet-style fine-tuning with any visionpe encoder (timm data/optim/scheduler/EMA, DDP, exact resume).

``run(load_config(path, overrides))`` is the Python entry; ``visionpe finetune`` the command line. The names
below are imported on first use, so ``visionpe.train.config`` (and ``--help``) load without torch.
"""
import importlib

__all__ = ["FinetuneConfig", "config_from_dict", "load_config", "run", "SimulatedCrash"]

_WHERE = {"FinetuneConfig": ".config", "config_from_dict": ".config", "load_config": ".config", "run": ".loop",
          "SimulatedCrash": ".loop"}


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
