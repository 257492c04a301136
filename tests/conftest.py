import os

import pytest
import torch

# CI has 2 cores; keep intra-op threads bounded so parallel BLAS does not oversubscribe.
torch.set_num_threads(min(2, os.cpu_count() or 1))

REFERENCE = os.path.join(os.path.dirname(__file__), "reference")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs one CUDA GPU (run by benchmarks/gpu_check.sh; deselected without)")


def pytest_collection_modifyitems(config, items):
    """Without a CUDA device the ``cuda``-marked tests are deselected (reported as such), not skipped: the CPU
    suite has nothing to say about them, and benchmarks/gpu_check.sh runs them where a GPU is. An explicit
    ``-m cuda`` keeps them (gpu_check.sh's ``--dry-run`` collects them on a CPU)."""
    if torch.cuda.is_available() or "cuda" in (config.option.markexpr or ""):
        return
    cuda = [item for item in items if item.get_closest_marker("cuda")]
    if cuda:
        config.hook.pytest_deselected(items=cuda)
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]


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
    """``pytest.importorskip(name)``; under CI the hooks below turn its skip into a failure (module level: a
    collection error), so a missing optional dependency cannot hide a whole feature behind a green run."""
    return pytest.importorskip(name)


# -- CI: a skip for a missing dependency is a failure ---------------------------------------------------
# Locally, `pytest.importorskip("transformers")` skips the HF tests when transformers is not installed. In CI
# (`CI` set to anything but "", 0, false, no) the same skip would hide a whole feature behind a green run,
# so it is turned into a failure (a test) or a collection error (a module-level importorskip).
# tests/test_ci_skips.py checks the rule.
MISSING_DEPENDENCY = ("could not import ", "required is: ")  # the two messages of pytest.importorskip


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _missing_dependency(excinfo) -> str | None:
    """The skip message when ``excinfo`` is a skip for a missing (or too old) dependency, else None."""
    if excinfo is None or not excinfo.errisinstance(pytest.skip.Exception):
        return None
    msg = str(getattr(excinfo.value, "msg", excinfo.value))
    return msg if any(m in msg for m in MISSING_DEPENDENCY) else None


def _ci_failure(msg: str) -> str:
    return f"CI is set: a skip for a missing dependency is a failure (install it): {msg}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    msg = _missing_dependency(call.excinfo) if rep.skipped and in_ci() else None
    if msg is not None:
        rep.outcome = "failed"
        rep.longrepr = _ci_failure(msg)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    rep = outcome.get_result()
    if not (rep.skipped and in_ci()):
        return
    # a module-level importorskip: the collect report's longrepr is (path, line, "Skipped: <msg>")
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    if any(m in reason for m in MISSING_DEPENDENCY):
        rep.outcome = "failed"
        rep.longrepr = _ci_failure(reason)
