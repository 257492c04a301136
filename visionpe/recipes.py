"""Find a YAML recipe by name or path.

The recipes in the repository's ``configs/`` folder ship inside the wheel as package data of
``visionpe.configs``, so ``--config threecell_quick`` works the same in a checkout and in an installed wheel.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

__all__ = ["list_recipes", "recipe_path"]


def _packaged() -> dict[str, Path]:
    root = resources.files("visionpe.configs")
    return {Path(entry.name).stem: Path(str(entry)) for entry in root.iterdir()
            if entry.name.endswith((".yaml", ".yml"))}


def list_recipes(prefix: str = "") -> list[str]:
    """Names of the packaged recipes (file stems), optionally only those starting with ``prefix``."""
    return sorted(n for n in _packaged() if n.startswith(prefix))


def recipe_path(name_or_path: str | os.PathLike, *, prefix: str = "") -> Path:
    """The file of a recipe: an existing path as given, else a packaged recipe of that name.

    Args:
        name_or_path: ``"threecell_quick"``, ``"threecell_quick.yaml"`` or a path to a YAML file.
        prefix: only for the error message: which packaged recipes to list as the known ones.

    Raises:
        FileNotFoundError: neither a file nor a packaged recipe; the message lists the packaged names.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    recipes = _packaged()
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if path.parent == Path(".") and stem in recipes:
        return recipes[stem]
    raise FileNotFoundError(f"recipe {str(name_or_path)!r} is neither a file nor a packaged recipe; "
                            f"packaged: {', '.join(list_recipes(prefix)) or '(none)'}")
