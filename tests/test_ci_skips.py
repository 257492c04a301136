"""The CI rule of conftest.py: with CI set, a skip for a missing dependency (pytest.importorskip, in a test or at
module level) fails the run; other skips stay skips; without CI all of them are skips."""
import os
import re
import shutil
import subprocess
import sys

import pytest

CONFTEST = os.path.join(os.path.dirname(__file__), "conftest.py")

TESTS = {
    "test_in_test.py": """
import pytest
def test_needs_missing():
    pytest.importorskip("visionpe_no_such_module_xyz")
def test_needs_newer():
    pytest.importorskip("pytest", minversion="999")
def test_plain_skip():
    pytest.skip("not on this platform")
def test_passes():
    assert 1 + 1 == 2
""",
    "test_module_level.py": """
import pytest
pytest.importorskip("visionpe_no_such_module_xyz")
def test_never_collected():
    pass
""",
}


def _run(tmp_path, ci):
    for name, src in TESTS.items():
        (tmp_path / name).write_text(src)
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                           "--continue-on-collection-errors", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    summary = proc.stdout.strip().splitlines()[-1]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
    return proc, counts


@pytest.mark.parametrize("ci", [None, "false"])
def test_without_ci_missing_dependencies_skip(tmp_path, ci):
    proc, counts = _run(tmp_path, ci)
    assert proc.returncode == 0, proc.stdout
    assert counts == {"passed": 1, "skipped": 4}, proc.stdout  # 3 in test_in_test.py + the module


def test_in_ci_missing_dependencies_fail(tmp_path):
    proc, counts = _run(tmp_path, "true")
    assert proc.returncode != 0
    # the two importorskip tests fail, the module-level one is a collection error, the plain skip stays
    assert counts == {"passed": 1, "failed": 2, "skipped": 1, "error": 1}, proc.stdout
    out = proc.stdout
    assert "FAILED test_in_test.py::test_needs_missing" in out and "FAILED test_in_test.py::test_needs_newer" in out
    assert "ERROR test_module_level.py" in out
    assert "SKIPPED [1] test_in_test.py" in out and "not on this platform" in out
    assert "CI is set: a skip for a missing dependency is a failure" in out
    assert "could not import 'visionpe_no_such_module_xyz'" in out
