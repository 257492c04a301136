"""Official checkpoints (iRPE, RoPE-ViT, Twins PEG, LOOPE): parity with the official outputs, every loading path.

The reference files (tests/reference/checkpoints, see its README) are tiny random-weight instances of the
official model classes with the official eval-mode ``logits``, ``features`` and ``tokens``. Tolerance: the
manifest's rtol = atol = 1e-5 (float32).
"""
import argparse
import json
import logging
import os
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

from visionpe.models import load_official
from visionpe.models.official import (OFFICIAL_ARCH, RELEASES, OfficialCheckpointError, detect_family,
                                      inspect_official, release)
from visionpe.models.official.common import ape_holder, find_param
from visionpe.models.official.verify import OUTPUTS, reference_case, run_outputs

from conftest import REFERENCE

REF = os.path.join(REFERENCE, "checkpoints")
MANIFEST = json.load(open(os.path.join(REF, "manifest.json")))
NAMES = list(MANIFEST["models"])
TOL = dict(rtol=MANIFEST["tolerance"]["rtol"], atol=MANIFEST["tolerance"]["atol"])

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cases():
    return {name: reference_case(REF, name) for name in NAMES}


def assert_matches(model, t):
    out = run_outputs(model, t["input"])
    for key in OUTPUTS:
        torch.testing.assert_close(out[key], t[key], **TOL, msg=lambda m: f"{key}: {m}")


# -- parity --------------------------------------------------------------------------------------------
def test_reference_folder_covers_every_family():
    assert len(NAMES) == 8
    assert {name.split("_")[0] for name in NAMES} == {"irpe", "ropevit", "peg", "loope"}


@pytest.mark.parametrize("name", NAMES)
def test_converted_model_reproduces_official_outputs(name, cases):
    sd, t, kwargs = cases[name]
    model = load_official(sd, **kwargs).eval()
    assert_matches(model, t)
    assert model.official_report["family"] == name.split("_")[0]


@pytest.mark.parametrize("name", NAMES)
def test_position_encoding_weights_are_live(name, cases):
    """Zeroing the converted PE parameters moves the logits far beyond the tolerance (they are used)."""
    sd, t, kwargs = cases[name]
    model = load_official(sd, **kwargs).eval()
    base = run_outputs(model, t["input"])["logits"]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("pe."):
                p.zero_()
    moved = (run_outputs(model, t["input"])["logits"] - base).abs().max().item()
    if name == "ropevit_rope_axial_deit_LS":  # axial RoPE has no parameter: the rotation itself is the PE
        assert moved == 0.0
    else:
        assert moved > 100 * TOL["atol"], moved


def test_family_detected_from_keys(cases):
    for name, (sd, _, _) in cases.items():
        assert detect_family(sd) == name.split("_")[0]


def test_inferred_architecture_matches_the_manifest(cases):
    for name, (sd, _, kwargs) in cases.items():
        args = MANIFEST["models"][name]["constructor_args"]
        kw = inspect_official(sd, **kwargs).model_kwargs
        hf = args.get("vit_config_overrides", {})
        width = args.get("embed_dim") or (args.get("embed_dims") or [None])[0] or hf["hidden_size"]
        depth = args.get("depth") or (args.get("depths") or [None])[0] or hf["num_hidden_layers"]
        assert (kw["embed_dim"], kw["depth"], kw["num_heads"]) == (width, depth, 2)
        assert kw["num_classes"] == args["num_classes"]


def test_irpe_config_read_from_tensors(cases):
    for side in ("k", "qk", "qkv"):
        spec = inspect_official(cases[f"irpe_deit_ctx_product_50_shared_{side}"][0])
        assert spec.model_kwargs["pe"] == dict(name="irpe", method="product", mode="contextual", rpe_on=side,
                                               shared_head=True, ratio=1.9, ape=True)
        assert spec.model_kwargs["num_heads"] == 2 and spec.grid == (14, 14)


def test_dropped_keys_are_exactly_the_documented_ones(cases):
    dropped = {}
    for name, (sd, _, kwargs) in cases.items():
        dropped[name] = load_official(sd, **kwargs).official_report["dropped"]
    assert not any(dropped[n] for n in NAMES if n.startswith(("irpe", "peg")))
    assert not dropped["ropevit_rope_axial_deit_LS"] and not dropped["ropevit_rope_axial_ape_deit_LS"]
    assert set(dropped["ropevit_rope_mixed_deit_LS"]) == {"freqs_t_x", "freqs_t_y"}
    loope = dropped["loope_vit_art"]
    sd = cases["loope_vit_art"][0]
    assert set(loope) == {k for k in sd if k.startswith("model.") or k in (
        "pos_embedding.cord", "pos_embedding.wrap_pos_hilbert", "pos_embedding.div_term")}
    assert all(reason for reason in loope.values())


