"""Three-Cell: labels on hand-made triples, the generator (priors, determinism, cache), the runner
(outputs, resume, bad input) and the fine-tuning probe."""
import json
import os

import numpy as np
import pytest
import timm
import torch

from visionpe.eval import threecell, threecell_run
from visionpe.eval.threecell_config import data_config
from visionpe.eval.threecell_model import build_model, load_pretrained, param_groups
from visionpe.eval.threecell_train import Split
from visionpe.eval.probe import ThreeCellProbeCallback, threecell_probe
from visionpe.eval.threecell_data import (GROUPS, ThreeCellConfig, ThreeCellData, generate, group_accuracies,
                                          labels_for_grid, load_or_generate, offset_table, render)


# -- labels --------------------------------------------------------------------------------------------
def _lab(r, g, b, grid=(14, 14)):
    """Labels of one triple given as (x=col, y=row) points (the docs' convention)."""
    coords = np.array([[[p[1], p[0]] for p in (r, g, b)]])  # -> (row, col)
    return labels_for_grid(coords, grid)[0].tolist()


def test_labels_hand_constructed():
    # R at the origin, G 3 to the right, B 1 down: |RG|^2 = 9 > |RB|^2 = 1
    # cross = (3)(1) - (0)(0) = 3 > 0; 2A_RG = |(0+0)*3| = 0, 2A_RB = |(0+1)*0| = 0 -> equal areas
    # sums x: 3, y: 1 -> not > 13
    assert _lab((0, 0), (3, 0), (0, 1)) == [1, 0, 1, 0, 0, 0]
    # swap G and B: distances and orientation flip, areas stay equal
    assert _lab((0, 0), (0, 1), (3, 0)) == [0, 1, 0, 0, 0, 0]
    # equal distances (5^2 = 3^2 + 4^2), cross = (5)(4) - (0)(3) = 20 > 0
    # 2A_RG = |(2+2)*5| = 20, 2A_RB = |(2+6)*3| = 24 -> bit 4; sums x 1+6+4 = 11 -> bit 5 off
    assert _lab((1, 2), (6, 2), (4, 6)) == [0, 0, 1, 0, 1, 0]
    # vector sum needs BOTH coordinate sums > 13 (AND rule, spec §8.3)
    assert _lab((5, 5), (6, 5), (5, 6))[5] == 1      # x 16 > 13 and y 16 > 13
    assert _lab((4, 4), (5, 4), (4, 5))[5] == 0      # x 13, y 13: not > 13
    assert _lab((12, 12), (13, 12), (12, 13))[5] == 1
    assert _lab((13, 0), (13, 1), (12, 0))[5] == 0   # x 38 > 13, y 1 -> AND fails
    # area comparison: 2A_RG = |(0+10)*(10-0)| = 100 > 2A_RB = |(0+1)*(1-0)| = 1 -> bit 3
    lab = _lab((0, 0), (10, 10), (1, 1))
    assert lab[3] == 1 and lab[4] == 0
    # bit-5 threshold follows the grid: on 7x7 it is 6 per axis
    assert _lab((2, 2), (3, 2), (2, 3), grid=(7, 7))[5] == 1
    assert _lab((2, 2), (3, 2), (2, 3), grid=(14, 14))[5] == 0


def test_offset_table_and_priors():
    table = offset_table((14, 14))
    assert len(table) == 125 and 0 not in table  # spec §8.2
    assert all((t[:, 0] ** 2 + t[:, 1] ** 2 == k).all() for k, t in table.items())
    a = generate(ThreeCellConfig(num_samples=4000, seed=1))
    prior = a["labels"].mean(0)
    # spec §8.3: P(bit=1) ~ [0.33, 0.33, 0.50, 0.45, 0.46, 0.61]
    np.testing.assert_allclose(prior, [0.33, 0.33, 0.50, 0.45, 0.46, 0.61], atol=0.03)
    c = a["coords"].astype(int)
    assert c.min() >= 0 and c.max() <= 13
    assert (labels_for_grid(c, (14, 14)) == a["labels"]).all()
    # three distinct, non-colinear cells; mode 1 has equal distances
    r, g, b = c[:, 0], c[:, 1], c[:, 2]
    cross = (g[:, 1] - r[:, 1]) * (b[:, 0] - r[:, 0]) - (g[:, 0] - r[:, 0]) * (b[:, 1] - r[:, 1])
    assert (cross != 0).all()
    eq = ((g - r) ** 2).sum(1) == ((b - r) ** 2).sum(1)
    assert eq[a["modes"] == 1].all()
    assert (((g - r) ** 2).sum(1) <= ((b - r) ** 2).sum(1))[a["modes"] == 2].all()


