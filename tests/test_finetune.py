"""Fine-tuning pipeline: config, outputs, exact resume after a crash, accumulation, probe hook, bad input."""
import json
import os
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from visionpe.train import SimulatedCrash, config_from_dict, load_config, run
from visionpe.train.rundir import scan_checkpoints
from visionpe.train.finetune import main as finetune_main
from visionpe.train.model import load_description, model_from_description
from visionpe.train.synthetic import make_color_folder, tiny_vit_config


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_color_folder(str(tmp_path_factory.mktemp("colors")), num_classes=3, train_per_class=16,
                             val_per_class=4)


def cfg_for(root, out, **sections):
    return config_from_dict(tiny_vit_config(root, str(out), **sections))


# a recipe that uses every RNG stream: RandAugment + random erasing (per-sample seeds), Mixup/CutMix
# (NumPy), drop-path (torch), EMA, label smoothing, layer decay, warmup + cosine
FULL = dict(data={"auto_augment": "rand-m9-mstd0.5", "re_prob": 0.25, "mixup": 0.8, "cutmix": 1.0,
                  "label_smoothing": 0.1},
            model={"drop_path_rate": 0.1}, ema={"enabled": True, "decay": 0.9},
            optim={"layer_decay": 0.75, "clip_grad": 1.0}, sched={"epochs": 2, "warmup_epochs": 1},
            checkpoint={"every_updates": 2})


def test_run_writes_outputs_and_rebuildable_model(data_root, tmp_path):
    out = tmp_path / "run"
    res = run(cfg_for(data_root, out, train={"plot": True}, ema={"enabled": True, "decay": 0.5}))
    assert res["epochs_done"] == 2 and res["update"] == 12  # 48 images / batch 8 = 6 updates per epoch
    assert res["stopped"] is None and res["best_epoch"] in (1, 2)
    for name in ("model.safetensors", "model_ema.safetensors", "model_best.safetensors", "model.json", "config.yaml",
                 "metrics.jsonl", "summary.csv", "curves.png"):
        assert (out / name).is_file(), name
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["update"] for r in recs if r["kind"] == "step"] == list(range(1, 13))
    assert [r["epoch"] for r in recs if r["kind"] == "step"] == [1] * 6 + [2] * 6  # one numbering, from 1
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all("eval_top1" in r and "ema_eval_top1" in r for r in epochs)
    header = open(out / "summary.csv").readline().strip().split(",")
    assert header[:6] == ["epoch", "update", "train_loss", "eval_loss", "eval_top1", "eval_top5"] and "lr" in header
    assert not any("top3" in h or h.startswith("val_") for h in header)  # timm's names, whatever the class count
    # model_best holds the weights of the best eval top-1 epoch (here: compared with that epoch's checkpoint)
    best = max(epochs, key=lambda r: (r["eval_top1"], -r["epoch"]))
    assert res["best_epoch"] == best["epoch"] and res["best_eval_top1"] == best["eval_top1"]
    ck = load_file(str(out / "checkpoints" / f"update_{6 * best['epoch']:08d}" / "model.safetensors"))
    mb = load_file(str(out / "model_best.safetensors"))
    assert all(torch.equal(ck[k], mb[k]) for k in ck)
    # model.json rebuilds the network; the saved weights reproduce the logged validation loss
    desc = load_description(str(out / "model.json"))
    assert desc["pe"] == {"name": "rope_mixed"} and desc["kwargs"]["num_classes"] == 3
    m = model_from_description(desc)
    m.load_state_dict(load_file(str(out / "model.safetensors")))
    assert type(m).__name__ == "VisionPEViT"
    ckpts = sorted(os.listdir(out / "checkpoints"))
    assert ckpts == ["update_00000006", "update_00000012"]
    # the checkpoint's weights load into timm through pretrained_cfg_overlay (num_classes: keep the head)
    import timm
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3, pe="rope_mixed")
    m2 = timm.create_model("vpe_vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(
        file=str(out / "checkpoints" / "update_00000012" / "model.safetensors"), num_classes=3), **kw)
    last = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(v, last[k]) for k, v in m2.state_dict().items())


