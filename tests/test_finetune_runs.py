"""Runs that cannot be lost or mixed up: the shipped RoPE recipes through checkpoints and a resume, run folders,
--resume/--fresh, damaged checkpoints, pruning, TensorBoard, the start-up summary."""
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from visionpe.train import SimulatedCrash, config_from_dict, load_config, run
from visionpe.train.checkpoint import CheckpointManager, save_tensors_atomic, validate_checkpoint
from visionpe.train.metrics import TensorBoardLog, format_epoch_line
from visionpe.train.rundir import BEST_WEIGHTS, best_weights_epoch
from visionpe.train.synthetic import make_color_folder, tiny_vit_config

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = "{patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, init_values: 1.0e-4}"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_color_folder(str(tmp_path_factory.mktemp("colors")), num_classes=3, train_per_class=16,
                             val_per_class=4)


def cfg_for(root, out, **sections):
    return config_from_dict(tiny_vit_config(root, str(out), **sections))


def same_weights(a_dir, b_dir, names=("model.safetensors",)):
    for name in names:
        a, b = load_file(str(a_dir / name)), load_file(str(b_dir / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# -- the shipped RoPE-ViT recipes (LAMB, BCE, 3-Augment, Mixup/CutMix, LayerScale) at tiny size ------------------
@pytest.mark.parametrize("recipe", ["finetune_deit_s_rope_mixed", "finetune_deit_s_rope_axial"])
def test_rope_recipe_tiny_through_checkpoints_and_resume(recipe, data_root, tmp_path):
    tiny = [f"data.root={data_root}", "model.img_size=32", f"model.kwargs={TINY}", "data.batch_size=8",
            "data.workers=0", "sched.epochs=2", "sched.warmup_epochs=1", "checkpoint.every_updates=4",
            "train.progress=false", "train.plot=false", "train.tensorboard=false"]
    ref_cfg = load_config(recipe, tiny + [f"train.output_dir={tmp_path / 'ref'}"])
    assert (ref_cfg.optim.opt, ref_cfg.train.loss, ref_cfg.data.auto_augment) == ("lamb", "bce", "3a")
    run(ref_cfg)
    out = tmp_path / "run"
    with pytest.raises(SimulatedCrash):
        run(load_config(recipe, tiny + [f"train.output_dir={out}", "train.debug_crash_at_update=9"]))
    # checkpoints at updates 4 (in epoch 1), 6 (epoch end) and 8; the newest two are kept
    assert [d for d in sorted(os.listdir(out / "checkpoints"))] == ["update_00000006", "update_00000008"]
    res = run(load_config(recipe, tiny + [f"train.output_dir={out}", "checkpoint.resume=latest"]))
    assert res["update"] == 12 and res["stopped"] is None
    same_weights(tmp_path / "ref", out)


# -- run folders ---------------------------------------------------------------------------------------------------
def test_auto_named_run_folders_and_resume_latest(data_root, tmp_path):
    root = tmp_path / "runs"
    sections = dict(train={"output_root": str(root)}, checkpoint={"every_updates": 2})
    cfg = tiny_vit_config(data_root, None, **sections)
    with pytest.raises(SimulatedCrash):
        run(config_from_dict({**cfg, "train": {**cfg["train"], "debug_crash_at_update": 3}}))
    (first,) = os.listdir(root)
    assert re.fullmatch(r"\d{8}-\d{6}-vpe_vit_tiny_patch16_224-rope_mixed", first)
    res = run(config_from_dict({**cfg, "checkpoint": {"every_updates": 2, "resume": "latest"}}))
    assert res["output_dir"] == str(root / first) and res["update"] == 12  # continued the newest run of this PE
    other = run(config_from_dict(cfg))  # a plain new run gets a folder of its own
    assert other["output_dir"] != res["output_dir"] and len(os.listdir(root)) == 2
    same_weights(root / first, Path(other["output_dir"]))  # crashed + resumed = uninterrupted


def test_used_folder_is_refused_and_fresh_moves_it_aside(data_root, tmp_path):
    out = tmp_path / "run"
    run(cfg_for(data_root, out, sched={"epochs": 1}))
    before = sorted(os.listdir(out)), sorted(os.listdir(out / "checkpoints"))
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoints up to update 6\): continue it with "
                                         r"--resume, start over with --fresh"):
        run(cfg_for(data_root, out, sched={"epochs": 1}, optim={"lr": 5e-4}))
    assert (sorted(os.listdir(out)), sorted(os.listdir(out / "checkpoints"))) == before  # untouched
    res = run(cfg_for(data_root, out, sched={"epochs": 1}, optim={"lr": 5e-4}, checkpoint={"fresh": True}))
    (old,) = [p for p in os.listdir(tmp_path) if p.startswith("run.old-")]
    assert sorted(os.listdir(tmp_path / old)) == before[0]  # the old run, whole, beside the new one
    assert sorted(os.listdir(tmp_path / old / "checkpoints")) == before[1]
    assert res["update"] == 6 and sorted(os.listdir(out / "checkpoints")) == ["update_00000006"]
    with pytest.raises(ValueError, match="--fresh starts over and --resume continues a run: give one of them"):
        run(cfg_for(data_root, out, checkpoint={"fresh": True, "resume": "latest"}))
    with pytest.raises(ValueError, match=r"--resume: no earlier run of vpe_vit_tiny_patch16_224 with pe 'rope_mixed'"):
        run(config_from_dict(tiny_vit_config(data_root, None, train={"output_root": str(tmp_path / "none")},
                                             checkpoint={"resume": "latest"})))