def test_render_places_cells():
    coords = np.array([[[0, 1], [2, 0], [1, 1]]])  # R at row 0 col 1, G at (2, 0), B at (1, 1)
    x = render(coords, (3, 2), 2)
    assert x.shape == (1, 3, 6, 4)
    assert x[0, 0, 0:2, 2:4].eq(1).all() and x[0, 0].sum() == 4  # red cell, 2x2 px
    assert x[0, 1, 4:6, 0:2].eq(1).all() and x[0, 1].sum() == 4
    assert x[0, 2, 2:4, 2:4].eq(1).all() and x[0, 2].sum() == 4


def test_determinism_and_cache(tmp_path):
    cfg = ThreeCellConfig(img_size=28, cell_size=4, num_samples=64, seed=3)
    a1, path, generated = load_or_generate(cfg, tmp_path)
    assert generated and path.exists() and path.parent == tmp_path
    mtime = path.stat().st_mtime_ns
    a2, path2, generated2 = load_or_generate(cfg, tmp_path)
    assert not generated2 and path2 == path and path.stat().st_mtime_ns == mtime  # never regenerated
    fresh = generate(cfg)
    for k in ("coords", "labels", "modes"):
        assert np.array_equal(a1[k], a2[k]) and np.array_equal(a1[k], fresh[k])
    other, p_other, _ = load_or_generate(ThreeCellConfig(img_size=28, cell_size=4, num_samples=64, seed=4), tmp_path)
    assert p_other != path and not np.array_equal(other["coords"], a1["coords"])
    data = ThreeCellData(cfg, tmp_path)
    x, y = data.tensors("test")
    assert x.shape == (len(y), 3, 28, 28) and y.shape[1] == 6
    assert sum(data.cfg.split_sizes()) == 64


def test_group_accuracy_metric():
    labels = torch.tensor([[1, 0, 1, 0, 1, 1], [0, 0, 0, 1, 0, 0]], dtype=torch.float32)
    logits = torch.tensor([[5, -5, 5, -5, 5, 5], [5, -5, -5, -5, -5, -5]], dtype=torch.float32)
    acc = group_accuracies(logits, labels)
    # distance: 3/4 correct bits, orientation 2/2, area 3/4 (sample 2 bit 3 wrong), vector sum 2/2
    assert acc == {"distance": 0.75, "orientation": 1.0, "area": 0.75, "vector_sum": 1.0, "avg": 0.875}
    assert set(GROUPS) == {"distance", "orientation", "area", "vector_sum"}


# -- bad input -----------------------------------------------------------------------------------------
def test_bad_input_data():
    with pytest.raises(ValueError, match=r"cell_size=5 does not divide the image size \(28, 28\)"):
        ThreeCellConfig(img_size=28, cell_size=5)
    with pytest.raises(ValueError, match=r"grid \(1, 7\) .* too small to place three non-colinear cells"):
        ThreeCellConfig(img_size=(4, 28), cell_size=4)
    with pytest.raises(ValueError, match="too small"):
        ThreeCellConfig(img_size=16, cell_size=16)
    with pytest.raises(ValueError, match="num_samples"):
        ThreeCellConfig(img_size=28, cell_size=4, num_samples=2)


def _tiny_cfg(tmp_path, **train):
    cfg = threecell.load_config(_write_cfg(tmp_path), overrides={f"train.{k}": v for k, v in train.items()})
    return cfg