def test_resume_after_crash_is_bit_exact(data_root, tmp_path):
    ref = run(cfg_for(data_root, tmp_path / "ref", **FULL))
    crashed = tmp_path / "crashed"
    with pytest.raises(SimulatedCrash, match="after update 9"):
        run(cfg_for(data_root, crashed, **FULL, train={"debug_crash_at_update": 9}))
    # the crash hit mid-epoch 2: the newest checkpoint is update 8; leave a half-written one behind too
    assert scan_checkpoints(str(crashed))[0].endswith("update_00000008")
    junk = crashed / "checkpoints" / ".update_00000010.tmp"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"partial")
    resumed = run(cfg_for(data_root, crashed, **{**FULL, "checkpoint": {"every_updates": 2, "resume": "latest"}}))
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(crashed / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ea = load_file(str(tmp_path / "ref" / "model_ema.safetensors"))
    eb = load_file(str(crashed / "model_ema.safetensors"))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert resumed["eval_loss"] == ref["eval_loss"] and resumed["train_loss"] == ref["train_loss"]
    # the metrics log has no duplicate records from the crashed attempt
    recs = [json.loads(line) for line in open(crashed / "metrics.jsonl")]
    assert [r["update"] for r in recs if r["kind"] == "step"] == list(range(1, 13))
    assert not junk.exists()


def test_gradient_accumulation_matches_the_large_batch(data_root, tmp_path):
    big = run(cfg_for(data_root, tmp_path / "big", sched={"epochs": 1}))
    acc = run(cfg_for(data_root, tmp_path / "acc", data={"batch_size": 4}, optim={"accum_steps": 2},
                      sched={"epochs": 1}))
    assert big["update"] == acc["update"] == 6
    a = load_file(str(tmp_path / "big" / "model.safetensors"))
    b = load_file(str(tmp_path / "acc" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


def test_amp_bfloat16_on_cpu(data_root, tmp_path):
    ref = run(cfg_for(data_root, tmp_path / "fp32", sched={"epochs": 1}))
    amp = run(cfg_for(data_root, tmp_path / "bf16", sched={"epochs": 1}, train={"amp": True}))
    a = load_file(str(tmp_path / "fp32" / "model.safetensors"))
    b = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in b.values())  # autocast: the weights stay float32
    assert not all(torch.equal(a[k], b[k]) for k in a)  # ... but the forward really ran in bfloat16
    torch.testing.assert_close(b["blocks.0.attn.qkv.weight"], a["blocks.0.attn.qkv.weight"], rtol=0, atol=5e-3)
    assert amp["train_loss"] == pytest.approx(ref["train_loss"], abs=0.05)


def test_probe_runs_every_n_epochs_without_touching_training(data_root, tmp_path, monkeypatch):
    calls = []

    def fake_probe(model, *, num_samples, epochs, seed=0, **cfg):
        calls.append((type(model).__name__, model.training, num_samples, epochs, cfg))
        torch.rand(100)  # consumes RNG: must not change the training run
        return {"threecell/avg": 0.5 + len(calls), "pesi/M_U": 0.25}

    mod = sys.modules.get("visionpe.eval.probe")
    if mod is None:
        mod = types.ModuleType("visionpe.eval.probe")
        monkeypatch.setitem(sys.modules, "visionpe.eval.probe", mod)
    monkeypatch.setattr(mod, "threecell_probe", fake_probe, raising=False)
    sections = dict(model={"drop_path_rate": 0.1}, sched={"epochs": 3}, train={"loss": "bce"})
    with_probe = run(cfg_for(data_root, tmp_path / "p", probe={"every": 2, "num_samples": 8, "epochs": 1,
                                                                "cell": 2}, **sections))
    # every 2 epochs, plus the last one
    assert calls == [("VisionPEViT", False, 8, 1, {"cell": 2})] * 2
    recs = [json.loads(line) for line in open(tmp_path / "p" / "metrics.jsonl") if '"epoch"' in line]
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert [r.get("threecell/avg") for r in epochs] == [None, 1.5, 2.5]
    assert epochs[1]["pesi/M_U"] == 0.25
    header = open(tmp_path / "p" / "summary.csv").readline()
    assert "threecell/avg" in header
    without = run(cfg_for(data_root, tmp_path / "n", **sections))
    assert with_probe["eval_loss"] == without["eval_loss"]


def test_cli_entry_points(data_root, tmp_path, capsys):
    from visionpe.cli import main as cli_main
    import yaml
    cfg = tiny_vit_config(data_root, str(tmp_path / "cli"), sched={"epochs": 1})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["finetune", "--config", str(path), "--set", "optim.lr=5e-4", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 5e-4 and printed["probe"] == {"every": 0}
    assert cli_main(["finetune", "-c", str(path), "--output-dir", str(tmp_path / "cli2")]) == 0
    assert json.loads(capsys.readouterr().out)["update"] == 6
    assert (tmp_path / "cli2" / "model.safetensors").is_file()
    # the same folder again: refused in one line; --resume (nothing left to do) and --fresh work
    assert cli_main(["finetune", "-c", str(path), "--output-dir", str(tmp_path / "cli2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a run (checkpoints up to update 6): continue it with --resume" in err
    assert cli_main(["finetune", "-c", str(path), "--output-dir", str(tmp_path / "cli2"), "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["update"] == 6
    assert cli_main(["finetune", "-c", str(path), "--output-dir", str(tmp_path / "cli2"), "--fresh"]) == 0
    assert len([p for p in os.listdir(tmp_path) if p.startswith("cli2.old-")]) == 1


# -- bad input ----------------------------------------------------------------------------------------
def test_unknown_config_keys_are_named(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown config key\(s\) 'optim.lrr', 'optim.wd'; section 'optim' "
                                         r"accepts: opt, lr,"):
        config_from_dict({"optim": {"lrr": 1e-3, "wd": 0.1}})
    with pytest.raises(ValueError, match=r"unknown config key\(s\) 'modle'; the top level accepts: model, data"):
        config_from_dict({"modle": {}})
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  root: x\n  batchsize: 4\n")
    assert finetune_main(["--config", str(path)]) == 2
    assert "unknown config key(s) 'data.batchsize'" in capsys.readouterr().err


def test_config_values_are_checked():
    assert config_from_dict({"optim": {"lr": "5e-4"}}).optim.lr == 5e-4  # YAML reads 5e-4 as a string
    with pytest.raises(ValueError, match="data.batch_size must be an integer; got 'eight'"):
        config_from_dict({"data": {"batch_size": "eight"}})
    with pytest.raises(ValueError, match="optim.accum_steps must be > 0; got 0"):
        config_from_dict({"optim": {"accum_steps": 0}})
    with pytest.raises(ValueError, match="Mixup/CutMix need an even data.batch_size; got 7"):
        config_from_dict({"data": {"batch_size": 7}})
    with pytest.raises(ValueError, match="train.loss must be 'ce' or 'bce'; got 'hinge'"):
        config_from_dict({"train": {"loss": "hinge"}})
    with pytest.raises(ValueError, match="config file 'nope.yaml' does not exist"):
        load_config("nope.yaml")


def test_timm_dataset_names(data_root):
    from visionpe.train.data import build_dataset, num_classes_of
    cfg = config_from_dict({"data": {"root": data_root, "dataset": "torch/image_folder"}})
    ds = build_dataset(cfg.data, "val", is_training=False)  # torchvision ImageFolder through timm
    assert type(ds).__name__ == "ImageFolder" and len(ds) == 12 and num_classes_of(ds) == 3
    ds.transform = None
    from timm.data import create_transform
    from visionpe.train.data import SeededDataset
    x, y = SeededDataset(ds, create_transform(32, is_training=True))[(0, 5)]
    assert x.shape == (3, 32, 32) and y == 1


def test_missing_data_dir(tmp_path, data_root):
    with pytest.raises(ValueError, match=r"data.root '.*no_such_dir' does not exist"):
        run(cfg_for(str(tmp_path / "no_such_dir"), tmp_path / "o"))
    with pytest.raises(ValueError, match=r"has no 'valid' folder \(found: \['train', 'val'\]\)"):
        run(cfg_for(data_root, tmp_path / "o", data={"val_split": "valid"}))
    with pytest.raises(ValueError, match="data.root is not set"):
        run(config_from_dict({"train": {"output_dir": str(tmp_path / "o")}}))


def test_resolution_not_divisible_by_patch(data_root, tmp_path):
    with pytest.raises(ValueError, match=r"model.img_size \(36, 36\) is not divisible by the patch size \(8, 8\)"):
        run(cfg_for(data_root, tmp_path / "o", model={"img_size": 36}))
    from visionpe.train.model import build_model
    cfg = cfg_for(data_root, tmp_path / "o", model={"img_size": 36, "kwargs": {
        "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "dynamic_img_size": True,
        "dynamic_img_pad": True}})
    model, _ = build_model(cfg.model, 3)  # padding makes it legal
    assert model(torch.randn(1, 3, 36, 36)).shape == (1, 3)


def test_incompatible_checkpoint_gives_key_diff(data_root, tmp_path):
    out = tmp_path / "run"
    run(cfg_for(data_root, out, sched={"epochs": 1}))
    deeper = dict(model={"kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}})
    with pytest.raises(ValueError, match=r"does not fit VisionPEViT:\n  missing in checkpoint .*\(12\): "
                                         r"\[blocks\.2\.attn"):
        run(cfg_for(data_root, tmp_path / "other", checkpoint={"resume": str(out)}, **deeper))
    sd = load_file(str(out / "model.safetensors"))
    sd["extra.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "pre.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected in checkpoint \(1\): \[extra.weight\]"):
        run(cfg_for(data_root, tmp_path / "ft", model={"pretrained_file": str(tmp_path / "pre.safetensors")}))
    with pytest.raises(ValueError, match=r"was started with other settings \(optim.lr\): resume with the same"):
        run(cfg_for(data_root, out, sched={"epochs": 1}, optim={"lr": 5e-4}, checkpoint={"resume": "latest"}))
    with pytest.raises(ValueError, match="'.*nothing' does not exist"):
        run(cfg_for(data_root, tmp_path / "x", checkpoint={"resume": str(tmp_path / "nothing")}))
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(ValueError, match="is neither a checkpoint folder nor a run folder"):
        run(cfg_for(data_root, tmp_path / "x", checkpoint={"resume": str(tmp_path / "empty_run")}))


def test_finetune_from_pretrained_file_with_swap(data_root, tmp_path):
    """A plain timm ViT checkpoint, fine-tuned as RoPE-Mixed (swap on load); the blocks start from it."""
    import timm
    src = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                            num_classes=10)
    path = tmp_path / "vit.safetensors"
    save_file(dict(src.state_dict()), str(path))
    cfg = cfg_for(data_root, tmp_path / "ft", sched={"epochs": 1, "min_lr": 0.0},
                  optim={"lr": 1e-12, "weight_decay": 0.0},
                  model={"name": "vit_tiny_patch16_224", "pretrained_file": str(path)})
    run(cfg)
    out = load_file(str(tmp_path / "ft" / "model.safetensors"))
    assert "pe.freqs" in out and "pos_embed" not in out and out["head.weight"].shape == (3, 32)
    torch.testing.assert_close(out["blocks.1.mlp.fc2.weight"], src.state_dict()["blocks.1.mlp.fc2.weight"],
                               rtol=0, atol=1e-9)
    assert load_description(str(tmp_path / "ft" / "model.json"))["name"] == "vit_tiny_patch16_224"
