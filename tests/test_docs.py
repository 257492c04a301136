"""The docs cannot drift: every generated table of README.md and docs/*.md equals what tools/render_docs.py
renders from its committed results file, hand-written tables hold no measured ratios or timings, and every
```python block runs (each in a fresh namespace, in a temporary directory). A block may opt out only with a
visible marker right before it, `<!-- no-run: reason -->`, whose reason must not be empty."""
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("render_docs", ROOT / "tools" / "render_docs.py")
render_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_docs)

DOCS = render_docs.doc_files(ROOT)
FENCE = re.compile(r"^```python\n(?P<code>.*?)^```$", re.S | re.M)
NO_RUN = re.compile(r"<!--\s*no-run:(?P<reason>.*?)-->\s*$")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def python_blocks(text: str, label: str) -> list[dict]:
    """Every ```python block of a markdown text: its code, first line, and the no-run reason (or None)."""
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = [ln for ln in text[:m.start()].splitlines() if ln.strip()]
        marker = NO_RUN.search(before[-1]) if before else None
        out.append({"file": label, "line": line, "code": m.group("code"),
                    "no_run": marker.group("reason").strip() if marker else None})
    return out


BLOCKS = [b for p in DOCS for b in python_blocks(p.read_text(), _rel(p))]
RUNNABLE = [b for b in BLOCKS if b["no_run"] is None]  # opted-out blocks are listed, with their reason, above


def test_docs_have_python_blocks():
    assert len(BLOCKS) >= 7, [(b["file"], b["line"]) for b in BLOCKS]  # README and every method page


def test_no_run_markers_give_a_reason():
    for b in BLOCKS:
        if b["no_run"] is not None:
            assert b["no_run"], f"{b['file']}:{b['line']}: '<!-- no-run: -->' needs a reason"


def test_most_blocks_run():
    opted_out = [(b["file"], b["line"], b["no_run"]) for b in BLOCKS if b["no_run"] is not None]
    assert len(opted_out) <= 3, opted_out  # an opt-out is the exception: each needs a reason in the doc


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"{b['file']}:{b['line']}" for b in RUNNABLE])
def test_python_block_runs(block, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    code = compile(block["code"], f"{block['file']}:{block['line']}", "exec")
    exec(code, {"__name__": "__docs__"})  # a fresh namespace per block


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_generated_tables_match_their_results_files(path):
    text = path.read_text()
    fresh = dict(render_docs.blocks(render_docs.render_text(text, ROOT)))
    stale = [spec for spec, body in render_docs.blocks(text) if fresh[spec] != body]
    assert not stale, (f"{_rel(path)}: generated tables differ from their results files (run "
                       f"`python tools/render_docs.py`): {stale}")


def _outside_generated(text: str) -> str:
    return render_docs.MARKER.sub("", text)


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_hand_written_tables_hold_no_measured_ratios_or_timings(path):
    # ratios and timings are exactly what drifted: they must come from a generated table
    ratio = re.compile(r"\b\d+\.\d+x\b|\b\d+(\.\d+)?\s?(ms|s)/img\b|\b\d+(\.\d+)?\s?ms\b")
    rows = [ln for ln in _outside_generated(path.read_text()).splitlines() if ln.startswith("|")]
    bad = [ln for ln in rows if ratio.search(ln)]
    assert not bad, f"{_rel(path)}: hand-written table rows with measured ratios/timings: {bad}"


def test_every_results_file_named_in_the_docs_exists():
    for path in DOCS:
        for spec, _ in render_docs.blocks(path.read_text()):
            rel, kind, _opts = render_docs.parse_spec(spec)
            if rel != "-":
                assert list(ROOT.glob(rel)), f"{_rel(path)}: {rel} does not exist"


# -- the renderer itself -------------------------------------------------------------------------------
def test_renderer_detects_a_changed_number_and_bad_markers(tmp_path):
    spec = "docs/results/threecell_quick_all.csv kind=threecell cols=avg encoders=none,sincos2d majority=0"
    fresh = f"intro\n\n<!-- table: {spec} -->\nold\n<!-- /table -->\n\nend\n"
    rendered = render_docs.render_text(fresh, ROOT)
    body = render_docs.blocks(rendered)[0][1]
    assert "| sincos2d |" in body and rendered.startswith("intro\n\n") and rendered.endswith("\n\nend\n")
    assert render_docs.render_text(rendered, ROOT) == rendered  # idempotent
    tampered = rendered.replace("96.77", "97.77")
    assert tampered != rendered and render_docs.render_text(tampered, ROOT) == rendered
    doc = tmp_path / "doc.md"
    doc.write_text(tampered)
    assert render_docs.main(["--check", str(doc)]) == 1 and doc.read_text() == tampered
    assert render_docs.main([str(doc)]) == 0 and doc.read_text() == rendered
    with pytest.raises(ValueError, match="no matching"):
        render_docs.render_text(f"<!-- table: {spec} -->\nunterminated\n", ROOT)
    with pytest.raises(ValueError, match="kind='nope' is not one of"):
        render_docs.render_block("docs/results/threecell_quick_all.csv kind=nope", ROOT)
    with pytest.raises(ValueError, match="does not exist"):
        render_docs.render_block("docs/results/missing.csv kind=threecell", ROOT)
    with pytest.raises(ValueError, match=r"unknown name\(s\) \['no_such_pe'\]"):
        render_docs.render_block("docs/results/threecell_quick_all.csv kind=threecell encoders=no_such_pe", ROOT)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['colz'\]"):
        render_docs.render_block("docs/results/threecell_quick_all.csv kind=threecell colz=avg", ROOT)


def test_bench_goal_column_is_computed_from_the_file():
    body = render_docs.render_block("benchmarks/results/vit_s16_cpu.json kind=bench encoders=learned,mdlrpe "
                                    "cols=fwd224 goals=learned:1.0,mdlrpe:1.05", ROOT)
    import json
    t = json.loads((ROOT / "benchmarks/results/vit_s16_cpu.json").read_text())["timing"]["224"]["fwd"]
    r = t["mdlrpe"]["ms_per_img"] / t["learned"]["ms_per_img"]
    assert f"| `mdlrpe` | {r:.3f}x | <= 1.05x: {'met' if r <= 1.05 else '**missed**'} |" in body
    assert "| `learned` | 1.000x | <= 1.0x: met |" in body


def test_no_run_marker_is_read():
    text = ("a\n\n<!-- no-run: needs a GPU -->\n```python\nraise SystemExit\n```\n\n```python\nx = 1\n```\n"
            "<!-- no-run: -->\n\n```python\ny = 2\n```\n")
    assert [b["no_run"] for b in python_blocks(text, "x.md")] == ["needs a GPU", None, ""]
    assert [b["line"] for b in python_blocks(text, "x.md")] == [4, 8, 13]