@pytest.fixture(scope="module")
def crashed(data_root, tmp_path_factory):
    """A reference run and a run crashed after update 11 with checkpoints at updates 6, 8 and 10."""
    tmp = tmp_path_factory.mktemp("crashed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests that resume it (module fixtures run before `one_thread`)
    sections = dict(checkpoint={"every_updates": 2, "keep_last": 3}, ema={"enabled": True, "decay": 0.9},
                    model={"drop_path_rate": 0.1})
    run(cfg_for(data_root, tmp / "ref", **sections))
    with pytest.raises(SimulatedCrash):
        run(cfg_for(data_root, tmp / "crashed", **sections, train={"debug_crash_at_update": 11}))
    torch.set_num_threads(threads)
    assert sorted(os.listdir(tmp / "crashed" / "checkpoints"))[-1] == "update_00000010"
    return tmp, sections


def test_resume_in_a_new_folder_brings_the_best_weights(crashed, data_root, tmp_path):
    src, sections = crashed
    ck = src / "crashed" / "checkpoints" / "update_00000008"  # epoch 2 of 2 under way; best so far: epoch 1
    assert best_weights_epoch(str(src / "crashed" / BEST_WEIGHTS)) == 1
    fork = tmp_path / "fork"
    forked = {**sections, "checkpoint": {**sections["checkpoint"], "resume": str(ck)}}
    with pytest.raises(SimulatedCrash):  # stopped before the fork's first checkpoint (update 10)
        run(cfg_for(data_root, fork, **forked, train={"debug_crash_at_update": 9}))
    assert (fork / BEST_WEIGHTS).read_bytes() == (src / "crashed" / BEST_WEIGHTS).read_bytes()
    assert not (fork / "checkpoints").exists()
    with pytest.raises(SimulatedCrash):  # the same command again (as a scheduler restarts it): not refused
        run(cfg_for(data_root, fork, **forked, train={"debug_crash_at_update": 11}))
    (aside,) = [p for p in os.listdir(tmp_path) if p.startswith("fork.old-")]  # the first attempt, set aside
    assert sorted(os.listdir(fork / "checkpoints")) == ["update_00000010"]  # epoch 2 not ended: best is epoch 1's
    assert (fork / BEST_WEIGHTS).read_bytes() == (src / "crashed" / BEST_WEIGHTS).read_bytes()
    run(cfg_for(data_root, fork, **{**sections, "checkpoint": {**sections["checkpoint"], "resume": "latest"}}))
    same_weights(src / "ref", fork, ("model.safetensors", BEST_WEIGHTS))  # as the uninterrupted run
    with pytest.raises(ValueError, match="which holds another run"):  # now the fork has checkpoints of its own
        run(cfg_for(data_root, fork, **forked))


def test_resume_from_an_older_checkpoint_moves_later_best_weights_aside(crashed, data_root, tmp_path, caplog):
    src, sections = crashed
    out = tmp_path / "again"
    shutil.copytree(src / "crashed", out)
    best = load_file(str(out / BEST_WEIGHTS))
    save_tensors_atomic(str(out / BEST_WEIGHTS), best, {"format": "pt", "epoch": "2"})  # a later stretch's best
    ck = out / "checkpoints" / "update_00000006"  # end of epoch 1: best epoch 1
    with caplog.at_level(logging.WARNING), pytest.raises(SimulatedCrash):
        run(cfg_for(data_root, out, **{**sections, "checkpoint": {**sections["checkpoint"], "resume": str(ck)},
                                       "train": {"debug_crash_at_update": 7}}))
    assert not (out / BEST_WEIGHTS).exists()
    (aside,) = list((out / "checkpoints").glob(f"superseded-*/{BEST_WEIGHTS}"))
    assert best_weights_epoch(str(aside)) == 2
    assert any("resumed checkpoint's best is epoch 1" in r.getMessage() for r in caplog.records)


def _flip_bytes(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, reason", [
    (lambda d: _flip_bytes(d / "training_state.pt"), "is damaged"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100]),
     "has 100 bytes"),
    (lambda d: (d / "meta.json").unlink(), "has no meta.json"),
])
def test_damaged_newest_checkpoint_is_skipped_with_a_warning(damage, reason, crashed, data_root, tmp_path, caplog):
    src, sections = crashed
    out = tmp_path / "crashed"
    shutil.copytree(src / "crashed", out)
    newest = out / "checkpoints" / "update_00000010"
    damage(newest)
    with caplog.at_level(logging.WARNING):
        res = run(cfg_for(data_root, out, **{**sections, "checkpoint": {**sections["checkpoint"], "resume": "latest"}}))
    warned = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(warned) == 1 and str(newest) in warned[0] and reason in warned[0]
    assert res["update"] == 12
    same_weights(src / "ref", out, ("model.safetensors", "model_ema.safetensors"))  # from update 8, bit for bit
    (aside,) = os.listdir(out / "checkpoints" / "invalid")  # kept for inspection, out of the run's way
    assert aside.startswith("update_00000010-")
    assert sorted(d for d in os.listdir(out / "checkpoints") if d.startswith("update_")) == \
        ["update_00000008", "update_00000010", "update_00000012"]  # keep_last 3; 10 and 12 written anew
    assert validate_checkpoint(str(out / "checkpoints" / "update_00000010"))["update"] == 10


