"""The console script: list, demo, bench (smoke runs with tiny settings), unknown commands."""
import json

import pytest

import visionpe
from visionpe import cli


def test_list_shows_every_encoder_with_hooks(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in visionpe.list_encoders():
        line = next(l for l in out.splitlines() if l.split()[:1] == [name])
        hooks = ",".join(visionpe.encoder_info(name).hooks) or "-"
        assert line.split()[1] == hooks


def test_list_filters_by_hook(capsys):
    assert cli.main(["list", "--hook", "rotate"]) == 0
    names = [l.split()[0] for l in capsys.readouterr().out.splitlines()[1:]]
    assert names == visionpe.list_encoders("rotate") and "rope_axial" in names and "learned" not in names


def test_unknown_command_fails_with_usage(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_demo_runs_each_encoder(capsys):
    from visionpe.eval import demo
    rc = demo.main(["--encoders", "none", "rope_axial", "--img-size", "64", "--other-size", "48", "80",
                    "--depth", "1", "--batch", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "rope_axial" in out and "FAILED" not in out


def test_demo_rejects_unknown_encoder():
    from visionpe.eval import demo
    with pytest.raises(ValueError, match="unknown encoder 'nope'"):
        demo.main(["--encoders", "nope"])


def test_bench_writes_json_and_markdown(tmp_path, capsys):
    from visionpe.eval import bench
    rc = bench.main(["--encoders", "rope_axial", "--resolutions", "224", "--modes", "fwd", "--batch", "1",
                     "--rounds", "1", "--warmup", "0", "--no-anchor", "--no-memory", "--out", str(tmp_path),
                     "--tag", "smoke"])
    assert rc == 0
    res = json.loads((tmp_path / "smoke.json").read_text())
    assert res["names"] == ["learned", "rope_axial"]
    t = res["timing"]["224"]["fwd"]
    assert all(t[n]["ms_per_img"] > 0 for n in res["names"])
    md = (tmp_path / "smoke.md").read_text()
    assert "| `rope_axial` | rotate |" in md and "1.000x" in md  # the baseline row's own ratio


def test_bench_rejects_resolution_not_multiple_of_patch(tmp_path):
    from visionpe.eval import bench
    with pytest.raises(ValueError, match="multiples of the patch size"):
        bench.main(["--encoders", "none", "--resolutions", "200", "--no-memory", "--out", str(tmp_path)])
