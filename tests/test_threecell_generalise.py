"""Three-Cell across grid sizes: the test grids' data (cell size, grid-dependent labels), the per-grid label
majority, a no-PE model on every grid, resampling round trips of the tabulated encoders, the any-grid model,
the runner (`--generalise`: weights reused, resume, n/a instead of a crash), the probe at a second grid and
the docs renderer."""
import csv
import importlib.util
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml

import visionpe
from visionpe.encoders.loope import resample_square_operator
from visionpe.eval import threecell, threecell_generalise, threecell_run
from visionpe.eval.probe import threecell_probe
from visionpe.eval.threecell_config import data_config, generalise_grids, load_config
from visionpe.eval.threecell_data import ThreeCellConfig, ThreeCellData, group_accuracies, labels_for_grid
from visionpe.eval.threecell_generalise import (GRID_CHANGE, grid_data_config, grid_majorities, generalise_encoder,
                                               test_grids as grids_of)
from visionpe.eval.threecell_model import any_grid_copy, build_model
from visionpe.eval.threecell_train import load_weights, majority_accuracies, train_encoder, weights_path
from visionpe.resample import resample_grid_table

ROOT = Path(__file__).resolve().parent.parent
TABULATED = ("learned", "irpe", "irpe_bias", "irpe_qkv", "relpos_bias", "loope")


def _recipe(tmp_path, grids=(5, 6), samples=60, **extra):
    path = tmp_path / "tiny_gen.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny_gen", "data": {"img_size": 16, "cell_size": 4, "num_samples": 80},
        "model": {"embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0},
        "train": {"epochs": 1, "batch_size": 16, "optimizer": "adamw", "lr": 1e-3, "min_lr": 1e-5},
        "run": {"workers": 1, "threads": 1, "device": "cpu", "pesi": False},
        "generalise": {"grids": list(grids), "samples": samples}, **extra}))
    return path


