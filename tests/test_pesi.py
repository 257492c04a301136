"""PESI metrics: the paper's Table 5 rows, the similarity extraction per hook, heatmaps and the CLI."""
import json
import math
import os

import numpy as np
import pytest
import timm
import torch

import visionpe
from visionpe.encoders.loope import sinusoid_1d
from visionpe.eval.pesi import (_group_spearman, cosine_similarity_matrix, main, model_pesi,
                                pesi_from_similarity, plot_similarity, position_similarity)
from visionpe.rotary import grid_positions, rotary_angles

from conftest import REFERENCE


def _rounded(m):
    return tuple(round(m[k], 4) for k in ("M_U", "M_D", "A_SU"))


def test_paper_row_1d_sinusoid():
    # [P] Table 5, 1D sinusoid (D = 768, 14x14, 60 buckets): 1.9567 / 1.4905 / 0.1243
    sim = cosine_similarity_matrix(sinusoid_1d(torch.arange(196, dtype=torch.float64), 768))
    assert _rounded(pesi_from_similarity(sim, (14, 14), 60)) == (1.9567, 1.4905, 0.1243)


def test_paper_loope_row_from_gilbert_order():
    # spec §9: the static Gilbert-order sinusoid equals the paper's LOOPE row 1.9674 / 1.2900 / 0.0939
    with open(os.path.join(REFERENCE, "loope", "gilbert_rank1_14x14.json")) as f:
        rank1 = json.load(f)["grids"]["H14_W14"]["official_rank1"]
    sim = cosine_similarity_matrix(sinusoid_1d(torch.tensor(rank1, dtype=torch.float64).reshape(-1), 768))
    assert _rounded(pesi_from_similarity(sim, (14, 14))) == (1.9674, 1.2900, 0.0939)


def test_layout_and_offset_invariance():
    # interleaved vs concatenated sin/cos, and positions 0.. vs 1.., give the same metrics (spec §9)
    t = sinusoid_1d(torch.arange(196, dtype=torch.float64), 768)
    base = pesi_from_similarity(cosine_similarity_matrix(t), (14, 14))
    concat = torch.cat([t[:, 0::2], t[:, 1::2]], dim=1)
    shifted = sinusoid_1d(torch.arange(1, 197, dtype=torch.float64), 768)
    for other in (concat, shifted):
        m = pesi_from_similarity(cosine_similarity_matrix(other), (14, 14))
        for k in base:
            assert m[k] == pytest.approx(base[k], abs=1e-9)


def test_group_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(6), 9)
    a = rng.integers(0, 4, groups.size).astype(float)  # many ties
    b = rng.integers(0, 5, groups.size).astype(float)
    rho = _group_spearman(groups, a, b, 7)
    for g in range(6):
        sel = groups == g
        assert rho[g] == pytest.approx(stats.spearmanr(a[sel], b[sel]).statistic, abs=1e-12)
    assert rho[6] == 0.0  # empty group counts as 0


def test_ideal_and_degenerate_maps():
    # similarity = -distance is perfectly monotone: rho = -1 per radius profile, M_U = 2
    h, w = 5, 6
    pos = grid_positions((h, w)).double()
    sim = -torch.cdist(pos, pos)
    assert pesi_from_similarity(sim, (h, w))["M_U"] == pytest.approx(2.0)
    # a constant map has no order at all: every correlation counts as 0
    m = pesi_from_similarity(torch.ones(h * w, h * w), (h, w))
    assert m["M_U"] == pytest.approx(1.0) and m["M_D"] == pytest.approx(1.0) and m["A_SU"] == pytest.approx(0.0)


def _vit(pe, **kw):
    return timm.create_model("vpe_vit_tiny_patch16_224", pe=pe, img_size=32, patch_size=8, embed_dim=64,
                             depth=2, num_heads=2, num_classes=6, **kw)


def test_additive_uses_embedding_cosine():
    model = _vit("learned")
    sim, method = position_similarity(model)
    assert method == "embedding"
    ref = cosine_similarity_matrix(model.pe.pos_embed[0, 1:])
    torch.testing.assert_close(sim, ref, rtol=0, atol=1e-12)


