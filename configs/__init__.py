"""The YAML recipes, installed as package data of ``visionpe.configs`` (see :mod:`visionpe.recipes`)."""
