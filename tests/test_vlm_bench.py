"""Smoke test of ``visionpe bench vlm`` (quick sizes, one round, no HF rows)."""
import json

from visionpe.cli import main as cli_main


def test_bench_vlm_quick(tmp_path, capsys):
    rc = cli_main(["bench", "vlm", "--quick", "--rounds", "1", "--no-hf", "--out", str(tmp_path), "--tag", "t"])
    assert rc == 0
    data = json.loads((tmp_path / "t.json").read_text())
    calls = {(r["case"], r["call"]) for r in data["rows"]}
    for scheme in ["rope1d", "mrope-qwen2vl", "mrope-qwen25vl", "mrope-qwen3vl", "vrope", "hope", "v2pe", "cca"]:
        assert ("1M video", scheme) in calls and ("8x32k", scheme) in calls
    assert ("8x32k", "mrope-qwen2vl (HF tensors)") in calls
    assert all(r["median_ms"] > 0 and r["tokens"] > 0 for r in data["rows"])
    assert "| 8x32k | mrope-qwen2vl |" in capsys.readouterr().out
    assert (tmp_path / "t.md").read_text().startswith("# VLM position building")
