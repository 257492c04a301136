"""Checks that need one CUDA GPU (``pytest -m cuda``; run by ``benchmarks/gpu_check.sh``).

* every encoder, fp16 and bf16 autocast, forward and backward: finite, and within 3e-2 (relative, logits) of
  the fp32 model;
* ``torch.compile`` of the model (encoders of each hook kind, the flex path included) equals eager;
* the flex kernel's own forward and backward (torch's FlexAttention has no CPU backward) equal SDPA with the
  materialised bias: fp32 with full-precision matmuls to 1e-5 on outputs and on the gradients of q, k, v and
  the encoder tables; fp16/bf16 finite and close.

Without a GPU these are deselected at collection (the CPU suite covers the rest: tests/test_flex.py); the one test that runs
on CPU checks ``benchmarks/gpu_check.sh --dry-run``, so the script cannot rot.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import visionpe
from visionpe import Layout, create_encoder
from visionpe.flex import flex_attention_terms
from visionpe.models import VisionPEViT



def needs_cuda(fn):
    """``@pytest.mark.cuda``: deselected without a GPU (tests/conftest.py; ``bash benchmarks/gpu_check.sh`` runs
    them on one)."""
    return pytest.mark.cuda(fn)


DEV = "cuda"
TINY = dict(img_size=(64, 48), patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5)
FLEX_ENCODERS = ["relpos_bias", "irpe_bias", "irpe", {"name": "irpe", "method": "cross", "rpe_on": "qk",
                                                       "shared_head": False}]


@pytest.fixture(autouse=True)
def _full_precision():
    if not torch.cuda.is_available():
        yield
        return
    """IEEE fp32 matmuls and convolutions (no TF32) for the fp32 comparisons."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _randomise_pe(model):
    with torch.no_grad():
        for p in model.pe.parameters():
            p.normal_(0, 0.5)
    return model


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("pe", visionpe.list_encoders())
@needs_cuda
def test_every_encoder_low_precision_forward_backward(pe, dtype):
    model = _randomise_pe(VisionPEViT(pe=pe, **TINY)).to(DEV)
    x = torch.randn(2, 3, 64, 48, device=DEV)
    ref = model(x).detach()
    with torch.autocast("cuda", dtype=dtype):
        out = model(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().pow(2).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads), pe
    assert _rel_err(out, ref) < 3e-2, pe


@pytest.mark.parametrize("pe,impl", [("rope_mixed", "sdpa"), ("irpe", "flex"), ("relpos_bias", "flex")])
@needs_cuda
def test_torch_compile_matches_eager(pe, impl):
    torch._dynamo.reset()
    model = _randomise_pe(VisionPEViT(pe=pe, attn_impl=impl, **TINY)).to(DEV)
    compiled = torch.compile(copy.deepcopy(model))
    x = torch.randn(2, 3, 64, 48, device=DEV)
    ref, out = model(x), compiled(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    ref.pow(2).sum().backward()
    out.pow(2).sum().backward()
    for (name, a), b in zip(model.named_parameters(), compiled.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("cfg,grid,prefix", list(zip(FLEX_ENCODERS, [(6, 2), (5, 7), (4, 3), (5, 3)], [0, 1, 4, 2])),
                         ids=["relpos_bias-P0", "irpe_bias-P1", "irpe-P4", "irpe_cross_qk-P2"])
@needs_cuda
def test_flex_kernel_forward_backward_equals_sdpa_fp32(cfg, grid, prefix):
    enc = create_encoder(cfg, dim=64, num_heads=2, depth=1, grid_size=grid, num_prefix_tokens=prefix).to(DEV)
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0, 0.5)
    layout = Layout(grid, prefix)
    q, k, v = [torch.randn(2, 2, layout.num_tokens, 32, device=DEV, requires_grad=True) for _ in range(3)]
    w = torch.randn(2, 2, layout.num_tokens, 32, device=DEV)
    leaves = [q, k, v] + list(enc.parameters())
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=enc.bias(q, k, layout, 0))
    g_ref = torch.autograd.grad((ref * w).sum(), leaves, allow_unused=True)
    out = flex_attention_terms(q, k, v, enc.flex_terms(q, k, layout, 0))
    g = torch.autograd.grad((out * w).sum(), leaves, allow_unused=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for (name, _), a, b in zip([("q", 0), ("k", 0), ("v", 0)] + list(enc.named_parameters()), g_ref, g):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("pe,dtype", list(zip(FLEX_ENCODERS, [torch.float16, torch.bfloat16] * 2)),
                         ids=["relpos_bias-fp16", "irpe_bias-bf16", "irpe-fp16", "irpe_cross_qk-bf16"])
@needs_cuda
def test_model_flex_low_precision_close_to_sdpa(pe, dtype):
    a = _randomise_pe(VisionPEViT(pe=pe, attn_impl="sdpa", reg_tokens=2, **TINY)).to(DEV)
    b = copy.deepcopy(a)
    b.set_attn_impl("flex")
    x = torch.randn(2, 3, 64, 48, device=DEV)
    with torch.autocast("cuda", dtype=dtype):
        out_a, out_b = a(x), b(x)
    assert torch.isfinite(out_b).all() and _rel_err(out_b, out_a) < 3e-2
    out_a.float().pow(2).sum().backward()
    out_b.float().pow(2).sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            assert torch.isfinite(pb.grad).all(), name
            assert _rel_err(pb.grad, pa.grad) < 1e-1, name


def test_gpu_check_dry_run_validates_every_step(tmp_path):
    """CPU: the script's dry run collects the CUDA tests, validates the sweep's options and the Three-Cell
    recipe and encoders, and writes only the small files (summary, generated recipe)."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == ["tests", "sweep", "threecell"]
    assert all(" rc=0 " in line for line in summary), summary
    assert "--device cuda --dtype bfloat16" in summary[1] and "--dry-run" in summary[1]
    tests_log = (tmp_path / "tests.log").read_text()
    import re
    m = re.search(r"(\d+)(?:/\d+)? tests? collected", tests_log)
    assert m and int(m.group(1)) >= 40, tests_log[-500:]   # the CUDA tests were collected
    listed = (tmp_path / "threecell.log").read_text().split()
    assert listed == ["none", "learned", "sincos2d", "rope_mixed", "irpe", "fourier", "gilbert", "loope"]
    import yaml
    recipe = yaml.safe_load((tmp_path / "threecell_vits.yaml").read_text())
    assert recipe["model"]["embed_dim"] == 384 and recipe["model"]["num_heads"] == 6
    assert recipe["data"]["cell_size"] == 16 and recipe["data"]["img_size"] == 224  # 14 x 14 cells of 16 px
    assert not list(tmp_path.glob("*.json"))               # nothing heavy ran
    bad = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--bogus"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr
