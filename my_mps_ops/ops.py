"""Functional API: thin wrappers over torch.ops.my_mps_ops."""

from typing import Optional, Tuple

import torch
from torch import Tensor

_ops = torch.ops.my_mps_ops


def rms_norm(input: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dimension: ``input * rsqrt(mean(input**2, -1) + eps) * weight``.

    Works on cpu and mps tensors of float32, float16 and bfloat16 (float32
    accumulation), supports autograd and torch.compile.
    """
    return _ops.rms_norm(input, weight, eps)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` in one pass (the SwiGLU of Llama MLPs); the backward
    recomputes the activation instead of saving it."""
    return _ops.swiglu(gate, up)


def geglu(gate: Tensor, up: Tensor, approximate: str = "none") -> Tensor:
    """``gelu(gate, approximate) * up`` in one pass; approximate is "none" (erf) or "tanh"."""
    return _ops.geglu(gate, up, approximate)


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6):
    """``h = x + residual; return rms_norm(h, weight, eps), h`` in one pass (the
    pre-norm residual stream of Llama blocks). Returns (out, residual_out)."""
    return _ops.fused_add_rms_norm(x, residual, weight, eps)


def layer_norm(input: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dimension, as ``F.layer_norm(input, (input.shape[-1],), weight, bias, eps)``."""
    return _ops.layer_norm(input, weight, bias, eps)


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = -100, label_smoothing: float = 0.0,
                  reduction: str = "mean") -> Tensor:
    """``F.cross_entropy(logits[N, V], target[N], ...)`` in one pass per row,
    keeping only a per-row log-sum-exp for the backward (no [N, V] float32
    intermediate). Out-of-range targets raise on cpu; on mps (no host sync)
    their rows' loss is NaN."""
    return _ops.cross_entropy(logits, target, ignore_index, label_smoothing, reduction)[0]


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                         ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                         logit_softcap: Optional[float] = None, z_loss: float = 0.0) -> Tensor:
    """``F.cross_entropy(logits, target, ...)`` with ``logits = hidden[N, H] @ weight[V, H].T + bias``, never
    holding the [N, V] logits: rows are taken in chunks, each chunk's logits made,
    reduced and (for the gradient) turned into d loss / d logits before the next.

    ``logit_softcap`` c applies Gemma 2's ``c * tanh(logits / c)`` first;
    ``z_loss`` adds ``z_loss * logsumexp(logits)**2`` to each counted row's loss
    (reduced like the loss: "mean" over the rows whose target is not
    ignore_index). The loss is float32 for float16 / bfloat16 inputs (their
    logits are upcast first, as transformers' ForCausalLMLoss does). Gradients
    for hidden, weight and bias, in their dtypes.
    """
    return _ops.linear_cross_entropy(hidden, weight, target, bias, ignore_index, label_smoothing, reduction,
                                     logit_softcap, z_loss)[0]


def quantized_linear(x: Tensor, qweight: Tensor, scales: Tensor, biases: Optional[Tensor] = None,
                     bias: Optional[Tensor] = None, bits: int = 4, group_size: int = 64, mode: str = "affine") -> Tensor:
    """``x @ W.T + bias`` with ``W = my_mps_ops.dequantize(qweight, scales, biases, bits, group_size, mode)``
    (computed in float32), never holding the whole float weight: for a few rows
    of x (decoding) fused kernels expand the codes where they are used, for more
    a tile of output rows is expanded at a time. The quantized weight is frozen;
    x and bias get gradients."""
    return _ops.quantized_linear(x, qweight, scales, biases, bias, group_size, bits, mode)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: Optional[float] = None,
                    window: Optional[Tuple[int, int]] = None, softcap: Optional[float] = None,
                    sinks: Optional[Tensor] = None) -> Tensor:
    """Fused attention ``softmax(scale * q @ k^T [masked]) @ v`` with memory linear in sequence length.

    Inputs are (batch, heads, seq, head_dim); k and v may have fewer heads than q
    (grouped-query attention: their head count must divide q's). Query and key
    lengths may differ; ``causal`` masks with the diagonal aligned to the bottom
    right (query i sees key j iff ``j <= i + k_len - q_len``, as
    ``torch.nn.attention.bias.causal_lower_right``; the same as
    ``F.scaled_dot_product_attention(is_causal=True)`` when the lengths are equal).
    ``window=(left, right)``: query i, aligned the same way at ``a = i + k_len - q_len``,
    sees keys ``a - left .. a + right`` (-1: unbounded on that side; with ``causal``
    the right bound is ``min(right, 0)``); a sliding window of ``w`` tokens
    including the query itself is ``window=(w - 1, 0)`` with ``causal=True``.
    ``softcap``: the scaled scores become ``softcap * tanh(scores / softcap)``
    before the softmax (None or 0: off). ``sinks``: a (q_heads,) tensor of
    per-head logits that join every row's softmax denominator without adding a
    value (gpt-oss's attention sinks); it receives a gradient.
    Rows that see no key give zeros. ``scale`` defaults to ``1/sqrt(head_dim)``.
    head_dim 32, 64, 80, 96, 128 or 256; float32, float16, bfloat16 (float64 on
    cpu). Supports autograd (FlashAttention-2 backward) and torch.compile.
    """
    left, right = (-1, -1) if window is None else window
    return _ops.flash_attention(q, k, v, causal, scale, int(left), int(right),
                                0.0 if softcap is None else float(softcap), sinks)[0]


