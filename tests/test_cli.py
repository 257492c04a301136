"""The console script: list, demo, bench (smoke runs with tiny settings), unknown commands, --help/--version
without torch, --encoders parsing, one-line errors, the GPU-recipe warning."""
import argparse
import json
import subprocess
import sys

import pytest

import visionpe
from visionpe import cli
from visionpe.cli import COMMANDS
from visionpe.cli_util import add_encoders_argument, error_line, estimate_threecell_flops, gpu_recipe_warning


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


# -- answering at once, one-line errors, --encoders ---------------------------------------------------------------

LIGHT = [["--help"], ["--version"], *([c, "--help"] for c in COMMANDS), ["bench", "sweep", "--help"],
         ["bench", "vlm", "--help"]]


@pytest.mark.parametrize("argv", LIGHT, ids=" ".join)
def test_help_and_version_do_not_import_torch(argv):
    code = ("import sys\nfrom visionpe.cli import main\ntry:\n    rc = main(%r)\nexcept SystemExit as e:\n"
            "    rc = e.code\nheavy = [m for m in ('torch', 'timm') if m in sys.modules]\n"
            "print('RC', rc, 'HEAVY', heavy)\n" % (argv,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.strip().splitlines()[-1] == "RC 0 HEAVY []", out
    if argv == ["--version"]:
        assert out.splitlines()[0] == f"visionpe {visionpe.__version__}"


def test_import_visionpe_is_light_and_registers_models_when_timm_comes():
    code = ("import sys, visionpe\nassert 'torch' not in sys.modules\nimport timm\n"
            "print(timm.is_model('vpe_vit_small_patch16_224'), len(visionpe.list_encoders()) > 10)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "True True", out.stderr[-2000:]


def test_encoders_accept_commas_and_spaces():
    p = argparse.ArgumentParser()
    add_encoders_argument(p)
    for argv in (["--encoders", "a,b"], ["--encoders", "a", "b"], ["--encoders", "a,", "b", "a"],
                 ["--encoders", "a, b"], ["--encoders", "a b"], ["--encoders", " a,  b "]):
        assert p.parse_args(argv).encoders == ["a", "b"], argv
    assert p.parse_args([]).encoders is None


@pytest.mark.parametrize("command", ["bench", "demo", "pesi"])
def test_unknown_encoders_are_one_line_listing_the_known(command, capsys, tmp_path):
    argv = [command, "--encoders", "nope,rope_axial", "zap", *(["--out", str(tmp_path)] if command != "demo" else [])]
    if command == "pesi":  # pesi reports it as a usage error (argparse: usage line, error line, exit 2)
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        rc, err = e.value.code, capsys.readouterr().err.strip().splitlines()[-1]
        prefix = "visionpe pesi: error: --encoders: "
    else:
        rc, err = cli.main(argv), capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1
        prefix = f"visionpe {command}: error: --encoders: "
    assert rc == 2 and "Traceback" not in err
    assert err.startswith(prefix + "unknown encoders 'nope', 'zap'; known encoders: ") and "rope_mixed" in err


def test_demo_takes_comma_separated_encoders(capsys):
    assert cli.main(["demo", "--encoders", "none,rope_axial", "--img-size", "32", "--other-size", "48", "16",
                     "--depth", "1", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "rope_axial" in out and "none" in out and "FAILED" not in out


def test_unexpected_errors_name_their_type_and_point_to_debug():
    assert error_line("x", RuntimeError("boom\n  detail")) == \
        "visionpe x: error: RuntimeError: boom detail (run with --debug for the traceback)"
    assert error_line("x", ValueError("bad value\n  second line")) == "visionpe x: error: bad value second line"


def _threecell_recipe(name):
    import yaml
    from visionpe.recipes import recipe_path
    return yaml.safe_load(open(recipe_path(name)))


def test_gpu_recipe_on_cpu_warns_with_an_estimate():
    paper, quick = _threecell_recipe("threecell"), _threecell_recipe("threecell_quick")
    # ViT-B/16, 197 tokens: 34.9 GFLOPs = 17.4 GMACs forward per image (timm lists 17.6 GMACs with patch embed, head)
    fwd = 12 * (2 * 197 * 12 * 768 ** 2 + 4 * 197 ** 2 * 768)
    assert estimate_threecell_flops(paper, 1) == pytest.approx(150 * (3 * fwd * 8000 + fwd * 1000) + fwd * 1000)
    msg = gpu_recipe_warning(paper, 18, cuda_available=False, flops_per_s=1e11)
    assert msg is not None and "use --quick" in msg and "no CUDA device found" in msg
    assert "at least 273 days" in msg  # 18 x 1.31e17 FLOPs at 1e11 FLOP/s
    assert gpu_recipe_warning(paper, 18, cuda_available=True, flops_per_s=1e11) is None  # a GPU: no warning
    assert gpu_recipe_warning(quick, 18, cuda_available=False, flops_per_s=1e11) is None  # the CPU recipe


# -- --encoders on every command, errors of every command ---------------------------------------------------------
def test_encoders_mixed_forms_on_threecell_and_bench_sweep_rows(capsys, tmp_path):
    assert cli.main(["threecell", "--quick", "--encoders", "none,rope_axial", "learned", "--list"]) == 0
    assert capsys.readouterr().out.split() == ["none", "rope_axial", "learned"]
    assert cli.main(["bench", "sweep", "--rows", "learned,rope_axial", "irpe@flex", "--dry-run", "--out",
                     str(tmp_path / "s")]) == 0
    assert "dry run: 3 rows" in capsys.readouterr().out and not (tmp_path / "s").exists()
    from visionpe.eval.bench import parse_args
    assert parse_args(["--encoders", "none,rope_axial", "learned"]).encoders == ["none", "rope_axial", "learned"]


@pytest.mark.parametrize("argv, prefix", [
    (["threecell", "--quick", "--encoders", "nope,rope_axial", "zap", "--list"],
     "visionpe threecell: error: unknown encoder(s) ['nope', 'zap']; known encoders: "),
    (["bench", "sweep", "--rows", "learned,nope@sdpa", "--resolutions", "32"],
     "visionpe bench sweep: error: unknown encoder 'nope'; known encoders: "),
], ids=["threecell", "bench sweep"])
def test_unknown_names_on_threecell_and_bench_sweep(argv, prefix, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(prefix) and "rope_mixed" in err, err
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--set", "data.root=nodata", "--output-dir", "run"],
     "visionpe finetune: error: data.root 'nodata' does not exist or is not a directory"),
    (["evalres", "--model", "vit_tiny_patch16_224", "--data-root", "nodata"],
     "visionpe evalres: error: data.root 'nodata' does not exist or is not a directory"),
    (["threecell", "--config", "nope.yaml"],
     "visionpe threecell: error: recipe 'nope.yaml' is neither a file nor a packaged recipe; packaged: threecell,"),
    (["vlmdiag", "--config", "nope.yaml"],
     "visionpe vlmdiag: error: recipe 'nope.yaml' is neither a file nor a packaged recipe; packaged: vlmdiag,"),
    (["bench", "--encoders", "rope_axial,nope", "--out", "b"],
     "visionpe bench: error: --encoders: unknown encoder 'nope'; known encoders: fourier,"),
    (["convert", "missing.pth", "o"], "visionpe convert: error: checkpoint file 'missing.pth' does not exist"),
], ids=["finetune-data", "evalres-data", "threecell-config", "vlmdiag-config", "bench-encoders", "convert-file"])
def test_every_command_answers_bad_input_in_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(message) and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())  # nothing written (evalres's default --out, finetune's run folder ...)


def test_debug_shows_the_traceback_on_any_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in ("threecell", "vlmdiag"):  # they report their recipe errors themselves; --debug still reaches them
        with pytest.raises(FileNotFoundError, match="recipe .nope.yaml. is neither a file nor a packaged recipe"):
            cli.main([command, "--config", "nope.yaml", "--debug"])
    with pytest.raises(ValueError, match="data.root 'nodata' does not exist"):
        cli.main(["--debug", "evalres", "--model", "vit_tiny_patch16_224", "--data-root", "nodata"])
    out = subprocess.run([sys.executable, "-m", "visionpe", "demo", "--encoders", "nope", "--debug"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback (most recent call last)" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("ValueError: --encoders: unknown encoder 'nope'")


def test_threecell_command_warns_before_a_gpu_recipe_on_cpu(monkeypatch, capsys, tmp_path):
    """The warning reaches the user from ``visionpe threecell`` itself, before the run starts (stubbed here)."""
    import torch
    from visionpe import cli_util
    from visionpe.eval import threecell_run

    class Started(Exception):
        pass

    def started(*args, **kwargs):
        raise Started("the run would start here")

    monkeypatch.setattr(threecell_run, "run", started)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cli_util, "cpu_flops_per_second", lambda seconds=0.2: 1e11)
    for argv, warned in ((["threecell", "--out", str(tmp_path / "o")], True),
                         (["threecell", "--quick", "--out", str(tmp_path / "o")], False)):
        assert cli.main(argv) == 1  # the stub's exception, as one line
        err = capsys.readouterr().err
        assert "Started: the run would start here" in err
        lines = err.strip().splitlines()
        if warned:
            assert len(lines) == 2 and lines[0].startswith("visionpe threecell: warning: recipe 'threecell' is sized "
                                                           "for a GPU")
            assert "(no CUDA device found): it would take at least" in lines[0] and "use --quick" in lines[0]
        else:
            assert len(lines) == 1 and "warning" not in err
