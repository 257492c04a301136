"""The HF hook (:func:`visionpe.vlm.attach_scheme`) on tiny local models: which route each scheme takes per
model family, prefill / ``generate`` / manual KV-cache decoding against full forwards, left-padded batches,
the CCA mask, native Qwen-VL models reproduced exactly, bad input. ``tools/test_compat.sh`` runs it against
every pinned transformers release (4.57.6, 5.23.0, 5.24.0)."""
import inspect

import pytest
import torch

from conftest import importorskip_or_fail

transformers = importorskip_or_fail("transformers")

from visionpe.vlm import (Image, Text, Video, VLMLayout, attach_scheme, hf_rope_inputs, tiny_causal_lm,  # noqa: E402
                          tiny_qwen_vl, vlm_positions)

HF_MAJOR = int(transformers.__version__.split(".")[0])
COMPAT = "transformers5" if HF_MAJOR >= 5 else "transformers4.57"
TOL = dict(rtol=1e-4, atol=1e-5)  # float32 logits of a 2-layer model, cached vs full computation


@pytest.fixture(scope="module")
def qwen2():
    return tiny_causal_lm("qwen2", head_dim=32)


# head_dim 32 -> 16 rotary frequencies: sections scaled down from the 64-frequency originals
HOOK_SCHEMES = {
    "rope1d": ("rope1d", {}),
    "mrope-qwen2vl": ("mrope", dict(variant="qwen2vl", sections=(4, 6, 6))),
    "mrope-qwen25vl": ("mrope", dict(variant="qwen25vl", sections=(4, 6, 6))),
    "mrope-qwen3vl": ("mrope", dict(variant="qwen3vl", sections=(6, 5, 5))),
    "vrope": ("vrope", {}),
    "hope": ("hope", dict(gamma=0.75, sections=(4, 6, 6))),
    "v2pe": ("v2pe", dict(delta=0.25)),
    "cca": ("cca", {}),
}
PLAIN_ROUTE = {"rope1d": "position_ids", "v2pe": "position_ids", "cca": "position_ids"}  # others: rotary
PROMPTS = [[Text(4), Image(3, 4), Text(2), Video(3, 2, 2, 1.5), Text(3)], [Text(2), Image(2, 3), Text(4)]]


def _ids(layout, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (layout.batch_size, layout.length), generator=g)
    return ids.masked_fill(~layout.padding_mask, 0), layout.padding_mask.long()


