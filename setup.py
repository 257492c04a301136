"""Package discovery for the one ``visionpe`` distribution (metadata lives in pyproject.toml).

The repository keeps ``models/``, ``train/``, ``eval/`` and ``configs/`` at the top level; they install as
``visionpe.models``, ``visionpe.train``, ``visionpe.eval`` and ``visionpe.configs`` (the YAML recipes, as package
data). Subpackages are found, not listed, so a new one cannot be left out of the wheel.
"""
from setuptools import find_packages, setup

ROOTS = {"visionpe": "visionpe", "visionpe.models": "models", "visionpe.train": "train",
         "visionpe.eval": "eval", "visionpe.configs": "configs"}

packages, package_dir = [], {}
for name, folder in ROOTS.items():
    package_dir[name] = folder
    packages.append(name)
    for sub in find_packages(folder):
        packages.append(f"{name}.{sub}")
        package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(packages=packages, package_dir=package_dir, package_data={"visionpe.configs": ["*.yaml"]})