def test_image_dependent_encoder_uses_black_image_embedding():
    model = _vit("loope")
    sim, method = position_similarity(model)
    assert method == "embedding"
    grid = tuple(model.patch_embed.grid_size)
    h, w = grid[0] * model.patch_embed.patch_size[0], grid[1] * model.patch_embed.patch_size[1]
    with torch.no_grad():
        table = model.pe.eval().patch_embedding(torch.zeros(1, 3, h, w), grid)[0]
    torch.testing.assert_close(sim, cosine_similarity_matrix(table.double()), rtol=0, atol=1e-6)


def test_rotary_kernel_equals_sinusoid_cosine():
    # identical q = k content rotated by RoPE: the normalised logit is mean_f cos(angle_f(p) - angle_f(c)),
    # i.e. the cosine similarity of the table [cos(angle), sin(angle)]
    model = _vit("rope_axial")
    sim, method = position_similarity(model)
    assert method == "rotary-kernel"
    ang = rotary_angles(grid_positions((4, 4), xy=True), model.pe.freq_matrix, dtype=torch.float64)
    ref = cosine_similarity_matrix(torch.cat([ang.cos(), ang.sin()], dim=1))
    torch.testing.assert_close(sim, ref, rtol=0, atol=1e-6)


def test_bias_kernel_is_normalised_softmax_kernel():
    model = _vit("relpos_bias")
    with torch.no_grad():
        for t in model.pe.tables:
            t.normal_()
    sim, method = position_similarity(model)
    assert method == "bias-kernel"
    layout = visionpe.Layout((4, 4), 1)
    q = torch.zeros(1, 2, 17, 32)
    expect = 0
    for block in range(2):
        b = model.pe.bias(q, q, layout, block)[0, :, 1:, 1:].double()
        d = torch.diagonal(b, dim1=-2, dim2=-1)
        expect = expect + torch.exp(b - (d[..., :, None] + d[..., None, :]) / 2).mean(0) / 2
    torch.testing.assert_close(sim, expect, rtol=0, atol=1e-12)
    assert torch.diagonal(sim).sub(1).abs().max() < 1e-12


@pytest.mark.parametrize("pe", ["rope_mixed", "relpos_bias", {"name": "mdlrpe", "learnable_theta": True}])
def test_similarity_runs_without_autograd(pe):
    # learnable frequencies/tables: without no_grad the kernel would carry a graph back to the parameters
    model = _vit(pe)
    assert torch.is_grad_enabled() and any(p.requires_grad for p in model.pe.parameters())
    sim, method = position_similarity(model)
    assert method.endswith("-kernel")
    assert sim.grad_fn is None and not sim.requires_grad
    assert torch.is_grad_enabled()  # the decorator restores the caller's mode


def test_no_position_signal_gives_nan_and_model_untouched():
    model = _vit("none")
    assert position_similarity(model) == (None, "none")
    assert all(math.isnan(v) for v in model_pesi(model).values())
    learned = _vit("learned").train()
    before = {k: v.clone() for k, v in learned.state_dict().items()}
    model_pesi(learned)
    assert learned.training and learned.pe.training
    for k, v in learned.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_input():
    with pytest.raises(ValueError, match=r"sim must be \(h\*w, h\*w\) = \(16, 16\)"):
        pesi_from_similarity(torch.ones(15, 15), (4, 4))
    with pytest.raises(ValueError, match="num_buckets"):
        pesi_from_similarity(torch.ones(16, 16), (4, 4), num_buckets=0)
    with pytest.raises(ValueError, match="table must be a"):
        cosine_similarity_matrix(torch.ones(3))


def test_heatmap_and_cli(tmp_path):
    sim = cosine_similarity_matrix(sinusoid_1d(torch.arange(16, dtype=torch.float64), 32))
    png = plot_similarity(sim, (4, 4), tmp_path / "a.png", "x")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "cli"
    rc = main(["--encoders", "none,learned,rope_axial", "--img-size", "32", "--patch-size", "8",
               "--embed-dim", "64", "--depth", "2", "--num-heads", "2", "--out", str(out)])
    assert rc == 0
    text = (out / "pesi.md").read_text()
    assert "| none | none | n/a | n/a | n/a |" in text and "| rope_axial | rotary-kernel |" in text
    assert (out / "heatmaps" / "learned.png").exists() and not (out / "heatmaps" / "none.png").exists()
    rows = (out / "pesi.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 1 + 3  # header, reference row, three encoders
    with pytest.raises(SystemExit):
        main(["--encoders", "no_such_pe", "--out", str(out)])
