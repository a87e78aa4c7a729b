"""flash_attention_varlen vs the dense flash_attention run once per sequence, on
this machine's CPU: forward+backward time over packed sequences of different
lengths, ratios from one run (the fastest of --repeats timed steps after a
warm-up, both implementations in the same process, alternating step by step).

    python benchmarks/bench_flash_attention_varlen.py           # 8 sequences of 128..1024 tokens, 8 heads, head_dim 64
    python benchmarks/bench_flash_attention_varlen.py --quick   # 4 sequences of 32..128

The per-sequence baseline starts from the same packed (total, heads, head_dim)
tensors, as a caller without a varlen kernel would: it slices each sequence,
views it as (1, heads, len, head_dim), runs flash_attention and concatenates
the outputs. Target: varlen at least 1.0x (speedup = per-sequence time /
varlen time).
"""

import argparse
import time

import torch

import my_mps_ops


def make(lengths, heads, kv_heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, heads, head_dim, generator=g).to(dtype).requires_grad_()
    k = torch.randn(total, kv_heads, head_dim, generator=g).to(dtype).requires_grad_()
    v = torch.randn(total, kv_heads, head_dim, generator=g).to(dtype).requires_grad_()
    cu = torch.tensor([0] + list(lengths)).cumsum(0).to(torch.int32)
    grad_out = torch.randn(total, heads, head_dim, generator=g).to(dtype)
    return q, k, v, cu, grad_out


def varlen_step(q, k, v, cu, max_len, causal, grad_out):
    out = my_mps_ops.flash_attention_varlen(q, k, v, cu, cu, max_len, max_len, causal)
    out.backward(grad_out)


def per_sequence_step(q, k, v, cu, max_len, causal, grad_out):
    bounds = cu.tolist()
    dense = lambda t, a, b: t[a:b].transpose(0, 1).unsqueeze(0)
    outs = [my_mps_ops.flash_attention(dense(q, a, b), dense(k, a, b), dense(v, a, b), causal)[0].transpose(0, 1)
            for a, b in zip(bounds[:-1], bounds[1:])]
    torch.cat(outs, 0).backward(grad_out)


def timed_pair(steps, args, repeats):
    """The fastest of `repeats` timed runs of each step, after a warm-up, the
    steps alternating run by run so that a busy neighbour slows both alike."""
    q, k, v = args[:3]
    best = [float("inf")] * len(steps)
    for i in range(repeats + 1):  # the first round is the warm-up
        for j, step in enumerate(steps):
            for t in (q, k, v):
                t.grad = None
            start = time.perf_counter()
            step(*args)
            if i:
                best[j] = min(best[j], time.perf_counter() - start)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [32, 64, 96, 128] if args.quick else [128, 256, 384, 512, 640, 768, 896, 1024]
    heads, kv_heads, head_dim = 8, 8, 64
    print(f"CPU, {torch.get_num_threads()} threads, sequences {lengths}, {heads} heads "
          f"({kv_heads} k/v heads), head_dim {head_dim}, forward+backward, fastest of {args.repeats}")
    print("| dtype | causal | varlen ms | per-sequence ms | speedup |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for causal in (True, False):
            problem = make(lengths, heads, kv_heads, head_dim, dtype)
            q, k, v, cu, grad_out = problem
            call = (q, k, v, cu, max(lengths), causal, grad_out)
            # the same values and gradients, so that the two time the same work
            varlen_step(*call)
            grads = [t.grad.clone() for t in (q, k, v)]
            for t in (q, k, v):
                t.grad = None
            per_sequence_step(*call)
            for g, t in zip(grads, (q, k, v)):
                torch.testing.assert_close(g, t.grad, atol=1e-2, rtol=1e-2)
            t_ours, t_theirs = timed_pair((varlen_step, per_sequence_step), call, args.repeats)
            print(f"| {str(dtype)[6:]} | {causal} | {t_ours * 1e3:.1f} | {t_theirs * 1e3:.1f} | "
                  f"{t_theirs / t_ours:.2f}x |")


if __name__ == "__main__":
    main()
