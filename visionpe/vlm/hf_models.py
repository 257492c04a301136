"""Tiny, randomly initialised HF models built from local configs (no download): a Qwen-VL model and a plain
Qwen2 / Llama decoder, for trying :func:`~visionpe.vlm.attach_scheme` without a checkpoint, for the tests and
for the ``visionpe bench vlm`` comparison with HF ``get_rope_index``.

The config keyword names differ between transformers releases (5.x: ``rope_parameters``; 4.x:
``rope_theta`` + ``rope_scaling``); these builders pass the right ones for the installed release.

>>> model = tiny_qwen_vl("qwen2vl", causal_lm=True)        # Qwen2VLForConditionalGeneration, head_dim 16
>>> llm = tiny_causal_lm("qwen2", head_dim=32)             # Qwen2ForCausalLM, 2 layers
"""
from __future__ import annotations

from .hf_compat import check_transformers_version, transformers_major

__all__ = ["tiny_qwen_vl", "tiny_causal_lm", "QWEN_VL_VARIANTS"]

QWEN_VL_VARIANTS = ("qwen2vl", "qwen25vl", "qwen3vl")


def _rope_kwargs(theta: float, **extra) -> dict:
    """Config keywords for RoPE base ``theta`` (+ M-RoPE ``extra``) under the installed release's names."""
    if transformers_major() >= 5:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": float(theta), **extra}}
    out = {"rope_theta": float(theta)}
    if extra:
        out["rope_scaling"] = {"rope_type": "default", **extra}
    return out


def tiny_qwen_vl(variant: str = "qwen2vl", *, head_dim: int = 16, sections=None, tokens_per_second: int = 2,
                 vocab_size: int = 152000, causal_lm: bool = False, seed: int | None = 0):
    """A randomly initialised tiny HF Qwen-VL model (1 text layer, 1 vision block), in eval mode.

    Args:
        variant: ``"qwen2vl"``, ``"qwen25vl"`` or ``"qwen3vl"``.
        head_dim: text attention head size (2 heads, 1 KV head, hidden size ``2 * head_dim``).
        sections: M-RoPE sections (sum ``head_dim / 2``); default ``(2, 3, 3)`` chunked / ``(4, 2, 2)``
            interleaved (Qwen3-VL) for ``head_dim = 16``.
        tokens_per_second: Qwen2.5-VL temporal scale (released checkpoints: 2).
        vocab_size: must exceed the Qwen special token ids (151652-151656).
        causal_lm: ``True``: the ``...ForConditionalGeneration`` class (LM head, ``generate``); else the base
            ``...Model``.
        seed: ``torch.manual_seed`` before initialising (None: leave the global generator alone).
    """
    import torch
    import transformers as tf
    check_transformers_version()
    if variant not in QWEN_VL_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {QWEN_VL_VARIANTS}")
    if sections is None:
        if head_dim != 16:
            raise ValueError(f"pass sections= (summing to head_dim / 2 = {head_dim // 2}) for head_dim={head_dim}")
        sections = (4, 2, 2) if variant == "qwen3vl" else (2, 3, 3)
    if sum(sections) * 2 != head_dim:
        raise ValueError(f"sections {tuple(sections)} sum to {sum(sections)} but head_dim={head_dim} needs "
                         f"{head_dim // 2} (head_dim / 2)")
    text = dict(hidden_size=2 * head_dim, intermediate_size=4 * head_dim, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=vocab_size, head_dim=head_dim)
    vis = dict(depth=1, hidden_size=32, out_hidden_size=2 * head_dim, intermediate_size=64, num_heads=2)
    mrope = {"mrope_section": list(sections)}
    if variant == "qwen2vl":
        cfg = tf.Qwen2VLConfig(text_config=dict(text, **_rope_kwargs(1e6, **mrope)),
                               vision_config=dict(depth=1, embed_dim=32, hidden_size=2 * head_dim, num_heads=2))
        cls = tf.Qwen2VLForConditionalGeneration if causal_lm else tf.Qwen2VLModel
    elif variant == "qwen25vl":
        vis25 = dict(vis, tokens_per_second=tokens_per_second, fullatt_block_indexes=[0])
        cfg = tf.Qwen2_5_VLConfig(text_config=dict(text, **_rope_kwargs(1e6, **mrope)), vision_config=vis25)
        cls = tf.Qwen2_5_VLForConditionalGeneration if causal_lm else tf.Qwen2_5_VLModel
    else:
        cfg = tf.Qwen3VLConfig(text_config=dict(text, **_rope_kwargs(5e6, mrope_interleaved=True, **mrope)),
                               vision_config=dict(vis, deepstack_visual_indexes=[]))
        cls = tf.Qwen3VLForConditionalGeneration if causal_lm else tf.Qwen3VLModel
    if seed is not None:
        torch.manual_seed(seed)
    return cls(cfg).eval()


def tiny_causal_lm(family: str = "qwen2", *, head_dim: int = 32, num_layers: int = 2, vocab_size: int = 300,
                   theta: float = 10000.0, seed: int | None = 0):
    """A randomly initialised tiny HF decoder LLM with an LM head (``Qwen2ForCausalLM`` or
    ``LlamaForCausalLM``), in eval mode: 2 heads of ``head_dim`` (1 KV head), hidden size ``2 * head_dim``."""
    import torch
    import transformers as tf
    check_transformers_version()
    classes = {"qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "llama": (tf.LlamaConfig, tf.LlamaForCausalLM)}
    if family not in classes:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(classes)}")
    config_cls, model_cls = classes[family]
    cfg = config_cls(vocab_size=vocab_size, hidden_size=2 * head_dim, intermediate_size=4 * head_dim,
                     num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim,
                     tie_word_embeddings=False, **_rope_kwargs(theta))
    if seed is not None:
        torch.manual_seed(seed)
    return model_cls(cfg).eval()
