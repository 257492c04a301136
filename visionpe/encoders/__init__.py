"""Built-in encoders, one module per method family. Importing this package registers them all.

Every module in this package is imported automatically, so adding a method family is adding a file.
"""
import importlib
import pkgutil

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")
