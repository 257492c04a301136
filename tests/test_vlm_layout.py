"""The VLM segment layout: construction, padding, HF-style token types, bad input."""
import pytest
import torch

from visionpe.vlm import Image, Padding, SegmentTable, Text, Video, VLMLayout, list_schemes, vlm_positions
from visionpe.vlm.layout import IMAGE, PAD, TEXT, VIDEO


def test_token_counts_and_shorthand():
    lay = VLMLayout([("text", 3), ("image", 2, 3), ("video", 2, 2, 2, 0.5), ("pad", 2), Text(1)])
    assert lay.length == 3 + 6 + 8 + 2 + 1 and lay.batch_size == 1
    tb = lay.table
    assert tb.kind.tolist() == [TEXT, IMAGE, VIDEO, PAD, TEXT]
    assert tb.n.tolist() == [3, 6, 8, 2, 1]
    assert tb.start.tolist() == [0, 3, 9, 17, 19]
    assert tb.seconds.tolist() == [1.0, 1.0, 0.5, 1.0, 1.0]
    assert lay.padding_mask.tolist() == [[True] * 17 + [False] * 2 + [True]]
    assert Image.tiled(16, 16, 2, 3).tiles == 7 and Image.tiled(16, 16, 1, 1).tiles == 1
    assert Image(2, 2, tiles=3).num_tokens == 12
    assert Video.at_fps(4, 2, 2, fps=4).seconds_per_frame == 0.5  # 2 frames per temporal step


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding(side):
    lay = VLMLayout([[Text(5), Image(2, 2)], [Text(3)]], padding_side=side)
    assert (lay.batch_size, lay.length) == (2, 9)
    row = lay.padding_mask[1].tolist()
    assert row == ([False] * 6 + [True] * 3 if side == "left" else [True] * 3 + [False] * 6)
    assert lay.token_types()[0].tolist() == [0] * 5 + [1] * 4
    assert VLMLayout([[Text(5)], [Text(3)]], length=7).length == 7
    lay.check(2, 9)
    with pytest.raises(ValueError, match=r"shape \(2, 8\).*2 sequence\(s\) of 9 tokens"):
        lay.check(2, 8)


def test_layout_is_hashable_and_compares_by_segments():
    a = VLMLayout([Text(2), Image(3, 4)])
    b = VLMLayout([("text", 2), ("image", 3, 4)])
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != VLMLayout([Text(2), Image(4, 3)])


