"""torchrun + DDP (gloo, 2 CPU processes) gives the same weights as one process with the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from visionpe.train import config_from_dict, run
from visionpe.train.synthetic import make_color_folder, tiny_vit_config


pytestmark = pytest.mark.usefixtures("one_thread")


def test_ddp_two_processes_match_single_process(tmp_path):
    root = make_color_folder(str(tmp_path / "data"), num_classes=3, train_per_class=16, val_per_class=5)
    # random erasing + flips exercise the per-sample seeding; drop-path/Mixup are off because their RNG
    # streams are per process by design (as on separate GPUs)
    common = dict(data={"re_prob": 0.25}, ema={"enabled": True, "decay": 0.5}, sched={"epochs": 1},
                  checkpoint={"every_updates": 2})
    ddp_cfg = tiny_vit_config(root, str(tmp_path / "ddp"), **common)
    ddp_cfg["data"]["batch_size"] = 4  # x 2 processes = global batch 8
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(yaml.safe_dump(ddp_cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "visionpe.train", "--config", str(recipe)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp_res = json.loads(proc.stdout[proc.stdout.index("{"):])  # only rank 0 prints the result
    assert ddp_res["update"] == 6
    # rank 1's RNG state travels with the checkpoint (exact resume under DDP)
    assert os.path.isfile(tmp_path / "ddp" / "checkpoints" / "update_00000006" / "rng_rank1.json")

    single = run(config_from_dict(tiny_vit_config(root, str(tmp_path / "single"), **common)))  # batch 8
    a = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-6, msg=k)
    ea = load_file(str(tmp_path / "ddp" / "model_ema.safetensors"))
    eb = load_file(str(tmp_path / "single" / "model_ema.safetensors"))
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], rtol=0, atol=2e-6, msg=k)
    # validation is sharded over the ranks and summed: the same 15 images are counted once
    assert ddp_res["val_top1"] == pytest.approx(single["val_top1"], abs=1e-9)
    assert ddp_res["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    assert ddp_res["train_loss"] == pytest.approx(single["train_loss"], rel=1e-5)
