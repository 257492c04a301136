"""The shipped recipes: every YAML file in configs/ belongs to a recipe family and loads with that family's
reader; the fine-tuning recipes (configs/finetune_*.yaml) name registered models/encoders/optimizers, build
their transforms, and say what batch, LR and epochs they use."""
import glob
import os

import pytest
import timm
from timm.optim import list_optimizers
import torch
from timm.data import resolve_input_data_config

import visionpe
from visionpe.base import split_pe_config
from visionpe.train import load_config
from visionpe.train.data import build_transforms
from visionpe.train.loop import _resolve_lr
from visionpe.train.model import build_model

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), os.pardir, "configs", "finetune_*.yaml")))


CONFIG_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
ALL_RECIPES = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")) + glob.glob(os.path.join(CONFIG_DIR, "*.yml")))


def _check_finetune(path):
    cfg = load_config(path)
    assert timm.is_model(cfg.model.name) and cfg.sched.epochs >= 1


def _check_threecell(path):
    from visionpe.eval.threecell import load_config as load_threecell, resolve_encoders
    cfg = load_threecell(path)
    assert cfg["name"] == os.path.splitext(os.path.basename(path))[0]  # the default output folder
    assert resolve_encoders(cfg["run"]["encoders"])


def _check_vlmdiag(path):
    from visionpe.eval.vlmdiag_config import load_config as load_vlmdiag
    cfg = load_vlmdiag(path)
    assert isinstance(cfg, dict) and cfg


#: recipe family (file-name prefix) -> a check that loads the recipe with the reader that runs it
FAMILIES = {"finetune_": _check_finetune, "threecell": _check_threecell, "vlmdiag": _check_vlmdiag}


def test_every_recipe_in_configs_belongs_to_a_family():
    assert ALL_RECIPES, CONFIG_DIR
    orphans = [os.path.basename(p) for p in ALL_RECIPES
               if sum(os.path.basename(p).startswith(f) for f in FAMILIES) != 1]
    assert not orphans, f"recipes no family reads (add a family to FAMILIES): {orphans}"
    # every family has at least one recipe, so FAMILIES cannot hold a stale entry either
    for prefix in FAMILIES:
        assert any(os.path.basename(p).startswith(prefix) for p in ALL_RECIPES), prefix


@pytest.mark.parametrize("path", ALL_RECIPES, ids=os.path.basename)
def test_every_recipe_loads_with_its_family_reader(path):
    name = os.path.basename(path)
    (check,) = [c for prefix, c in FAMILIES.items() if name.startswith(prefix)]
    check(path)


def test_deit_s_recipes_cover_the_baseline_encoders():
    names = {os.path.basename(p) for p in CONFIGS}
    for pe in ("learned", "sincos2d", "none", "rope_axial", "rope_mixed", "relpos_bias"):
        assert f"finetune_deit_s_{pe}.yaml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_recipe_is_valid_and_documented(path):
    cfg = load_config(path)
    header = "".join(line for line in open(path) if line.startswith("#")).lower()
    assert "epochs" in header and "batch" in header and "lr" in header  # the paper's numbers are stated
    pe_name, _ = split_pe_config(cfg.model.pe)
    assert pe_name in visionpe.list_encoders()
    assert timm.is_model(cfg.model.name)
    assert cfg.optim.opt in list_optimizers()
    if cfg.model.pretrained_file is None and "small" in cfg.model.name:
        torch.manual_seed(0)
        model, desc = build_model(cfg.model, 1000)
        assert getattr(model, "pe_name", None) == pe_name and desc["kwargs"]["num_classes"] == 1000
        assert model.patch_embed.grid_size == (14, 14)
        build_transforms(cfg.data, dict(resolve_input_data_config(model)))  # augmentation strings are valid


def test_deit_learning_rate_rule():
    cfg = load_config(os.path.join(os.path.dirname(__file__), os.pardir, "configs", "finetune_deit_s_learned.yaml"))
    assert _resolve_lr(cfg, 8 * 128) == pytest.approx(1e-3)  # DeiT: 5e-4 x 1024 / 512
    rope = load_config(os.path.join(os.path.dirname(__file__), os.pardir, "configs",
                                    "finetune_deit_s_rope_mixed.yaml"))
    assert _resolve_lr(rope, 8 * 256) == pytest.approx(4e-3)  # RoPE-ViT: not rescaled
    assert rope.train.loss == "bce" and rope.model.kwargs["init_values"] == 1e-4
