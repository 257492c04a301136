"""Multi-resolution evaluation: table + plot, consistency with a direct evaluation, bad input."""
import csv
import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform

from visionpe.eval.evalres import load_for_eval, main
from visionpe.train import config_from_dict
from visionpe.train.model import build_model, write_description
from visionpe.train.synthetic import make_color_folder, tiny_vit_config


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_color_folder(str(tmp_path_factory.mktemp("colors")), num_classes=3, train_per_class=2,
                             val_per_class=5, size=48)


def fake_run(root, out, pe):
    """A run directory as finetune writes it (model.json + model.safetensors), random weights."""
    cfg = config_from_dict(tiny_vit_config(root, str(out), pe=pe))
    torch.manual_seed(0)
    model, desc = build_model(cfg.model, 3)
    desc["data_config"] = {"input_size": [3, 32, 32], "interpolation": "bicubic", "mean": [0.5] * 3,
                           "std": [0.25] * 3, "crop_pct": 0.875}
    os.makedirs(out, exist_ok=True)
    save_file(dict(model.state_dict()), os.path.join(out, "model.safetensors"))
    write_description(os.path.join(out, "model.json"), desc)
    return model


def direct_top1(model, root, res, dc):
    """Reference: the same protocol written out by hand, one image at a time."""
    tf = create_transform(input_size=(3, res, res), is_training=False, interpolation=dc["interpolation"],
                          mean=tuple(dc["mean"]), std=tuple(dc["std"]), crop_pct=dc["crop_pct"])
    hits = n = 0
    for c, cls in enumerate(sorted(os.listdir(os.path.join(root, "val")))):
        for f in sorted(os.listdir(os.path.join(root, "val", cls))):
            x = tf(Image.open(os.path.join(root, "val", cls, f)).convert("RGB"))[None]
            hits += int(model(x).argmax(1).item() == c)
            n += 1
    return 100.0 * hits / n


def test_evalres_table_plot_and_values(data_root, tmp_path, capsys):
    runs = {pe: tmp_path / pe for pe in ("rope_mixed", "learned")}
    for pe, d in runs.items():
        fake_run(data_root, str(d), pe)
    out = tmp_path / "res"
    rc = main(["--checkpoint", *map(str, runs.values()), "--data-root", data_root, "--resolutions", "24", "32",
               "48", "--out", str(out), "--workers", "0", "--batch-size", "4"])
    assert rc == 0
    table = capsys.readouterr().out.strip()
    assert table.splitlines()[0] == "| model | 24 | 32 | 48 |"
    assert {line.split("|")[1].strip() for line in table.splitlines()[2:]} == {"rope_mixed", "learned"}
    for ext in ("md", "csv", "json", "png"):
        assert (out / f"evalres.{ext}").is_file()
    rows = list(csv.reader(open(out / "evalres.csv")))
    assert rows[0] == ["model", "24", "32", "48"] and len(rows) == 3
    data = json.load(open(out / "evalres.json"))
    for (pe, d), row in zip(runs.items(), data["models"]):
        model, dc, _ = load_for_eval(str(d))
        # dynamic-size evaluation equals a by-hand evaluation at every resolution (APE resampled on the fly)
        for res in (24, 32, 48):
            assert row["metrics"][str(res)]["top1"] == pytest.approx(direct_top1(model, data_root, res, dc))


