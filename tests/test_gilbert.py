"""Gilbert (generalised Hilbert) curve: parity with the official LOOPE ranks, both entry variants, properties."""
import json
import os

import pytest
import torch

from visionpe.gilbert import VARIANTS, gilbert, gilbert_rank, nonunit_steps
from conftest import REFERENCE

with open(os.path.join(REFERENCE, "loope", "gilbert_orders.json")) as f:
    GRIDS = json.load(f)["grids"]


def _ref_path(h, w, variant):
    """Direct transcription of the recursion in the spec's prose (recursive, list-based), for cross-checks."""
    def sgn(v):
        return (v > 0) - (v < 0)

    def gen(x, y, ax, ay, bx, by):
        ww, hh = abs(ax + ay), abs(bx + by)
        dax, day, dbx, dby = sgn(ax), sgn(ay), sgn(bx), sgn(by)
        if hh == 1:
            return [(x + dax * i, y + day * i) for i in range(ww)]
        if ww == 1:
            return [(x + dbx * i, y + dby * i) for i in range(hh)]
        ax2, ay2, bx2, by2 = ax // 2, ay // 2, bx // 2, by // 2
        w2, h2 = abs(ax2 + ay2), abs(bx2 + by2)
        if 2 * ww > 3 * hh:
            if w2 % 2 and ww > 2:
                ax2, ay2 = ax2 + dax, ay2 + day
            return gen(x, y, ax2, ay2, bx, by) + gen(x + ax2, y + ay2, ax - ax2, ay - ay2, bx, by)
        if h2 % 2 and hh > 2:
            bx2, by2 = bx2 + dbx, by2 + dby
        return (gen(x, y, bx2, by2, ax2, ay2) + gen(x + bx2, y + by2, ax, ay, bx - bx2, by - by2)
                + gen(x + (ax - dax) + (bx2 - dbx), y + (ay - day) + (by2 - dby), -bx2, -by2, -(ax - ax2),
                      -(ay - ay2)))

    pts = gen(0, 0, 0, h, w, 0) if (variant == "branched" and w < h) else gen(0, 0, w, 0, 0, h)
    return torch.tensor([(y, x) for x, y in pts], dtype=torch.int64)


@pytest.mark.parametrize("key", sorted(GRIDS))
def test_matches_official_ranks_and_steps(key):
    ref = GRIDS[key]
    h, w = ref["H"], ref["W"]
    assert torch.equal(gilbert_rank(h, w), torch.tensor(ref["official_rank1"]))
    assert nonunit_steps(gilbert(h, w)) == ref["official_nonunit_steps"]
    # the branched (supplement/upstream) entry is stored only where it can differ (tall grids)
    branched = ref.get("branched_rank1", ref["official_rank1"])
    assert torch.equal(gilbert_rank(h, w, "branched"), torch.tensor(branched))
    if "branched_nonunit_steps" in ref:
        assert nonunit_steps(gilbert(h, w, "branched")) == ref["branched_nonunit_steps"]


def test_variants_differ_on_tall_grids_only():
    for key in ("H7_W5", "H14_W7", "H3_W2"):
        h, w = GRIDS[key]["H"], GRIDS[key]["W"]
        assert not torch.equal(gilbert_rank(h, w), gilbert_rank(h, w, "branched")), key
    # the branched entry is the official one run on the transposed grid
    assert torch.equal(gilbert_rank(14, 7, "branched"), gilbert_rank(7, 14).t())


def test_check_values_14x14():
    r = gilbert_rank(14, 14)
    assert r[0].tolist() == [1, 2, 15, 16, 17, 20, 21, 176, 177, 180, 181, 182, 195, 196]
    assert r[13].tolist() == [74, 75, 78, 79, 82, 83, 86, 87, 118, 119, 122, 123, 126, 127]
    p = gilbert(14, 14)
    assert p[0].tolist() == [0, 0] and p[-1].tolist() == [0, 13]
    assert gilbert_rank(14, 14, start=0).min() == 0 and torch.equal(gilbert_rank(14, 14, start=0) + 1, r)


@pytest.mark.parametrize("variant", VARIANTS)
def test_equals_spec_recursion_on_all_small_grids(variant):
    for h in range(1, 21):
        for w in range(1, 21):
            assert torch.equal(gilbert(h, w, variant), _ref_path(h, w, variant)), (h, w, variant)


def test_properties_and_diagonal_rule():
    # spec [V]: official entry has a diagonal step only when h is even and w is odd; never more than one;
    # branched entry: wide/square grids with even h and odd w, tall grids with odd h and even w
    for h in range(1, 25):
        for w in range(1, 25):
            p = gilbert(h, w)
            assert p[0].tolist() == [0, 0]
            assert torch.equal(torch.sort(p[:, 0] * w + p[:, 1]).values, torch.arange(h * w))
            n = nonunit_steps(p)
            assert n <= 1 and (n == 0 or (h % 2 == 0 and w % 2 == 1)), (h, w, n)
            nb = nonunit_steps(gilbert(h, w, "branched"))
            allowed = (h % 2 == 1 and w % 2 == 0) if w < h else (h % 2 == 0 and w % 2 == 1)
            assert nb <= 1 and (nb == 0 or allowed), (h, w, nb)
    assert nonunit_steps(gilbert(6, 9)) == 1 and nonunit_steps(gilbert(4, 3)) == 1
    assert nonunit_steps(gilbert(2, 3)) == 0


def test_large_grid_and_results_are_copies():
    p = gilbert(96, 160)  # 1536x2560 pixels at patch 16
    assert p.shape == (96 * 160, 2)
    assert int((p[1:] - p[:-1]).abs().sum(1).max()) <= 2
    p[:] = -1  # the cache must not be affected
    assert gilbert(96, 160)[0].tolist() == [0, 0]


@pytest.mark.parametrize("h, w", [(0, 5), (5, 0), (-1, 3), (0, 0)])
def test_empty_grid_raises(h, w):
    with pytest.raises(ValueError, match="non-empty"):
        gilbert(h, w)
    with pytest.raises(ValueError, match="non-empty"):
        gilbert_rank(h, w)


def test_bad_arguments():
    with pytest.raises(TypeError, match="h must be an int"):
        gilbert(2.5, 3)
    with pytest.raises(TypeError, match="w must be an int"):
        gilbert(3, True)
    with pytest.raises(ValueError, match="variant must be one of"):
        gilbert(3, 3, "upstream")
    with pytest.raises(TypeError, match="start must be an int"):
        gilbert_rank(3, 3, start=1.0)
    with pytest.raises(ValueError, match=r"\(K, 2\)"):
        nonunit_steps(torch.zeros(4, 3, dtype=torch.int64))
