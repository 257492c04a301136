"""M-RoPE against HF transformers' own ``get_rope_index`` on random layouts (Qwen2-VL, Qwen2.5-VL, Qwen3-VL
models built from tiny local configs, no download). Runs when the optional ``transformers`` extra is
installed (``pip install visionpe[transformers]``; CI installs it)."""
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from visionpe.vlm import Image, Padding, Text, Video, VLMLayout, mrope_positions  # noqa: E402
from visionpe.vlm.hf import attach_scheme, hf_rope_inputs, tiny_qwen_vl  # noqa: E402

HF_MAJOR_MINOR = tuple(int(x) for x in transformers.__version__.split(".")[:2])
# which of our compat modes the installed transformers implements (spec vlm_rope.md section 1.5)
COMPAT = ("transformers5" if HF_MAJOR_MINOR >= (5, 0) else
          "transformers4.57" if HF_MAJOR_MINOR >= (4, 57) else "reference")


@pytest.fixture(scope="module")
def models():
    return {v: tiny_qwen_vl(v) for v in ("qwen2vl", "qwen25vl", "qwen3vl")}


def random_batch(g, cfg, variant, batch):
    """Our segments plus the HF inputs (input_ids with vision markers, mm_token_type_ids, grids)."""
    m = 2
    vs, ve = cfg.vision_start_token_id, 151653
    seqs, ids, types, images, videos, spg = [], [], [], [], [], []
    rnd = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    for _ in range(batch):
        segs, tok, typ = [], [], []

        def text(n, first=None, last=None):
            t = [1000 + rnd(0, 900) for _ in range(n)]
            if first is not None:
                t[0] = first
            if last is not None:
                t[-1] = last
            segs.append(Text(n))
            tok.extend(t)
            typ.extend([0] * n)

        def vision(kind, t, h, w):
            n = t * h * w
            segs.append(Image(h, w) if kind == 1 else Video(t, h, w, cur_spg))
            tok.extend([cfg.image_token_id if kind == 1 else cfg.video_token_id] * n)
            typ.extend([kind] * n)

        text(rnd(1, 4), last=vs)
        for i in range(rnd(1, 4)):
            kind, h, w = rnd(1, 3), rnd(1, 6), rnd(1, 6)
            if kind == 1:
                cur_spg = 1.0
                images.append([1, h * m, w * m])
                vision(1, 1, h, w)
            else:
                t = rnd(1, 6)
                cur_spg = [0.25, 0.5, 1.0, 1.5, 2.0, 2 / 3, 0.4][rnd(0, 7)]
                videos.append([t, h * m, w * m])
                spg.append(cur_spg)
                if variant == "qwen3vl":  # one block per frame, separated by timestamp text
                    for f in range(t):
                        if f:
                            text(4, first=ve, last=vs)
                        vision(2, 1, h, w)
                else:
                    vision(2, t, h, w)
            text(rnd(2, 5), first=ve, last=vs)
        seqs.append(segs)
        ids.append(tok)
        types.append(typ)
    L = max(len(t) for t in ids)
    pad = [L - len(t) for t in ids]
    input_ids = torch.tensor([[0] * p + t for p, t in zip(pad, ids)])
    mm = torch.tensor([[0] * p + t for p, t in zip(pad, types)])
    mask = torch.tensor([[0] * p + [1] * len(t) for p, t in zip(pad, ids)])
    grid = lambda x: torch.tensor(x, dtype=torch.int64).view(-1, 3) if x else None  # noqa: E731
    return seqs, dict(input_ids=input_ids, mm_token_type_ids=mm, image_grid_thw=grid(images),
                      video_grid_thw=grid(videos), attention_mask=mask,
                      second_per_grid_ts=torch.tensor(spg, dtype=torch.float32) if spg else None)


def hf_rope_index(model, variant, inputs):
    params = inspect.signature(model.get_rope_index).parameters
    kw = {k: v for k, v in inputs.items() if k in params and k != "input_ids"}
    if variant != "qwen25vl":
        kw.pop("second_per_grid_ts", None)
    return model.get_rope_index(inputs["input_ids"], **kw)


