"""Layout, registry and rotary core."""
import pytest
import torch

import visionpe
from visionpe import Layout, create_encoder, list_encoders
from visionpe.rotary import (angles_to_cis, apply_rotary, apply_rotary_cis, axial_freq_matrix, grid_positions,
                             inv_freq, rotary_angles, sectioned_freq_matrix)


def test_layout_counts_and_check():
    lay = Layout((4, 5), num_prefix_tokens=3)
    assert lay.num_patches == 20 and lay.num_tokens == 23 and lay.ndim == 2
    lay.check(23)
    with pytest.raises(ValueError, match=r"21 tokens .* expects 23"):
        lay.check(21)
    assert Layout((2, 3, 4), 0).num_tokens == 24
    assert hash(Layout((4, 5), 1)) == hash(Layout([4, 5], 1))


@pytest.mark.parametrize("grid, exc", [(14, TypeError), ((14,), ValueError), ((0, 3), ValueError),
                                       ((2, 3, 4, 5), ValueError), ((2.0, 3), TypeError)])
def test_layout_rejects_bad_grids(grid, exc):
    with pytest.raises(exc, match="grid"):
        Layout(grid, 1)


def test_layout_rejects_negative_prefix():
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        Layout((2, 2), -1)


def test_registry_lists_baselines_and_hooks():
    names = list_encoders()
    for n in ["none", "learned", "sincos2d", "rope_axial", "rope_mixed", "relpos_bias"]:
        assert n in names
    assert "rope_mixed" in list_encoders("rotate") and "rope_mixed" not in list_encoders("embed")
    assert visionpe.encoder_info("relpos_bias").hooks == ("bias",)


def test_unknown_encoder_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown encoder 'ropee'.*rope_axial.*rope_mixed"):
        create_encoder("ropee", dim=64)


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['thetaa'\]"):
        create_encoder("rope_axial", dim=64, num_heads=1, thetaa=3)


def test_create_from_config_dict():
    enc = create_encoder({"name": "rope_axial", "theta": 10000.0}, dim=128, num_heads=2)
    assert enc.theta == 10000.0 and enc.encoder_name == "rope_axial"
    with pytest.raises(ValueError, match="'name' key"):
        create_encoder({"theta": 1.0}, dim=64)


def test_inv_freq_matches_classic_formula():
    d = 64
    f = inv_freq(d // 2, 10000.0)
    ref = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    torch.testing.assert_close(f, ref, rtol=1e-6, atol=0)


def test_rotary_angles_axial_and_sections():
    pos = grid_positions((3, 4))
    w = axial_freq_matrix(torch.tensor([1.0, 0.5]), 2)
    ang = rotary_angles(pos, w)
    assert ang.shape == (12, 4) and ang.dtype == torch.float32
    torch.testing.assert_close(ang[:, :2], pos[:, :1] * torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(ang[:, 2:], pos[:, 1:] * torch.tensor([1.0, 0.5]))
    w2 = sectioned_freq_matrix(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 0, -1]), 2)
    torch.testing.assert_close(rotary_angles(pos, w2)[:, 2], torch.zeros(12))
    with pytest.raises(ValueError, match="axes"):
        rotary_angles(torch.zeros(5, 3), w)


def test_rotary_angles_float64_for_large_positions():
    pos = torch.tensor([[2 ** 25 + 1]], dtype=torch.int64)
    ang = rotary_angles(pos, torch.ones(1, 1))
    assert ang.dtype == torch.float64 and ang.item() == 2 ** 25 + 1


@pytest.mark.parametrize("interleaved", [True, False])
def test_apply_rotary_is_a_rotation(interleaved):
    x = torch.randn(2, 3, 7, 16)
    ang = torch.randn(7, 8)
    y = apply_rotary(x, ang.cos(), ang.sin(), interleaved)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    # relative property: <R(a)x, R(b)y> depends on a-b only
    z = apply_rotary(x, (ang + 0.3).cos(), (ang + 0.3).sin(), interleaved)
    torch.testing.assert_close((y * y).sum(-1), (z * z).sum(-1), rtol=1e-5, atol=1e-5)


def test_complex_and_real_paths_agree():
    x = torch.randn(2, 3, 7, 16)
    ang = torch.randn(7, 8)
    torch.testing.assert_close(apply_rotary_cis(x, angles_to_cis(ang)), apply_rotary(x, ang.cos(), ang.sin()),
                               rtol=1e-5, atol=1e-6)
    xb = x.bfloat16()
    assert apply_rotary_cis(xb, angles_to_cis(ang)).dtype == torch.bfloat16


def test_apply_rotary_width_mismatch():
    with pytest.raises(ValueError, match="channels"):
        apply_rotary(torch.randn(2, 5, 10), torch.ones(5, 4), torch.zeros(5, 4))
