"""``visionpe bench sweep``: a tiny run end to end (files, ratios from the same run, the docs renderer), the goal
table's and the flex crossover's decisions on constructed numbers, bad input."""
import importlib.util
import json
from pathlib import Path

import pytest

from visionpe.eval import bench_sweep
from visionpe.eval.bench import main as bench_main

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("render_docs", ROOT / "tools" / "render_docs.py")
render_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_docs)


@pytest.mark.slow
def test_tiny_sweep_writes_results_markdown_plot_and_renders_into_docs(tmp_path, one_thread):
    rows = "learned,relpos_bias@sdpa,relpos_bias@flex,irpe@flex,timm:vit_relpos_small_patch16_224"
    rc = bench_main(["sweep", "--rows", rows, "--resolutions", "32", "48", "--fwdbwd-max-res", "32", "--batch", "1",
                     "--rounds", "2", "--out", str(tmp_path), "--img-dir", str(tmp_path), "--tag", "tiny"])
    assert rc == 0
    res = json.loads((tmp_path / "tiny.json").read_text())
    assert res["rows"] == rows.split(",") and res["complete"]
    assert res["tokens"] == {"32": 5, "48": 10}
    assert set(res["timing"]["32"]) == {"fwd", "fwdbwd"} and set(res["timing"]["48"]) == {"fwd"}
    for r in ("32", "48"):
        for mode, block in res["timing"][r].items():
            assert all(len(v["samples"]) == 2 and v["ms_per_img"] > 0 for v in block.values())
            assert set(res["memory"][r][mode]) == set(res["rows"])
            # the tensor peak of one untimed step (CPU): what the ratios use
            assert all(v["tensor_mib"] > 0 for v in res["memory"][r][mode].values())
    assert len(res["load"]["start"]) == 3 and res["meta"]["batch"] == 1
    for r, n in (("32", 5), ("48", 10)):  # attention alone, in the same run
        kern = res["kernels"][r]
        assert kern["tokens"] == n and set(kern["ms"]) == set(bench_sweep.KERNEL_ROWS)
        assert all(len(kern["samples"][k]) == 3 and kern["ms"][k] > 0 for k in bench_sweep.KERNEL_ROWS)
    md = (tmp_path / "tiny.md").read_text()
    ms = res["kernels"]["48"]["ms"]
    assert "## attention alone" in md and f"{ms['flex, no score_mod'] / ms['sdpa']:.2f}x" in md
    assert md == bench_sweep.render_sweep_markdown(res)       # the file is the function of the JSON
    base = res["timing"]["32"]["fwd"]["learned"]["ms_per_img"]
    ratio = res["timing"]["32"]["fwd"]["irpe@flex"]["ms_per_img"] / base
    assert f"{ratio:.2f}x" in md and "| `learned` | 1.00x | 1.00x |" in md
    mem = res["memory"]["48"]["fwd"]
    assert f"{mem['irpe@flex']['tensor_mib'] / mem['learned']['tensor_mib']:.2f}x" in md and "MiB tensors" in md
    own = res["timing"]["48"]["fwd"]["relpos_bias@flex"]["ms_per_img"] / res["timing"]["48"]["fwd"]["relpos_bias@sdpa"]["ms_per_img"]
    assert f"| `relpos_bias` | " in md and f"{own:.2f}x" in md  # flex over its own SDPA row, same run
    assert (tmp_path / "tiny.png").stat().st_size > 10_000
    # the docs' kind=sweep block is the same markdown without its title, rendered from the JSON
    block = render_docs.render_sweep(tmp_path / "tiny.json", {})
    assert block == md.split("\n", 2)[2].strip("\n") and "## Goals" in block and not block.startswith("# ")
    # level=4: the same text, its "##" headings at level 4 (under a docs page's own headings)
    level4 = render_docs.render_sweep(tmp_path / "tiny.json", {"level": "4"})
    assert level4 == block.replace("\n## ", "\n#### ") and "\n## " not in level4
    with pytest.raises(ValueError, match="level must be 2 to 6"):
        render_docs.render_sweep(tmp_path / "tiny.json", {"level": "x"})
    docs = tmp_path / "bench.md"
    spec = f"{tmp_path / 'tiny.json'} kind=sweep"
    docs.write_text(f"# Bench\n\nbefore\n<!-- table: {spec} -->\nold table\n<!-- /table -->\nafter\n")
    new = render_docs.render_text(docs.read_text(), root=Path("/"))
    assert "old table" not in new and new.startswith("# Bench\n\nbefore\n") and new.endswith("after\n")
    assert dict(render_docs.blocks(new))[spec] == block
    # re-rendering from the JSON gives the same markdown
    assert bench_sweep.main(["--render", str(tmp_path / "tiny.json"), "--out", str(tmp_path / "again"),
                             "--img-dir", ""]) == 0
    assert (tmp_path / "again" / "tiny.md").read_text() == md


