"""ImageNet-style fine-tuning with any visionpe encoder (timm data/optim/scheduler/EMA, DDP, exact resume).

``run(load_config(path, overrides))`` is the Python entry; ``visionpe finetune`` the command line.
"""
from .config import FinetuneConfig, config_from_dict, load_config
from .loop import SimulatedCrash, run

__all__ = ["FinetuneConfig", "config_from_dict", "load_config", "run", "SimulatedCrash"]