def _write_cfg(tmp_path, **data):
    d = {"img_size": 16, "cell_size": 4, "num_samples": 64, **data}
    path = tmp_path / "tiny.yaml"
    import yaml
    path.write_text(yaml.safe_dump({
        "name": "tiny", "data": d,
        "model": {"embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0},
        "train": {"epochs": 1, "batch_size": 16, "optimizer": "adamw", "lr": 1e-3, "min_lr": 1e-5},
        "run": {"workers": 1, "threads": 1, "device": "cpu"}}))
    return path


def test_bad_input_runner(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown encoder\(s\) \['no_such_pe'\]; known encoders: .*learned"):
        threecell.resolve_encoders("learned,no_such_pe")
    rc = threecell.main(["--config", str(_write_cfg(tmp_path)), "--encoders", "no_such_pe", "--out", str(tmp_path / "o")])
    assert rc == 2 and "unknown encoder" in capsys.readouterr().err
    rc = threecell.main(["--config", str(_write_cfg(tmp_path, cell_size=3)), "--out", str(tmp_path / "o")])
    assert rc == 2 and "cell_size=3 does not divide the image size (16, 16)" in capsys.readouterr().err
    rc = threecell.main(["--config", str(_write_cfg(tmp_path, img_size=8, cell_size=8)), "--out", str(tmp_path / "o")])
    assert rc == 2 and "too small to place three" in capsys.readouterr().err
    with pytest.raises(ValueError, match="model.patch_size=3 must divide data.cell_size=4"):
        threecell.load_config(_write_cfg(tmp_path), overrides={"model.patch_size": 3})
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochz: 3}\n")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) 'train.epochz'; section 'train' accepts: epochs"):
        threecell.load_config(bad)
    bad.write_text("trian: {epochs: 3}\n")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) 'trian'; the top level accepts: name, data"):
        threecell.load_config(bad)
    bad.write_text("train: {epochs: ten}\n")
    with pytest.raises(ValueError, match=r"train.epochs must be an integer; got 'ten'"):
        threecell.load_config(bad)
    with pytest.raises(ValueError, match=r"train.epochs must be an int >= 1; got 0"):
        threecell.load_config(_write_cfg(tmp_path), overrides={"train.epochs": 0})
    with pytest.raises(ValueError, match=r"override 'epochs' must look like section.key"):
        threecell.load_config(_write_cfg(tmp_path), overrides={"epochs": 3})


def test_default_encoders_cover_registry():
    import visionpe
    names = threecell.resolve_encoders()
    assert names[:3] == ["none", "learned", "sincos2d"]
    assert set(names) == set(visionpe.list_encoders()) and len(names) == len(set(names))


def test_shipped_configs_load():
    quick = threecell.load_config(quick=True)
    full = threecell.load_config()
    assert quick["name"] == "threecell_quick" and full["name"] == "threecell"
    assert full["data"] == {**full["data"], "img_size": 224, "cell_size": 16, "num_samples": 10000}
    assert full["train"]["epochs"] == 150 and full["train"]["batch_size"] == 64 and full["train"]["lr"] == 1e-3


# -- runner: outputs, resume, no-PE invariance ----------------------------------------------------------
def test_runner_outputs_and_resume(tmp_path, monkeypatch):
    cfg_path = _write_cfg(tmp_path)
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["--config", str(cfg_path), "--encoders", "none,sincos2d", "--out", str(out), "--cache-dir", str(cache)]
    assert threecell.main(args) == 0
    for f in ("results.md", "results.csv", "threecell.png", "config.yaml", "encoders/none.json",
              "encoders/sincos2d.json", "heatmaps/sincos2d.png"):
        assert (out / f).exists(), f
    assert (out / "threecell.png").read_bytes()[:4] == b"\x89PNG"
    rec = json.loads((out / "encoders" / "sincos2d.json").read_text())
    assert set(rec["test"]) == {"distance", "orientation", "area", "vector_sum", "avg"}
    assert rec["pesi_method"] == "embedding" and rec["pesi"]["M_U"] is not None
    md = (out / "results.md").read_text()
    assert "| Encoder | hooks | Distance | Orientation | Area | Vector Sum | Average |" in md and "| sincos2d |" in md
    rows = (out / "results.csv").read_text().strip().splitlines()
    assert rows[1].startswith("label_majority") and len(rows) == 4

    # resume: finished encoders are loaded, not retrained (train_encoder must not be called for them)
    calls = []
    real = threecell_run.train_encoder
    monkeypatch.setattr(threecell_run, "train_encoder", lambda name, *a, **k: calls.append(name) or real(name, *a, **k))
    assert threecell.main(args[:3] + ["none,sincos2d,learned"] + args[4:]) == 0
    assert calls == ["learned"]
    assert json.loads((out / "encoders" / "sincos2d.json").read_text()) == rec
    # a changed recipe invalidates the stored results
    calls.clear()
    assert threecell.main(args + ["--epochs", "2"]) == 0
    assert calls == ["none", "sincos2d"]


