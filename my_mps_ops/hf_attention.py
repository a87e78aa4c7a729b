"""``attn_implementation="my_mps_ops"`` for transformers models.

`register()` adds the name to transformers' attention-function registry (and
its mask registry, with SDPA's mask builder, which hands the attention function
no mask at all when the mask is plain causal). The attention function runs
my_mps_ops.flash_attention when that computes exactly what the model asks for
(causal, no mask or exactly a sliding-window mask, no dropout, no position
bias, a supported head_dim), with the model's sliding window, logit softcap
(Gemma 2) and attention sinks (gpt-oss's ``s_aux``) passed to the kernel, and
falls back otherwise: to the model's own eager attention when the call has a
softcap or sinks (transformers' SDPA function refuses softcap and ignores
sinks), to transformers' SDPA function for the rest. `stats` counts both, the
fallbacks by reason.

Decoding with a cache (transformers' cache classes; keys outnumber queries):
a single new token gets no mask (it sees every key); several new tokens get
an explicit causal mask offset by the cache length, which is checked to be
exactly the bottom-right causal mask (the kernels' alignment) and dropped. Up
to 16 new tokens without gradients run my_mps_ops.flash_attention_decode (the
keys split over the whole device, K/V read once per kv head); longer ones,
or ones that need gradients, flash_attention with causal=True. `stats.decode`
counts the decode calls (included in `stats.fused`).

transformers' ``sliding_window=w`` is a window of w tokens, the query
included: query i sees keys i - w < j <= i (masking_utils.py in transformers,
``sliding_window_overlay``: ``kv_idx > q_idx - sliding_window``, and'ed with
the causal mask), which is flash_attention's ``window=(w - 1, 0)`` with
``causal=True``. For a sliding layer whose keys outnumber the window,
transformers builds that mask even without padding (``_ignore_causal_mask_sdpa``
keeps it); it is checked to be exactly the window, aligned bottom-right as the
kernel aligns it, before the mask is dropped for the kernel's own window.

Packed sequences (several sequences in one row, as DataCollatorWithFlattening
builds them for padding-free training) run my_mps_ops.flash_attention_varlen,
found as transformers' flash-attention path finds them
(modeling_flash_attention_utils.py in transformers, ``_flash_attention_forward``):
the ``cu_seq_lens_q`` / ``cu_seq_lens_k`` / ``max_length_q`` / ``max_length_k``
keyword arguments when the call has all four (the rows of the batch flattened
into one packed sequence), or else, for a single row, ``position_ids`` that
restart: every position equal to the row's minimum starts a sequence
(``prepare_fa_kwargs_from_position_ids``). The mask transformers builds for them
(masking_utils.py: ``find_packed_sequence_indices``, causal and'ed with "same
sequence") is checked to be exactly the sequences' causal blocks (and sliding
window) before the kernel replaces it. Under torch.compile packed calls fall
back (reading the offsets would break the graph).
"""

from __future__ import annotations

import sys
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch

from . import ops

NAME = "my_mps_ops"
SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128, 256)
# Decoding steps of up to this many new tokens run flash_attention_decode.
DECODE_MAX_QUERIES = 16


@dataclass
class AttentionStats:
    fused: int = 0
    decode: int = 0  # of the fused calls, those run by flash_attention_decode
    packed: int = 0  # of the fused calls, those over packed sequences (flash_attention_varlen)
    fallbacks: Counter = field(default_factory=Counter)

    def reset(self) -> None:
        self.fused = 0
        self.decode = 0
        self.packed = 0
        self.fallbacks.clear()

    def __str__(self) -> str:
        reasons = ", ".join(f"{n} {r}" for r, n in self.fallbacks.most_common())
        return f"attention: {self.fused} fused calls, {sum(self.fallbacks.values())} fallbacks to SDPA or eager" + (
            f" ({reasons})" if reasons else "")


stats = AttentionStats()

# The last masks found to be (or not to be) a sliding window: every sliding
# layer of a forward pass gets the same mask tensor, so it is compared once.
_window_checks: dict = {}


