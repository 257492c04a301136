"""VLM position diagnostic data: the label rule on hand-built videos, the generator (balance, rule agreement,
no overlaps, determinism, cache) and the token / layout builder."""
import numpy as np
import pytest

from visionpe.eval.vlmdiag_data import (GROUPS, QUESTIONS, SLOTS, DataConfig, SplitSpec, Vocab, answers,
                                        generate_split, load_or_generate, majority_answers, tokens_and_layout)

Q = {q: i for i, q in enumerate(QUESTIONS)}


def _video(**cells):
    """One sample's objects ``(1, 10, 3)`` from ``NAME=(f, r, c)``; the other slots absent."""
    o = np.full((1, len(SLOTS), 3), -1)
    for name, frc in cells.items():
        o[0, SLOTS[name][0]] = frc
    return o


def _ans(T, grid=(4, 4), **cells):
    return dict(zip(QUESTIONS, answers(np.array([T]), grid, _video(**cells))[0].tolist()))


# -- the label rule on hand-built examples ----------------------------------------------------------------
def test_temporal_labels():
    assert _ans(4, O1=(0, 3, 3), O2=(2, 0, 0))["order"] == 0      # O1 in frame 0, O2 in frame 2: yes
    assert _ans(4, O1=(3, 0, 0), O2=(1, 0, 0))["order"] == 1      # no
    assert _ans(4, O1=(2, 0, 0), O2=(2, 1, 1))["order"] == -1     # same frame: no answer
    # half: T=4 -> frames 0, 1 first, 2, 3 second; T=5 -> 0, 1 first, 2 none, 3, 4 second
    assert [_ans(4, H=(f, 1, 1))["half"] for f in range(4)] == [0, 0, 1, 1]
    assert [_ans(5, H=(f, 1, 1))["half"] for f in range(5)] == [0, 0, -1, 1, 1]
    assert _ans(2, H=(0, 0, 0))["half"] == 0 and _ans(2, H=(1, 0, 0))["half"] == 1


def test_spatial_labels():
    a = _ans(3, S1=(1, 0, 0), S2=(1, 3, 2))          # S1 at column 0, S2 at column 2, different rows
    assert a["left_of"] == 0 and a["same_row"] == 1
    a = _ans(3, S1=(1, 2, 3), S2=(1, 2, 1))          # same row 2, S1 right of S2
    assert a["left_of"] == 1 and a["same_row"] == 0
    a = _ans(3, S1=(1, 0, 2), S2=(1, 3, 2))          # same column: left_of has no answer, rows differ
    assert a["left_of"] == -1 and a["same_row"] == 1
    a = _ans(3, S1=(0, 1, 0), S2=(2, 1, 3))          # different frames: neither is asked of such a pair
    assert a["left_of"] == -1 and a["same_row"] == -1
    # corner on 4x4: rows/cols 0-1 are top/left, 2-3 bottom/right
    assert [_ans(2, C=(0, r, c))["corner"] for r, c in [(0, 0), (1, 3), (2, 1), (3, 2)]] == [0, 1, 2, 3]
    # 5x5: the middle row or column has no nearest corner
    assert _ans(2, grid=(5, 5), C=(1, 2, 0))["corner"] == -1 and _ans(2, grid=(5, 5), C=(1, 0, 2))["corner"] == -1
    assert _ans(2, grid=(5, 5), C=(1, 3, 4))["corner"] == 3
    # non-square 2x6: row 1 is the bottom, column 2 the left half
    assert _ans(2, grid=(2, 6), C=(0, 1, 2))["corner"] == 2


