import os

import pytest
import torch

# CI has 2 cores; keep intra-op threads bounded so parallel BLAS does not oversubscribe.
torch.set_num_threads(min(2, os.cpu_count() or 1))

REFERENCE = os.path.join(os.path.dirname(__file__), "reference")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs one CUDA GPU (run by benchmarks/gpu_check.sh; skipped without)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (tiny training runs are much faster so on 2 shared cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
