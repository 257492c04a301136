"""Baseline encoders against timm 1.0.x's own implementations (the reference for these)."""
import pytest
import torch
from timm.layers import (RelPosBias as TimmRelPosBias, RotaryEmbeddingCat, RotaryEmbeddingMixed,
                         apply_rot_embed_cat, build_sincos2d_pos_embed, resample_abs_pos_embed)

from visionpe import Layout, create_encoder
from visionpe.encoders.absolute import build_sincos2d

RTOL, ATOL = 1e-5, 1e-6


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("grid, dim", [((14, 14), 384), ((5, 7), 64)])
def test_sincos2d_matches_timm(grid, dim):
    _close(build_sincos2d(grid, dim), build_sincos2d_pos_embed(list(grid), dim))
    enc = create_encoder("sincos2d", dim=dim, num_heads=1, grid_size=grid, num_prefix_tokens=1)
    x = torch.zeros(2, 1 + grid[0] * grid[1], dim)
    out = enc.embed(x, Layout(grid, 1))
    _close(out[0, 1:], build_sincos2d_pos_embed(list(grid), dim))
    assert out[:, 0].abs().max() == 0  # prefix tokens get no position


@pytest.mark.parametrize("new_grid", [(20, 12), (7, 7), (14, 14)])
def test_learned_resample_matches_timm(new_grid):
    enc = create_encoder("learned", dim=32, num_heads=1, grid_size=(14, 14), num_prefix_tokens=1)
    ref = resample_abs_pos_embed(enc.pos_embed, new_size=list(new_grid), old_size=[14, 14], num_prefix_tokens=1)
    _close(enc.table_for(new_grid), ref)
    x = torch.randn(2, 1 + new_grid[0] * new_grid[1], 32)
    _close(enc.embed(x, Layout(new_grid, 1)), x + ref)


def test_learned_no_embed_class_and_set_grid_size():
    enc = create_encoder("learned", dim=16, grid_size=(4, 6), num_prefix_tokens=2, embed_prefix=False)
    assert enc.pos_embed.shape == (1, 24, 16)
    x = torch.randn(1, 2 + 24, 16)
    out = enc.embed(x, Layout((4, 6), 2))
    _close(out[:, :2], x[:, :2])
    old = enc.pos_embed.detach().clone()
    enc.set_grid_size((8, 3))
    _close(enc.pos_embed, resample_abs_pos_embed(old, [8, 3], old_size=[4, 6], num_prefix_tokens=0))


@pytest.mark.parametrize("grid, prefix", [((14, 14), 1), ((5, 7), 0), ((3, 8), 4)])
def test_rope_axial_matches_timm_rotary_embedding_cat(grid, prefix):
    heads, hd = 3, 32
    enc = create_encoder("rope_axial", dim=heads * hd, num_heads=heads, grid_size=grid, num_prefix_tokens=prefix)
    n = prefix + grid[0] * grid[1]
    q, k = torch.randn(2, heads, n, hd), torch.randn(2, heads, n, hd)
    rq, rk = enc.rotate(q, k, Layout(grid, prefix))
    emb = RotaryEmbeddingCat(hd, temperature=100, in_pixels=False, grid_indexing="xy").get_embed(shape=list(grid))
    for got, x in ((rq, q), (rk, k)):
        _close(got[:, :, :prefix], x[:, :, :prefix])
        _close(got[:, :, prefix:], apply_rot_embed_cat(x[:, :, prefix:], emb))


def test_rope_mixed_matches_timm_rotary_embedding_mixed():
    heads, hd, depth, grid = 6, 64, 3, (6, 9)
    enc = create_encoder("rope_mixed", dim=heads * hd, num_heads=heads, depth=depth, grid_size=grid)
    ref = RotaryEmbeddingMixed(heads * hd, depth=depth, num_heads=heads, temperature=10, grid_indexing="xy")
    assert ref.freqs.shape == enc.freqs.shape
    with torch.no_grad():
        ref.freqs.copy_(enc.freqs)
    emb = ref.get_embed(shape=list(grid))  # (depth, heads, N, 2*hd)
    n = 1 + grid[0] * grid[1]
    q, k = torch.randn(2, heads, n, hd), torch.randn(2, heads, n, hd)
    for b in range(depth):
        rq, rk = enc.rotate(q, k, Layout(grid, 1), block=b)
        _close(rq[:, :, 1:], apply_rot_embed_cat(q[:, :, 1:], emb[b]).detach())
        _close(rk[:, :, 1:], apply_rot_embed_cat(k[:, :, 1:], emb[b]).detach())
        _close(rq[:, :, :1], q[:, :, :1])


def test_rope_mixed_init_matches_timm_statistics():
    """Same magnitudes as timm's init (the random rotation only changes direction)."""
    enc = create_encoder("rope_mixed", dim=384, num_heads=6, depth=12)
    ref = RotaryEmbeddingMixed(384, depth=12, num_heads=6, temperature=10)
    _close(enc.freqs.norm(dim=0), ref.freqs.norm(dim=0))


@pytest.mark.parametrize("grid", [(7, 7), (4, 6)])
def test_relpos_bias_matches_timm(grid):
    heads = 4
    enc = create_encoder("relpos_bias", dim=64, num_heads=heads, depth=2, grid_size=grid, num_prefix_tokens=1)
    ref = TimmRelPosBias(grid, heads, prefix_tokens=1)
    with torch.no_grad():
        ref.relative_position_bias_table.copy_(enc.tables[1])
    n = 1 + grid[0] * grid[1]
    q = torch.randn(1, heads, n, 16)
    _close(enc.bias(q, q, Layout(grid, 1), block=1), ref.get_bias())


def test_relpos_bias_prefix_tokens_share_extra_rows_and_resample():
    enc = create_encoder("relpos_bias", dim=32, num_heads=2, depth=1, grid_size=(4, 4), num_prefix_tokens=3)
    q = torch.randn(1, 2, 3 + 16, 16)
    b = enc.bias(q, q, Layout((4, 4), 3))
    t = enc.tables[0]
    _close(b[0, :, 0, 5], t[-3])
    _close(b[0, :, 5, 2], t[-2])
    _close(b[0, :, 1, 2], t[-1])
    big = enc.bias(torch.randn(1, 2, 3 + 48, 16), None, Layout((6, 8), 3))
    assert big.shape == (1, 2, 51, 51)
    # zero offset maps to the table's centre at any grid
    _close(big[0, :, 3, 3], t[(4 - 1) * 7 + (4 - 1)])
