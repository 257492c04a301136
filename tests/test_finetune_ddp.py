"""torchrun + DDP (gloo, 2 CPU processes): the same weights as one process with the same global batch, and a
run stopped by SIGTERM mid-epoch resumes to exactly the weights of the uninterrupted 2-process run."""
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
from visionpe.train.synthetic import make_color_folder, tiny_vit_config


pytestmark = pytest.mark.usefixtures("one_thread")

# random erasing + flips exercise the per-sample seeding; drop-path/Mixup are off because their RNG
# streams are per process by design (as on separate GPUs)
COMMON = dict(data={"re_prob": 0.25}, ema={"enabled": True, "decay": 0.5}, sched={"epochs": 1},
              checkpoint={"every_updates": 2})
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun(recipe, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            "visionpe.train", "--config", str(recipe), *args]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One uninterrupted 2-process run (batch 4 per process = global batch 8): (root, recipe, out, result)."""
    tmp = tmp_path_factory.mktemp("ddp")
    root = make_color_folder(str(tmp / "data"), num_classes=3, train_per_class=16, val_per_class=5)
    cfg = tiny_vit_config(root, str(tmp / "ddp"), **COMMON)
    cfg["data"]["batch_size"] = 4  # x 2 processes = global batch 8
    recipe = tmp / "ddp.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(_torchrun(recipe), env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout[proc.stdout.index("{"):])  # only rank 0 prints the result
    return root, recipe, tmp / "ddp", res


def _same_weights(a_dir, b_dir, atol=None):
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = load_file(str(a_dir / name)), load_file(str(b_dir / name))
        assert a.keys() == b.keys()
        for k in a:
            if atol is None:
                assert torch.equal(a[k], b[k]), (name, k)
            else:
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=f"{name} {k}")


def test_ddp_two_processes_match_single_process(ddp_run, tmp_path):
    root, _, ddp_out, ddp_res = ddp_run
    assert ddp_res["update"] == 6
    # rank 1's RNG state travels with the checkpoint (exact resume under DDP)
    assert os.path.isfile(ddp_out / "checkpoints" / "update_00000006" / "rank1.pt")
    single = run(config_from_dict(tiny_vit_config(root, str(tmp_path / "single"), **COMMON)))  # batch 8
    _same_weights(ddp_out, tmp_path / "single", atol=2e-6)
    # validation is sharded over the ranks and summed: the same 15 images are counted once
    assert ddp_res["eval_top1"] == pytest.approx(single["eval_top1"], abs=1e-9)
    assert ddp_res["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)
    assert ddp_res["train_loss"] == pytest.approx(single["train_loss"], rel=1e-5)


def test_ddp_sigterm_mid_epoch_then_resume_is_exact(ddp_run, tmp_path):
    _, recipe, ddp_out, ddp_res = ddp_run
    out = tmp_path / "stopped"
    # both ranks wait after update 3 (of 6) until the signal that torchrun forwards to them arrives
    proc = subprocess.Popen(_torchrun(recipe, "--output-dir", str(out), "--set", "train.debug_pause_at_update=3"),
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = out / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and any(json.loads(line).get("update") == 3 for line in log.read_text().splitlines()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun reports the stop
    ck = out / "checkpoints" / "update_00000003"
    meta = validate_checkpoint(str(ck))  # written by both ranks at the agreed update, then renamed into place
    assert (meta["update"], meta["update_in_epoch"], meta["world_size"]) == (3, 3, 2)
    assert (ck / "rank1.pt").is_file() and not (out / "model.safetensors").exists()
    assert "stopped by SIGTERM after update 3" in err
    resumed = subprocess.run(_torchrun(recipe, "--output-dir", str(out), "--resume"), env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ck}" in resumed.stderr
    res = json.loads(resumed.stdout[resumed.stdout.index("{"):])
    _same_weights(ddp_out, out)  # bit for bit
    assert res["eval_loss"] == ddp_res["eval_loss"] and res["train_loss"] == ddp_res["train_loss"]


def test_two_process_checkpoint_continues_in_one_process(ddp_run, tmp_path, caplog):
    """Moving a run from N processes to 1 (docs/finetune.md): the same global batch (8 x 1 instead of 4 x 2), the
    optimizer, scheduler and EMA state carry over; with no per-process random draws in this recipe the result is
    the 2-process run's, within the DDP-vs-single tolerance."""
    import logging
    root, _, ddp_out, ddp_res = ddp_run
    ck = ddp_out / "checkpoints" / "update_00000004"  # 4 of 6 updates, written by 2 processes
    assert validate_checkpoint(str(ck))["world_size"] == 2
    with caplog.at_level(logging.WARNING):
        res = run(config_from_dict(tiny_vit_config(root, str(tmp_path / "one"), **{
            **COMMON, "checkpoint": {**COMMON["checkpoint"], "resume": str(ck)}})))  # batch 8, 1 process
    assert res["update"] == 6
    assert any("written by 2 process(es), this run has 1" in r.getMessage() for r in caplog.records)
    _same_weights(ddp_out, tmp_path / "one", atol=2e-6)
    assert res["eval_top1"] == pytest.approx(ddp_res["eval_top1"], abs=1e-9)
