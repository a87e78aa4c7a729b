"""``attn_implementation="my_mps_ops"`` for transformers models.

`register()` adds the name to transformers' attention-function registry (and
its mask registry, with SDPA's mask builder, which hands the attention function
no mask at all when the mask is plain causal). The attention function runs
my_mps_ops.flash_attention when that computes exactly what the model asks for
(causal, no mask, no dropout, sliding window, softcap, sinks or position bias,
a supported head_dim) and falls back to transformers' SDPA function otherwise;
`stats` counts both, the fallbacks by reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from . import ops

NAME = "my_mps_ops"
SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128, 256)


@dataclass
class AttentionStats:
    fused: int = 0
    fallbacks: Counter = field(default_factory=Counter)

    def reset(self) -> None:
        self.fused = 0
        self.fallbacks.clear()

    def __str__(self) -> str:
        reasons = ", ".join(f"{n} {r}" for r, n in self.fallbacks.most_common())
        return f"attention: {self.fused} fused calls, {sum(self.fallbacks.values())} SDPA fallbacks" + (
            f" ({reasons})" if reasons else "")


stats = AttentionStats()


def _fallback_reason(module, query, key, attention_mask, dropout, is_causal, kwargs):
    if attention_mask is not None:
        return "explicit attention mask (padding or a non-causal pattern)"
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        return "not causal"
    if dropout:
        return "attention dropout"
    for key_name, what in (("sliding_window", "sliding window"), ("softcap", "softcap"), ("s_aux", "attention sinks"),
                           ("sinks", "attention sinks"), ("position_bias", "position bias")):
        if kwargs.get(key_name) is not None:
            return what
    if kwargs.get("output_attentions"):
        return "output_attentions"
    q_len, k_len = query.shape[2], key.shape[2]
    if q_len not in (1, k_len):
        # SDPA's is_causal aligns the diagonal top-left, the fused op bottom-right.
        return "query shorter than the keys"
    if query.shape[-1] not in SUPPORTED_HEAD_DIMS or key.shape[-1] != query.shape[-1]:
        return f"head_dim {query.shape[-1]}"
    if query.shape[1] % key.shape[1] != 0:
        return "query heads not a multiple of key heads"
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16) and not (
            query.dtype == torch.float64 and query.device.type == "cpu"):
        return f"dtype {query.dtype}"
    return None


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                      **kwargs):
    """transformers' attention-function signature: (batch, heads, seq, head_dim)
    inputs; returns (batch, seq, heads, head_dim) and no attention weights."""
    reason = _fallback_reason(module, query, key, attention_mask, dropout, is_causal, kwargs)
    if reason is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        stats.fallbacks[reason] += 1
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    stats.fused += 1
    out = ops.flash_attention(query, key, value, causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Registers ``attn_implementation="my_mps_ops"`` with transformers; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