@pytest.mark.parametrize("variant", ["qwen2vl", "qwen25vl", "qwen3vl"])
def test_mrope_equals_hf_get_rope_index_on_random_layouts(models, variant):
    model = models[variant]
    g = torch.Generator().manual_seed(17)
    for trial in range(12):
        seqs, inputs = random_batch(g, model.config, variant, batch=1 + trial % 3)
        with torch.no_grad():
            hf_pos, hf_delta = hf_rope_index(model, variant, inputs)
        lay = VLMLayout(seqs, padding_side="left")
        ours = mrope_positions(lay, variant, compat=COMPAT)
        assert torch.equal(ours.positions.double(), hf_pos.double()), (variant, trial)
        # transformers 5 reports rope_deltas against the unpadded length, 4.x against the padded one
        ref_len = lay.padding_mask.sum(1) if COMPAT == "transformers5" else torch.full((lay.batch_size,), lay.length)
        assert torch.equal(ours.rope_delta + lay.length - ref_len, hf_delta.view(-1).double()), (variant, trial)
        # the same from the HF tensors, vectorised
        tensors = VLMLayout.from_token_types(inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                             inputs["video_grid_thw"], inputs["attention_mask"],
                                             inputs["second_per_grid_ts"], split_video_frames=variant == "qwen3vl")
        assert torch.equal(mrope_positions(tensors, variant, compat=COMPAT).positions.double(), hf_pos.double())


def test_reference_rule_differs_from_transformers5_only_after_long_videos(models):
    """The 5.x text resumption (base + max(h, w)) is the only difference for Qwen2-VL here."""
    seqs = [[Text(3), Video(6, 2, 2), Text(3)]]
    ref = mrope_positions(VLMLayout(seqs), "qwen2vl")
    hf5 = mrope_positions(VLMLayout(seqs), "qwen2vl", compat="transformers5")
    assert ref.positions[0, 0, -3].item() == 3 + 6 and hf5.positions[0, 0, -3].item() == 3 + 2
    img = [[Text(3), Image(3, 5), Text(3)]]
    assert torch.equal(mrope_positions(VLMLayout(img), "qwen2vl").positions,
                       mrope_positions(VLMLayout(img), "qwen2vl", compat="transformers5").positions)


# ---------------------------------------------------------------------------------------------- the hook
@pytest.fixture(scope="module")
def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return Qwen2ForCausalLM(cfg).eval()


# head_dim 32 -> 16 rotary frequencies: sections scaled down from the 64-frequency originals
HOOK_SCHEMES = {
    "mrope-qwen2vl": ("mrope", dict(variant="qwen2vl", sections=(4, 6, 6))),
    "mrope-qwen25vl": ("mrope", dict(variant="qwen25vl", sections=(4, 6, 6))),
    "mrope-qwen3vl": ("mrope", dict(variant="qwen3vl", sections=(6, 5, 5))),
    "vrope": ("vrope", {}),
    "hope": ("hope", dict(gamma=0.75, sections=(4, 6, 6))),
    "v2pe": ("v2pe", dict(delta=0.25)),
    "cca": ("cca", {}),
}
PROMPTS = [[Text(4), Image(3, 4), Text(2), Video(3, 2, 2, 1.5), Text(3)], [Text(2), Image(2, 3), Text(4)]]


def _ids(layout, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (layout.batch_size, layout.length), generator=g)
    return ids.masked_fill(~layout.padding_mask, 0), layout.padding_mask.long()


def test_hook_rope1d_reproduces_the_model(qwen2):
    lay = VLMLayout(PROMPTS[0])
    ids, _ = _ids(lay)
    with torch.no_grad():
        ref = qwen2(ids).logits
        with attach_scheme(qwen2, "rope1d") as hook:
            hook.set_layout(lay)
            out = qwen2(ids).logits
        assert torch.equal(qwen2(ids).logits, ref)  # removed: the model is its old self
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(HOOK_SCHEMES))
def test_hook_generate_matches_a_full_forward(qwen2, name):
    """Cached decoding (decode positions) equals recomputing the whole sequence with the generated tokens
    appended as text, for a left-padded batch; and the scheme really changes the model's output."""
    scheme, opts = HOOK_SCHEMES[name]
    lay = VLMLayout(PROMPTS, padding_side="left")
    ids, mask = _ids(lay)
    new = 3
    with torch.no_grad():
        with attach_scheme(qwen2, "rope1d") as plain:
            plain.set_layout(lay)
            base = qwen2(ids, attention_mask=mask).logits
        with attach_scheme(qwen2, scheme, **opts) as hook:
            res = hook.set_layout(lay)
            mine = qwen2(ids, attention_mask=mask).logits
            out = qwen2.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True, output_logits=True)
            longer = VLMLayout([p + [Text(new - 1)] for p in PROMPTS], padding_side="left")
            full_mask = torch.cat([mask, torch.ones(2, new - 1, dtype=torch.long)], 1)
            hook.set_layout(longer)
            full = qwen2(out.sequences[:, :-1], attention_mask=full_mask).logits[:, lay.length - 1:]
    torch.testing.assert_close(torch.stack(out.logits, 1), full, rtol=1e-4, atol=1e-5)
    assert out.sequences.shape == (2, lay.length + new)
    assert res.positions.shape[1:] == (2, lay.length)
    real = mask.bool()
    torch.testing.assert_close(out.logits[0], mine[:, -1])  # the first generated token comes from the prefill
    assert (mine - base)[real].abs().max() > 1e-4  # the scheme really changes the model's output