def flash_attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, causal: bool = True,
                           scale: Optional[float] = None, window_left: int = -1, softcap: Optional[float] = None,
                           sinks: Optional[Tensor] = None, return_lse: bool = False):
    """Attention of a few new tokens per sequence against a preallocated KV cache (generation), forward only.

    ``q`` is (batch, q_heads, q_len, head_dim) with q_len small (1..16: the new
    tokens); ``k_cache`` / ``v_cache`` are (batch, kv_heads, cache_len,
    head_dim), kv_heads dividing q_heads (grouped-query attention, K/V never
    repeated), allocated once for the longest sequence and filled in place.
    ``cache_seqlens`` (batch,), int32 or int64 on q's device: only the first
    ``cache_seqlens[b]`` rows of sequence b are valid (the rest is never read,
    so it may hold anything), and the q_len new tokens are the last q_len of
    them, already written into the cache. So query i of sequence b sits at
    ``a = i + cache_seqlens[b] - q_len``: ``causal`` lets it see keys ``<= a``
    (bottom-right alignment per sequence), otherwise every valid key;
    ``window_left`` >= 0 also drops keys before ``a - window_left``;
    ``softcap`` and ``sinks`` as in :func:`flash_attention`. Rows that see no
    key give zeros. The key range is split into chunks computed in parallel
    and combined in a second pass (split-K), so one long sequence uses the
    whole device. Forward only: a backward through it raises (use
    :func:`flash_attention` for training). Returns ``out``, or ``(out, lse)``
    with ``return_lse``.
    """
    out, lse = _ops.flash_attention_decode(q, k_cache, v_cache, cache_seqlens, causal, scale, int(window_left),
                                           0.0 if softcap is None else float(softcap), sinks)
    return (out, lse) if return_lse else out


def flash_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, causal: bool = False,
                           scale: Optional[float] = None, window: Optional[Tuple[int, int]] = None,
                           softcap: Optional[float] = None, sinks: Optional[Tensor] = None,
                           return_lse: bool = False):
    """``flash_attention`` over packed sequences of different lengths (FlashAttention's varlen layout).

    q is (total_q, q_heads, head_dim), k and v (total_k, kv_heads, head_dim): the
    sequences back to back, sequence b being q rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]``
    and k/v rows ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]``. ``cu_seqlens_*`` are int32
    (batch + 1,) offsets from 0 to the totals, on q's device; ``max_seqlen_*`` bound the
    sequences' lengths. Each sequence is attended to on its own, exactly as
    ``flash_attention`` of it alone (causal and windows aligned bottom-right per
    sequence; a sequence may have no query or no key). Options as ``flash_attention``.
    Returns out (total_q, q_heads, head_dim), and with ``return_lse`` also lse
    (q_heads, total_q), float32 (float64 for float64 inputs), FlashAttention's layout.
    The offsets are read on the host (a sync on mps).
    """
    left, right = (-1, -1) if window is None else window
    out, lse = _ops.flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                           scale, int(left), int(right), 0.0 if softcap is None else float(softcap),
                                           sinks)
    return (out, lse) if return_lse else out


def rotary_embedding(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False, seq_dim: int = 1) -> Tensor:
    """Rotary position embedding of 4-D ``x``: (batch, seq, heads, head_dim) with
    ``seq_dim=1`` or (batch, heads, seq, head_dim) with ``seq_dim=2``.

    ``cos``/``sin`` are [seq, rot/2] (shared by the batch) or [batch, seq, rot/2];
    the first ``rot = 2 * cos.size(-1)`` elements of each head rotate, the rest
    pass through. ``interleaved=False`` pairs (i, i + rot/2) (GPT-NeoX / Llama),
    ``True`` pairs (2i, 2i+1) (GPT-J). cos and sin receive no gradient."""
    return _ops.rotary_embedding(x, cos, sin, interleaved, seq_dim)


def rotary_embedding_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False,
                        seq_dim: int = 1):
    """``rotary_embedding`` of q and k (k may have fewer heads) in one launch; returns (q, k)."""
    return _ops.rotary_embedding_qk(q, k, cos, sin, interleaved, seq_dim)
