"""The tiny self-contained decoder: every scheme end to end, batches with padding, cached generation."""
import subprocess
import sys

import pytest
import torch

from visionpe.vlm import Image, Text, TinyVLMDecoder, Video, VLMLayout

# head_dim 32 -> 16 rotary frequencies: sections scaled down from the 64-frequency originals
SCHEMES = {
    "rope1d": ("rope1d", {}),
    "mrope-qwen2vl": ("mrope", dict(variant="qwen2vl", sections=(4, 6, 6))),
    "mrope-qwen25vl": ("mrope", dict(variant="qwen25vl", sections=(4, 6, 6))),
    "mrope-qwen3vl": ("mrope", dict(variant="qwen3vl", sections=(6, 5, 5))),
    "vrope": ("vrope", {}),
    "hope": ("hope", dict(gamma=1.5, sections=(4, 6, 6))),
    "v2pe": ("v2pe", dict(delta=0.25)),
    "cca": ("cca", {}),
}
PROMPTS = [[Text(3), Image(3, 4), Text(2), Video(2, 2, 3, 2.0), Text(2)], [Text(2), Image(2, 2), Text(3)]]
VOCAB = 97


def model_for(name, **kw):
    scheme, opts = SCHEMES[name]
    torch.manual_seed(0)
    return TinyVLMDecoder(vocab_size=VOCAB, dim=64, depth=2, num_heads=2, scheme=scheme, **opts, **kw).eval()


def ids_for(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (layout.batch_size, layout.length), generator=g).masked_fill(~layout.padding_mask, 0)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_padded_batch_rows_equal_single_sequences(name):
    """Left padding changes nothing: each row's logits equal those of the sequence run alone."""
    model = model_for(name)
    lay = VLMLayout(PROMPTS, padding_side="left")
    ids = ids_for(lay)
    with torch.no_grad():
        batch = model(ids, lay)
        for b, segs in enumerate(PROMPTS):
            single = VLMLayout(segs)
            keep = lay.padding_mask[b]
            alone = model(ids[b:b + 1, keep], single)
            torch.testing.assert_close(batch[b, keep], alone[0], rtol=1e-4, atol=1e-5)
    assert batch.shape == (2, lay.length, VOCAB) and bool(torch.isfinite(batch).all())


@pytest.mark.parametrize("name", list(SCHEMES))
def test_cached_generation_equals_full_forward(name):
    model = model_for(name)
    lay = VLMLayout(PROMPTS, padding_side="left")
    ids = ids_for(lay, seed=1)
    new = 4
    tokens, step_logits = model.generate(ids, lay, max_new_tokens=new, return_logits=True)
    longer = VLMLayout([p + [Text(new - 1)] for p in PROMPTS], padding_side="left")
    with torch.no_grad():
        full = model(tokens[:, :-1], longer)[:, lay.length - 1:]
    torch.testing.assert_close(step_logits, full, rtol=1e-4, atol=1e-5)
    assert torch.equal(tokens[:, lay.length:], full.argmax(-1))


def test_schemes_change_the_output_and_vision_features_are_used():
    lay = VLMLayout(PROMPTS, padding_side="right")
    ids = ids_for(lay)
    with torch.no_grad():
        outs = {n: model_for(n)(ids, lay) for n in ("rope1d", "mrope-qwen2vl", "vrope", "cca")}
        real = lay.padding_mask
        for n in ("mrope-qwen2vl", "vrope", "cca"):
            assert (outs[n] - outs["rope1d"])[real].abs().max() > 1e-3
        model = model_for("mrope-qwen2vl", vision_dim=8)
        n_vis = sum(s.num_tokens for seq in PROMPTS for s in seq if not isinstance(s, Text))
        feats = torch.randn(n_vis, 8)
        a = model(ids, lay, feats)
        b = model(ids, lay, feats * 2)
        assert (a - b)[real].abs().max() > 1e-4
        first_vision = 2  # both rows start with at least 2 text tokens
        torch.testing.assert_close(a[:, :first_vision], b[:, :first_vision])  # causal: text before is unaffected


def test_decoder_bad_input():
    model = model_for("mrope-qwen2vl")
    lay = VLMLayout([Text(3), Image(2, 2)])
    with pytest.raises(ValueError, match=r"input_ids has shape \(1, 5\) but the layout describes 1 sequence\(s\) of 7"):
        model(torch.zeros(1, 5, dtype=torch.long), lay)
    with pytest.raises(ValueError, match=r"vision_features must be \(num_vision_tokens, vision_dim\) = \(4, 64\)"):
        model(torch.zeros(1, 7, dtype=torch.long), lay, torch.zeros(3, 64))
    with pytest.raises(ValueError, match=r"sections \(16, 24, 24\) sum to 64 rotary frequencies but head_dim=32"):
        TinyVLMDecoder(dim=64, num_heads=2, scheme="mrope")
    with pytest.raises(ValueError, match="must split into num_heads=3 heads of even size"):
        TinyVLMDecoder(dim=64, num_heads=3, scheme="rope1d")


def test_decoder_runs_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import torch\n"
            "from visionpe.vlm import TinyVLMDecoder, VLMLayout, Text, Image\n"
            "m = TinyVLMDecoder(vocab_size=50, dim=32, depth=1, num_heads=2, scheme='vrope')\n"
            "lay = VLMLayout([Text(2), Image(2, 2), Text(1)])\n"
            "print(m.generate(torch.zeros(1, lay.length, dtype=torch.long), lay, max_new_tokens=2).shape)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch.Size([1, 9])"