# -- sources: .pth (weights_only), safetensors, wrappers ------------------------------------------------
def test_pth_with_model_key_and_args_namespace(tmp_path, cases):
    sd, t, kwargs = cases["irpe_deit_ctx_product_50_shared_qk"]
    path = tmp_path / "ckpt.pth"
    torch.save({"model": sd, "args": argparse.Namespace(lr=5e-4, model="deit"), "epoch": 299}, path)
    assert_matches(load_official(str(path), **kwargs), t)


def test_bare_pth_safetensors_and_ddp_prefix(tmp_path, cases):
    sd, t, kwargs = cases["peg_cpvt_gap_vit"]
    torch.save(sd, tmp_path / "bare.pth")
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.pth")
    for f in ("bare.pth", "w.safetensors", "ddp.pth"):
        assert_matches(load_official(tmp_path / f, **kwargs), t)


class Opaque:
    """Some object a training script might pickle next to the weights."""


def test_pth_with_arbitrary_objects_is_refused(tmp_path, cases):
    sd = cases["peg_cpvt_gap_vit"][0]
    torch.save({"model": sd, "extra": Opaque()}, tmp_path / "bad.pth")
    with pytest.raises(OfficialCheckpointError, match="weights_only=True"):
        load_official(str(tmp_path / "bad.pth"), num_heads=2)


# -- timm's loading path ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_timm_create_model_with_official_file(name, cases, tmp_path):
    sd, t, kwargs = cases[name]
    path = str(tmp_path / "official.pth")
    torch.save({"model": sd}, path)
    kw = inspect_official(sd, **kwargs).model_kwargs
    model = timm.create_model(OFFICIAL_ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=10),
                              **kw)
    assert_matches(model, t)


@pytest.mark.parametrize("name, pe, extra", [
    ("irpe_deit_ctx_product_50_shared_qkv", "irpe_qkv", {}),
    ("ropevit_rope_mixed_deit_LS", "rope_mixed", {"init_values": 1e-4}),
    ("ropevit_rope_axial_ape_deit_LS", "rope_axial_ape", {"init_values": 1e-4}),
])
def test_generic_vpe_vit_name_loads_official_files(name, pe, extra, cases, tmp_path):
    """``vpe_vit_*`` names: their ``pe_checkpoint_filter`` hands official layouts to the same converter."""
    sd, t, _ = cases[name]
    path = str(tmp_path / "official.safetensors")
    save_file(sd, path)
    model = timm.create_model("vpe_vit_small_patch16_224", pe=pe, pretrained=True,
                              pretrained_cfg_overlay=dict(file=path, num_classes=10), embed_dim=64, depth=2,
                              num_heads=2, num_classes=10, **extra)
    assert_matches(model, t)


def test_release_names_load_official_files_of_other_sizes(cases, tmp_path):
    for arch, name in (("vpe_deit_small_patch16_224_ctx_product_50_shared_qk", "irpe_deit_ctx_product_50_shared_qk"),
                       ("vpe_rope_mixed_deit_base_patch16_LS", "ropevit_rope_mixed_deit_LS")):
        sd, t, _ = cases[name]
        path = str(tmp_path / f"{name}.pth")
        torch.save({"model": sd}, path)
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=10),
                                  embed_dim=64, depth=2, num_heads=2, num_classes=10)
        assert_matches(model, t)


def test_timm_path_rejects_a_wrong_size_model(cases, tmp_path):
    sd = cases["ropevit_rope_mixed_deit_LS"][0]
    path = str(tmp_path / "official.pth")
    torch.save(sd, path)
    with pytest.raises(OfficialCheckpointError,
                       match=r"blocks.0.attn.qkv.weight \(192, 64\) -> .* expects \(288, 96\)"):
        timm.create_model("vpe_rope_mixed_deit_small_patch16_LS", pretrained=True,
                          pretrained_cfg_overlay=dict(file=path, num_classes=10), embed_dim=96, depth=2, num_heads=2,
                          num_classes=10)