def test_across_frame_labels():
    assert _ans(4, M1=(0, 2, 3), M2=(3, 2, 1))["hmove"] == 0       # same row, column 3 -> 1: left
    assert _ans(4, M1=(1, 0, 0), M2=(2, 0, 2))["hmove"] == 1       # right
    assert _ans(4, M1=(1, 3, 2), M2=(2, 3, 2))["hmove"] == 2       # same cell in a later frame: stayed
    assert _ans(4, M1=(1, 0, 0), M2=(2, 1, 2))["hmove"] == -1      # row changed: not a horizontal move
    assert _ans(4, M1=(2, 0, 0), M2=(1, 0, 2))["hmove"] == -1      # the end must come after the start
    assert _ans(4, V1=(0, 3, 1), V2=(1, 0, 1))["vmove"] == 0       # up
    assert _ans(4, V1=(0, 0, 1), V2=(3, 2, 1))["vmove"] == 1       # down
    assert _ans(4, V1=(0, 2, 1), V2=(3, 2, 1))["vmove"] == 2       # stayed
    assert _ans(4, V1=(0, 2, 1), V2=(3, 2, 0))["vmove"] == -1      # column changed


def test_absent_cells_have_no_answer():
    assert set(_ans(4).values()) == {-1}
    with pytest.raises(ValueError, match="objects must be"):
        answers(np.array([4]), (4, 4), np.zeros((1, 3, 3)))


# -- the generator ------------------------------------------------------------------------------------------
def test_generator_balanced_consistent_and_non_overlapping():
    cfg = DataConfig(distractors=2, text_before=(1, 5), text_after=(0, 3))
    a = generate_split(cfg, SplitSpec("train", (2, 6), (4, 5), 6000))
    n = 6000
    assert a["objects"].shape == (n, len(SLOTS) + 2, 3) and a["asked"].shape == (n, len(QUESTIONS))
    assert (np.sort(a["asked"], 1) == np.arange(len(QUESTIONS))).all()      # every question once per sample
    T = a["frames"].astype(int)
    assert T.min() == 2 and T.max() == 6
    assert a["text_before"].min() == 1 and a["text_before"].max() == 5 and a["text_after"].max() == 3
    np.testing.assert_array_equal(answers(T, (4, 5), a["objects"]), a["answers"])  # the rule agrees
    for qi, q in enumerate(QUESTIONS):  # balanced: every answer within 3 points of uniform
        counts = np.bincount(a["answers"][:, qi], minlength=len(QUESTIONS[q])) / n
        np.testing.assert_allclose(counts, 1 / len(QUESTIONS[q]), atol=0.03)
    o = a["objects"].astype(int)
    assert (o[..., 0] < T[:, None]).all() and (o[..., 1] < 4).all() and (o[..., 2] < 5).all() and (o >= 0).all()
    flat = (o[..., 0] * 4 + o[..., 1]) * 5 + o[..., 2]
    assert all(len(set(row)) == len(row) for row in flat.tolist())  # no two cells in the same place
    # a subset of questions places only their cells
    b = generate_split(DataConfig(questions=("corner",)), SplitSpec("t", 3, 4, 50))
    assert (b["asked"] == Q["corner"]).all()
    assert (b["objects"][:, SLOTS["C"][0], 0] >= 0).all() and (b["objects"][:, SLOTS["O1"][0]] == -1).all()


def test_determinism_and_cache(tmp_path):
    cfg, spec = DataConfig(seed=3), SplitSpec("val", (2, 4), 4, 64)
    a1, path, generated = load_or_generate(cfg, spec, tmp_path)
    assert generated and path.exists() and path.parent == tmp_path
    a2, path2, generated2 = load_or_generate(cfg, spec, tmp_path)
    assert not generated2 and path2 == path
    for k in a1:
        np.testing.assert_array_equal(a1[k], a2[k])
        np.testing.assert_array_equal(a1[k], generate_split(cfg, spec)[k])
    other = generate_split(DataConfig(seed=4), spec)
    assert not np.array_equal(other["objects"], a1["objects"])
    # splits with other names draw other samples from the same seed
    assert not np.array_equal(generate_split(cfg, SplitSpec("test", (2, 4), 4, 64))["objects"], a1["objects"])


def test_majority_answers():
    a = {"answers": np.array([[0, 1, -1, 0, 3, 2, 2], [1, 1, -1, 0, 3, 2, 0], [0, 0, -1, 1, 2, 1, 2]])}
    np.testing.assert_array_equal(majority_answers(a), [0, 1, -1, 0, 3, 2, 2])


