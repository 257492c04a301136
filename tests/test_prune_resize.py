"""Encoders inside a pruned or resized ViT, for every registered encoder.

* Pruning (``prune_intermediate_layers``, timm's ``features_only``): the encoder keeps only what the kept blocks
  use (``PositionEncoder.prune_blocks``), every remaining parameter gets a gradient, the kept blocks' outputs are
  bit-identical to the unpruned model's, and the state dict is that of a model built with the kept depth.
* A new input size (``set_input_size`` -> ``set_grid_size``) on a larger and a smaller non-square grid: the
  model runs with the right shapes, tabulated encoders resample their tables with the package's documented
  resampling (checked against independent references), nothing else changes, and the result equals the same
  weights run at that size with ``dynamic_img_size=True`` (which resamples on the fly).
"""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

import visionpe
from visionpe.base import PositionEncoder
from visionpe.encoders.loope import resample_square_operator
from visionpe.irpe_buckets import bucket_ids, num_buckets
from visionpe.models import VisionPEViT
from visionpe.resample import resample_offset_table

DEPTH = 4
IMG = (32, 24)                      # a 4 x 3 patch grid
TINY = dict(img_size=IMG, patch_size=8, embed_dim=32, depth=DEPTH, num_heads=2, num_classes=5)
ENCODERS = visionpe.list_encoders()
#: options whose per-block state the registered defaults do not show
VARIANTS = [
    {"name": "peg", "peg_blocks": (-1, 1, 3)},        # PEGs on the input, after a kept and after a pruned block
    {"name": "peg", "peg_blocks": (2,)},              # every PEG after a pruned block when keeping 1 or 2
    {"name": "relpos_bias", "shared": True},
    {"name": "mdlrpe", "learnable_theta": True},
    {"name": "mdtpe_mdlrpe", "learnable_theta": True},
    {"name": "irpe", "method": "cross", "rpe_on": "qkv", "shared_head": False},
]


def tiny(pe, **kw):
    return VisionPEViT(pe=pe, **{**TINY, **kw})


def pe_id(pe):
    return pe if isinstance(pe, str) else "-".join(f"{k}={v}" for k, v in pe.items()).replace("name=", "")


# -- pruning ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [1, 3])
@pytest.mark.parametrize("pe", ENCODERS + VARIANTS, ids=pe_id)
def test_prune_keeps_outputs_and_every_parameter_learns(pe, keep):
    model = tiny(pe).eval()
    x = torch.randn(2, 3, *IMG)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
        early_final, _ = model.forward_intermediates(x, indices=[keep - 1], stop_early=True)
    pruned = copy.deepcopy(model)
    take = pruned.prune_intermediate_layers([keep - 1])
    assert take == [keep - 1] and len(pruned.blocks) == keep and pruned.pe.depth == keep

    with torch.no_grad():  # bit-identical outputs of the kept blocks (tap and final norm)
        (tap,) = pruned.forward_intermediates(x, indices=take, intermediates_only=True)
        assert torch.equal(tap, taps[keep - 1])
        assert torch.equal(pruned.forward_features(x), early_final)

    # no parameter of a dropped block is left, and every remaining one gets a gradient (timm's contract)
    for name, _ in pruned.pe.named_parameters():
        idx = pruned.pe.block_param_index(name)
        assert not isinstance(idx, int) or idx < keep, name
    assert all(s < keep for s in pruned._embed_after)
    pruned.train()
    (tap,) = pruned.forward_intermediates(x, indices=take, intermediates_only=True)
    (tap.sum() + pruned.forward_features(x).sum()).backward()
    unused = [n for n, p in pruned.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused

    # the pruned model is a model of depth `keep`: its state dict loads strictly into a fresh one
    cfg = dict(pruned.pe_cfg)
    if "peg_blocks" in cfg:
        cfg["peg_blocks"] = pruned.pe.peg_blocks
    if cfg.get("peg_blocks") == ():
        assert not list(pruned.pe.parameters()) and not pruned._embed_after  # every PEG was after a pruned block
        return
    fresh = tiny(cfg, depth=keep, num_classes=0)
    fresh.load_state_dict(pruned.state_dict())
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}


