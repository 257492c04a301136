"""The runs docs/vlm_diagnostic.md quotes are committed, complete and of the quick recipe. (That its tables equal
what the committed CSVs render is tests/test_docs.py's check of every generated block.)"""
from pathlib import Path

import pytest

from visionpe.eval import vlmdiag_report
from visionpe.eval.vlmdiag_config import load_config, split_specs

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "vlm_diagnostic.md"
RUNS = ["vlmdiag_quick", "vlmdiag_quick_seed1"]


@pytest.mark.parametrize("name", RUNS)
def test_committed_results_match_the_quick_recipe(name):
    assert f"<!-- table: docs/results/{name}.csv kind=vlmdiag" in DOC.read_text()
    rows = vlmdiag_report.read_csv(ROOT / "docs" / "results" / f"{name}.csv")
    cfg = load_config(quick=True)
    assert [r["variant"] for r in rows] == ["label_majority", *cfg["variants"]]
    assert not any(r["error"] for r in rows)
    assert {r["epochs"] for r in rows[1:]} == {str(cfg["train"]["epochs"])}
    tests = [s for s in split_specs(cfg) if s not in ("train", "val")]
    assert [k.split("/")[0] for k in rows[0] if k.endswith("/avg")] == tests


def test_docs_link_the_committed_report_and_chart():
    text = DOC.read_text()
    assert (ROOT / "docs" / "img" / "vlmdiag_quick.png").stat().st_size > 10_000 and "img/vlmdiag_quick.png" in text
    for name in ("vlmdiag_quick.md", "vlmdiag_quick.csv", "vlmdiag_quick_seed1.csv"):
        assert (ROOT / "docs" / "results" / name).exists() and f"results/{name}" in text