def test_bad_configs_name_the_argument():
    with pytest.raises(ValueError, match="questions"):
        DataConfig(questions=("left_of", "colour"))
    with pytest.raises(ValueError, match="text_before"):
        DataConfig(text_before=(5, 2))
    with pytest.raises(TypeError, match="distractors"):
        DataConfig(distractors=1.5)
    with pytest.raises(ValueError, match="frames"):
        SplitSpec("x", (1, 4), 4, 10)           # order / moves need two frames
    with pytest.raises(ValueError, match="grid h"):
        SplitSpec("x", 4, (1, 4), 10)
    with pytest.raises(TypeError, match="grid"):
        SplitSpec("x", 4, "4x4", 10)
    with pytest.raises(ValueError, match="num_samples"):
        SplitSpec("x", 4, 4, 0)


# -- tokens and layout ---------------------------------------------------------------------------------------
def test_tokens_and_layout_by_hand():
    cfg = DataConfig(questions=("order", "corner"), text_before=(0, 2), text_after=(1, 1), filler=4)
    v = cfg.vocab
    T, (h, w) = np.array([2, 3]), (2, 2)
    objects = np.full((2, len(SLOTS), 3), -1)
    objects[0, SLOTS["O1"][0]], objects[0, SLOTS["O2"][0]], objects[0, SLOTS["C"][0]] = (1, 0, 1), (0, 1, 0), (0, 0, 0)
    objects[1, SLOTS["O1"][0]], objects[1, SLOTS["O2"][0]], objects[1, SLOTS["C"][0]] = (0, 0, 0), (2, 1, 1), (1, 1, 1)
    arr = {"frames": T, "objects": objects, "answers": answers(T, (h, w), objects),
           "asked": np.array([[Q["order"], Q["corner"]], [Q["corner"], Q["order"]]]),
           "text_before": np.array([2, 0]), "text_after": np.array([1, 1]),
           "filler_before": np.array([[3, 1], [0, 0]]), "filler_after": np.array([[2], [0]])}
    ids, layout, asked, target, qpos = tokens_and_layout(arr, [0, 1], (h, w), v)
    # sample 0: 2 filler, <vstart>, 8 video, <vend>, 1 filler, 2 x (question, answer) = 17; sample 1: 19
    assert ids.shape == (2, 19) and layout.length == 19
    assert layout.padding_mask[0].tolist() == [False] * 2 + [True] * 17 and layout.padding_mask[1].all()
    col = lambda s: v.colour0 + SLOTS[s][1]  # noqa: E731
    bg = Vocab.BACKGROUND
    assert ids[0, 2:].tolist() == [v.filler0 + 3, v.filler0 + 1, v.vstart,
                                   col("C"), bg, col("O2"), bg,          # frame 0: C at (0, 0), O2 at (1, 0)
                                   bg, col("O1"), bg, bg,                # frame 1: O1 at (0, 1)
                                   v.vend, v.filler0 + 2,
                                   v.question0 + Q["order"], v.answer0 + 1,    # O1 after O2: "no"
                                   v.question0 + Q["corner"], v.answer0 + 4]   # top_left
    assert ids[1, :3].tolist() == [v.vstart, col("O1"), bg]
    assert ids[1, 1 + 4 + 3].item() == col("C") and ids[1, 1 + 8 + 3].item() == col("O2")  # (1,1,1), (2,1,1)
    assert ids[1, 15:].tolist() == [v.question0 + Q["corner"], v.answer0 + 7, v.question0 + Q["order"], v.answer0]
    assert qpos.tolist() == [15, 17]
    assert target.tolist() == [[v.answer0 + 1, v.answer0 + 4], [v.answer0 + 7, v.answer0]]
    assert asked.tolist() == arr["asked"].tolist()
    # the layout's video segments sit exactly on the video tokens
    types = layout.token_types()
    assert (types[0, 5:13] == 2).all() and (types[0, 2:5] == 0).all() and (types[0, 13:] == 0).all()


def test_groups_cover_every_question_once():
    assert sorted(q for qs in GROUPS.values() for q in qs) == sorted(QUESTIONS)
