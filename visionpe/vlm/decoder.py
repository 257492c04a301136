"""A tiny self-contained decoder LLM (pure torch, no transformers) that runs any VLM position scheme
end to end: layout -> positions -> rotary tables -> attention (with CCA's mask where the scheme has one)
-> logits, plus greedy generation with a KV cache continuing at the scheme's decode positions.

>>> model = TinyVLMDecoder(vocab_size=100, dim=64, depth=2, num_heads=2, scheme="mrope", sections=(4, 6, 6))
>>> lay = VLMLayout([Text(4), Image(2, 3), Text(2)])
>>> logits = model(torch.randint(0, 100, (1, lay.length)), lay)       # (1, 12, 100)
>>> out = model.generate(torch.randint(0, 100, (1, lay.length)), lay, max_new_tokens=3)   # (1, 15)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layout import IMAGE, VIDEO, VLMLayout
from .positions import VLMPositions
from .schemes import vlm_positions
from .tables import apply_multimodal_rotary, rotary_cos_sin

__all__ = ["TinyVLMDecoder"]


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm1, self.norm2 = _RMSNorm(dim), _RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.up = nn.Linear(dim, 4 * dim, bias=False)
        self.gate = nn.Linear(dim, 4 * dim, bias=False)
        self.down = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        """x ``(B, n, D)``; cos/sin ``(B, n, hd/2)``; mask ``(B, 1, n, n_past + n)`` bool; cache (k, v) or None."""
        B, n, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = apply_multimodal_rotary(q, k, cos, sin)
        if cache is not None:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(att.transpose(1, 2).reshape(B, n, D))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h)), (k, v)


class TinyVLMDecoder(nn.Module):
    """A small pre-norm decoder (RMSNorm, SwiGLU, SDPA) whose rotary positions come from a VLM scheme.

    Args:
        vocab_size, dim, depth, num_heads: model size (``head_dim = dim / num_heads``; the defaults give
            head_dim 128, which every scheme's default frequency allocation fits).
        scheme: ``rope1d``, ``mrope``, ``vrope``, ``hope``, ``v2pe`` or ``cca``.
        theta: RoPE base (default: the scheme's).
        vision_dim: width of visual features given to :meth:`forward` (projected to ``dim``); default ``dim``.
        **scheme_options: passed to the scheme (the frequency allocation must fit ``head_dim``, e.g.
            ``sections=(4, 6, 6)`` for head_dim 32). A head_dim the allocation does not fit raises ``ValueError``.
    """

    def __init__(self, vocab_size: int = 256, dim: int = 256, depth: int = 2, num_heads: int = 2,
                 scheme: str = "mrope", theta: float | None = None, vision_dim: int | None = None,
                 **scheme_options):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim={dim} must split into num_heads={num_heads} heads of even size")
        self.head_dim = dim // num_heads
        self.scheme, self.scheme_options = scheme, dict(scheme_options)
        probe = vlm_positions(VLMLayout([("text", 1)]), scheme, **self.scheme_options)
        probe.allocation.axis_of_freq(self.head_dim // 2)  # fail at construction, not at the first forward
        self.theta = probe.theta if theta is None else float(theta)
        self.embed = nn.Embedding(vocab_size, dim)
        self.vision_proj = nn.Linear(vision_dim or dim, dim)
        self.blocks = nn.ModuleList(_Block(dim, num_heads) for _ in range(depth))
        self.norm = _RMSNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def positions(self, layout: VLMLayout) -> VLMPositions:
        return vlm_positions(layout, self.scheme, **self.scheme_options)

    def _embed(self, input_ids, layout, vision_features):
        x = self.embed(input_ids)
        if vision_features is None:
            return x
        types = layout.token_types()
        slots = ((types == IMAGE) | (types == VIDEO)).to(x.device)
        n = int(slots.sum())
        if vision_features.ndim != 2 or vision_features.shape[0] != n:
            raise ValueError(f"vision_features must be (num_vision_tokens, vision_dim) = ({n}, "
                             f"{self.vision_proj.in_features}) in layout order; got {tuple(vision_features.shape)}")
        return x.masked_scatter(slots[..., None], self.vision_proj(vision_features).to(x.dtype))

    def forward(self, input_ids: torch.Tensor, layout: VLMLayout, vision_features: torch.Tensor | None = None,
                *, positions: VLMPositions | None = None, return_cache: bool = False):
        """Logits ``(B, L, vocab)`` for a prompt described by ``layout`` (``input_ids`` ``(B, L)``).

        ``vision_features``: ``(num_vision_tokens, vision_dim)`` features that replace the embeddings of the
        image/video slots, in layout order. ``positions`` reuses precomputed scheme positions.
        """
        layout.check(*input_ids.shape)
        res = self.positions(layout) if positions is None else positions
        x = self._embed(input_ids, layout, vision_features)
        cos, sin = rotary_cos_sin(res.positions, res.allocation, self.head_dim, self.theta)
        cos, sin = cos.to(x.device, x.dtype), sin.to(x.device, x.dtype)
        real = res.padding_mask.to(x.device)
        if res.attention_mask is not None:  # CCA: causal on positions (includes padding)
            mask = res.attention_mask.to(x.device)
        else:  # causal on the sequence index; padded rows see themselves only (no all-masked row)
            L = input_ids.shape[1]
            causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
            mask = torch.where(real[:, :, None], causal & real[:, None, :], torch.eye(L, dtype=torch.bool,
                                                                                      device=x.device))
        cache = []
        for blk in self.blocks:
            x, kv = blk(x, cos, sin, mask[:, None], None)
            cache.append(kv)
        logits = self.head(self.norm(x))
        return (logits, (cache, real, res)) if return_cache else logits

    def _decode_step(self, tokens, state, past):
        cache, real, res = state
        x = self.embed(tokens)
        pos = res.decode_positions(tokens.shape[1], past)
        cos, sin = rotary_cos_sin(pos, res.allocation, self.head_dim, self.theta)
        cos, sin = cos.to(x.device, x.dtype), sin.to(x.device, x.dtype)
        real = torch.cat([real, torch.ones_like(tokens, dtype=torch.bool)], 1)
        mask = real[:, None, None, :]  # a new token sees every real earlier token (and itself)
        new_cache = []
        for blk, kv in zip(self.blocks, cache):
            x, kv = blk(x, cos, sin, mask, kv)
            new_cache.append(kv)
        return self.head(self.norm(x)), (new_cache, real, res)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, layout: VLMLayout, max_new_tokens: int = 8,
                 vision_features: torch.Tensor | None = None, return_logits: bool = False):
        """Greedy decoding with a KV cache; returns ``(B, L + max_new_tokens)`` token ids (and the step logits)."""
        logits, state = self(input_ids, layout, vision_features, return_cache=True)
        step_logits = [logits[:, -1]]
        out = [input_ids, logits[:, -1:].argmax(-1)]
        past = input_ids.shape[1]
        for _ in range(max_new_tokens - 1):
            logits, state = self._decode_step(out[-1], state, past)
            past += 1
            step_logits.append(logits[:, -1])
            out.append(logits[:, -1:].argmax(-1))
        tokens = torch.cat(out, 1)
        return (tokens, torch.stack(step_logits, 1)) if return_logits else tokens
