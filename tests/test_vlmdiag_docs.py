"""The numbers docs/vlm_diagnostic.md quotes are the committed runs': each generated block equals what
``vlmdiag_report.docs_block`` renders from its committed CSV, and the results match the quick recipe."""
from pathlib import Path

import pytest

from visionpe.eval import vlmdiag_report
from visionpe.eval.vlmdiag_config import load_config, split_specs

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "vlm_diagnostic.md"


@pytest.mark.parametrize("tag", list(vlmdiag_report.DOC_BLOCKS))
def test_docs_tables_are_rendered_from_the_committed_csv(tag):
    csv_rel, full = vlmdiag_report.DOC_BLOCKS[tag]
    md = DOC.read_text()
    start, end = vlmdiag_report.markers(tag)
    assert md.count(start) == 1 and md.count(end) == 1, f"block {tag!r} missing from {DOC.name}"
    i, j = md.index(start), md.index(end)
    assert md[i:j + len(end)] == vlmdiag_report.docs_block(DOC.parent / csv_rel, tag, full), (
        "docs/vlm_diagnostic.md is stale: run python -m visionpe.eval.vlmdiag_report docs/vlm_diagnostic.md")


@pytest.mark.parametrize("tag", list(vlmdiag_report.DOC_BLOCKS))
def test_committed_results_match_the_quick_recipe(tag):
    rows = vlmdiag_report.read_csv(DOC.parent / vlmdiag_report.DOC_BLOCKS[tag][0])
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