def test_evalres_model_name_with_pretrained_file(data_root, tmp_path, capsys):
    fake_run(data_root, str(tmp_path / "r"), "rope_axial")
    rc = main(["--model", "vpe_vit_tiny_patch16_224", "--pe", "rope_axial", "--pretrained-file",
               str(tmp_path / "r" / "model.safetensors"), "--num-classes", "3", "--data-root", data_root,
               "--resolutions", "32", "--out", str(tmp_path / "o"), "--workers", "0", "--limit", "6"])
    # the file holds a patch-8 / depth-2 model; vpe_vit_tiny is patch 16 / depth 12: a clear key diff
    assert rc == 2
    err = capsys.readouterr().err
    assert "does not fit VisionPEViT" in err and "missing in checkpoint" in err
    kw = '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}'
    rc = main(["--model", "vpe_vit_tiny_patch16_224", "--pe", "rope_axial", "--pretrained-file",
               str(tmp_path / "r" / "model.safetensors"), "--num-classes", "3", "--model-kwargs", kw,
               "--data-root", data_root, "--resolutions", "32", "48", "--out", str(tmp_path / "o"),
               "--workers", "0"])
    assert rc == 0
    row = json.load(open(tmp_path / "o" / "evalres.json"))["models"][0]
    assert row["label"] == "vpe_vit_tiny_patch16_224 pe=rope_axial"
    # the registry cfg's mean/std (pretrained_cfg_overlay keeps them) drive the transforms here
    dc = {"interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "crop_pct": 0.9}
    ref, _, _ = load_for_eval(str(tmp_path / "r"))  # same weights, dynamic size
    for res in (32, 48):
        assert row["metrics"][str(res)]["top1"] == pytest.approx(direct_top1(ref, data_root, res, dc))


# -- bad input ----------------------------------------------------------------------------------------
def test_evalres_resolution_not_divisible(data_root, tmp_path, capsys):
    fake_run(data_root, str(tmp_path / "r"), "rope_mixed")
    args = ["--checkpoint", str(tmp_path / "r"), "--data-root", data_root, "--resolutions", "32", "36",
            "--out", str(tmp_path / "o"), "--workers", "0"]
    assert main(args) == 2
    assert "resolution 36: (36, 36) is not divisible by the patch size (8, 8)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # checked before any evaluation
    assert main(args + ["--pad"]) == 0  # padding makes 36 legal


def test_evalres_missing_inputs(data_root, tmp_path, capsys):
    fake_run(data_root, str(tmp_path / "r"), "rope_mixed")
    assert main(["--checkpoint", str(tmp_path / "r"), "--data-root", str(tmp_path / "nodata")]) == 2
    err = capsys.readouterr().err
    assert "data.root" in err and "nodata' does not exist" in err
    with pytest.raises(ValueError, match="does not exist"):
        load_for_eval(str(tmp_path / "nothing"))
    os.remove(tmp_path / "r" / "model.json")
    with pytest.raises(ValueError, match="no model.json next to"):
        load_for_eval(str(tmp_path / "r"))


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("visionpe evalres: error: ") and "Traceback" not in err, err
    return lines[0]


def test_evalres_head_wider_than_the_data_is_refused(data_root, tmp_path, capsys):
    """The issue's case: a plain timm ViT file swapped to RoPE-Mixed, no --num-classes: a 1000-way head."""
    import timm
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    src = timm.create_model("vit_tiny_patch16_224", **kw)
    save_file(dict(src.state_dict()), str(tmp_path / "vit.safetensors"))
    args = ["--model", "vit_tiny_patch16_224", "--pe", "rope_mixed", "--pretrained-file", str(tmp_path / "vit.safetensors"),
            "--model-kwargs", json.dumps(kw), "--data-root", data_root, "--resolutions", "32", "--out",
            str(tmp_path / "o"), "--workers", "0"]
    assert main(args) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"the model's head has 1000 classes, the data ({data_root}, split 'val') has 3 (class0, class1, class2)" in line
    assert "--num-classes 3" in line and not (tmp_path / "o").exists()


def test_evalres_ten_class_run_on_three_class_data(data_root, tmp_path, capsys):
    cfg = config_from_dict(tiny_vit_config(data_root, str(tmp_path / "r")))
    model, desc = build_model(cfg.model, 10)
    os.makedirs(tmp_path / "r")
    save_file(dict(model.state_dict()), str(tmp_path / "r" / "model.safetensors"))
    write_description(str(tmp_path / "r" / "model.json"), desc)
    assert main(["--checkpoint", str(tmp_path / "r"), "--data-root", data_root, "--resolutions", "32", "--out",
                 str(tmp_path / "o"), "--workers", "0"]) == 2
    assert "the model's head has 10 classes" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_evalres_checks_class_names_stored_with_the_run(data_root, tmp_path, capsys):
    fake_run(data_root, str(tmp_path / "r"), "rope_mixed")
    desc = json.load(open(tmp_path / "r" / "model.json"))
    desc["classes"] = ["circle", "square", "triangle"]  # trained on other classes, same count
    write_description(str(tmp_path / "r" / "model.json"), desc)
    assert main(["--checkpoint", str(tmp_path / "r"), "--data-root", data_root, "--resolutions", "32", "--out",
                 str(tmp_path / "o"), "--workers", "0"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "model 'r' (trained on) has 3 classes and the data" in line
    assert "only in the first: ['circle', 'square', 'triangle']" in line and not (tmp_path / "o").exists()


def test_evalres_reads_a_finetune_checkpoint_and_its_classes(data_root, tmp_path, capsys):
    from visionpe.train import run
    cfg = config_from_dict(tiny_vit_config(data_root, str(tmp_path / "run"), sched={"epochs": 1},
                                           data={"batch_size": 2}, train={"tensorboard": False}))
    res = run(cfg)
    ck = res["checkpoint"]
    assert json.load(open(os.path.join(ck, "meta.json")))["classes"] == ["class0", "class1", "class2"]
    assert main(["--checkpoint", ck, str(tmp_path / "run" / "model_best.safetensors"), "--data-root", data_root,
                 "--resolutions", "32", "--out", str(tmp_path / "o"), "--workers", "0"]) == 0
    capsys.readouterr()
    rows = json.load(open(tmp_path / "o" / "evalres.json"))["models"]
    assert rows[0]["metrics"]["32"]["top1"] == pytest.approx(res["eval_top1"])  # the run's own evaluation at 32 px
    # a damaged checkpoint is refused by name
    with open(os.path.join(ck, "model.safetensors"), "r+b") as f:
        f.seek(200)
        f.write(b"\0\1\2\3")
    assert main(["--checkpoint", ck, "--data-root", data_root, "--resolutions", "32", "--out",
                 str(tmp_path / "o2"), "--workers", "0"]) == 2
    assert "is damaged" in _one_line(capsys.readouterr().err) and not (tmp_path / "o2").exists()


def test_evalres_pe_options_as_json(data_root, tmp_path, capsys):
    """``--pe`` takes a name or JSON with options; a typo in an option is one line naming the accepted ones."""
    args = ["--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps({"img_size": 32, "patch_size": 8,
            "embed_dim": 32, "depth": 1, "num_heads": 2}), "--num-classes", "3", "--data-root", data_root,
            "--resolutions", "32", "--out", str(tmp_path / "o"), "--workers", "0"]
    assert main(args + ["--pe", '{"name": "rope_mixed", "thetaa": 3}']) == 2
    line = _one_line(capsys.readouterr().err)
    assert "encoder 'rope_mixed' got unknown option(s) ['thetaa']; it accepts" in line and "'theta'" in line
    assert not (tmp_path / "o").exists()
    assert main(args + ["--pe", '{"name": "rope_mixed", "theta": 10}']) == 0
    capsys.readouterr()
    (row,) = json.load(open(tmp_path / "o" / "evalres.json"))["models"]
    assert row["label"] == 'vit_tiny_patch16_224 pe={"name": "rope_mixed", "theta": 10}'
