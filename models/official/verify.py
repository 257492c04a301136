"""Parity of the converters against a folder of official reference outputs (``tests/reference/checkpoints``).

Each ``<name>.safetensors`` there holds an official model's ``state_dict/*``, an ``input`` and the official
eval-mode ``logits``, ``features`` (the classifier's input) and ``tokens`` (the final norm's output);
``manifest.json`` holds the constructor arguments. :func:`verify_reference` converts every file with
:func:`~visionpe.models.official.load_official`, runs the input and reports the max abs errors;
``visionpe convert --verify DIR --out FILE`` writes them (docs/results/official_checkpoints.*).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

import torch

__all__ = ["reference_case", "verify_reference", "OUTPUTS"]

OUTPUTS = ("logits", "features", "tokens")


def _heads(args: dict):
    heads = args.get("num_heads", args.get("vit_config_overrides", {}).get("num_attention_heads"))
    return heads[0] if isinstance(heads, list) else heads


def reference_case(folder: str, name: str):
    """``(official state dict, tensors, load_official kwargs)`` of reference file ``name``.

    The kwargs are what the tensors do not store: the head count of families without relative tables
    (``manifest['models'][name]['constructor_args']``).
    """
    from safetensors.torch import load_file
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    entry = manifest["models"][name]
    d = load_file(os.path.join(folder, entry["file"]))
    sd = {k[len("state_dict/"):]: v for k, v in d.items() if k.startswith("state_dict/")}
    tensors = {k: v for k, v in d.items() if not k.startswith("state_dict/")}
    kwargs = {} if name.startswith("irpe") else {"num_heads": _heads(entry["constructor_args"])}
    return sd, tensors, kwargs


def run_outputs(model, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Eval-mode ``tokens`` (final norm output), ``features`` (classifier input) and ``logits`` of ``model``."""
    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(x)
        return {"tokens": tokens, "features": model.forward_head(tokens, pre_logits=True),
                "logits": model.forward_head(tokens)}


def verify_reference(folder: str) -> List[dict]:
    """One row per reference file: ``{"name", "family", "max_abs": {output: float}, "within_tol": bool}``."""
    from . import load_official
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    tol = manifest.get("tolerance", {"rtol": 1e-5, "atol": 1e-5})
    rows = []
    for name in manifest["models"]:
        sd, t, kwargs = reference_case(folder, name)
        model = load_official(sd, **kwargs)
        out = run_outputs(model, t["input"])
        errs = {k: float((out[k] - t[k]).abs().max()) for k in OUTPUTS}
        ok = all(torch.allclose(out[k], t[k], rtol=tol["rtol"], atol=tol["atol"]) for k in OUTPUTS)
        rows.append({"name": name, "family": model.official_report["family"], "max_abs": errs, "within_tol": ok,
                     "dropped": sorted(model.official_report["dropped"])})
    return rows
