"""A tiny Llama-style decoder: pre-norm RMSNorm, rotary causal attention with
grouped-query heads, SwiGLU MLP. ``use_my_ops`` picks my_mps_ops kernels
(rms_norm, rotary_embedding_qk, flash_attention, swiglu, cross_entropy) or
plain PyTorch for the same weights (identical state_dict keys).

Generation (``TinyLlama.generate``, greedy) keeps a ``KVCache``: per layer a
K and a V tensor preallocated for the longest sequence, filled in place, and
per-sequence lengths. The prompt is prefilled with flash_attention; each new
token attends to the cache with flash_attention_decode (plain PyTorch: SDPA
with the explicit cache mask)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import my_mps_ops

from .. import nn as my_nn


@dataclass
class TinyLlamaConfig:
    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = 352
    max_seq_len: int = 128
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0


def rotary_tables(cfg: TinyLlamaConfig, device=None, dtype=torch.float32):
    head_dim = cfg.dim // cfg.n_heads
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """NeoX (half-split) rotation of x [batch, heads, seq, head_dim]; cos/sin are
    [seq, head_dim / 2] or per sequence [batch, seq, head_dim / 2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos = cos[None, None] if cos.dim() == 2 else cos[:, None]
    sin = sin[None, None] if sin.dim() == 2 else sin[:, None]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class KVCache:
    """Per layer K and V of (batch, kv_heads, max_len, head_dim), allocated once
    (zeros) and written in place, and ``seqlens`` (batch,) int32: how many
    rows of each sequence are valid. Rows past a sequence's length are never
    read by flash_attention_decode."""

    def __init__(self, cfg: TinyLlamaConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        head_dim = cfg.dim // cfg.n_heads
        shape = (batch, cfg.n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.seqlens = torch.zeros(batch, device=device, dtype=torch.int32)
        self.max_len = max_len
        self.prefilling = False  # set by TinyLlama.forward_cached for a prompt into an empty cache

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Stores k, v (batch, kv_heads, seq, head_dim) at rows ``positions`` (batch, seq)."""
        index = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.k[layer].scatter_(2, index, k.to(self.k[layer].dtype))
        self.v[layer].scatter_(2, index, v.to(self.v[layer].dtype))


def cache_attention_mask(seqlens: torch.Tensor, q_len: int, max_len: int) -> torch.Tensor:
    """[batch, 1, q_len, max_len] boolean: the new tokens are the last q_len of
    each sequence's seqlens[b] valid rows, each seeing the valid keys up to itself."""
    key = torch.arange(max_len, device=seqlens.device)
    position = seqlens.long()[:, None] - q_len + torch.arange(q_len, device=seqlens.device)  # [batch, q_len]
    return (key[None, None, :] <= position[:, :, None])[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig, use_my_ops: bool = False):
        super().__init__()
        self.use_my_ops = use_my_ops
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, positions=None, seqlens=None):
        if cache is not None:
            return self._forward_cached(x, cos, sin, cache, layer, positions, seqlens)
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.use_my_ops:
            # RoPE on q and k in one launch; grouped-query attention without repeating k and v.
            q, k = my_mps_ops.rotary_embedding_qk(q, k, cos[:s], sin[:s])
            out = my_mps_ops.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v, causal=True)
        else:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            q, k = apply_rotary(q, cos[:s], sin[:s]), apply_rotary(k, cos[:s], sin[:s])
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))

    def _forward_cached(self, x, cos, sin, cache, layer, positions, seqlens):
        """x holds each sequence's next tokens, at ``positions`` (batch, seq);
        ``seqlens`` are the cache lengths once they are written."""
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos[positions], sin[positions]  # per sequence: [batch, seq, head_dim / 2]
        if self.use_my_ops:
            q, k = my_mps_ops.rotary_embedding_qk(q, k, cos, sin)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        else:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        cache.write(layer, k, v, positions)
        if self.use_my_ops:
            if cache.prefilling:
                # The prompt into an empty cache: it attends to itself.
                out = my_mps_ops.flash_attention(q, k, v, causal=True)
            else:
                out = my_mps_ops.flash_attention_decode(q, cache.k[layer], cache.v[layer], seqlens)
        else:
            rep = self.n_heads // self.n_kv_heads
            kc = cache.k[layer].repeat_interleave(rep, dim=1)
            vc = cache.v[layer].repeat_interleave(rep, dim=1)
            mask = cache_attention_mask(seqlens, s, cache.max_len)
            out = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    """Plain PyTorch twin of my_mps_ops.nn.SwiGLU (same parameter names)."""

    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w_up = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w_down = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


