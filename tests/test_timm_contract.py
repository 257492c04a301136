"""timm visibility (``python -m visionpe.run``) and timm's model contract beyond tests/test_vit.py.

timm's own model test suite runs through ``tools/timm_suite.sh`` (see docs/timm.md); this file holds what
that suite does not cover: the runner route for tools that only call ``timm.create_model``, the
``fixed_input_size`` choice, and ``torch.export`` of every registered ``vpe_vit_tiny_*`` model.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch

import visionpe
from visionpe.models import vpe_model_names
from visionpe.run import main as run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_NAMES = [n for n in vpe_model_names() if n.startswith("vpe_vit_tiny_")]

# a "config-driven tool": it knows model names only as strings and never imports visionpe
TOOL = textwrap.dedent("""
    import sys
    import timm
    name, out = sys.argv[1], sys.argv[2]
    model = timm.create_model(name, num_classes=3)
    with open(out, "w") as f:
        f.write(" ".join([__name__, type(model).__name__, model.pe_name, sys.argv[0], sys.path[0]]))
""")


def _python(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_plain_timm_does_not_see_the_models_and_the_runner_makes_them_visible(tmp_path):
    script = tmp_path / "tool" / "train_like.py"
    script.parent.mkdir()
    script.write_text(TOOL)
    out = tmp_path / "out.txt"
    name = "vpe_vit_tiny_patch16_224_rope_mixed"
    # timm loads no entry points: without the runner the name is unknown
    plain = _python(str(script), name, str(out), cwd=tmp_path)
    assert plain.returncode != 0 and "Unknown model" in plain.stderr and not out.exists()
    # the one line from docs/timm.md: python -m visionpe.run SCRIPT ARGS...
    ran = _python("-m", "visionpe.run", str(script), name, str(out), cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-2000:]
    main_name, cls, pe, argv0, path0 = out.read_text().split(" ")
    assert (main_name, cls, pe) == ("__main__", "VisionPEViT", "rope_mixed")
    assert argv0 == str(script)  # argv as `python SCRIPT ARGS...` sets it
    assert os.path.samefile(path0, script.parent)  # the script's directory first on sys.path


def test_runner_module_form(tmp_path):
    (tmp_path / "tool_mod.py").write_text(TOOL)
    out = tmp_path / "out.txt"
    ran = _python("-m", "visionpe.run", "-m", "tool_mod", "vpe_vit_tiny_patch16_224_peg", str(out), cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-2000:]
    main_name, cls, pe, argv0, _ = out.read_text().split(" ")
    assert (main_name, cls, pe) == ("__main__", "VisionPEViT", "peg")
    assert os.path.samefile(argv0, tmp_path / "tool_mod.py")  # as `python -m tool_mod` sets it


def test_runner_exit_codes_and_usage(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(SystemExit) as e:
        run_main([])
    assert e.value.code == 2 and "usage: python -m visionpe.run SCRIPT" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run_main(["-m"])
    assert e.value.code == 2 and "-m needs a module name" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run_main([str(tmp_path / "missing.py")])
    assert e.value.code == 2 and "missing.py" in capsys.readouterr().err
    failing = tmp_path / "exits.py"
    failing.write_text("import sys\nsys.exit(sys.argv[1])\n")
    with pytest.raises(SystemExit) as e:
        run_main([str(failing), "7"])
    assert e.value.code == "7"  # the script's own exit status passes through


# -- input size: fixed grid, as timm's own ViTs ---------------------------------------------------------
def test_pretrained_cfgs_say_fixed_input_size_like_timm_vits():
    assert timm.get_pretrained_cfg("vit_tiny_patch16_224").fixed_input_size is True  # timm's own ViT
    for name in vpe_model_names():
        cfg = timm.get_pretrained_cfg(name)
        assert cfg.fixed_input_size is True, name
        assert cfg.input_size[-1] == int(name.split("_patch16_")[1][:3])


def test_other_sizes_need_dynamic_img_size_as_timm_vits():
    x = torch.randn(1, 3, 96, 128)
    ours = timm.create_model("vpe_vit_tiny_patch16_224_rope_axial", depth=1)
    with pytest.raises(ValueError, match=r"image size \(96, 128\) does not match the model's \(224, 224\).*"
                                         r"dynamic_img_size=True"):
        ours(x)
    theirs = timm.create_model("vit_tiny_patch16_224", depth=1)
    with pytest.raises(AssertionError):  # timm's ViT refuses the same input (its own assert)
        theirs(x)
    dyn = timm.create_model("vpe_vit_tiny_patch16_224_rope_axial", depth=1, num_classes=4, dynamic_img_size=True)
    assert dyn(x).shape == (1, 4)


def test_factory_device_and_dtype_reach_the_encoder():
    m = timm.create_model("vpe_vit_tiny_patch16_224_rope_mixed", depth=2, device="meta", dtype=torch.bfloat16)
    assert m.pe.freqs.device.type == "meta" and m.pe.freqs.dtype == torch.bfloat16
    assert {p.device.type for p in m.parameters()} == {"meta"}
    with torch.device("meta"):  # timm's suite builds models this way; the Gilbert curve is host-side math
        g = timm.create_model("vpe_vit_tiny_patch16_224_gilbert", depth=1)
    assert g.patch_embed.proj.weight.device.type == "meta"


# -- torch.export ---------------------------------------------------------------------------------------
def test_every_encoder_has_a_tiny_registered_name():
    assert {n[len("vpe_vit_tiny_patch16_224_"):] for n in TINY_NAMES if "_224_" in n} == set(visionpe.list_encoders())


@pytest.mark.slow
# the encoders fill their table caches while export traces; torch.export reports it and discards those
# entries (asserted below: eager after export is bit-identical to eager before)
@pytest.mark.filterwarnings(r"ignore:The tensor attributes? self\.pe\..*assigned during export:UserWarning")
@pytest.mark.parametrize("name", TINY_NAMES)
def test_torch_export_each_registered_tiny_model(name):
    """Every registered ``vpe_vit_tiny_*`` model, as registered, exports at its fixed input size and the
    exported program matches eager (float32, 1e-5 relative)."""
    model = timm.create_model(name).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        ref = model(x)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        out = program.module()(x)
        again = model(x)  # exporting left no traced tensors in the encoders' caches
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, ref, rtol=0, atol=0)
