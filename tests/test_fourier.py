"""Learnable Fourier features (``fourier``): golden-vector parity, grids, groups, prefix tokens, bad input."""
import json
import math
import os

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import visionpe
from visionpe import Layout, create_encoder
from visionpe.encoders.fourier import FourierPE, LearnableFourierFeatures, lff_grid_coordinates, lff_init_std
from visionpe.models import VisionPEViT

REF = os.path.join(os.path.dirname(__file__), "reference", "fourier")
GRID_CASES = [("lff_2d_4x5_int", (4, 5), "index"), ("lff_2d_4x5_norm", (4, 5), "normalized"),
              ("lff_3d_2x3x4_int", (2, 3, 4), "index"), ("lff_2d_4x5_gamma1", (4, 5), "index")]
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def load_case(name):
    path = os.path.join(REF, name + ".safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    return load_file(path), {k: (float(v) if k == "gamma" else int(v)) for k, v in meta.items()
                             if k in ("G", "M", "F_dim", "H_dim", "D", "gamma")}


def lff_state(t):
    return {"wr.weight": t["Wr"], "mlp1.weight": t["W1"], "mlp1.bias": t["b1"],
            "mlp2.weight": t["W2"], "mlp2.bias": t["b2"]}


def test_reference_files_match_manifest():
    import hashlib
    manifest = json.load(open(os.path.join(REF, "manifest.json")))["files"]
    for name, entry in manifest.items():
        with open(os.path.join(REF, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == entry["sha256"], name


# -- parity ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [c[0] for c in GRID_CASES] + ["lff_boxes_G2"])
def test_lff_matches_golden_vectors(name):
    t, m = load_case(name)
    lff = LearnableFourierFeatures(m["M"], m["F_dim"], m["H_dim"], m["D"], groups=m["G"], gamma=m["gamma"])
    lff.load_state_dict(lff_state(t))
    out = lff(t["x"])
    assert out.shape == t["out"].shape
    torch.testing.assert_close(out, t["out"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lff.double()(t["x"].double()), t["out_f64"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, grid, coords", GRID_CASES)
def test_grid_coordinates_match_vectors(name, grid, coords):
    t, _ = load_case(name)
    torch.testing.assert_close(lff_grid_coordinates(grid, coords), t["x"], rtol=0, atol=1e-7)


@pytest.mark.parametrize("name, grid, coords", GRID_CASES[:3])
def test_encoder_embed_matches_vectors_with_prefix(name, grid, coords):
    """The encoder adds [prefix vector; LFF(grid)] to the tokens: 2D and 3D grids, both coordinate kinds."""
    t, m = load_case(name)
    enc = create_encoder("fourier", dim=m["D"], num_heads=2, grid_size=grid, num_prefix_tokens=1,
                         fourier_dim=m["F_dim"], hidden_dim=m["H_dim"], gamma=m["gamma"], coords=coords)
    enc.lff.load_state_dict(lff_state(t))
    with torch.no_grad():
        enc.prefix_pos.fill_(0.5)
    x = torch.randn(2, 1 + math.prod(grid), m["D"])
    out = enc.embed(x, Layout(grid, 1))
    torch.testing.assert_close(out[:, 1:] - x[:, 1:], t["out"].expand(2, -1, -1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[:, 0] - x[:, 0], torch.full((2, m["D"]), 0.5))


# -- conventions ---------------------------------------------------------------------------------------
def test_cos_block_then_sin_block_scaled_by_sqrt_f():
    """With identity-like MLP probing: r = [cos P || sin P] / sqrt(F), not interleaved, not 1/sqrt(D)."""
    lff = LearnableFourierFeatures(2, 8, 8, 8, gamma=1.0)
    with torch.no_grad():
        lff.mlp1.weight.copy_(torch.eye(8))
        lff.mlp1.bias.fill_(10.0)            # GELU(z) = z for z >> 0: the hidden layer passes r through
        lff.mlp2.weight.copy_(torch.eye(8))
        lff.mlp2.bias.fill_(-10.0)
    x = torch.randn(5, 1, 2)
    proj = x[:, 0] @ lff.wr.weight.t()
    expect = torch.cat([proj.cos(), proj.sin()], -1) / math.sqrt(8)
    torch.testing.assert_close(lff(x), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv, std", [("paper", 1 / 4.0), ("inv_gamma_sq", 4.0 ** -2), ("gamma_sq", 16.0),
                                       (0.3, 0.3)])
def test_wr_init_conventions(conv, std):
    assert lff_init_std(conv, 4.0) == pytest.approx(std)
    lff = LearnableFourierFeatures(2, 4000, 4, 4, gamma=4.0, init_std=conv)
    assert lff.wr.weight.std().item() == pytest.approx(std, rel=0.05)


def test_default_init_is_one_over_gamma_and_defaults():
    enc = create_encoder("fourier", dim=64, num_heads=2, grid_size=(4, 4))
    assert enc.lff.init_std == pytest.approx(1 / 0.25) and enc.lff.fourier_dim == 64 and enc.lff.hidden_dim == 32
    assert enc.lff.groups == 1 and enc.lff.pos_dim == 2
    assert create_encoder("fourier", dim=64, grid_size=(4, 4), coords="index").lff.gamma == 2.0


def test_groups_axes_are_separable_and_corners_are_boxes():
    enc = create_encoder("fourier", dim=32, num_heads=2, grid_size=(3, 4), num_prefix_tokens=0, groups="axes")
    assert (enc.lff.groups, enc.lff.pos_dim) == (2, 1)
    pe = enc.table(Layout((3, 4), 0), "cpu").detach().reshape(3, 4, 32)
    # group 0 (columns 0..15) sees only the row, group 1 only the column
    torch.testing.assert_close(pe[:, :, :16], pe[:, :1, :16].expand(3, 4, 16))
    torch.testing.assert_close(pe[:, :, 16:], pe[:1, :, 16:].expand(3, 4, 16))
    c = lff_grid_coordinates((2, 4), "normalized", "corners")
    assert c.shape == (8, 2, 2)
    torch.testing.assert_close(c[5], torch.tensor([[0.0, -0.5], [1.0, 0.0]]))   # row 1, col 1 of a 2x4 grid
    torch.testing.assert_close(lff_grid_coordinates((2, 4), "index", "corners")[5], torch.tensor([[1.0, 1], [2, 2]]))
    enc = create_encoder("fourier", dim=24, grid_size=(2, 4), num_prefix_tokens=0, groups="corners",
                         fourier_dim=16, hidden_dim=32)
    t, _ = load_case("lff_boxes_G2")
    enc.lff.load_state_dict(lff_state(t))
    torch.testing.assert_close(enc.encode(t["x"]), t["out"], rtol=1e-5, atol=1e-6)


def test_any_resolution_and_normalized_range():
    enc = create_encoder("fourier", dim=32, num_heads=2, grid_size=(4, 4), num_prefix_tokens=0)
    for grid in [(4, 4), (7, 3), (1, 9)]:
        c = enc.coordinates(grid, "cpu")
        assert c.shape == (grid[0] * grid[1], 1, 2) and c.abs().max() <= 1.0
        torch.testing.assert_close(enc.table(Layout(grid, 0), "cpu"), enc.lff(c))
    assert enc.coordinates((1, 9), "cpu")[:, 0, 0].abs().max() == 0       # a length-1 axis sits at 0
    m = VisionPEViT(pe="fourier", dynamic_img_size=True, **TINY).eval()
    assert m(torch.randn(1, 3, 48, 24)).shape == (1, 5)
    final, inter = m.forward_intermediates(torch.randn(1, 3, 48, 24), indices=[1])
    assert inter[0].shape == (1, 32, 6, 3)


def test_video_grid_3d():
    enc = create_encoder("fourier", dim=48, num_heads=2, grid_size=(2, 3, 4), num_prefix_tokens=2)
    x = torch.zeros(3, 2 + 24, 48)
    out = enc.embed(x, Layout((2, 3, 4), 2))
    assert out.shape == x.shape and enc.lff.pos_dim == 3
    assert torch.equal(out[:, :2], torch.zeros(3, 2, 48))                 # zero-initialised prefix vectors
    # different frames get different encodings, same frame and cell twice the same
    pe = out[0, 2:].reshape(2, 3, 4, 48)
    assert not torch.allclose(pe[0], pe[1])


def test_prefix_vector_learns_and_can_be_disabled():
    m = VisionPEViT(pe="fourier", reg_tokens=2, **TINY)
    assert m.pe.prefix_pos.shape == (1, 3, 32) and "pe.prefix_pos" in m.no_weight_decay()
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    assert m.pe.prefix_pos.grad.abs().sum() > 0 and m.pe.lff.wr.weight.grad.abs().sum() > 0
    enc = create_encoder("fourier", dim=32, grid_size=(2, 2), num_prefix_tokens=1, prefix_embed=False)
    x = torch.randn(1, 5, 32)
    out = enc.embed(x, Layout((2, 2), 1))
    assert enc.prefix_pos is None and torch.equal(out[:, 0], x[:, 0]) and not torch.allclose(out[:, 1:], x[:, 1:])


def test_registered_names_and_config_dict():
    assert "fourier" in visionpe.list_encoders("embed")
    m = timm.create_model("vpe_vit_tiny_patch16_224_fourier", num_classes=3)
    assert isinstance(m.pe, FourierPE)
    m = timm.create_model("vpe_vit_tiny_patch16_224", num_classes=0,
                          pe={"name": "fourier", "coords": "index", "groups": "axes", "hidden_dim": 16})
    assert m.pe.coords == "index" and m.pe.lff.groups == 2 and m.pe.lff.hidden_dim == 16


def test_bf16_and_compile_clean():
    m = VisionPEViT(pe="fourier", **TINY).to(torch.bfloat16)
    out = m(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    enc = create_encoder("fourier", dim=32, num_heads=2, grid_size=(4, 4))
    lay = Layout((4, 4), 1)
    x = torch.randn(2, 17, 32)
    fn = torch.compile(lambda t: enc.embed(t, lay), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(x), enc.embed(x, lay))


# -- bad input -------------------------------------------------------------------------------------------
def test_coordinates_of_wrong_dimensionality():
    enc = create_encoder("fourier", dim=32, grid_size=(4, 4), num_prefix_tokens=0)
    with pytest.raises(ValueError, match=r"\(\.\.\., N, G=1, M=2\); got \(5, 1, 3\)"):
        enc.encode(torch.zeros(5, 1, 3))
    with pytest.raises(ValueError, match=r"got \(5, 2\)"):
        enc.encode(torch.zeros(5, 2))
    with pytest.raises(ValueError, match=r"built for 2D coordinates .* got a 3D grid \(2, 2, 2\)"):
        enc.embed(torch.zeros(1, 8, 32), Layout((2, 2, 2), 0))
    with pytest.raises(TypeError, match="coordinates must be a tensor"):
        enc.encode([[0.0, 0.0]])


def test_group_count_must_divide_dims():
    with pytest.raises(ValueError, match=r"out_dim=24 is not divisible by groups=5"):
        LearnableFourierFeatures(2, 16, 32, 24, groups=5)
    with pytest.raises(ValueError, match=r"G=3 positional groups, which does not divide dim=32"):
        create_encoder("fourier", dim=32, grid_size=(2, 3, 4), groups="axes")
    with pytest.raises(ValueError, match="groups must be one of"):
        create_encoder("fourier", dim=32, grid_size=(4, 4), groups="rows")
    with pytest.raises(ValueError, match="fourier_dim must be even"):
        LearnableFourierFeatures(2, 15, 32, 24)


def test_empty_grid():
    with pytest.raises(ValueError, match=r"grid must be non-empty.*\(0, 4\)"):
        lff_grid_coordinates((0, 4))
    with pytest.raises(ValueError, match=r"grid_size must be non-empty"):
        create_encoder("fourier", dim=32, grid_size=(4, 0))
    enc = create_encoder("fourier", dim=32, grid_size=(4, 4))
    with pytest.raises(ValueError, match=r"grid must be non-empty"):
        enc.coordinates((3, 0), "cpu")
    with pytest.raises(ValueError, match=r"no positions \(N=0\)"):
        enc.encode(torch.zeros(0, 1, 2))


def test_other_bad_options():
    with pytest.raises(ValueError, match="coords must be one of"):
        create_encoder("fourier", dim=32, grid_size=(4, 4), coords="pixels")
    with pytest.raises(ValueError, match="init_std must be a float or one of"):
        create_encoder("fourier", dim=32, grid_size=(4, 4), init_std="xavier")
    with pytest.raises(ValueError, match="gamma must be > 0"):
        create_encoder("fourier", dim=32, grid_size=(4, 4), gamma=0.0)
    enc = create_encoder("fourier", dim=32, grid_size=(4, 4), num_prefix_tokens=1)
    with pytest.raises(ValueError, match=r"17 tokens but the layout expects 18"):
        enc.embed(torch.zeros(1, 17, 32), Layout((4, 4), 2))