def _results(fwd: dict, mem: dict) -> dict:
    """A results dict from ``{res: {row: forward ms/img}}`` and ``{res: {row: peak MiB}}``."""
    ress = list(fwd)
    return {"rows": list(fwd[ress[0]]), "resolutions": ress, "tokens": {str(r): (r // 16) ** 2 + 1 for r in ress},
            "timing": {str(r): {"fwd": {k: {"ms_per_img": v} for k, v in fwd[r].items()}} for r in ress},
            "memory": {str(r): {"fwd": {k: {"mib": v} for k, v in mem[r].items()}} for r in ress}}


def test_goal_rows_decide_met_and_missed_per_encoder_and_resolution():
    fwd = {"learned": 10.0, "relpos_bias@sdpa": 20.0, "relpos_bias@flex": 15.0, "irpe@sdpa": 20.0, "irpe@flex": 25.0,
           "irpe_qkv@sdpa": 40.0, "irpe_qkv@flex": 30.0, bench_sweep.TIMM_RELPOS: 16.0}
    mem = {"learned": 100.0, "relpos_bias@sdpa": 200.0, "relpos_bias@flex": 110.0, "irpe@sdpa": 300.0,
           "irpe@flex": 111.0, "irpe_qkv@sdpa": 900.0, "irpe_qkv@flex": 400.0, bench_sweep.TIMM_RELPOS: 150.0}
    lines = bench_sweep.goal_rows(_results({r: fwd for r in (224, 768, 1024)}, {r: mem for r in (224, 768, 1024)}))
    assert lines[0] == "| goal | `relpos_bias@flex` | `irpe@flex` | `irpe_qkv@flex` |"
    table = {ln.split(" | ")[0][2:]: ln.split(" | ")[1:] for ln in lines[2:]}
    for res in (224, 768, 1024):   # 1.10x is met (<=), 1.11x missed
        assert table[f"forward peak memory / APE <= 1.10, {res} px"] == ["met (1.10x)", "**missed** (1.11x)",
                                                                       "**missed** (4.00x) |"]
    for res in (768, 1024):
        assert table[f"forward time / own SDPA path < 1, {res} px"] == ["met (0.75x)", "**missed** (1.25x)",
                                                                      "met (0.75x) |"]
        assert table[f"forward time / timm's relpos ViT < 1, {res} px"] == ["met (0.94x)", "**missed** (1.56x)",
                                                                          "**missed** (1.88x) |"]
    assert "forward time / own SDPA path < 1, 224 px" not in table          # speed goals only at 768 and 1024
    assert table["goals met"] == ["7 of 7", "0 of 7", "2 of 7 |"]


def test_flex_crossover_is_the_smallest_token_count_from_which_flex_always_wins():
    def res(flex_over_sdpa: dict, resolutions=(224, 384, 512, 768)):
        fwd = {r: {"learned": 1.0, "relpos_bias@sdpa": 1.0, "relpos_bias@flex": flex_over_sdpa[r][0],
                   "irpe@sdpa": 1.0, "irpe@flex": flex_over_sdpa[r][1]} for r in resolutions}
        return _results(fwd, {r: {k: 1.0 for k in fwd[r]} for r in resolutions})
    wins_from_512 = {224: (0.9, 1.2), 384: (1.1, 0.9), 512: (0.9, 0.99), 768: (0.5, 0.6)}
    assert bench_sweep.flex_crossover(res(wins_from_512), "fwd") == 1025      # both encoders must win
    assert bench_sweep.flex_crossover(res({**wins_from_512, 384: (0.9, 0.9)}), "fwd") == 577
    assert bench_sweep.flex_crossover(res({**wins_from_512, 224: (0.8, 0.8), 384: (0.9, 0.9)}), "fwd") == 197
    # a loss at the largest measured size: no crossover, whatever happens below it
    assert bench_sweep.flex_crossover(res({**wins_from_512, 768: (0.5, 1.0)}), "fwd") is None
    assert bench_sweep.flex_crossover(res(wins_from_512), "fwdbwd") is None  # mode not measured
    # per encoder (what attn_impl="auto" uses)
    assert bench_sweep.flex_crossover(res(wins_from_512), "fwd", ["relpos_bias"]) == 1025  # 224 won, 384 lost
    assert bench_sweep.flex_crossover(res(wins_from_512), "fwd", ["irpe"]) == 577
    md = bench_sweep._crossover_rows(res(wins_from_512))
    assert md[0].endswith("| fwd 768 px (N=2305) | flex faster from N (fwd) |")
    assert "| `irpe` | 1.20x | 0.90x | 0.99x | 0.60x | 577 |" in md
    assert "| `relpos_bias` | 0.90x | 1.10x | 0.90x | 0.50x | 1025 |" in md
    assert "| `relpos_bias` | 0.90x | 1.10x | 0.90x | 1.01x | none |" in bench_sweep._crossover_rows(
        res({**wins_from_512, 768: (1.01, 0.6)}))


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
    with pytest.raises(SystemExit):   # the sweep no longer writes docs itself (tools/render_docs.py does)
        bench_sweep.main(["--docs", "docs/bench.md", "--dry-run"])


def test_tensor_peak_counts_live_tensor_bytes_not_their_sum():
    import torch

    def one_at_a_time():
        for _ in range(3):
            a = torch.ones(1024, 1024)              # 4 MiB, freed before the next
            del a

    def two_live():
        a = torch.ones(1024, 1024)
        b = torch.ones(1024, 512)                   # 2 MiB while a lives
        return a.sum() + b.sum()

    assert bench_sweep.tensor_peak_mib(one_at_a_time) == pytest.approx(4.0, abs=0.01)
    assert bench_sweep.tensor_peak_mib(two_live) == pytest.approx(6.0, abs=0.01)
    assert bench_sweep.tensor_peak_mib(two_live) == bench_sweep.tensor_peak_mib(two_live)   # deterministic