# -- released checkpoints: tags, download locations, architecture ----------------------------------------
def test_release_tags_carry_the_official_download_locations():
    listed = set(timm.list_pretrained("vpe_*"))
    manifest_urls = {c["name"]: c.get("url") or c.get("hf_hub") for m in MANIFEST["models"].values()
                     for c in m["released_checkpoints"]}
    for r in RELEASES:
        assert r.model_name in listed
        cfg = timm.get_pretrained_cfg(r.model_name).to_dict()
        where = cfg["url"] or cfg["hf_hub_id"]
        assert where == (r.url or r.hf_hub_id)
        if r.name in manifest_urls:
            assert where == manifest_urls[r.name]
            reported = next(c for m in MANIFEST["models"].values() for c in m["released_checkpoints"]
                            if c["name"] == r.name)
            assert r.top1[224] == reported.get("top1_imagenet", reported.get("top1_imagenet_224"))
    assert len(manifest_urls) == 15 and len(RELEASES) == 18  # + rope_mixed_ape S/B/L (rope-vit README)
    assert release("vpe_rope_mixed_deit_small_patch16_LS.naver_in1k").family == "ropevit"


@pytest.mark.parametrize("arch, params_m", [
    # parameter counts of the official iRPE model zoo (README; docs/irpe_cpe.md, A.6)
    ("vpe_deit_tiny_patch16_224_ctx_product_50_shared_k", 5.76),
    ("vpe_deit_small_patch16_224_ctx_product_50_shared_k", 22.09),
    ("vpe_deit_small_patch16_224_ctx_product_50_shared_qk", 22.13),
    ("vpe_deit_small_patch16_224_ctx_product_50_shared_qkv", 22.17),
])
def test_release_architectures_have_the_official_parameter_counts(arch, params_m):
    model = timm.create_model(arch)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == params_m


def test_release_entries_build_at_other_sizes():
    for r in RELEASES:
        m = timm.create_model(r.arch, embed_dim=64, depth=1, num_heads=2, num_classes=3)
        assert m.pe_name == r.pe["name"] and m(torch.randn(1, 3, 224, 224)).shape == (1, 3)
        if r.family == "ropevit":
            assert m.blocks[0].ls1.gamma.shape == (64,)


# -- visionpe convert and visionpe evalres ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["irpe_deit_ctx_product_50_shared_k", "loope_vit_art", "peg_cpvt_gap_vit"])
def test_convert_writes_a_timm_loadable_folder(name, cases, tmp_path):
    from visionpe import cli
    from visionpe.eval.evalres import load_for_eval
    sd, t, kwargs = cases[name]
    src = tmp_path / "official.pth"
    torch.save({"model": sd}, src)
    dst = tmp_path / "converted"
    argv = ["convert", str(src), str(dst)] + (["--num-heads", str(kwargs["num_heads"])] if kwargs else [])
    assert cli.main(argv) == 0
    desc = json.loads((dst / "model.json").read_text())
    cfg = json.loads((dst / "pretrained_cfg.json").read_text())
    assert desc["name"] == cfg["architecture"] == OFFICIAL_ARCH
    model = timm.create_model(desc["name"], pretrained=True, pe=desc["pe"], **desc["kwargs"],
                              pretrained_cfg_overlay=dict(cfg, file=str(dst / "model.safetensors")))
    assert_matches(model, t)
    model, data_config, _ = load_for_eval(str(dst))  # evalres rebuilds it with dynamic_img_size=True
    assert_matches(model, t)
    assert data_config["crop_pct"] == 0.875 and data_config["interpolation"] == "bicubic"


def test_evalres_model_and_pretrained_file(cases, tmp_path):
    from visionpe.eval.evalres import load_for_eval
    sd, t, _ = cases["ropevit_rope_axial_ape_deit_LS"]
    path = tmp_path / "pytorch_model.bin"
    torch.save({"model": sd}, path)
    model, _, _ = load_for_eval(model_name="vpe_rope_axial_ape_deit_small_patch16_LS", pretrained_file=str(path),
                                num_classes=10, model_kwargs=dict(embed_dim=64, depth=2, num_heads=2))
    assert_matches(model, t)


