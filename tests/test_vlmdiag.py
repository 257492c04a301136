"""VLM position diagnostic runner: recipes (lookup, validation, variant selection), positions of a variant,
outputs and resume, the tables rendered from the CSV, the CLI, and a small run in which a scheme that sees
the true positions beats the label majority on the spatial group."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from visionpe.eval import vlmdiag, vlmdiag_config, vlmdiag_report, vlmdiag_run, vlmdiag_train
from visionpe.eval.vlmdiag_config import Variant, load_config, resolve_recipe, select_variants
from visionpe.vlm import Text, Video, VLMLayout, list_schemes


def _recipe(tmp_path, name="tiny", **sections) -> Path:
    base = {
        "data": {"text_before": [0, 1], "text_after": [0, 1]},
        "splits": {"train": {"frames": [2, 3], "grid": [4, 4], "num_samples": 64},
                   "val": {"frames": [2, 3], "grid": [4, 4], "num_samples": 16},
                   "test": {"in_dist": {"frames": [2, 3], "grid": [4, 4], "num_samples": 16},
                            "T6": {"frames": 6, "grid": [4, 4], "num_samples": 8},
                            "grid6": {"frames": 2, "grid": [6, 6], "num_samples": 8}}},
        "model": {"dim": 32, "depth": 1, "num_heads": 1, "theta": 100},
        "train": {"epochs": 1, "batch_size": 32, "warmup_steps": 2},
        "variants": {"none": {"scheme": "none"},
                     "mrope_q3": {"scheme": "mrope", "options": {"variant": "qwen3vl", "sections": [6, 5, 5]}}},
        "run": {"workers": 1, "threads": 1},
    }
    base.update(sections)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


# -- recipes -------------------------------------------------------------------------------------------------
def test_shipped_recipes_resolve_and_cover_every_scheme():
    assert resolve_recipe(quick=True).name == "vlmdiag_quick.yaml"
    assert resolve_recipe().name == "vlmdiag.yaml"
    assert resolve_recipe("vlmdiag_quick") == resolve_recipe("vlmdiag_quick.yaml") == resolve_recipe(quick=True)
    assert resolve_recipe(str(resolve_recipe(quick=True))) == resolve_recipe(quick=True)  # a path
    with pytest.raises(FileNotFoundError, match="vlmdiag_quick"):
        resolve_recipe("no_such_recipe")
    for quick in (True, False):
        cfg = load_config(quick=quick)
        vs = vlmdiag_config.variants(cfg)
        schemes = {v.scheme for v in vs.values()}
        assert schemes == set(list_schemes()) | {"none"}
        assert sorted(v.options["variant"] for v in vs.values() if v.scheme == "mrope") == ["qwen25vl", "qwen2vl",
                                                                                          "qwen3vl"]
        assert len({v.phase_options("test")["delta"] for v in vs.values() if v.scheme == "v2pe"}) >= 2
        specs = vlmdiag_config.split_specs(cfg)
        train = specs["train"]
        longest = max(s.frames[1] for s in specs.values())
        assert longest >= 4 * train.frames[1] and any(s.grid[0] > train.grid[0] for s in specs.values())


def test_select_variants_by_name_or_scheme():
    cfg = load_config(quick=True)
    assert select_variants(cfg, "mrope") == ["mrope_qwen2vl", "mrope_qwen25vl", "mrope_qwen3vl"]
    assert select_variants(cfg, "none, cca") == ["none", "cca"]
    assert select_variants(cfg, None) == list(cfg["variants"])
    with pytest.raises(ValueError, match="unknown variant or scheme 'nope'"):
        select_variants(cfg, "nope")


@pytest.mark.parametrize("change, message", [
    ({"model": {"dim": 30, "num_heads": 4}}, "heads of even size"),
    ({"variants": {"x": {"scheme": "alibi"}}}, "unknown scheme 'alibi'"),
    ({"variants": {"a/b": {"scheme": "rope1d"}}}, "names a file"),
    ({"variants": {"x": {"scheme": "none", "options": {"theta": 5}}}}, "takes no options"),
    ({"variants": {"x": {"scheme": "rope1d", "extra": 1}}}, "unknown key"),
    ({"splits": {"train": {"frames": 2, "grid": 4}, "val": {"frames": 2, "grid": 4, "num_samples": 4},
                 "test": {"t": {"frames": 2, "grid": 4, "num_samples": 4}}}}, "exactly frames, grid and num_samples"),
    ({"train": {"epochs": 0}}, "train.epochs"),
    ({"colour": {}}, "unknown section"),
])
def test_bad_recipes_are_named(tmp_path, change, message):
    with pytest.raises((ValueError, TypeError), match=message):
        load_config(_recipe(tmp_path, **change))


# -- positions of a variant --------------------------------------------------------------------------------
def test_variant_positions():
    lay = VLMLayout([[Text(3), Video(2, 2, 2), Text(2)], [Text(1), Video(3, 2, 2), Text(1)]], padding_side="left")
    res = vlmdiag_train.positions(Variant("none", "none"), lay, "test")
    assert (res.positions == 0).all() and res.attention_mask is None
    hope = Variant("hope", "hope", {"sections": [4, 6, 6]}, train={"gamma": "random"}, test={"gamma": 1.0})
    a = vlmdiag_train.positions(hope, lay, "train", torch.Generator().manual_seed(1)).positions
    b = vlmdiag_train.positions(hope, lay, "train", torch.Generator().manual_seed(1)).positions
    assert torch.equal(a, b)  # training draws come from the run's generator
    from visionpe.vlm import vlm_positions
    assert torch.equal(vlmdiag_train.positions(hope, lay, "test").positions,
                       vlm_positions(lay, "hope", sections=[4, 6, 6], gamma=1.0).positions)


# -- outputs, resume, tables --------------------------------------------------------------------------------
def test_run_outputs_and_resume(tmp_path, monkeypatch, one_thread):
    cfg = load_config(_recipe(tmp_path))
    out, cache = tmp_path / "out", tmp_path / "cache"
    s = vlmdiag.run(cfg, ["none", "mrope_q3"], out, cache, show_progress=False)
    for f in ("results.csv", "results.md", "vlmdiag.png", "config.yaml", "variants/none.json",
              "variants/mrope_q3.json"):
        assert (out / f).exists(), f
    rows = vlmdiag_report.read_csv(out / "results.csv")
    assert [r["variant"] for r in rows] == ["label_majority", "none", "mrope_q3"]
    assert set(k.split("/")[0] for k in rows[0] if "/" in k) == {"in_dist", "T6", "grid6"}
    rec = json.loads((out / "variants" / "mrope_q3.json").read_text())
    assert set(rec["test"]) == {"in_dist", "T6", "grid6"} and set(rec["by_frames"]["T6"]) == {"6"}
    for split, v in rec["test"].items():
        assert 0 <= v["avg"] <= 100 and set(v) >= {"temporal", "spatial", "across", "avg", "questions"}
    md = (out / "results.md").read_text()
    assert vlmdiag_report.render_tables(rows).strip() in md and "label_majority" in md
    assert np.isclose(s["majority"]["in_dist"]["test"]["avg"], float(rows[0]["in_dist/avg"]), atol=0.01)

    # resume: finished variants are loaded, not retrained
    def boom(*a, **k):
        raise AssertionError("train_variant must not be called for a finished variant")
    monkeypatch.setattr(vlmdiag_run, "train_variant", boom)
    s2 = vlmdiag.run(cfg, ["none", "mrope_q3"], out, cache, show_progress=False)
    assert s2["trained"] == 0 and s2["records"]["mrope_q3"]["test"] == rec["test"]
    # a changed variant retrains (and a crash is reported as a failed row, the others kept)
    cfg["variants"]["mrope_q3"]["options"]["variant"] = "qwen2vl"
    cfg["variants"]["mrope_q3"]["options"]["sections"] = [4, 6, 6]
    s3 = vlmdiag.run(cfg, ["none", "mrope_q3"], out, cache, show_progress=False)
    assert s3["trained"] == 1 and "error" in s3["records"]["mrope_q3"] and "error" not in s3["records"]["none"]
    rows = vlmdiag_report.read_csv(out / "results.csv")
    assert rows[2]["error"].startswith("AssertionError") and "failed" in vlmdiag_report.render_tables(rows)


def test_render_tables_is_a_function_of_the_csv(tmp_path):
    path = tmp_path / "r.csv"
    q = {"questions": {"order": 50.0, "half": 50.0}}
    maj = {"a": {"test": {"temporal": 50, "spatial": 41.5, "across": 33.3, "avg": 41.6, **q}},
           "b": {"test": {"temporal": 49, "spatial": 40, "across": 33, "avg": 40.7, **q}}}
    rec = {"scheme": "rope1d", "describe": "rope1d", "best_epoch": 2, "epochs": 3, "steps": 9, "params": 10,
           "wall_s": 1.0, "cpu_s": 1.0, "threads": 1, "device": "cpu",
           "test": {"a": {"temporal": 90.04, "spatial": 60, "across": 40, "avg": 63.35,
                          "questions": {"order": 100.0, "half": 80.08}},
                    "b": {"temporal": 80, "spatial": 50.55, "across": 30, "avg": 53.5,
                          "questions": {"order": 70.0, "half": 90.0}}}}
    vlmdiag_report.write_csv({"rope1d": rec}, maj, ["a", "b"], path)
    text = vlmdiag_report.render_tables(vlmdiag_report.read_csv(path))
    assert "| variant | a | b |" in text
    assert "| rope1d | 90.0 | 80.0 |" in text and "| rope1d | 60.0 | 50.5 |" in text  # 50.55 -> "50.55" -> 50.5
    assert "| *label_majority (constant predictor)* | 41.6 | 40.7 |" in text
    assert text.index("**Average**") < text.index("**Temporal") < text.index("**Spatial") < text.index("**Across")
    # per split, every asked question (the others are left out)
    assert "| variant | order | half |" in text and "| rope1d | 100.0 | 80.1 |" in text
    assert "| rope1d | 70.0 | 90.0 |" in text and "| corner" not in text
    assert vlmdiag_report.render_tables(vlmdiag_report.read_csv(path)) == text


# -- CLI ------------------------------------------------------------------------------------------------------
def test_cli_list_and_errors(capsys, tmp_path):
    from visionpe.cli import main
    assert main(["vlmdiag", "--quick", "--list"]) == 0
    assert capsys.readouterr().out.split() == list(load_config(quick=True)["variants"])
    assert main(["vlmdiag", "--quick", "--schemes", "v2pe", "--list"]) == 0
    assert capsys.readouterr().out.split() == ["v2pe_1of4", "v2pe_1of16"]
    # comma- or space-separated, or both; a variant named twice runs once
    for schemes in (["v2pe_1of4", "rope1d"], ["v2pe_1of4,rope1d"], ["v2pe_1of4, rope1d", "rope1d"]):
        assert main(["vlmdiag", "--quick", "--schemes", *schemes, "--list"]) == 0
        assert capsys.readouterr().out.split() == ["v2pe_1of4", "rope1d"], schemes
    assert main(["vlmdiag", "--config", "no_such_recipe"]) == 2
    assert "neither a file nor a packaged recipe; packaged: vlmdiag, vlmdiag_quick" in capsys.readouterr().err
    assert main(["vlmdiag", "--quick", "--schemes", "alibi"]) == 2
    assert "unknown variant or scheme" in capsys.readouterr().err


# -- a small run learns space -------------------------------------------------------------------------------
def test_true_positions_beat_the_majority_on_space(tmp_path, one_thread):
    """mrope (Qwen3-VL: t, h, w of every cell) on the spatial questions of 2-frame 4x4 videos: about 15 s of CPU."""
    path = _recipe(tmp_path, name="space",
                   data={"questions": ["left_of", "same_row", "corner"], "text_before": [0, 1], "text_after": [0, 1]},
                   splits={"train": {"frames": 2, "grid": [4, 4], "num_samples": 3000},
                           "val": {"frames": 2, "grid": [4, 4], "num_samples": 100},
                           "test": {"in_dist": {"frames": 2, "grid": [4, 4], "num_samples": 300}}},
                   model={"dim": 64, "depth": 2, "num_heads": 2, "theta": 100},
                   train={"epochs": 4, "batch_size": 32, "lr": 5.0e-3, "warmup_steps": 30},
                   variants={"mrope": {"scheme": "mrope", "options": {"variant": "qwen3vl", "sections": [6, 5, 5]}}})
    s = vlmdiag.run(load_config(path), ["mrope"], tmp_path / "out", tmp_path / "cache", show_progress=False)
    got = s["records"]["mrope"]["test"]["in_dist"]["spatial"]
    majority = s["majority"]["in_dist"]["test"]["spatial"]
    assert 40 < majority < 48  # (50 + 50 + 25) / 3 up to sampling
    assert got > majority + 15, (got, majority)