def test_prune_through_features_only_leaves_no_unused_parameter():
    """timm's ``features_only`` wrapper prunes through ``prune_intermediate_layers``."""
    m = timm.create_model("vpe_vit_tiny_patch16_224", pe="irpe_qkv", img_size=64, features_only=True,
                          out_indices=(1,))
    assert len(m.model.pe.rpe_k) == len(m.model.pe.rpe_v) == 2 == len(m.model.blocks)
    (feat,) = m(torch.randn(1, 3, 64, 64))
    assert feat.shape == (1, 192, 4, 4)
    feat.sum().backward()
    assert not [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]


def test_prune_blocks_bad_depth():
    enc = visionpe.create_encoder("relpos_bias", dim=32, num_heads=2, depth=4, grid_size=(4, 3))
    for bad in (0, 5, True, 2.0):
        with pytest.raises(ValueError, match=r"depth \(blocks to keep\) must be an int in \[1, 4\]"):
            enc.prune_blocks(bad)
    assert len(enc.tables) == 4 and enc.depth == 4


class _PerBlockWithoutPruning(PositionEncoder):
    """A per-block table without a ``_prune_own_blocks`` override (what a third-party encoder may forget)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.scales = nn.ParameterList([nn.Parameter(torch.ones(1)) for _ in range(self.depth)])

    def block_param_index(self, name):
        return int(name.split(".")[1])


def test_prune_blocks_refuses_to_leave_per_block_state():
    enc = _PerBlockWithoutPruning(dim=8, num_heads=2, depth=3)
    with pytest.raises(NotImplementedError, match=r"scales\.1.*override _prune_own_blocks"):
        enc.prune_blocks(1)
    _PerBlockWithoutPruning(dim=8, num_heads=2, depth=3).prune_blocks(3)  # keeping every block is fine


# -- a new input size ---------------------------------------------------------------------------------------------
def changed_params(pe: str) -> set:
    """Parameters that ``set_grid_size`` resamples (the tabulated encoders); every other one is unchanged."""
    if pe == "relpos_bias":
        return {f"pe.tables.{i}" for i in range(DEPTH)}
    if pe in ("learned", "rope_axial_ape", "rope_mixed_ape"):
        return {"pe.pos_embed"}
    if pe.startswith("irpe"):
        return {"pe.ape.pos_embed"}
    if pe == "loope":
        return {"pe.context.linear.weight"}
    return set()


def check_resampled(pe: str, old: dict, new: dict, old_grid, new_grid) -> None:
    """The tables against independent references of the documented resampling."""
    for name in changed_params(pe):
        before, after = old[name], new[name]
        if name.startswith("pe.tables."):
            # Swin/BEiT (timm's resize_rel_pos_bias_table): offsets as an image, bicubic, align_corners=False,
            # no antialiasing; the three prefix rows kept
            (H, W), (h, w) = old_grid, new_grid
            img = before[:-3].t().reshape(1, -1, 2 * H - 1, 2 * W - 1)
            ref = F.interpolate(img, size=(2 * h - 1, 2 * w - 1), mode="bicubic", align_corners=False)
            ref = torch.cat([ref.reshape(ref.shape[1], -1).t(), before[-3:]])
        elif name.endswith("pos_embed"):
            # timm's own ViT resampling (bicubic, antialiased), prefix rows as the encoder lays them out
            prefix = before.shape[1] - old_grid[0] * old_grid[1]
            ref = resample_abs_pos_embed(before, list(new_grid), list(old_grid), num_prefix_tokens=prefix)
        else:
            ref = resample_square_operator(before, new_grid, old_grid)  # LOOPE's documented operator resampling
        assert after.shape == ref.shape and torch.equal(after, ref), name


@pytest.mark.parametrize("size", [(48, 40), (24, 16)], ids=["larger", "smaller"])
@pytest.mark.parametrize("pe", ENCODERS)
def test_set_input_size_every_encoder(pe, size):
    model = tiny(pe).eval()
    old = {k: v.clone() for k, v in model.named_parameters()}
    dynamic = tiny(pe, dynamic_img_size=True).eval()
    dynamic.load_state_dict(model.state_dict())
    old_grid, grid = (4, 3), (size[0] // 8, size[1] // 8)

    model.set_input_size(size)
    assert model.pe.grid_size == grid and tuple(model.patch_embed.grid_size) == grid
    new = dict(model.named_parameters())
    assert {k for k in old if new[k].shape != old[k].shape or not torch.equal(new[k], old[k])} == changed_params(pe)
    check_resampled(pe, old, new, old_grid, grid)

    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 5) and torch.isfinite(out).all()
        assert model.forward_features(x).shape == (2, 1 + grid[0] * grid[1], 32)
        (tap,) = model.forward_intermediates(x, indices=[DEPTH - 1], intermediates_only=True)
        assert tap.shape == (2, 32, *grid)
        # resampled once == resampled on the fly from the original weights (same helper, same numbers)
        torch.testing.assert_close(out, dynamic(x), rtol=1e-5, atol=1e-6)
    model.train()
    model(x).sum().backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("method", ["euc", "quant", "cross", "product"])
def test_irpe_buckets_are_clipped_on_any_grid(method):
    """iRPE needs no resampling: the piecewise index clips large offsets, so every grid uses the same buckets."""
    m = tiny({"name": "irpe", "method": method}).eval()
    nb = m.pe.num_buckets
    m.set_input_size((160, 56))             # 20 x 7, offsets far beyond the 4 x 3 training grid
    assert m.pe.num_buckets == nb == num_buckets(method, m.pe.ratio, 1)
    ids = bucket_ids(method, m.pe.ratio, (20, 7), 1)
    assert ids.min() >= 0 and ids.max() == nb - 1  # the prefix bucket is the last; no id beyond the table
    with torch.no_grad():
        assert torch.isfinite(m(torch.randn(1, 3, 160, 56))).all()


def test_set_grid_size_unchanged_keeps_parameters_and_rejects_3d():
    m = tiny("relpos_bias")
    tables = list(m.pe.tables)
    m.set_input_size(IMG)
    assert all(a is b for a, b in zip(tables, m.pe.tables))
    ape = tiny("learned")
    table = ape.pe.pos_embed
    ape.set_input_size(IMG)
    assert ape.pe.pos_embed is table
    for enc in (m.pe, ape.pe):
        with pytest.raises(ValueError, match="grid_size must have 2 axes"):
            enc.set_grid_size((2, 4, 3))
        assert enc.grid_size == (4, 3)


def test_resample_offset_table_bad_input_and_unchanged_grid():
    table = torch.randn(7 * 5 + 3, 2)                    # a 4 x 3 grid's offsets and three prefix rows
    assert resample_offset_table(table, (4, 3), (4, 3), num_extra_rows=3) is table
    assert resample_offset_table(table, (2, 6), (4, 3), num_extra_rows=3).shape == (3 * 11 + 3, 2)
    with pytest.raises(ValueError, match=r"table has 38 rows but old_grid \(3, 4\) has 35 offsets"):
        resample_offset_table(table, (6, 5), (3, 4), num_extra_rows=0)
    with pytest.raises(ValueError, match=r"table must be \(\(2h-1\)\(2w-1\) \+ extra rows, C\); got \(1, 38, 2\)"):
        resample_offset_table(table[None], (6, 5), (4, 3))
    with pytest.raises(ValueError, match="num_extra_rows must be an int >= 0"):
        resample_offset_table(table, (6, 5), (4, 3), num_extra_rows=-1)
    with pytest.raises(TypeError, match="square grids are never assumed"):
        resample_offset_table(table, 6, (4, 3), num_extra_rows=3)
