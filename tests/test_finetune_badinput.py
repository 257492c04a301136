"""Bad input to ``visionpe finetune``: one line naming both sides, exit code 2, and nothing written."""
import os

import pytest
import timm
import yaml
from safetensors.torch import save_file

from visionpe.cli import main as cli_main
from visionpe.train.data import check_labels
from visionpe.train.synthetic import make_color_folder, tiny_vit_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_color_folder(str(tmp_path_factory.mktemp("colors")), num_classes=3, train_per_class=4,
                             val_per_class=2)


def finetune(tmp_path, capsys, root, **sections):
    """Run ``visionpe finetune`` on a tiny recipe; returns (exit code, stderr, run folder)."""
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_vit_config(str(root), str(out), **sections)))
    rc = cli_main(["finetune", "-c", str(recipe)])
    return rc, capsys.readouterr().err, out


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("visionpe finetune: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("num_classes", [10, 2])  # wider (scores absent classes), narrower (labels beyond the head)
def test_head_size_differs_from_the_data(num_classes, data_root, tmp_path, capsys):
    rc, err, out = finetune(tmp_path, capsys, data_root, model={"num_classes": num_classes})
    assert rc == 2 and not out.exists()
    assert f"model.num_classes is {num_classes}, but the training data ({data_root}) has 3 classes" in \
        one_error_line(err)


def test_kept_head_of_a_checkpoint_differs_from_the_data(data_root, tmp_path, capsys):
    src = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                            num_classes=10)
    save_file(dict(src.state_dict()), str(tmp_path / "vit.safetensors"))
    rc, err, out = finetune(tmp_path, capsys, data_root, model={
        "name": "vit_tiny_patch16_224", "pretrained_file": str(tmp_path / "vit.safetensors"), "keep_head": True,
        "kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}})
    assert rc == 2 and not out.exists()
    assert "the model's head has 10 classes" in one_error_line(err) and "the training data has 3" in err


def test_val_folder_missing_a_class(tmp_path, capsys):
    root = make_color_folder(str(tmp_path / "data"), num_classes=3, train_per_class=4, val_per_class=2)
    for f in os.listdir(os.path.join(root, "val", "class1")):
        os.remove(os.path.join(root, "val", "class1", f))
    os.rmdir(os.path.join(root, "val", "class1"))
    rc, err, out = finetune(tmp_path, capsys, root)
    assert rc == 2 and not out.exists()
    line = one_error_line(err)
    assert f"the training data ({root}, split 'train') has 3 classes and the evaluation data ({root}, split 'val') " \
           f"has 2, and they differ (only in the first: ['class1'])" in line


def test_labels_beyond_the_head_are_named():
    class Fake:
        targets = [0, 1, 3]
    with pytest.raises(ValueError, match=r"the data has labels 0\.\.3, but the model's head has 3 classes "
                                         r"\(labels 0\.\.2\)"):
        check_labels(Fake(), 3, "the data")
    check_labels(Fake(), 4, "the data")  # fits


def test_typo_in_a_pe_option(data_root, tmp_path, capsys):
    rc, err, out = finetune(tmp_path, capsys, data_root, model={"pe": {"name": "rope_mixed", "thetaa": 10.0}})
    assert rc == 2 and not out.exists()
    assert "encoder 'rope_mixed' got unknown option(s) ['thetaa']; it accepts" in one_error_line(err)


def test_option_of_a_pe_given_by_name_on_the_command_line(data_root, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_vit_config(str(data_root), str(tmp_path / "run"), pe="rope_mixed")))
    rc = cli_main(["finetune", "-c", str(recipe), "--set", "model.pe.thetaa=3"])  # pe: rope_mixed -> {name, thetaa}
    assert rc == 2 and not (tmp_path / "run").exists()
    line = one_error_line(capsys.readouterr().err)
    assert "encoder 'rope_mixed' got unknown option(s) ['thetaa']; it accepts" in line
    rc = cli_main(["finetune", "-c", str(recipe), "--set", "data.root.x=3"])
    assert rc == 2 and not (tmp_path / "run").exists()
    assert f"override 'data.root.x=3': data.root is {str(data_root)!r}, not a section with keys" in \
        one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("section, message", [
    ({"model": {"name": "vit_tiny_patch16_22"}},
     "model 'vit_tiny_patch16_22' is not a registered timm model; did you mean vit_tiny_patch16_224"),
    ({"optim": {"opt": "adamww"}}, "optim.opt 'adamww' is not a timm optimizer; did you mean adamw"),
], ids=["model", "optimizer"])
def test_unknown_model_or_optimizer(section, message, data_root, tmp_path, capsys):
    rc, err, out = finetune(tmp_path, capsys, data_root, **section)
    assert rc == 2 and not out.exists()
    assert message in one_error_line(err)


def test_empty_data_folder(tmp_path, capsys):
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir(parents=True)
    rc, err, out = finetune(tmp_path, capsys, tmp_path / "data")
    assert rc == 2 and not out.exists()
    assert f"no images found under '{tmp_path / 'data' / 'train'}'" in one_error_line(err)


def test_debug_shows_the_traceback(data_root, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_vit_config(str(data_root), str(tmp_path / "run"),
                                                     model={"num_classes": 10})))
    with pytest.raises(ValueError, match="model.num_classes is 10"):
        cli_main(["--debug", "finetune", "-c", str(recipe)])


def _listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_resume_on_other_classes_or_another_global_batch(data_root, tmp_path, capsys):
    """Resuming checks the checkpoint's class names and global batch against this run before anything moves."""
    import shutil
    done = tmp_path / "done"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_vit_config(str(data_root), str(done), sched={"epochs": 1})))
    assert cli_main(["finetune", "-c", str(recipe)]) == 0
    capsys.readouterr()
    before = _listing(done)
    ck = done / "checkpoints" / "update_00000001"
    other = tmp_path / "renamed"
    shutil.copytree(data_root, other)
    for split in ("train", "val"):
        os.rename(other / split / "class2", other / split / "zebra")
    rc = cli_main(["finetune", "-c", str(recipe), "--set", f"data.root={other}", "--resume", str(ck),
                   "--output-dir", str(tmp_path / "fork")])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"checkpoint {ck} has 3 classes and the training data ({other}) has 3, and they differ" in line
    assert "only in the first: ['class2']" in line and "only in the second: ['zebra']" in line
    rc = cli_main(["finetune", "-c", str(recipe), "--set", "data.batch_size=4", "--resume"])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"checkpoint {ck} was trained with a global batch of 8, this run has 4" in line
    assert not (tmp_path / "fork").exists() and _listing(done) == before  # nothing moved, nothing written