@pytest.mark.parametrize("variant", ["qwen2vl", "qwen25vl", "qwen3vl"])
def test_hook_reproduces_native_qwen_vl_forward_and_generate(variant):
    """Swapping a Qwen-VL model's own M-RoPE for ours (transformers-5 compat) changes nothing."""
    torch.manual_seed(0)
    model = tiny_qwen_vl(variant, causal_lm=True)
    if variant == "qwen3vl":
        seqs = [[Text(4), Image(3, 4), Text(3), Video(1, 2, 2), Text(3), Video(1, 2, 2), Text(2)],
                [Text(2), Image(2, 2), Text(4)]]
    else:
        seqs = [[Text(4), Image(3, 4), Text(3), Video(3, 2, 2, 1.5), Text(2)], [Text(2), Image(2, 2), Text(4)]]
    lay = VLMLayout(seqs, padding_side="left")
    inputs = {k: v for k, v in hf_rope_inputs(lay).items() if v is not None}
    if variant != "qwen25vl":
        inputs.pop("second_per_grid_ts", None)
    gen = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        native = model(**inputs).logits
        native_gen = model.generate(**inputs, **gen)
        secs = (4, 2, 2) if variant == "qwen3vl" else (2, 3, 3)  # as tiny_qwen_vl configures them
        with attach_scheme(model, "mrope", variant=variant, compat="transformers5", sections=secs) as hook:
            hook.set_layout(lay)
            ours = model(**inputs).logits
            ours_gen = model.generate(**inputs, **gen)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[real], native[real], rtol=1e-5, atol=1e-6)
    assert torch.equal(ours_gen.sequences, native_gen.sequences)
    torch.testing.assert_close(torch.stack(ours_gen.logits), torch.stack(native_gen.logits), rtol=1e-5, atol=1e-6)


def test_hook_bad_input(qwen2):
    with pytest.raises(ValueError, match=r"sections \(16, 24, 24\) sum to 64 rotary frequencies but head_dim=32"):
        attach_scheme(qwen2, "mrope", variant="qwen2vl")
    with pytest.raises(TypeError, match="no submodule with `rotary_emb` and `layers`"):
        attach_scheme(torch.nn.Linear(2, 2), "rope1d")
    with attach_scheme(qwen2, "vrope") as hook:
        hook.set_layout(VLMLayout([Text(3), Image(2, 2)]))
        with pytest.raises(ValueError, match=r"the prompt has shape \(1, 5\) but the layout describes 1 sequence\(s\) of 7"):
            qwen2(torch.ones(1, 5, dtype=torch.long))
        hook.set_layout(None)  # no layout: the model's own 1-D positions on every axis
        with torch.no_grad():
            assert qwen2(torch.ones(1, 5, dtype=torch.long)).logits.shape == (1, 5, 300)


def test_hf_rope_inputs_marks_vision_blocks():
    lay = VLMLayout([[Text(2), Image(1, 2), Text(1)], [Text(1), Video(2, 1, 1, 0.5), Padding(1)]])
    inp = hf_rope_inputs(lay, text_token_id=7)
    assert inp["input_ids"][0].tolist() == [7, 151652, 151655, 151655, 7]
    assert inp["input_ids"][1, :3].tolist() == [151652, 151656, 151656]
    assert inp["mm_token_type_ids"].tolist() == [[0, 0, 1, 1, 0], [0, 2, 2, 0, 0]]
    assert inp["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert inp["image_grid_thw"].tolist() == [[1, 2, 4]] and inp["video_grid_thw"].tolist() == [[2, 2, 2]]
    assert inp["second_per_grid_ts"].tolist() == [0.5]