def _norm(cfg: TinyLlamaConfig, use_my_ops: bool) -> nn.Module:
    cls = my_nn.RMSNorm if use_my_ops else nn.RMSNorm
    return cls(cfg.dim, eps=cfg.norm_eps)


class Block(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig, use_my_ops: bool):
        super().__init__()
        self.attn_norm = _norm(cfg, use_my_ops)
        self.attn = Attention(cfg, use_my_ops)
        self.mlp_norm = _norm(cfg, use_my_ops)
        self.mlp = my_nn.SwiGLU(cfg.dim, cfg.hidden_dim) if use_my_ops else SwiGLU(cfg)

    def forward(self, x, cos, sin, cache=None, layer=0, positions=None, seqlens=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, positions, seqlens)
        return x + self.mlp(self.mlp_norm(x))


class TinyLlama(nn.Module):
    """``activation_checkpointing=True``: in training with gradients on, each
    block runs under ``torch.utils.checkpoint`` (non-reentrant): its
    activations are recomputed in the backward pass instead of stored."""

    def __init__(self, cfg: TinyLlamaConfig = TinyLlamaConfig(), use_my_ops: bool = True,
                 activation_checkpointing: bool = False):
        super().__init__()
        self.cfg = cfg
        self.use_my_ops = use_my_ops
        self.activation_checkpointing = activation_checkpointing
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, use_my_ops) for _ in range(cfg.n_layers))
        self.norm = _norm(cfg, use_my_ops)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final normed hidden states, which lm_head projects to logits."""
        x = self.embed(tokens)
        checkpointed = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointed:
                x = torch.utils.checkpoint.checkpoint(block, x, self.rope_cos, self.rope_sin, use_reentrant=False)
            else:
                x = block(x, self.rope_cos, self.rope_sin)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(tokens))

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.cfg, batch, max_len, device=self.lm_head.weight.device, dtype=self.lm_head.weight.dtype)

    def forward_cached(self, tokens: torch.Tensor, cache: KVCache, prefill: bool = False) -> torch.Tensor:
        """Logits of `tokens` (batch, seq), the next tokens of each sequence in
        `cache`, which they are appended to. prefill=True: the cache is empty
        (the prompt attends to itself with flash_attention)."""
        s = tokens.shape[1]
        positions = cache.seqlens.long()[:, None] + torch.arange(s, device=tokens.device)
        seqlens = cache.seqlens + s
        x = self.embed(tokens)
        cache.prefilling = prefill
        for layer, block in enumerate(self.blocks):
            x = block(x, self.rope_cos, self.rope_sin, cache, layer, positions, seqlens)
        cache.prefilling = False
        cache.seqlens = seqlens
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, use_cache: bool = True,
                 max_cache_len: int | None = None) -> torch.Tensor:
        """Greedy decoding: `tokens` (batch, prompt_len) followed by
        max_new_tokens tokens, each the argmax of the last position's logits.
        use_cache=False recomputes the whole sequence every step (the
        reference); otherwise a KVCache of max_cache_len rows (default: the
        final length) is prefilled and extended one token per step."""
        total = tokens.shape[1] + max_new_tokens
        if total > self.cfg.max_seq_len:
            raise ValueError(f"generate: {total} tokens exceed max_seq_len {self.cfg.max_seq_len} (rotary tables)")
        out = tokens
        if not use_cache:
            for _ in range(max_new_tokens):
                out = torch.cat([out, self(out)[:, -1].argmax(-1, keepdim=True)], 1)
            return out
        cache = self.new_cache(tokens.shape[0], max_cache_len or total)
        logits = self.forward_cached(tokens, cache, prefill=True)
        for step in range(max_new_tokens):
            next_token = logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, next_token], 1)
            if step + 1 < max_new_tokens:
                logits = self.forward_cached(next_token, cache)
        return out

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy. With my_mps_ops the loss comes from the
        hidden states and lm_head's weight (linear_cross_entropy: the logits
        are never held); otherwise F.cross_entropy over the logits."""
        target = tokens[:, 1:].reshape(-1)
        if self.use_my_ops:
            hidden = self.hidden_states(tokens[:, :-1])
            return my_mps_ops.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, target)
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target)