def test_no_pe_is_a_constant_predictor(tmp_path):
    # spec §8.7: cells aligned with patches -> every image is the same multiset of tokens for a no-PE ViT
    cfg = _tiny_cfg(tmp_path)
    model = build_model("none", cfg)[0].eval()
    data = ThreeCellData(data_config(cfg), tmp_path / "c")
    x, _ = data.tensors("train")
    with torch.no_grad():
        z = model(x[:16])
    assert (z - z[:1]).abs().max() < 1e-5
    assert not (build_model("sincos2d", cfg)[0].eval()(x[:16]) - z[:1]).abs().max() < 1e-3


# -- probe ---------------------------------------------------------------------------------------------
def test_probe_leaves_model_untouched_and_returns_flat_keys(tmp_path):
    model = timm.create_model("vpe_vit_tiny_patch16_224", pe="sincos2d", img_size=32, patch_size=8, embed_dim=64,
                              depth=2, num_heads=2, num_classes=10)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = threecell_probe(model, num_samples=200, epochs=3, seed=0, cache_dir=tmp_path)
    expected = {f"threecell/{k}" for k in ("distance", "orientation", "area", "vector_sum", "avg", "majority_avg")}
    assert expected | {"pesi/M_U", "pesi/M_D", "pesi/A_SU"} == set(out)
    assert all(0 <= out[k] <= 100 for k in expected)
    assert np.isfinite(out["pesi/M_U"])
    assert model.training and all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the callback runs every N epochs and on the last one only
    cb = ThreeCellProbeCallback(every=2, num_samples=100, epochs=1, cache_dir=tmp_path)
    assert cb(model, 0) == {} and set(cb(model, 1)) == set(out) and cb(model, 2, last=True)
    with pytest.raises(ValueError, match="every"):
        ThreeCellProbeCallback(every=0)


def test_param_groups_scale_only_encoder_parameters(tmp_path):
    cfg = _tiny_cfg(tmp_path)
    model, _ = build_model("learned", cfg)
    groups = param_groups(model, lr=1e-3, weight_decay=0.05, pe_lr_scale=10.0)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert len(by_id) == sum(1 for _ in model.parameters())
    assert by_id[id(model.pe.pos_embed)]["lr"] == pytest.approx(1e-2)
    assert by_id[id(model.pe.pos_embed)]["weight_decay"] == 0.0  # in no_weight_decay()
    w = model.blocks[0].attn.qkv.weight
    assert by_id[id(w)]["lr"] == pytest.approx(1e-3) and by_id[id(w)]["weight_decay"] == 0.05
    assert by_id[id(model.blocks[0].attn.qkv.bias)]["weight_decay"] == 0.0


def test_probe_no_pe_sits_at_label_majority(tmp_path):
    # features of a no-PE ViT differ only by float rounding (which depends on token order); the probe must
    # not read positions from that noise
    model = timm.create_model("vpe_vit_tiny_patch16_224", pe="none", img_size=32, patch_size=8, embed_dim=64,
                              depth=2, num_heads=2, num_classes=10)
    out = threecell_probe(model, num_samples=400, epochs=10, seed=0, cache_dir=tmp_path)
    assert out["threecell/avg"] == pytest.approx(out["threecell/majority_avg"], abs=1e-6)