def _cache_kwarg(model):
    """The name under which this transformers release takes the KV cache (5.24 renamed it)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


@pytest.mark.parametrize("name", list(HOOK_SCHEMES))
def test_route_per_scheme_on_a_plain_decoder(qwen2, name):
    scheme, opts = HOOK_SCHEMES[name]
    with attach_scheme(qwen2, scheme, **opts) as hook:
        assert hook.family == "plain"
        assert hook.route == PLAIN_ROUTE.get(name, "rotary"), hook.route_reason


@pytest.mark.parametrize("route", ["position_ids", "rotary"])
def test_hook_rope1d_reproduces_the_model(qwen2, route):
    lay = VLMLayout(PROMPTS[0])
    ids, _ = _ids(lay)
    with torch.no_grad():
        ref = qwen2(ids).logits
        with attach_scheme(qwen2, "rope1d", route=route) as hook:
            hook.set_layout(lay)
            out = qwen2(ids).logits
        assert torch.equal(qwen2(ids).logits, ref)  # removed: the model is its old self
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheme,opts", [("v2pe", dict(delta=0.25)), ("cca", {})])
def test_both_routes_agree_for_1d_schemes(qwen2, scheme, opts):
    """Fractional V2PE positions through float position_ids equal our own rotary tables; so does CCA."""
    lay = VLMLayout(PROMPTS, padding_side="left")
    ids, mask = _ids(lay)
    outs = {}
    with torch.no_grad():
        for route in ("position_ids", "rotary"):
            with attach_scheme(qwen2, scheme, route=route, **opts) as hook:
                hook.set_layout(lay)
                outs[route] = qwen2(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(outs["position_ids"][real], outs["rotary"][real], rtol=1e-5, atol=1e-6)


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
    torch.testing.assert_close(torch.stack(out.logits, 1), full, **TOL)
    assert out.sequences.shape == (2, lay.length + new)
    assert res.positions.shape[1:] == (2, lay.length)
    real = mask.bool()
    torch.testing.assert_close(out.logits[0], mine[:, -1])  # the first generated token comes from the prefill
    if name != "rope1d":  # (rope1d is the baseline)
        assert (mine - base)[real].abs().max() > 1e-4  # the scheme really changes the model's output


@pytest.mark.parametrize("name", ["mrope-qwen2vl", "hope", "v2pe", "cca"])
def test_manual_kv_cache_decoding(qwen2, name):
    """Prefill, then one token at a time with the returned cache (passed back under this release's name);
    with and without an attention mask (the hook supplies the layout's padding mask)."""
    scheme, opts = HOOK_SCHEMES[name]
    lay = VLMLayout(PROMPTS, padding_side="left")
    ids, mask = _ids(lay)
    steps = torch.tensor([[5, 6, 7], [8, 9, 10]])
    key = _cache_kwarg(qwen2)
    with torch.no_grad(), attach_scheme(qwen2, scheme, **opts) as hook:
        hook.set_layout(VLMLayout(PROMPTS, padding_side="left"))
        for use_mask in (True, False):
            kw = dict(attention_mask=mask) if use_mask else {}
            out = qwen2(ids, use_cache=True, **kw)
            logits = [out.logits[:, -1]]
            cache, m = _returned_cache(out), mask
            for j in range(steps.shape[1]):
                m = torch.cat([m, torch.ones(2, 1, dtype=torch.long)], 1)
                kw = dict(attention_mask=m) if use_mask else {}
                out = qwen2(steps[:, j:j + 1], use_cache=True, **{key: cache}, **kw)
                logits.append(out.logits[:, -1])
                cache = _returned_cache(out)
            hook.set_layout(VLMLayout([p + [Text(steps.shape[1])] for p in PROMPTS], padding_side="left"))
            full = qwen2(torch.cat([ids, steps], 1), attention_mask=m).logits[:, lay.length - 1:]
            hook.set_layout(lay)
            torch.testing.assert_close(torch.stack(logits, 1), full, **TOL)


def test_cca_through_the_hook_is_position_ids_plus_a_4d_mask(qwen2):
    """The hook's CCA equals passing CCA's positions and its concentric mask (4-D, additive) by hand."""
    lay = VLMLayout(PROMPTS, padding_side="left")
    ids, mask = _ids(lay)
    res = vlm_positions(lay, "cca")
    additive = torch.zeros(res.attention_mask.shape).masked_fill(~res.attention_mask, torch.finfo(torch.float32).min)
    with torch.no_grad():
        by_hand = qwen2(ids, attention_mask=additive[:, None], position_ids=res.positions[0].long()).logits
        causal = qwen2(ids, attention_mask=mask, position_ids=res.positions[0].long()).logits
        with attach_scheme(qwen2, "cca") as hook:
            hook.set_layout(lay)
            ours = qwen2(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], by_hand[real], rtol=1e-5, atol=1e-6)
    assert (ours - causal)[real].abs().max() > 1e-4  # the concentric mask is not the causal one


# ---------------------------------------------------------------------------------------- Qwen-VL models
QWEN_SEQS = {
    "qwen3vl": [[Text(4), Image(3, 4), Text(3), Video(1, 2, 2), Text(3), Video(1, 2, 2), Text(2)],
                [Text(2), Image(2, 2), Text(4)]],
    "other": [[Text(4), Image(3, 4), Text(3), Video(3, 2, 2, 1.5), Text(2)], [Text(2), Image(2, 2), Text(4)]],
}
NATIVE_SECTIONS = {"qwen2vl": (2, 3, 3), "qwen25vl": (2, 3, 3), "qwen3vl": (4, 2, 2)}  # as tiny_qwen_vl builds them


def _qwen_inputs(model, variant, lay):
    """HF inputs for ``lay``, keeping only what this release's model takes (4.57 has no mm_token_type_ids)."""
    params = inspect.signature(model.model.forward).parameters
    inputs = {k: v for k, v in hf_rope_inputs(lay).items() if v is not None and k in params}
    if variant != "qwen25vl":
        inputs.pop("second_per_grid_ts", None)
    return inputs


@pytest.fixture(scope="module")
def qwen_vl_models():
    return {v: tiny_qwen_vl(v, causal_lm=True) for v in ("qwen2vl", "qwen25vl", "qwen3vl")}


@pytest.mark.parametrize("variant", ["qwen2vl", "qwen25vl", "qwen3vl"])
def test_hook_reproduces_native_qwen_vl_forward_and_generate(qwen_vl_models, variant):
    """Swapping a Qwen-VL model's own M-RoPE for ours (the installed release's compat mode) changes nothing:
    the position_ids route, on 4.57 as on 5.x."""
    model = qwen_vl_models[variant]
    lay = VLMLayout(QWEN_SEQS["qwen3vl" if variant == "qwen3vl" else "other"], padding_side="left")
    inputs = _qwen_inputs(model, variant, lay)
    gen = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        native = model(**inputs).logits
        native_gen = model.generate(**inputs, **gen)
        with attach_scheme(model, "mrope", variant=variant, compat=COMPAT, sections=NATIVE_SECTIONS[variant]) as hook:
            assert hook.route == "position_ids", hook.route_reason
            hook.set_layout(lay)
            ours = model(**inputs).logits
            ours_gen = model.generate(**inputs, **gen)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[real], native[real], rtol=1e-5, atol=1e-6)
    assert torch.equal(ours_gen.sequences, native_gen.sequences)
    torch.testing.assert_close(torch.stack(ours_gen.logits), torch.stack(native_gen.logits), rtol=1e-5, atol=1e-6)