@pytest.mark.parametrize("build, exc, match", [
    (lambda: Text(0), ValueError, r"Text.n must be >= 1; got 0"),
    (lambda: Image(2, 2.5), TypeError, r"Image.w must be an int"),
    (lambda: Video(2, 2, 2, seconds_per_frame=0), ValueError, r"seconds_per_frame must be a finite number > 0"),
    (lambda: Video.at_fps(2, 2, 2, fps=-1), ValueError, r"fps must be a finite number > 0"),
    (lambda: VLMLayout([Text(2)], padding_side="top"), ValueError, r"padding_side must be 'left' or 'right'"),
    (lambda: VLMLayout([[Text(9)], [Text(2)]], length=4), ValueError, r"length=4 is shorter than sequence 0, which has 9"),
    (lambda: VLMLayout([("audio", 3)]), ValueError, r"unknown segment kind 'audio'"),
    (lambda: VLMLayout([3]), TypeError, r"a segment must be Text, Image, Video, Padding"),
    (lambda: VLMLayout([]), ValueError, r"at least one sequence"),
])
def test_bad_segments(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


def hf_inputs(layout, merge=2):
    """HF-style tensors (mm_token_type_ids, grids, attention mask) describing ``layout``."""
    types = layout.token_types()
    mask = (types != PAD).long()
    images, videos, spg = [], [], []
    for seq in layout.sequences:
        for s in seq:
            if isinstance(s, Image):
                images.append([1, s.h * merge, s.w * merge])
            elif isinstance(s, Video):
                videos.append([s.t, s.h * merge, s.w * merge])
                spg.append(s.seconds_per_frame)
    as_t = lambda x: torch.tensor(x, dtype=torch.int64).view(-1, 3) if x else None  # noqa: E731
    return types.masked_fill(types == PAD, 0), as_t(images), as_t(videos), mask, torch.tensor(spg)


def random_sequence(g, vision_between_text=True):
    segs = [Text(int(torch.randint(1, 5, (1,), generator=g)))]
    for _ in range(int(torch.randint(0, 4, (1,), generator=g))):
        hw = torch.randint(1, 5, (2,), generator=g).tolist()
        if torch.rand((), generator=g) < 0.5:
            segs.append(Image(*hw))
        else:
            segs.append(Video(int(torch.randint(1, 5, (1,), generator=g)), *hw,
                              [0.5, 1.0, 1.5, 2.0][int(torch.randint(0, 4, (1,), generator=g))]))
        segs.append(Text(int(torch.randint(1, 5, (1,), generator=g))))
    return segs


SCHEME_KW = {"rope1d": {}, "mrope": {"variant": "qwen25vl"}, "vrope": {}, "hope": {"gamma": 0.75},
             "v2pe": {"delta": 0.25}, "cca": {}}


@pytest.mark.parametrize("side", ["left", "right"])
def test_from_token_types_matches_segment_layout(side):
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        lay = VLMLayout([random_sequence(g) for _ in range(3)], padding_side=side)
        types, imgs, vids, mask, spg = hf_inputs(lay)
        hf = VLMLayout.from_token_types(types, imgs, vids, mask, spg)
        assert torch.equal(hf.padding_mask, lay.padding_mask)
        for scheme in list_schemes():
            a = vlm_positions(lay, scheme, **SCHEME_KW[scheme])
            b = vlm_positions(hf, scheme, **SCHEME_KW[scheme])
            assert torch.equal(a.positions, b.positions), scheme
            assert torch.equal(a.rope_delta, b.rope_delta), scheme


def test_from_token_types_splits_qwen3_video_frames():
    # Qwen3-VL: a video grid row (t=2) stands for two one-frame runs separated by timestamp text
    lay = VLMLayout([Text(3), Video(1, 2, 3), Text(2), Video(1, 2, 3), Text(1)])
    types = lay.token_types()
    hf = VLMLayout.from_token_types(types, video_grid_thw=torch.tensor([[2, 4, 6]]), split_video_frames=True)
    assert torch.equal(vlm_positions(hf, "mrope", variant="qwen3vl").positions,
                       vlm_positions(lay, "mrope", variant="qwen3vl").positions)


def test_from_token_types_bad_input():
    types = torch.tensor([[0, 0, 1, 1, 1, 0]])
    # a segment whose token count doesn't match its grid: 3 image tokens, grid 1 x (4/2) x (4/2) = 4
    with pytest.raises(ValueError, match=r"image run 0 has 3 tokens but its grid \(1, 4, 4\) .* expects 4"):
        VLMLayout.from_token_types(types, image_grid_thw=torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match=r"image_grid_thw has 2 rows but mm_token_type_ids has 1 image runs"):
        VLMLayout.from_token_types(types, image_grid_thw=torch.tensor([[1, 2, 6], [1, 2, 2]]))
    with pytest.raises(ValueError, match=r"divisible by spatial_merge_size=2; row 0 is \(1, 3, 1\)"):
        VLMLayout.from_token_types(types, image_grid_thw=torch.tensor([[1, 3, 1]]))
    with pytest.raises(ValueError, match=r"must hold 0 \(text\), 1 \(image\) or 2 \(video\) per token .*"
                                         r"1 of 2 tokens hold other values: \[5\]"):
        VLMLayout.from_token_types(torch.tensor([[0, 5]]))
    with pytest.raises(TypeError, match=r"image_grid_thw must be an integer tensor; got dtype torch.float32"):
        VLMLayout.from_token_types(types, image_grid_thw=torch.tensor([[1.0, 2.5, 4.0]]))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(1, 6\)"):
        VLMLayout.from_token_types(types, torch.tensor([[1, 2, 6]]), attention_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match=r"second_per_grid_ts has 2 values but there are 1 videos"):
        VLMLayout.from_token_types(torch.tensor([[2, 2, 2]]), video_grid_thw=torch.tensor([[3, 2, 2]]),
                                   second_per_grid_ts=[1.0, 2.0], spatial_merge_size=2)
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        VLMLayout.from_token_types(torch.tensor([0, 1]))


def test_padding_segment_anywhere_does_not_advance():
    a = vlm_positions(VLMLayout([Text(3), Padding(2), Image(2, 2), Text(2)]), "mrope")
    b = vlm_positions(VLMLayout([Text(3), Image(2, 2), Text(2)]), "mrope")
    keep = a.padding_mask[0]
    assert torch.equal(a.positions[:, 0, keep], b.positions[:, 0])
    assert torch.equal(a.positions[:, 0, ~keep], torch.ones(3, 2))  # the reference fill value


def test_negative_grids_are_rejected_even_when_the_product_matches():
    """(-2, -4, 4) merges to -1 x -2 x 2 = 4 tokens: the token count matches, the grid is still invalid."""
    types = torch.tensor([[0, 1, 1, 1, 1, 0]])
    with pytest.raises(ValueError, match=r"image_grid_thw entries must be >= 1; row 0 is \(-2, -4, 4\)"):
        VLMLayout.from_token_types(types, image_grid_thw=torch.tensor([[-2, -4, 4]]))
    with pytest.raises(ValueError, match=r"video_grid_thw entries must be >= 1; row 1 is \(0, 2, 2\)"):
        VLMLayout.from_token_types(torch.tensor([[2, 2]]), video_grid_thw=torch.tensor([[2, 2, 2], [0, 2, 2]]),
                                   split_video_frames=True)
    # a table built by hand goes through the same check
    good = VLMLayout([Text(1), Image(2, 2)]).table
    with pytest.raises(ValueError, match=r"SegmentTable.h must be >= 1; segment 1 has -2"):
        SegmentTable(seq=good.seq, kind=good.kind, n=good.n, t=good.t, h=torch.tensor([1, -2]),
                     w=torch.tensor([1, -2]), tiles=good.tiles, seconds=good.seconds, batch_size=1, length=5)
    with pytest.raises(ValueError, match=r"vision segment 1 has n=4 tokens but its grid t\*tiles\*h\*w = 6"):
        SegmentTable(seq=good.seq, kind=good.kind, n=good.n, t=good.t, h=torch.tensor([1, 2]),
                     w=torch.tensor([1, 3]), tiles=good.tiles, seconds=good.seconds, batch_size=1, length=5)


def test_error_messages_never_quote_a_whole_tensor():
    """input_ids passed where token types are expected: a short message with a few values and the count."""
    ids = torch.randint(151000, 152000, (8, 4096))
    with pytest.raises(ValueError) as err:
        VLMLayout.from_token_types(ids)
    msg = str(err.value)
    assert len(msg) < 400, len(msg)
    assert "not input_ids" in msg and "32768 of 32768 tokens" in msg and "values)" in msg
    with pytest.raises(ValueError) as err:
        VLMLayout.from_token_types(torch.tensor([[0, 2, 2, 0]]), video_grid_thw=torch.tensor([[2, 2, 2]]),
                                   second_per_grid_ts=-torch.ones(1))
    assert str(err.value) == "second_per_grid_ts must be finite and > 0; got 1 bad value(s): [-1.0]"
    for bad in (lambda: Text(torch.arange(10 ** 5)), lambda: VLMLayout([list(range(10 ** 5))]),
                lambda: VLMLayout([("x" * 10 ** 5, 1)]), lambda: vlm_positions(VLMLayout([Text(2)]), "x" * 10 ** 5)):
        with pytest.raises((TypeError, ValueError)) as err:
            bad()
        assert len(str(err.value)) < 300, str(err.value)[:300]