def test_split_renders_per_batch_when_large(tmp_path):
    # the 224-px paper data does not fit in memory as floats: batches are rendered from coordinates instead
    data = ThreeCellData(ThreeCellConfig(img_size=28, cell_size=4, num_samples=64), tmp_path)
    eager = Split(data, "train", torch.device("cpu"))
    lazy = Split(data, "train", torch.device("cpu"), max_bytes=0)
    assert eager.images is not None and lazy.images is None
    idx = torch.tensor([5, 0, 17])
    for a, b in zip(eager.batch(idx), lazy.batch(idx)):
        assert torch.equal(a, b)


def _tiny_timm_vit(tmp_path):
    src = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=1,
                            num_heads=2, mlp_ratio=2.0, num_classes=1000)
    path = tmp_path / "vit.pth"
    torch.save(src.state_dict(), path)
    return src, path


def test_pretrained_backbone_from_checkpoint_file(tmp_path):
    # model.pretrained loads a plain timm ViT checkpoint: blocks and pos_embed carry over, the head is new
    src, path = _tiny_timm_vit(tmp_path)
    cfg = threecell.load_config(_write_cfg(tmp_path), overrides={"model.pretrained": str(path)})
    model, report = build_model("learned", cfg)
    assert torch.equal(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert torch.equal(model.pe.pos_embed, src.pos_embed)
    assert model.head.weight.shape == (6, 32)
    # everything but the head came from the checkpoint: nothing missing, nothing left over
    assert report == {"source": str(path), "loaded": len(model.state_dict()) - 2, "missing": [], "unexpected": []}


def test_pretrained_load_reports_missing_and_unexpected_keys(tmp_path, caplog):
    # a plain ViT (learned APE) into a relative-bias model: the bias table is not in the checkpoint (missing,
    # kept at init) and the APE table has no place in the model (unexpected); both are reported and logged
    src, path = _tiny_timm_vit(tmp_path)
    cfg = threecell.load_config(_write_cfg(tmp_path), overrides={"model.pretrained": str(path)})
    torch.manual_seed(0)
    fresh, _ = build_model("relpos_bias", threecell.load_config(_write_cfg(tmp_path)))
    torch.manual_seed(0)
    with caplog.at_level("WARNING", logger="visionpe.eval.threecell_model"):
        model, report = build_model("relpos_bias", cfg)
    assert report["missing"] == ["pe.tables.0"] and report["unexpected"] == ["pos_embed"]
    assert report["loaded"] == len(model.state_dict()) - 2 - 1  # all but the head and the new table
    assert "1 missing in the checkpoint (kept at init): ['pe.tables.0']" in caplog.text
    assert "1 unexpected (not used): ['pos_embed']" in caplog.text
    assert torch.equal(model.pe.tables[0], fresh.pe.tables[0])  # kept at its (seeded) initialisation
    assert torch.equal(model.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)
    # the record carries the report and the summary line shows it
    from visionpe.eval.threecell_report import summary_line
    rec = {"encoder": "relpos_bias", "test": dict.fromkeys(("avg", "distance", "orientation", "area",
                                                            "vector_sum"), 50.0), "wall_s": 1.0,
           "pretrained": report}
    assert "1 missing (kept at init), 1 unexpected (ignored)" in summary_line(rec)


def test_pretrained_backbone_that_does_not_fit_is_an_error(tmp_path):
    src, path = _tiny_timm_vit(tmp_path)
    sd = src.state_dict()
    del sd["blocks.0.mlp.fc1.weight"]
    sd["blocks.0.extra"] = torch.zeros(3)
    torch.save(sd, path)
    model, _ = build_model("learned", threecell.load_config(_write_cfg(tmp_path)))
    with pytest.raises(ValueError, match=r"missing in checkpoint \(1\): \[blocks.0.mlp.fc1.weight\]"):
        load_pretrained(model, str(path))
    with pytest.raises(ValueError, match=r"unexpected in checkpoint \(1\): \[blocks.0.extra\]"):
        load_pretrained(model, str(path))
    with pytest.raises(ValueError, match="neither a checkpoint file nor a timm model name"):
        load_pretrained(model, str(tmp_path / "nope.pth"))
