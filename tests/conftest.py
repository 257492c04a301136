import os

import pytest
import torch

# CI has 2 cores; keep intra-op threads bounded so parallel BLAS does not oversubscribe.
torch.set_num_threads(min(2, os.cpu_count() or 1))

REFERENCE = os.path.join(os.path.dirname(__file__), "reference")


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


def importorskip_or_fail(name: str):
    """``pytest.importorskip(name)``, except under CI (env ``CI=true``), where a missing optional dependency
    fails the module loudly instead of skipping it (a skip there would hide the whole feature)."""
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        import importlib
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            pytest.fail(f"{name} is required in CI (CI={os.environ['CI']}) but cannot be imported: {exc}",
                        pytrace=False)
    return pytest.importorskip(name)
