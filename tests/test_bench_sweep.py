"""``visionpe bench sweep``: a tiny run end to end (files, ratios from the same run, docs block), bad input."""
import json

import pytest

from visionpe.eval import bench_sweep
from visionpe.eval.bench import main as bench_main


@pytest.mark.slow
def test_tiny_sweep_writes_results_markdown_plot_and_docs(tmp_path, one_thread):
    docs = tmp_path / "bench.md"
    docs.write_text("# Bench\n\nbefore\n<!-- sweep:begin -->\nold table\n<!-- sweep:end -->\nafter\n")
    rows = "learned,relpos_bias@sdpa,irpe@flex,timm:vit_relpos_small_patch16_224"
    rc = bench_main(["sweep", "--rows", rows, "--resolutions", "32", "48", "--fwdbwd-max-res", "32", "--batch", "1",
                     "--rounds", "2", "--out", str(tmp_path), "--img-dir", str(tmp_path), "--tag", "tiny",
                     "--docs", str(docs)])
    assert rc == 0
    res = json.loads((tmp_path / "tiny.json").read_text())
    assert res["rows"] == rows.split(",") and res["complete"]
    assert res["tokens"] == {"32": 5, "48": 10}
    assert set(res["timing"]["32"]) == {"fwd", "fwdbwd"} and set(res["timing"]["48"]) == {"fwd"}
    for r in ("32", "48"):
        for mode, block in res["timing"][r].items():
            assert all(len(v["samples"]) == 2 and v["ms_per_img"] > 0 for v in block.values())
            assert set(res["memory"][r][mode]) == set(res["rows"])
    assert len(res["load"]["start"]) == 3 and res["meta"]["batch"] == 1
    md = (tmp_path / "tiny.md").read_text()
    assert md == bench_sweep.render_sweep_markdown(res)       # the file is the function of the JSON
    base = res["timing"]["32"]["fwd"]["learned"]["ms_per_img"]
    ratio = res["timing"]["32"]["fwd"]["irpe@flex"]["ms_per_img"] / base
    assert f"{ratio:.2f}x" in md and "| `learned` | 1.00x | 1.00x |" in md
    assert (tmp_path / "tiny.png").stat().st_size > 10_000
    text = docs.read_text()
    assert "old table" not in text and "before" in text and "after" in text and "## Goals (flex rows)" in text
    # re-rendering from the JSON gives the same markdown
    assert bench_sweep.main(["--render", str(tmp_path / "tiny.json"), "--out", str(tmp_path / "again"),
                             "--img-dir", ""]) == 0
    assert (tmp_path / "again" / "tiny.md").read_text() == md


def test_bad_sweep_options(tmp_path):
    with pytest.raises(ValueError, match="unknown encoder"):
        bench_sweep.main(["--rows", "nope@flex", "--dry-run"])
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        bench_sweep.main(["--rows", "irpe@fast", "--dry-run"])
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        bench_sweep.main(["--resolutions", "200", "--dry-run"])
    with pytest.raises(ValueError, match="--batch must be > 0"):
        bench_sweep.main(["--batch", "0", "--dry-run"])
    assert bench_sweep.main(["--rows", "irpe@flex relpos_bias@sdpa", "--dry-run", "--out", str(tmp_path)]) == 0
    docs = tmp_path / "d.md"
    docs.write_text("no markers\n")
    with pytest.raises(ValueError, match="sweep:begin"):
        bench_sweep.update_docs(docs, "x")