def _sliding_window_mask(mask, q_len, k_len, window):
    """Whether boolean `mask` (batch or 1, 1, q_len, k_len) is, for every batch
    row, exactly the causal window of `window` tokens aligned bottom-right:
    query i sees keys j with i + k_len - q_len - window < j <= i + k_len - q_len
    (window None: no lower bound, the plain bottom-right causal mask of
    decoding several tokens against a cache)."""
    if (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1
            or tuple(mask.shape[-2:]) != (q_len, k_len)):
        return False
    if torch.compiler.is_compiling():  # comparing values would break the graph
        return False
    entry = _window_checks.get(window)
    if entry is not None and entry[0]() is mask and entry[1] == mask._version:
        return entry[2]
    aligned = torch.arange(q_len, device=mask.device)[:, None] + (k_len - q_len)
    key = torch.arange(k_len, device=mask.device)[None, :]
    expected = key <= aligned
    if window is not None:
        expected = expected & (key > aligned - window)
    result = bool(torch.equal(mask, expected.expand(mask.shape)))
    _window_checks[window] = (weakref.ref(mask), mask._version, result)
    return result


# The last packed-sequence check: every layer of a forward pass gets the same
# position_ids / cu_seq_lens and mask tensors, so they are read once.
_packed_checks: dict = {}


def _same_tensor(entry, t):
    if entry is None or t is None:
        return entry is None and t is None
    return entry[0]() is t and entry[1] == t._version


def _tensor_key(t):
    return None if t is None else (weakref.ref(t), t._version)


def _block_causal_mask(cu, total, window, device):
    """Boolean (total, total): query i sees key j iff both are in one sequence
    (cu: offsets), j <= i, and with a window of w tokens j > i - w."""
    index = torch.arange(total, device=device)
    seq = torch.searchsorted(cu[1:].to(device=device, dtype=torch.long), index, right=True)
    mask = (seq[:, None] == seq[None, :]) & (index[None, :] <= index[:, None])
    if window is not None:
        mask &= index[None, :] > index[:, None] - window
    return mask


def _find_packed(query, key, attention_mask, kwargs):
    """(cu_seqlens_q, cu_seqlens_k, max_q, max_k) when the call is packed
    sequences whose mask (if any) is exactly their causal blocks, else None."""
    batch, _, q_len, _ = query.shape
    names = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    given = [kwargs.get(n) for n in names]
    position_ids = kwargs.get("position_ids")
    if all(x is not None for x in given):
        cu_q, cu_k, max_q, max_k = given
        if attention_mask is not None and batch != 1:
            return None
    elif position_ids is None or batch != 1 or q_len in (0, 1) or key.shape[2] != q_len             or position_ids.numel() != q_len:
        return None
    else:
        cu_q = cu_k = None
    if torch.compiler.is_compiling():  # reading the offsets would break the graph
        return None
    window = kwargs.get("sliding_window")
    source = cu_q if cu_q is not None else position_ids
    entry = _packed_checks.get(window)
    if entry is not None and _same_tensor(entry[0], source) and _same_tensor(entry[1], attention_mask):
        return entry[2]
    result = None
    if cu_q is None:
        positions = position_ids.reshape(-1)
        starts = (positions == positions.min()).nonzero().view(-1)
        if starts.numel() > 1 and starts[0].item() == 0:  # a single sequence is the dense case
            cu_q = cu_k = torch.cat([starts, starts.new_tensor([q_len])]).to(torch.int32)
            max_q = max_k = cu_q.diff().max()
    if cu_q is not None:
        cu_q, cu_k = cu_q.to(device=query.device, dtype=torch.int32), cu_k.to(device=query.device, dtype=torch.int32)
        max_q, max_k = int(max_q), int(max_k)
        total_q, total_k = batch * q_len, key.shape[0] * key.shape[2]
        if int(cu_q[-1]) == total_q and int(cu_k[-1]) == total_k:
            result = (cu_q, cu_k, max_q, max_k)
        if result is not None and attention_mask is not None:
            expected = _block_causal_mask(cu_q, q_len, window, attention_mask.device) if total_q == total_k else None
            if not (expected is not None and attention_mask.dtype == torch.bool and attention_mask.dim() == 4
                    and tuple(attention_mask.shape[-2:]) == (q_len, q_len)
                    and torch.equal(attention_mask, expected.expand(attention_mask.shape))):
                result = None
    _packed_checks[window] = (_tensor_key(source), _tensor_key(attention_mask), result)
    return result