def test_convert_cli_errors_and_listing(tmp_path, capsys, cases):
    from visionpe import cli
    assert cli.main(["convert", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(r.model_name in out for r in RELEASES)
    torch.save({"model": cases["ropevit_rope_mixed_deit_LS"][0]}, tmp_path / "r.pth")
    assert cli.main(["convert", str(tmp_path / "r.pth"), str(tmp_path / "out")]) == 2
    assert "does not store the number of attention heads" in capsys.readouterr().err
    assert cli.main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_verify_reports_the_reference_folder(tmp_path, capsys):
    from visionpe import cli
    assert cli.main(["convert", "--verify", REF, "--out", str(tmp_path / "parity.md")]) == 0
    rows = json.loads((tmp_path / "parity.json").read_text())["rows"]
    assert [r["name"] for r in rows] == NAMES and all(r["within_tol"] for r in rows)
    assert all(max(r["max_abs"].values()) <= TOL["atol"] for r in rows)


def test_axial_with_ape_says_it_assumes_rope(cases, caplog):
    sd, t, kwargs = cases["ropevit_rope_axial_ape_deit_LS"]
    with caplog.at_level(logging.WARNING):
        spec = inspect_official(sd, **kwargs)
    assert "RoPE-Axial is assumed" in caplog.text and any("rope='none'" in n for n in spec.notes)
    plain = load_official(sd, rope="none", **kwargs)  # the DeiT-III APE reading of the same tensors
    assert plain.pe_name == "learned" and not plain.pe.embed_prefix
    out = run_outputs(plain, t["input"])["logits"]
    assert (out - t["logits"]).abs().max() > 100 * TOL["atol"]  # RoPE matters: the tensors alone do not say


def to_official(model, family):
    """A visionpe release model's state dict written back in the official key layout (test helper)."""
    ape_key = ape_holder(model)[0]  # wherever the encoder keeps its APE table
    freqs_key = f"{find_param(model, 'freqs')}.freqs"
    out = {}
    for k, v in model.state_dict().items():
        m = re.fullmatch(r"pe\.rpe_([qkv])\.(\d+)\.(.+)", k)
        if m:
            out[f"blocks.{m.group(2)}.attn.rpe_{m.group(1)}.{m.group(3)}"] = v
        elif k == ape_key:
            out["pos_embed"] = v
        elif k == freqs_key:
            out["freqs"] = v.flatten(2)
        else:
            out[re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", k)] = v
    if family == "ropevit" and "freqs" in out:
        t = torch.arange(196, dtype=torch.float32)
        out["freqs_t_x"], out["freqs_t_y"] = t % 14, torch.div(t, 14, rounding_mode="floor")
    return out


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224_ctx_product_50_shared_k",
                                  "rope_mixed_ape_deit_small_patch16_LS"])
def test_full_size_release_round_trip(name):
    """A full-size release model, written in the official layout, is read back as the same architecture."""
    r = release(name)
    torch.manual_seed(0)
    ours = timm.create_model(r.arch).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # LayerScale / zero-initialised tables become non-trivial
    spec = inspect_official(to_official(ours, r.family))
    expected = {k: v for k, v in r.model_args().items()}
    got = {k: spec.model_kwargs.get(k) for k in expected}
    got["img_size"], expected["img_size"] = tuple(got["img_size"]), (224, 224)
    assert got.pop("init_values", None) == expected.pop("init_values", None)
    assert got == expected
    loaded = load_official(to_official(ours, r.family)).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ours(x), rtol=0, atol=0)


def test_create_swapped_starts_finetuning_from_an_official_file(cases, tmp_path):
    from visionpe.models import create_swapped
    sd, t, _ = cases["irpe_deit_ctx_product_50_shared_qkv"]
    path = tmp_path / "official.pth"
    torch.save({"model": sd}, path)
    model = create_swapped("vpe_vit_small_patch16_224", str(path), pe="irpe_qkv", embed_dim=64, depth=2,
                           num_heads=2, num_classes=3)
    assert model.head.weight.shape == (3, 64)  # new classifier; everything else from the file
    torch.testing.assert_close(model.pe.rpe_v[1].lookup_table_weight, sd["blocks.1.attn.rpe_v.lookup_table_weight"],
                               rtol=0, atol=0)
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"], rtol=0, atol=0)


@pytest.mark.parametrize("name, size", [("irpe_deit_ctx_product_50_shared_k", 256), ("loope_vit_art", 128),
                                        ("ropevit_rope_axial_ape_deit_LS", 160)])
def test_timm_path_at_another_resolution_resamples_like_set_input_size(name, size, cases, tmp_path):
    """A model built at another size loads the file with its grid tables resampled, as ``set_input_size`` does."""
    sd, _, kwargs = cases[name]
    path = str(tmp_path / "official.pth")
    torch.save(sd, path)
    kw = dict(inspect_official(sd, **kwargs).model_kwargs, img_size=size)
    via_timm = timm.create_model(OFFICIAL_ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=10),
                                 **kw).eval()
    resized = load_official(sd, img_size=size, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(via_timm(x), resized(x), rtol=0, atol=0)