# -- the test grids' data --------------------------------------------------------------------------------
def test_larger_grid_keeps_cell_size_and_label_logic(tmp_path):
    cfg = load_config(_recipe(tmp_path, grids=(10, [9, 12])))
    assert grids_of(cfg) == [(4, 4), (10, 10), (9, 12)]
    assert grid_data_config(cfg, (4, 4)) == data_config(cfg)  # the training grid is the training data itself
    for grid in [(10, 10), (9, 12)]:
        dc = grid_data_config(cfg, grid)
        assert dc.cell_size == 4 and dc.grid == grid and dc.img_size == (grid[0] * 4, grid[1] * 4)
        assert dc.num_samples == 60 and dc.seed == 0 and dc.split == data_config(cfg).split
        data = ThreeCellData(dc, tmp_path / "cache")
        c = data.arrays["coords"].astype(int)
        assert c.min() >= 0 and c[..., 0].max() < grid[0] and c[..., 1].max() < grid[1]
        assert (c[..., 0].max(), c[..., 1].max()) != (3, 3)  # the cells use the larger grid
        # the labels are those of the test grid: the vector-sum threshold moves with it
        np.testing.assert_array_equal(data.arrays["labels"], labels_for_grid(c, grid))
        x, _ = data.tensors("test")
        assert x.shape[-2:] == (grid[0] * 4, grid[1] * 4)
        for img, coords in zip(x, data.split("test")["coords"].astype(int)):
            for ch, (r, col) in enumerate(coords):  # one cell of 4x4 px per colour, on the cell grid
                lit = img[ch].nonzero()
                assert len(lit) == 16 and (lit[:, 0] // 4 == r).all() and (lit[:, 1] // 4 == col).all()
    # on a large grid the vector-sum bit differs from the training grid's definition for some triples
    big = ThreeCellData(grid_data_config(cfg, (10, 10)), tmp_path / "cache").arrays["coords"].astype(int)
    assert (labels_for_grid(big, (10, 10))[:, 5] != labels_for_grid(big, (4, 4))[:, 5]).any()


def test_generalise_section_is_checked(tmp_path):
    for grids, msg in [([4], r"generalise.grids\[0\]=4 is the training grid \(4, 4\)"),
                       ([5, 5], r"generalise.grids\[1\]=5 repeats the grid \(5, 5\)"),
                       ([1], r"generalise.grids\[0\] must be at least 2x2"),
                       (["ten"], r"generalise.grids\[0\] must be a grid side \(int\) or a pair"),
                       ([[5, 6, 7]], r"generalise.grids\[0\] must be a grid side")]:
        with pytest.raises(ValueError, match=msg):
            load_config(_recipe(tmp_path, grids=grids))
    with pytest.raises(ValueError, match=r"generalise.samples must be an int >= 3"):
        load_config(_recipe(tmp_path, samples=2))
    bad = _recipe(tmp_path)
    bad.write_text(bad.read_text().replace("samples: 60", "sample: 60"))
    with pytest.raises(ValueError, match=r"unknown config key\(s\) 'generalise.sample'"):
        load_config(bad)
    quick = load_config(quick=True)
    assert generalise_grids(quick) == [(8, 8), (10, 10), (12, 12), (16, 16)]
    assert [grid_data_config(quick, g).img_size for g in generalise_grids(quick)] == [(32, 32), (40, 40), (48, 48),
                                                                                   (64, 64)]


def test_majority_is_the_best_constant_predictor_per_grid(tmp_path):
    cfg = load_config(_recipe(tmp_path, grids=(6,), samples=200))
    maj = grid_majorities(cfg, tmp_path / "cache")
    assert set(maj) == {"4x4", "6x6"}
    for label, grid in (("4x4", (4, 4)), ("6x6", (6, 6))):
        y = ThreeCellData(grid_data_config(cfg, grid), tmp_path / "cache").split("test")["labels"]
        yt = torch.from_numpy(y.astype(np.float32))
        best = max((group_accuracies(torch.tensor(bits, dtype=torch.float32).expand(len(y), 6) * 2 - 1, yt)
                    for bits in itertools.product((0, 1), repeat=6)), key=lambda a: a["avg"])
        assert maj[label]["avg"] == pytest.approx(100 * best["avg"], abs=1e-9)  # all 64 constants tried


# -- a model without position encoding ----------------------------------------------------------------
def test_no_pe_model_stays_at_the_per_grid_majority(tmp_path, one_thread):
    cfg = load_config(_recipe(tmp_path, grids=(6, 9), samples=100))
    out, cache = tmp_path / "out", tmp_path / "cache"
    rec = train_encoder("none", cfg, out, cache)
    maj = grid_majorities(cfg, cache)
    gen = generalise_encoder("none", cfg, out, cache, rec["finished"])
    assert gen["grids"][0]["test"] == rec["test"]  # the training grid repeats the main table
    model, _ = build_model("none", cfg, any_grid=True)
    model.load_state_dict(load_weights("none", cfg, out))
    model.eval()
    for entry in gen["grids"]:
        label = "{}x{}".format(*entry["grid"])
        for g, acc in entry["test"].items():
            assert acc <= maj[label][g] + 1e-9, (label, g)
        x, _ = ThreeCellData(grid_data_config(cfg, entry["grid"]), cache).tensors("test")
        with torch.no_grad():
            z = model(x)
        assert (z - z[:1]).abs().max() < 1e-5  # the same multiset of tokens for every image of the grid


# -- resampling ----------------------------------------------------------------------------------------
def _smooth(h, w, c):
    """A smooth table over an h x w grid with c channels, different along rows and columns."""
    y = torch.arange(h).float()[:, None, None] / (h - 1)
    x = torch.arange(w).float()[None, :, None] / (w - 1)
    f = torch.arange(c).float()[None, None, :] / c
    return torch.cos(math.pi * (y * (1 + f) + 0.5 * x * (1 - f)))


@pytest.mark.parametrize("name", TABULATED)
def test_tabulated_encoders_round_trip(name, tmp_path):
    # at the training grid (7x7 here) the any-grid model is the trained model (the table is read as stored) ...
    cfg = load_config(_recipe(tmp_path, grids=(9,)), overrides={"data.img_size": 28})
    fixed, _ = build_model(name, cfg)
    fixed.eval()
    anyg, _ = build_model(name, cfg, any_grid=True)
    anyg.load_state_dict(fixed.state_dict())
    anyg.eval()
    x = torch.rand(3, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(anyg(x), fixed(x), rtol=0, atol=0)
        torch.testing.assert_close(any_grid_copy(fixed)(x), fixed(x), rtol=0, atol=0)
    # ... and the encoder's own resampling, to a test grid and back, keeps a table: a constant exactly, a
    # smooth one within 5% of its range (bicubic at the borders; measured up to about 3.5%; a swapped axis or
    # a wrong N/N' factor would be off by order 1)
    pe, own = fixed.pe, (7, 7)
    for up in [(10, 10), (9, 12), (16, 16)]:
        if name == "relpos_bias":
            t = torch.cat([_smooth(13, 13, 2).reshape(169, 2), torch.zeros(3, 2)])
            with torch.no_grad():
                pe.tables[0].copy_(t)
            assert pe.table_for(0, own) is pe.tables[0]
            big = visionpe.create_encoder(name, dim=32, num_heads=2, depth=1, grid_size=up)
            with torch.no_grad():
                big.tables[0].copy_(pe.table_for(0, up))
            back, ref = big.table_for(0, own).detach(), t
        elif name == "loope":
            # a smooth operator over (output cell, input cell), both on the 7x7 grid
            w = _smooth(7, 7, 1).reshape(49, 1) * (_smooth(7, 7, 1).reshape(1, 49) * 0.5 + 0.2)
            assert pe.context.linear_weight(own) is pe.context.linear.weight
            back, ref = resample_square_operator(resample_square_operator(w, up, own), own, up), w
            c = torch.full((49, 49), 0.3)
            torch.testing.assert_close(resample_square_operator(resample_square_operator(c, up, own), own, up), c)
        else:  # learned APE, and iRPE's APE: the table of the timm layout with a class-token row
            table = torch.cat([torch.full((1, 1, 32), 0.7), _smooth(7, 7, 32).reshape(1, 49, 32)], dim=1)
            ape = pe.absolute_table()  # the declared table holder (LearnedAPE itself; iRPE's ape)
            with torch.no_grad():
                ape.pos_embed.copy_(table)
            kw = dict(mode=ape.interpolation, antialias=ape.antialias)
            assert resample_grid_table(ape.pos_embed, own, own, 1, **kw) is ape.pos_embed
            pe.set_grid_size(up)
            pe.set_grid_size(own)
            back, ref = ape.pos_embed.detach(), table
            assert torch.equal(back[:, :1], table[:, :1])  # the class-token row is kept as it is
            const = torch.full((1, 50, 32), 0.37)
            torch.testing.assert_close(resample_grid_table(resample_grid_table(const, up, own, 1, **kw), own, up, 1,
                                                           **kw), const)
        assert (back - ref).abs().max() <= 0.05 * (ref.max() - ref.min()), (name, up)


def test_every_encoder_runs_on_larger_grids_with_a_described_change(tmp_path):
    cfg = load_config(_recipe(tmp_path))
    x = torch.rand(2, 3, 36, 28)
    for name in visionpe.list_encoders():
        model, _ = build_model(name, cfg, any_grid=True)
        with torch.no_grad():
            assert model.eval()(x).shape == (2, 6), name
        short, long = threecell_generalise.grid_change(model)
        assert type(model.pe).__name__ in GRID_CHANGE and short and long, name


def test_any_grid_copy_leaves_the_model_and_matches_a_dynamic_build(tmp_path):
    cfg = load_config(_recipe(tmp_path))
    fixed, _ = build_model("relpos_bias", cfg)
    fixed.eval()
    copy = any_grid_copy(fixed)
    built, _ = build_model("relpos_bias", cfg, any_grid=True)
    built.load_state_dict(fixed.state_dict())
    built.eval()
    x = torch.rand(2, 3, 24, 20)
    with torch.no_grad():
        torch.testing.assert_close(copy(x), built(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"image size \(24, 20\) does not match the model's \(16, 16\)"):
        fixed(x)  # the original keeps its fixed input size
    with pytest.raises(TypeError, match="needs a timm VisionTransformer"):
        any_grid_copy(torch.nn.Linear(2, 2))


# -- the runner -----------------------------------------------------------------------------------------
def test_generalise_run_reuses_weights_resumes_and_reports(tmp_path, monkeypatch, one_thread):
    cfg_path = _recipe(tmp_path)
    out, cache = tmp_path / "out", tmp_path / "cache"
    base = ["--config", str(cfg_path), "--out", str(out), "--cache-dir", str(cache)]
    assert threecell.main(base + ["--encoders", "none,learned"]) == 0  # a main run: weights kept
    cfg = load_config(cfg_path)
    assert load_weights("learned", cfg, out) is not None
    main_rec = json.loads((out / "encoders" / "learned.json").read_text())
    trained = []
    real_train = threecell_run.train_encoder
    monkeypatch.setattr(threecell_run, "train_encoder", lambda n, *a, **k: trained.append(n) or real_train(n, *a, **k))
    weights_path(out, "none").unlink()  # a finished encoder without weights must be retrained
    assert threecell.main(base + ["--encoders", "none,learned,relpos_bias", "--generalise"]) == 0
    assert trained == ["none", "relpos_bias"]
    for f in ("generalise.md", "generalise.csv", "generalise.png", "generalise.json", "generalise/learned.json"):
        assert (out / f).exists(), f
    gen = json.loads((out / "generalise" / "learned.json").read_text())
    assert [e["grid"] for e in gen["grids"]] == [[4, 4], [5, 5], [6, 6]]
    assert gen["grids"][0]["test"] == main_rec["test"]  # same weights, same test split
    assert gen["new_grid"] == GRID_CHANGE["LearnedAPE"][0]
    rows = (out / "generalise.csv").read_text().strip().splitlines()
    assert rows[0].startswith("encoder,grid,grid_h,grid_w,train_grid,distance")
    assert len(rows) == 1 + 3 * 4 and rows[1].startswith("label_majority,4x4,4,4,1,")
    md = (out / "generalise.md").read_text()
    assert "| Encoder | on a new grid | 4x4 (train) | 5x5 | 6x6 |" in md and "| learned | table resampled" in md
    meta = json.loads((out / "generalise.json").read_text())
    assert meta["trained"] == 2 and meta["tested"] == 3 and len(meta["loadavg_start"]) == 3

    # resume: nothing trained or tested again; a changed generalise section re-tests without retraining
    trained.clear()
    tested = []
    real_gen = threecell_generalise.generalise_encoder
    monkeypatch.setattr(threecell_generalise, "generalise_encoder",
                        lambda n, *a, **k: tested.append(n) or real_gen(n, *a, **k))
    assert threecell.main(base + ["--encoders", "none,learned,relpos_bias", "--generalise"]) == 0
    assert trained == [] and tested == []
    assert threecell.main(base + ["--encoders", "learned", "--generalise", "--grids", "6,5x7"]) == 0
    assert trained == [] and tested == ["learned"]
    gen = json.loads((out / "generalise" / "learned.json").read_text())
    assert [e["grid"] for e in gen["grids"]] == [[4, 4], [6, 6], [5, 7]]


def test_generalise_reports_na_instead_of_crashing(tmp_path, monkeypatch, one_thread, capsys):
    cfg_path = _recipe(tmp_path)
    out, cache = tmp_path / "out", tmp_path / "cache"
    real = threecell_generalise.evaluate

    def broken_on_6x6(model, split, *a, **k):
        if split.grid == (6, 6):
            raise RuntimeError("this encoder has no table for 6x6")
        return real(model, split, *a, **k)
    monkeypatch.setattr(threecell_generalise, "evaluate", broken_on_6x6)
    args = ["--config", str(cfg_path), "--out", str(out), "--cache-dir", str(cache), "--generalise",
            "--encoders", "sincos2d"]
    assert threecell.main(args) == 1  # reported, not raised
    assert "not tested on every grid: sincos2d" in capsys.readouterr().err
    row = [r for r in (out / "generalise.md").read_text().splitlines() if r.startswith("| sincos2d |")][0]
    cells = [c.strip() for c in row.split("|")[3:-1]]
    assert cells[2] == "n/a: RuntimeError: this encoder has no table for 6x6"
    assert cells[0].count("(") == 1 and cells[1].count("(") == 1  # the other grids have numbers
    # an encoder without weights of this recipe: n/a with the reason, the others still run
    cfg = load_config(cfg_path)
    with pytest.raises(FileNotFoundError, match="no weights of 'learned' trained with recipe"):
        generalise_encoder("learned", cfg, out, cache)


def test_generalise_cli_bad_input(tmp_path, capsys):
    cfg_path = _recipe(tmp_path)
    base = ["--config", str(cfg_path), "--out", str(tmp_path / "o"), "--encoders", "none"]
    assert threecell.main(base + ["--generalise", "--grids", "4"]) == 2
    assert "generalise.grids[0]=4 is the training grid (4, 4)" in capsys.readouterr().err
    assert threecell.main(base + ["--generalise", "--grids", "ten"]) == 2
    assert "--grids: 'ten' is not a grid side" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        threecell.main(base + ["--grids", "8"])  # needs --generalise
    empty = _recipe(tmp_path, grids=())
    assert threecell.main(["--config", str(empty), "--out", str(tmp_path / "o"), "--generalise"]) == 2
    assert "has no generalise.grids" in capsys.readouterr().err


# -- the fine-tuning probe at a second grid -------------------------------------------------------------
def test_probe_at_second_grid(tmp_path):
    model = timm.create_model("vpe_vit_tiny_patch16_224", pe="sincos2d", img_size=32, patch_size=8, embed_dim=64,
                              depth=2, num_heads=2, num_classes=10)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = threecell_probe(model, num_samples=200, epochs=3, seed=0, cache_dir=tmp_path, pesi=False,
                          test_grids=[6, [4, 5]])
    for key in ("threecell_6x6", "threecell_4x5"):
        groups = ("distance", "orientation", "area", "vector_sum", "avg", "majority_avg")
        assert {f"{key}/{g}" for g in groups} <= set(out)
        assert 0 <= out[f"{key}/avg"] <= 100
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.patch_embed.img_size == (32, 32) and not model.dynamic_img_size
    with pytest.raises(ValueError, match=r"test_grids: 4 is the model's own grid \(4, 4\)"):
        threecell_probe(model, num_samples=50, epochs=1, cache_dir=tmp_path, test_grids=4)
    with pytest.raises(ValueError, match="test_grids must hold grid sides"):
        threecell_probe(model, num_samples=50, epochs=1, cache_dir=tmp_path, test_grids=["big"])


def test_probe_no_pe_at_second_grid_stays_at_or_under_the_majority(tmp_path):
    model = timm.create_model("vpe_vit_tiny_patch16_224", pe="none", img_size=32, patch_size=8, embed_dim=64,
                              depth=2, num_heads=2, num_classes=10)
    out = threecell_probe(model, num_samples=300, epochs=5, seed=0, cache_dir=tmp_path, pesi=False,
                          test_grids=(5, 5))
    assert out["threecell/avg"] == pytest.approx(out["threecell/majority_avg"], abs=1e-6)
    # a constant predictor on the 5x5 images: at most their best constant predictor
    assert out["threecell_5x5/avg"] <= out["threecell_5x5/majority_avg"] + 1e-6
    data = ThreeCellData(ThreeCellConfig(img_size=40, cell_size=8, num_samples=300, seed=0), tmp_path)
    y = data.split("test")["labels"]
    assert out["threecell_5x5/majority_avg"] == pytest.approx(majority_accuracies(y, y)["avg"], abs=1e-9)


# -- docs renderer --------------------------------------------------------------------------------------
def _render_docs():
    spec = importlib.util.spec_from_file_location("render_docs", ROOT / "tools" / "render_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_renderer_copies_the_generalise_csv(tmp_path, monkeypatch, one_thread):
    out = tmp_path / "out"
    assert threecell.main(["--config", str(_recipe(tmp_path)), "--out", str(out), "--cache-dir",
                           str(tmp_path / "cache"), "--encoders", "none,learned", "--generalise"]) == 0
    rd = _render_docs()
    body = rd.render_threecell_gen(out / "generalise.csv", {})
    with open(out / "generalise.csv", newline="") as f:
        rows = {r["encoder"] + "@" + r["grid"]: r for r in csv.DictReader(f)}
    lines = body.splitlines()
    assert lines[0] == "| Encoder | on a new grid | 4x4 (train) | 5x5 | 6x6 |"
    assert lines[2].startswith(f"| *label majority* |  | {rows['label_majority@4x4']['avg']} |")
    r = rows["learned@5x5"]
    assert f"{r['avg']} ({r['delta_avg']})" in [l for l in lines if l.startswith("| learned |")][0]
    group = rd.render_threecell_gen(out / "generalise.csv", {"col": "vector_sum", "encoders": "learned"})
    assert rows["learned@6x6"]["vector_sum"] in group and "| none |" not in group
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['colz'\]"):
        rd.render_threecell_gen(out / "generalise.csv", {"colz": "avg"})
    sentence = rd.render_threecell_gen_cost(out / "generalise.json", {})
    assert "2 encoder(s) trained" in sentence and "load average" in sentence


def test_paper_renderer_pairs_sizes_and_models():
    rd = _render_docs()
    res = ROOT / "docs" / "results"
    spec = dict(paper="docs/results/ropevit_multires_paper.csv", res="224:7x7,512:16x16",
                models="learned:vit_s_ape,rope_mixed:vit_s_rope_mixed")
    body = rd.render_threecell_gen_paper(res / "threecell_quick_generalise.csv", spec)
    with open(res / "threecell_quick_generalise.csv", newline="") as f:
        ours = {(r["encoder"], r["grid"]): r for r in csv.DictReader(f)}
    with open(res / "ropevit_multires_paper.csv", newline="") as f:
        paper = {r["id"]: r for r in csv.DictReader(f)}
    row = [l for l in body.splitlines() if l.startswith("| 512 | 16x16 |")][0]
    o_m, o_a = ours[("rope_mixed", "16x16")]["avg"], ours[("learned", "16x16")]["avg"]
    p_m, p_a = paper["vit_s_rope_mixed"]["512"], paper["vit_s_ape"]["512"]
    assert f"| {p_a} / {o_a} | {p_m} / {o_m} |" in row
    assert row.endswith(f"| {float(p_m) - float(p_a):+.1f} / {float(o_m) - float(o_a):+.2f} |")
    assert "| 224 | 7x7 (train) |" in body
    approx = rd.render_threecell_gen_paper(res / "threecell_quick_generalise.csv",
                                           {**spec, "res": "144:7x7", "models": "learned:vit_s_ape"})
    assert f"≈{paper['vit_s_ape']['144']} /" in approx  # digitised from the figure, marked
    with pytest.raises(ValueError, match=r"unknown name\(s\) \['vit_s_nope'\]"):
        rd.render_threecell_gen_paper(res / "threecell_quick_generalise.csv", {**spec, "models": "learned:vit_s_nope"})