OTHER_ON_QWEN = {  # head_dim 16 -> 8 frequencies
    "vrope": (("vrope", {}), "rotary"),
    "hope": (("hope", dict(gamma=1.5, sections=(2, 3, 3))), "rotary"),
    "v2pe": (("v2pe", dict(delta=0.5)), "position_ids"),
    "cca": (("cca", {}), "position_ids"),
    "mrope-foreign": (("mrope", None), "rotary"),  # the other family's sections / interleaving
}


@pytest.mark.parametrize("name", list(OTHER_ON_QWEN))
@pytest.mark.parametrize("variant", ["qwen2vl", "qwen3vl"])
def test_other_schemes_on_qwen_vl_generate_matches_a_full_forward(qwen_vl_models, variant, name):
    """Every scheme runs on native Qwen-VL models (4.57 hands per-axis (3, B, L, D) tables to its attention,
    5.x one (B, L, D) table): cached generate equals a full forward with the generated tokens appended."""
    (scheme, opts), route = OTHER_ON_QWEN[name]
    if opts is None:
        opts = dict(variant="qwen2vl", sections=(2, 3, 3)) if variant == "qwen3vl" else \
            dict(variant="qwen3vl", sections=(4, 2, 2))
    model = qwen_vl_models[variant]
    seqs = QWEN_SEQS["qwen3vl" if variant == "qwen3vl" else "other"]
    lay = VLMLayout(seqs, padding_side="left")
    inputs = _qwen_inputs(model, variant, lay)
    new = 3
    with torch.no_grad(), attach_scheme(model, scheme, **opts) as hook:
        assert hook.route == route, hook.route_reason
        hook.set_layout(lay)
        out = model.generate(**inputs, max_new_tokens=new, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        longer = VLMLayout([p + [Text(new - 1)] for p in seqs], padding_side="left")
        hook.set_layout(longer)
        ones = torch.ones(2, new - 1, dtype=torch.long)
        full_inputs = dict(inputs, input_ids=out.sequences[:, :-1],
                           attention_mask=torch.cat([inputs["attention_mask"], ones], 1))
        if "mm_token_type_ids" in full_inputs:
            full_inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"],
                                                          torch.zeros(2, new - 1, dtype=torch.long)], 1)
        full = model(**full_inputs).logits[:, lay.length - 1:]
    torch.testing.assert_close(torch.stack(out.logits, 1), full, **TOL)


def test_hook_bad_input(qwen2):
    with pytest.raises(ValueError, match=r"sections \(16, 24, 24\) sum to 64 rotary frequencies but head_dim=32"):
        attach_scheme(qwen2, "mrope", variant="qwen2vl")
    with pytest.raises(TypeError, match="no submodule with `rotary_emb` and `layers`"):
        attach_scheme(torch.nn.Linear(2, 2), "rope1d")
    with pytest.raises(ValueError, match=r"route='position_ids' is not possible: vrope has 4 position axes"):
        attach_scheme(qwen2, "vrope", route="position_ids")
    with pytest.raises(ValueError, match=r"route must be one of"):
        attach_scheme(qwen2, "vrope", route="cos")
    with attach_scheme(qwen2, "vrope") as hook:
        hook.set_layout(VLMLayout([Text(3), Image(2, 2)]))
        with pytest.raises(ValueError, match=r"shape \(1, 5\) but the layout describes 1 sequence\(s\) of 7"):
            qwen2(torch.ones(1, 5, dtype=torch.long))
        with pytest.raises(ValueError, match=r"batch of 3 but the layout describes 2 sequence"):
            hook.set_layout(VLMLayout([[Text(3)], [Text(2)]]))
            qwen2(torch.ones(3, 3, dtype=torch.long))
        hook.set_layout(VLMLayout([[Text(3)], [Text(2)]], padding_side="left"))
        with pytest.raises(ValueError, match=r"attention_mask disagrees with the layout's padding"):
            qwen2(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 3, dtype=torch.long))
        hook.set_layout(None)  # no layout: the hook stands aside
        with torch.no_grad():
            assert qwen2(torch.ones(1, 5, dtype=torch.long)).logits.shape == (1, 5, 300)


def test_scaled_rope_needs_the_position_ids_route():
    """The rotary route computes plain RoPE: a llama3-scaled model refuses it and names the route that works;
    1-D schemes still go through the model's own (scaled) rotary embedding."""
    model = tiny_causal_lm("llama", head_dim=32)
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
    if HF_MAJOR >= 5:
        model.model.config.rope_parameters = dict(scaling, rope_theta=10000.0)
    else:
        model.model.config.rope_scaling = scaling
    with pytest.raises(ValueError, match=r"rope_type='llama3'; the position_ids route keeps the model's scaling"):
        attach_scheme(model, "vrope")
    with attach_scheme(model, "v2pe", delta=0.5) as hook:
        assert hook.route == "position_ids"