def test_pruning_keeps_the_newest_and_touches_no_other_run(tmp_path):
    a, b = CheckpointManager(str(tmp_path / "a" / "checkpoints"), keep_last=1), \
        CheckpointManager(str(tmp_path / "b" / "checkpoints"), keep_last=1)
    sd = {"w": torch.zeros(2)}
    for mgr, update in ((b, 50), (a, 5), (a, 7)):
        mgr.begin(update)
        mgr.commit(update, sd, None, {}, {"update": update})
    assert [u for u, _ in a.committed()] == [7] and [u for u, _ in b.committed()] == [50]
    # even a lower update number than an older checkpoint's (not produced by runs, but possible by hand) survives
    a.begin(3)
    path = a.commit(3, sd, None, {}, {"update": 3})
    assert os.path.isdir(path) and validate_checkpoint(path)["update"] == 3


# -- logs ----------------------------------------------------------------------------------------------------------
def test_tensorboard_events_and_startup_summary(data_root, tmp_path, caplog):
    pytest.importorskip("tensorboard")  # the optional extra visionpe[tensorboard]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        run(cfg_for(data_root, out, train={"tensorboard": True}, optim={"lr": 1.19e-5}))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == f"run folder {out} (new run)"
    summary = "\n".join(lines[:8])
    for part in ("vpe_vit_tiny_patch16_224, pe rope_mixed", "31,843 parameters", "input 32x32, 3-way head",
                 "48 train / 12 eval images, 3 classes (class0, class1, class2)", "= 8; 6 updates per epoch, 2 epochs",
                 "adamw, lr 1.19e-05 (absolute)", f"TensorBoard in {out / 'tensorboard'}"):
        assert part in summary, part
    epoch_lines = [m for m in lines if m.startswith("epoch ")]
    assert [m.split()[1] for m in epoch_lines] == ["1/2", "2/2"]
    assert re.search(r"eval_top1 \d+\.\d\d  eval_top5 100\.00 .* lr \d\.\d+e-0\d  \(", epoch_lines[0])
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/lr", "eval/loss", "eval/top1", "eval/top5"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("eval/top1")] == [6, 12]
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 13))
    recs = [json.loads(line) for line in open(out / "metrics.jsonl") if '"epoch"' in line]
    assert [e.value for e in acc.Scalars("eval/top1")] == pytest.approx(
        [r["eval_top1"] for r in recs if r["kind"] == "epoch"])


def test_tensorboard_true_without_the_package_names_the_extra(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'visionpe\[tensorboard\]'"):
        TensorBoardLog.check(True)


def test_epoch_line_formats():
    rec = {"kind": "epoch", "epoch": 3, "update": 30, "train_loss": 1.23456, "eval_loss": 1.1, "eval_top1": 45.678,
           "eval_top5": 80.0, "lr": 1.19e-05}
    assert format_epoch_line(rec, 300, 12.34) == ("epoch 3/300  train_loss 1.235  eval_loss 1.1  eval_top1 45.68  "
                                                  "eval_top5 80.00  lr 1.19e-05  (12.3 s)")
