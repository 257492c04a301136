"""Recipes found by name or path (as package data), and optional dependencies that name their extra."""
import sys

import pytest

from visionpe.extras import require
from visionpe.recipes import list_recipes, recipe_path


def test_every_recipe_file_is_found_by_name():
    from pathlib import Path
    shipped = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert list_recipes() == shipped
    for name in shipped:
        assert recipe_path(name).name == f"{name}.yaml"
        assert recipe_path(f"{name}.yaml") == recipe_path(name)


def test_recipe_path_takes_an_existing_file_as_given(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("name: mine\n")
    assert recipe_path(f) == f
    assert recipe_path(str(f)) == f


def test_unknown_recipe_lists_the_packaged_ones():
    with pytest.raises(FileNotFoundError, match=r"'nope' is neither a file nor a packaged recipe.*threecell_quick"):
        recipe_path("nope", prefix="threecell")
    with pytest.raises(FileNotFoundError, match="packaged"):
        recipe_path("some/dir/threecell_quick.yaml")  # a path that does not exist is not looked up by name


def test_threecell_and_finetune_configs_load_by_name():
    from visionpe.eval.threecell import load_config as tc_load
    from visionpe.train.config import load_config as ft_load
    assert tc_load("threecell_grid14")["name"] == "threecell_grid14"
    assert tc_load(None, quick=True)["name"] == "threecell_quick"
    assert ft_load("finetune_digits_cpu").data.root is not None
    with pytest.raises(ValueError, match=r"config file 'nope.yaml' does not exist.*finetune_digits_cpu"):
        ft_load("nope.yaml")


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import of a None entry raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # (also when an earlier test imported it)
    with pytest.raises(ImportError, match=r"make_digits_folder needs the optional dependency 'sklearn'.*"
                                          r"pip install 'visionpe\[digits\]'"):
        require("sklearn.datasets", "digits", "make_digits_folder")
    assert require("json", "none", "x").dumps([1]) == "[1]"
