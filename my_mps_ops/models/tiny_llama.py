"""A tiny Llama-style decoder: pre-norm RMSNorm, rotary causal attention with
grouped-query heads, SwiGLU MLP. ``use_my_ops`` picks my_mps_ops kernels
(rms_norm, rotary_embedding_qk, flash_attention, swiglu, cross_entropy) or
plain PyTorch for the same weights (identical state_dict keys)."""

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
    """NeoX (half-split) rotation of x [batch, heads, seq, head_dim]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos = cos[None, None]
    sin = sin[None, None]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


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

    def forward(self, x, cos, sin):
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

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
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