def _fallback_reason(module, query, key, attention_mask, dropout, is_causal, kwargs):
    q_len, k_len = query.shape[2], key.shape[2]
    window = kwargs.get("sliding_window")
    if attention_mask is not None and not _sliding_window_mask(attention_mask, q_len, k_len, window):
        return "explicit attention mask (padding or a non-causal pattern)"
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        return "not causal"
    if dropout:
        return "attention dropout"
    if kwargs.get("position_bias") is not None:
        return "position bias"
    if kwargs.get("output_attentions"):
        return "output_attentions"
    if attention_mask is None and q_len not in (1, k_len):
        # SDPA's is_causal aligns the diagonal top-left, the fused op bottom-right
        # (a sliding-window mask was checked to be bottom-right above).
        return "query shorter than the keys"
    if query.shape[-1] not in SUPPORTED_HEAD_DIMS or key.shape[-1] != query.shape[-1]:
        return f"head_dim {query.shape[-1]}"
    if query.shape[1] % key.shape[1] != 0:
        return "query heads not a multiple of key heads"
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16) and not (
            query.dtype == torch.float64 and query.device.type == "cpu"):
        return f"dtype {query.dtype}"
    sinks = _sinks_of(kwargs)
    if sinks is not None and (sinks.dim() != 1 or sinks.shape[0] != query.shape[1]):
        return "sinks not one per query head"
    return None


def _sinks_of(kwargs):
    sinks = kwargs.get("s_aux")
    return kwargs.get("sinks") if sinks is None else sinks


def _fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    if kwargs.get("softcap") is not None or _sinks_of(kwargs) is not None:
        # The model's eager attention implements its softcap / sinks; it adds
        # the mask to the scores, so a boolean mask becomes 0 / finfo.min.
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is not None:
            causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
            if attention_mask is None and causal and query.shape[2] > 1:
                # No mask stands for SDPA's is_causal (top-left); eager would attend everywhere.
                attention_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool,
                                            device=query.device).tril()
            if attention_mask is not None and attention_mask.dtype == torch.bool:
                attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                    ~attention_mask, torch.finfo(query.dtype).min)
            return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                      **kwargs):
    """transformers' attention-function signature: (batch, heads, seq, head_dim)
    inputs; returns (batch, seq, heads, head_dim) and no attention weights."""
    packed = _find_packed(query, key, attention_mask, kwargs)
    # A packed call's mask was checked to be its sequences' causal blocks.
    reason = _fallback_reason(module, query, key, None if packed else attention_mask, dropout, is_causal, kwargs)
    if reason is not None:
        stats.fallbacks[reason] += 1
        return _fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    stats.fused += 1
    window = kwargs.get("sliding_window")
    if packed is not None:
        stats.packed += 1
        batch, heads, q_len, head_dim = query.shape
        rows = lambda t: t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])
        out = ops.flash_attention_varlen(rows(query), rows(key), rows(value), *packed, causal=True, scale=scaling,
                                         window=None if window is None else (window - 1, 0),
                                         softcap=kwargs.get("softcap"), sinks=_sinks_of(kwargs))
        return out.view(batch, q_len, heads, head_dim), None
    q_len, k_len = query.shape[2], key.shape[2]
    sinks = _sinks_of(kwargs)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, value, sinks))
    if q_len <= DECODE_MAX_QUERIES and q_len < k_len and not needs_grad:
        # New tokens against the cache (the last q_len of the keys): split over the keys.
        stats.decode += 1
        lengths = torch.full((query.shape[0],), k_len, dtype=torch.int32, device=query.device)
        out = ops.flash_attention_decode(query, key, value, lengths, causal=True, scale=scaling,
                                         window_left=-1 if window is None else window - 1,
                                         softcap=kwargs.get("softcap"), sinks=sinks)
        return out.transpose(1, 2).contiguous(), None
    out = ops.flash_attention(query, key, value, causal=True, scale=scaling,
                              window=None if window is None else (window - 1, 0), softcap=kwargs.get("softcap"),
                              sinks=_sinks_of(kwargs))
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Registers ``attn_implementation="my_mps_ops"`` with transformers; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
