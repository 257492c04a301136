"""The whole attention layer with iRPE against the official ``RPEAttention`` (independent golden vectors).

Each case loads the official layer's weights (qkv/proj and the per-side lookup tables, under their official
names) into ``PEAttention`` + ``create_encoder('irpe', ..., ape=False)`` and compares the output. Covered:
the four methods; contextual on q, k and v and bias on q and k; shared and per-head tables; one and two
prefix tokens; a non-square 3x4 grid. See ``tests/reference/irpe/README.md`` for how the files were made.
"""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from visionpe import Layout, create_encoder
from visionpe.models.vit import PEAttention

from conftest import REFERENCE

REF = os.path.join(REFERENCE, "irpe")
FILES = ["official_attention_cls1_4x4.safetensors", "official_attention_skip2_4x4.safetensors",
         "official_attention_grid3x4.safetensors"]


def _cases():
    out = []
    for f in FILES:
        with safe_open(os.path.join(REF, f), "pt") as fh:
            meta = fh.metadata()
        out += [(f, case, json.loads(cfg)) for case, cfg in sorted(meta.items())]
    return out


CASES = _cases()
_DATA = {}


def _data(fname):
    if fname not in _DATA:
        _DATA[fname] = load_file(os.path.join(REF, fname))
    return _DATA[fname]


def _build(d, case, cfg, dtype):
    """Our attention + encoder carrying the official parameters of ``case``, in ``dtype``."""
    grid, S = tuple(cfg["grid"]), cfg["num_prefix_tokens"]
    attn = PEAttention(cfg["dim"], cfg["num_heads"], qkv_bias=cfg["qkv_bias"]).eval().to(dtype)
    attn.load_state_dict({k[len("param/"):]: v for k, v in d.items() if k.startswith("param/")}, strict=True)
    pe = create_encoder("irpe", dim=cfg["dim"], num_heads=cfg["num_heads"], depth=1, grid_size=grid,
                        num_prefix_tokens=S, method=cfg["method"], mode=cfg["mode"], rpe_on=cfg["rpe_on"],
                        shared_head=cfg["shared_head"], ratio=cfg["ratio"], ape=False).eval().to(dtype)
    # official name rpe_k.lookup_table_weight (one layer) -> ours rpe_k.0.lookup_table_weight (block 0);
    # strict loading checks that names and shapes are the official ones
    prefix = f"{case}/param/"
    tables = {}
    for k, v in d.items():
        if k.startswith(prefix):
            side, rest = k[len(prefix):].split(".", 1)
            tables[f"{side}.0.{rest}"] = v
    pe.load_state_dict(tables, strict=True)
    return attn, pe, Layout(grid, S)


def _input(d, S, n):
    x = d["input"]  # (B, 2 + h*w, dim): a case with S prefix tokens uses the last S + h*w rows
    return x[:, x.shape[1] - n:]


def test_case_inventory():
    assert len(CASES) == 36
    methods = {c["method"] for _, _, c in CASES}
    assert methods == {"euc", "quant", "cross", "product"}
    assert {c["num_prefix_tokens"] for _, _, c in CASES} == {1, 2}
    assert any(c["rpe_on"] == "qkv" and not c["shared_head"] for _, _, c in CASES)


@pytest.mark.parametrize("fname,case,cfg", CASES, ids=[f"{f[19:-12]}-{c}" for f, c, _ in CASES])
def test_attention_matches_official(fname, case, cfg):
    d = _data(fname)
    S = cfg["num_prefix_tokens"]
    h, w = cfg["grid"]
    n = S + h * w
    ref = d[f"{case}/output"]
    # float32 at the README tolerance; float64 tightly (the official ran in float64 on these exact values)
    for dtype, rtol, atol in ((torch.float32, 1e-5, 1e-6), (torch.float64, 1e-10, 1e-12)):
        attn, pe, layout = _build(d, case, cfg, dtype)
        if dtype == torch.float32:
            ids = pe.bucket_ids(layout)
            if cfg["method"] == "cross":
                assert torch.equal(ids[0], d[f"{case}/bucket_ids_rows"].long())
                assert torch.equal(ids[1], d[f"{case}/bucket_ids_cols"].long())
            else:
                assert torch.equal(ids, d[f"{case}/bucket_ids"].long())
        with torch.no_grad():
            out = attn(_input(d, S, n).to(dtype), layout, pe, 0)
        assert out.dtype == dtype and out.shape == ref.shape
        torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol, msg=lambda m: f"{case} {dtype}: {m}")
