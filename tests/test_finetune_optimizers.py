"""Every optimizer timm names (that runs on a CPU) survives checkpoint and resume bit for bit.

A tiny model trains a few steps, is checkpointed through ``CheckpointManager`` (the files a run writes), trains
on; a fresh model and optimizer restored from the checkpoint train the same steps and must end with identical
weights and optimizer state (``torch.equal``).
"""
import importlib.util

import pytest
import torch
from timm.optim import create_optimizer_v2, get_optimizer_info, list_optimizers

from visionpe.train.checkpoint import (CheckpointManager, load_optimizer_state, optimizer_state, read_checkpoint,
                                       set_rng_state)

pytestmark = pytest.mark.usefixtures("one_thread")


def _needs_cuda_package(name: str):
    """apex and bitsandbytes optimizers: named by a dotted string, imported from a CUDA-only package."""
    cls = get_optimizer_info(name).opt_class
    if not isinstance(cls, str):
        return None
    package = cls.split(".")[0]
    return package if importlib.util.find_spec(package) is None else None


ALL = list_optimizers()
CPU = [n for n in ALL if _needs_cuda_package(n) is None]


def test_only_cuda_package_optimizers_are_left_out():
    left_out = {n: _needs_cuda_package(n) for n in ALL if n not in CPU}
    assert set(left_out.values()) <= {"apex", "bitsandbytes"}, left_out
    assert len(CPU) >= 80 and {"lamb", "lambc", "kron", "adafactorbv", "adahessian", "muon"} <= set(CPU)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.GELU(), torch.nn.Linear(8, 3))


def _steps(model, opt, start: int, n: int, second_order: bool):
    for i in range(start, start + n):
        g = torch.Generator().manual_seed(100 + i)
        x, y = torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward(create_graph=second_order)
        opt.step()
        if second_order:  # AdaHessian: drop the graph the gradients hold
            for p in model.parameters():
                p.grad = None


def _equal_state(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _equal_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _equal_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("name", CPU)
def test_optimizer_checkpoint_resume_is_bit_exact(name, tmp_path):
    second_order = get_optimizer_info(name).second_order
    with torch.compiler.set_stance("force_eager"):  # Kron compiles its kernels; eager gives the same numbers
        model = _model()
        opt = create_optimizer_v2(model, opt=name, lr=1e-2, weight_decay=0.05)
        _steps(model, opt, 0, 3, second_order)
        manager = CheckpointManager(str(tmp_path / "checkpoints"))
        manager.begin(3)
        path = manager.commit(3, model.state_dict(), None, {"optimizer": optimizer_state(model, opt)}, {"update": 3})
        _steps(model, opt, 3, 3, second_order)

        ck = read_checkpoint(path)
        restored = _model()
        restored.load_state_dict(ck["model"])
        opt2 = create_optimizer_v2(restored, opt=name, lr=1e-2, weight_decay=0.05)
        load_optimizer_state(restored, opt2, ck["training"]["optimizer"])
        set_rng_state(ck["rank"]["rng"])
        _steps(restored, opt2, 3, 3, second_order)
    for (k, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), k
    _equal_state(optimizer_state(model, opt), optimizer_state(restored, opt2))


def test_changed_parameter_groups_are_refused(tmp_path):
    model = _model()
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-2, weight_decay=0.05)
    _steps(model, opt, 0, 1, False)
    saved = optimizer_state(model, opt)
    other = create_optimizer_v2(model, opt="adamw", lr=1e-2, weight_decay=0.05, layer_decay=None,
                                filter_bias_and_bn=False)  # one group instead of decay / no-decay
    with pytest.raises(ValueError, match=r"optimizer does not fit this run: 2 parameter groups in the checkpoint, 1 now"):
        load_optimizer_state(model, other, saved)
