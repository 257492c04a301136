"""SIGTERM/SIGINT: the run finishes its step, writes a checkpoint, exits cleanly; ``--resume`` is bit-exact."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from visionpe.train import config_from_dict, run
from visionpe.train.checkpoint import validate_checkpoint
from visionpe.train.signals import GracefulStop
from visionpe.train.synthetic import make_color_folder, tiny_vit_config

pytestmark = pytest.mark.usefixtures("one_thread")

# Mixup/CutMix (NumPy), drop-path (torch), RandAugment + erasing (per-sample seeds) and EMA all in play
SECTIONS = dict(data={"auto_augment": "rand-m9-mstd0.5", "re_prob": 0.25, "mixup": 0.8, "cutmix": 1.0,
                      "label_smoothing": 0.1},
                model={"drop_path_rate": 0.1}, ema={"enabled": True, "decay": 0.9}, sched={"epochs": 2})


def test_sigterm_mid_epoch_checkpoints_and_resumes_bit_exact(tmp_path):
    root = make_color_folder(str(tmp_path / "data"), num_classes=3, train_per_class=16, val_per_class=4)
    ref = run(config_from_dict(tiny_vit_config(root, str(tmp_path / "ref"), **SECTIONS)))
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_vit_config(root, str(out), **SECTIONS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # the subprocess waits after update 8 (2 of 6 into epoch 2) until a signal arrives; the test sends SIGTERM
    proc = subprocess.Popen([sys.executable, "-m", "visionpe.train", "--config", str(recipe), "--set",
                             "train.debug_pause_at_update=8"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log, deadline = out / "metrics.jsonl", time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and any(json.loads(line).get("update") == 8 for line in log.read_text().splitlines()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "SIGTERM received: finishing the current step" in stderr
    assert "stopped by SIGTERM after update 8 (epoch 2, update 2 of 6)" in stderr
    result = json.loads(stdout[stdout.index("{"):])
    assert result["stopped"] == "SIGTERM" and result["update"] == 8
    meta = validate_checkpoint(str(out / "checkpoints" / "update_00000008"))
    assert (meta["epoch"], meta["update_in_epoch"]) == (1, 2)
    assert not (out / "model.safetensors").exists()  # the run is not finished
    assert not [d for d in os.listdir(out / "checkpoints") if d.startswith(".")]  # no staging left

    resumed = run(config_from_dict(tiny_vit_config(root, str(out), **SECTIONS, checkpoint={"resume": "latest"})))
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = load_file(str(tmp_path / "ref" / name)), load_file(str(out / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert resumed["eval_loss"] == ref["eval_loss"] and resumed["train_loss"] == ref["train_loss"]
    recs = [json.loads(line) for line in open(log)]
    assert [r["update"] for r in recs if r["kind"] == "step"] == list(range(1, 13))
    assert [r["epoch"] for r in recs if r["kind"] == "epoch"] == [1, 2]


def test_second_ctrl_c_aborts_without_saving():
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup / a background job
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.time() + 5
        while stop.signum is None and time.time() < deadline:
            time.sleep(0.01)
        assert stop.signum == signal.SIGINT  # first Ctrl-C: recorded, the loop stops at the next update
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before  # the handler found on entry is back


def test_ctrl_c_mid_epoch_checkpoints_exits_130_and_resumes_bit_exact(tmp_path, capsys):
    """SIGINT (Ctrl-C) in-process through ``visionpe finetune``: the step finishes, a checkpoint is written, the
    command returns 130; ``--resume`` ends with the uninterrupted run's weights."""
    import threading
    from visionpe.cli import main as cli_main
    root = make_color_folder(str(tmp_path / "data"), num_classes=3, train_per_class=16, val_per_class=4)
    sections = dict(model={"drop_path_rate": 0.1}, ema={"enabled": True, "decay": 0.9}, sched={"epochs": 1})
    run(config_from_dict(tiny_vit_config(root, str(tmp_path / "ref"), **sections)))
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_vit_config(root, str(out), **sections)))
    log = out / "metrics.jsonl"

    def press_ctrl_c():  # once update 3 is logged (the run waits there, its handler installed)
        deadline = time.time() + 120
        while time.time() < deadline:
            if log.is_file() and any(json.loads(line).get("update") == 3 for line in log.read_text().splitlines()):
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.02)

    presser = threading.Thread(target=press_ctrl_c)
    presser.start()
    rc = cli_main(["finetune", "-c", str(recipe), "--set", "train.debug_pause_at_update=3"])
    presser.join()
    assert rc == 128 + signal.SIGINT
    assert json.loads(capsys.readouterr().out)["stopped"] == "SIGINT"
    assert validate_checkpoint(str(out / "checkpoints" / "update_00000003"))["update_in_epoch"] == 3
    assert not (out / "model.safetensors").exists()
    assert cli_main(["finetune", "-c", str(recipe), "--resume"]) == 0
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = load_file(str(tmp_path / "ref" / name)), load_file(str(out / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
