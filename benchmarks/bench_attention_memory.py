"""Peak memory of attention, forward + backward, against sequence length: every
flash_attention feature (causal, sliding window, softcap, sinks, packed
variable-length sequences) next to F.scaled_dot_product_attention given the
equivalent explicit mask (and, for softcap and sinks, which SDPA has no
argument for, the same scores formed explicitly), on the CPU.

    python benchmarks/bench_attention_memory.py [--lengths 1024,2048,4096,8192] [--heads 4] [--head-dim 64]

Peak memory is my_mps_ops.memory.peak_allocated_mb: the most memory allocated at
once during the call above what existed before (inputs and the upstream
gradient are made before). Ours should grow linearly with the length (the
inputs, outputs and gradients are O(L)); an explicit mask and the scores are
O(L^2). Prints one table; a second column per length gives the ratio.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

import my_mps_ops
from my_mps_ops.memory import peak_allocated_mb

WINDOW = 256
SOFTCAP = 30.0


def explicit_mask(length: int, window: int | None) -> torch.Tensor:
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    keep = j <= i
    if window is not None:
        keep &= j >= i - window
    return keep


def reference(q, k, v, mask, softcap=None, sinks=None):
    """SDPA with the explicit mask; softcap / sinks through explicit scores (SDPA has no argument for them)."""
    if softcap is None and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.view(1, -1, 1, 1).expand(*s.shape[:3], 1)], -1)
    return torch.softmax(s, -1)[..., :k.shape[2]] @ v


def measure(fn, inputs) -> float:
    leaves = [t.detach().requires_grad_() for t in inputs]
    with torch.no_grad():
        grad = torch.randn_like(fn(*leaves))
    return peak_allocated_mb(lambda: fn(*leaves).backward(grad))


def cases(length: int, heads: int, head_dim: int):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, head_dim, generator=g) for _ in range(3))
    sinks = torch.randn(heads, generator=g)
    causal = explicit_mask(length, None)
    windowed = explicit_mask(length, WINDOW)
    yield ("causal", lambda q, k, v: my_mps_ops.flash_attention(q, k, v, causal=True),
           lambda q, k, v: reference(q, k, v, causal), (q, k, v))
    yield (f"window {WINDOW}", lambda q, k, v: my_mps_ops.flash_attention(q, k, v, causal=True, window=(WINDOW, 0)),
           lambda q, k, v: reference(q, k, v, windowed), (q, k, v))
    yield (f"softcap {SOFTCAP:g}", lambda q, k, v: my_mps_ops.flash_attention(q, k, v, causal=True, softcap=SOFTCAP),
           lambda q, k, v: reference(q, k, v, causal, softcap=SOFTCAP), (q, k, v))
    yield ("sinks", lambda q, k, v, s: my_mps_ops.flash_attention(q, k, v, causal=True, sinks=s),
           lambda q, k, v, s: reference(q, k, v, causal, sinks=s), (q, k, v, sinks))
    # Packed: four sequences of length / 4 in one row; SDPA gets the block-diagonal causal mask.
    n = length // 4
    lengths = [n, n, n, length - 3 * n]
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    block = torch.zeros(length, length, dtype=torch.bool)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        block[a:b, a:b] = explicit_mask(b - a, None)
    packed = lambda t: t[0].transpose(0, 1)  # (total, heads, head_dim)
    yield ("varlen (4 sequences)",
           lambda q, k, v: my_mps_ops.flash_attention_varlen(packed(q), packed(k), packed(v), cu, cu, max(lengths),
                                                             max(lengths), causal=True),
           lambda q, k, v: reference(q, k, v, block), (q, k, v))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,2048,4096,8192")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = {}
    for length in lengths:
        for name, ours, theirs, inputs in cases(length, args.heads, args.head_dim):
            rows.setdefault(name, {})[length] = (measure(ours, inputs), measure(theirs, inputs))
    print(f"peak memory of forward+backward, MiB (ours / SDPA with the explicit mask; batch 1, {args.heads} heads, "
          f"head_dim {args.head_dim}, float32, cpu)")
    print("| feature | " + " | ".join(f"L={n}" for n in lengths) + " |")
    print("|---|" + "---:|" * len(lengths))
    for name, per_length in rows.items():
        cells = [f"{a:.0f} / {b:.0f} ({a / b:.2f}x)" for a, b in (per_length[n] for n in lengths)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
