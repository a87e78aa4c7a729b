"""Benchmark cases: my_mps_ops.flash_attention vs F.scaled_dot_product_attention.

``CASES`` follows the common benchmark format (benchmarks/bench_ops.py); each
shape is (batch, q_heads, kv_heads, seq, head_dim). ``shapes`` are CPU-sized
(seq 256..2048); ``device_shapes["mps"]`` are Mac-sized (seq 512..8192).

Run directly for a table of forward and forward+backward time and peak memory
on the best device here, and (on mps only) the Mac goal's ratios:

    PYTHONPATH=. python benchmarks/cases_attention.py [--device cpu|mps] [--quick]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import my_mps_ops

HEAD_DIMS = (64, 128)
MPS_SEQS = (512, 1024, 2048, 4096, 8192)
CPU_SEQS = (256, 512, 1024, 2048)
BATCH, Q_HEADS, KV_HEADS = 1, 8, 2  # grouped-query attention, 4 q heads per k/v head

# The goal on a Mac, forward+backward at seq 4096.
TARGET_SEQ = 4096
TARGET_SPEEDUP = 2.0
TARGET_MEMORY_FRACTION = 0.25


def make_inputs(shape, dtype, device):
    batch, q_heads, kv_heads, seq, head_dim = shape
    q = torch.randn(batch, q_heads, seq, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, kv_heads, seq, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, kv_heads, seq, head_dim, dtype=dtype, device=device)
    return q, k, v


def ours(causal: bool) -> Callable:
    return lambda q, k, v: my_mps_ops.flash_attention(q, k, v, causal=causal)


def sdpa(causal: bool) -> Callable:
    # Square shapes only here, so is_causal's top-left alignment equals ours.
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                          enable_gqa=q.shape[1] != k.shape[1])


def _shapes(seqs: Sequence[int]) -> List[Tuple[int, ...]]:
    return [(BATCH, Q_HEADS, KV_HEADS, s, d) for d in HEAD_DIMS for s in seqs]


CASES = [
    {
        "op": f"flash_attention{'_causal' if causal else ''}",
        # The common runner (bench_ops.py) uses one list for every device: the
        # CPU-sized one. device_shapes has the Mac sizes (seq 512..8192).
        "shapes": _shapes(CPU_SEQS),
        "quick_shapes": [(BATCH, Q_HEADS, KV_HEADS, 512, 64)],
        "device_shapes": {"cpu": _shapes(CPU_SEQS), "mps": _shapes(MPS_SEQS)},
        # Emulator-sized stand-ins for --model (bench_ops.py): half the heads (the work per head is
        # independent); only seq 256 and 512, longer ones take too long to profile on the emulator.
        "model_shapes": {(BATCH, Q_HEADS, KV_HEADS, s, d): (BATCH, Q_HEADS // 2, KV_HEADS // 2, s, d)
                         for s in (256, 512) for d in HEAD_DIMS},
        "dtypes": [torch.float32, torch.float16],
        "make_inputs": make_inputs,
        "ours": ours(causal),
        "baselines": {"sdpa": sdpa(causal)},
        "grad_inputs": [0, 1, 2],
    }
    for causal in (True, False)
]


# ------------------------------------------------------------------ measuring

def _sync(device: str) -> None:
    if device == "mps":
        torch.mps.synchronize()


class _PeakAllocated(TorchDispatchMode):
    """Samples torch.mps.current_allocated_memory() after every op: the peak at op
    granularity (intermediates inside one kernel are not seen)."""

    def __init__(self):
        super().__init__()
        self.peak = torch.mps.current_allocated_memory()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, torch.mps.current_allocated_memory())
        return out


def peak_memory(fn: Callable[[], object], device: str) -> int:
    """Bytes allocated at the peak of fn() above what was allocated before it."""
    if device == "mps":
        _sync(device)
        base = torch.mps.current_allocated_memory()
        # Backward on the calling thread, so that the (thread-local) mode sees it.
        with torch.autograd.set_multithreading_enabled(False), _PeakAllocated() as mode:
            fn()
            _sync(device)
        return mode.peak - base
    # CPU: replay the profiler's allocation (+bytes) and free (-bytes) events of
    # PyTorch's CPU allocator in time order. Kernel-internal scratch from
    # malloc (our per-thread tiles, BLAS workspaces) is not seen.
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def time_ms(fn: Callable[[], object], device: str, min_time: float = 0.3, max_reps: int = 50) -> float:
    fn()  # warm up (kernel compilation, allocator)
    _sync(device)
    reps, start = 0, time.perf_counter()
    while reps < max_reps and (reps < 3 or time.perf_counter() - start < min_time):
        fn()
        reps += 1
    _sync(device)
    return (time.perf_counter() - start) / reps * 1e3


def measure(attention: Callable, shape, dtype, device: str) -> Dict[str, float]:
    q, k, v = make_inputs(shape, dtype, device)
    grad = torch.randn(q.shape, dtype=dtype, device=device)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def forward():
        with torch.no_grad():
            return attention(q, k, v)

    def forward_backward():
        # autograd.grad rather than .backward: no .grad from an earlier run is
        # freed inside a measurement (that would offset the peak).
        torch.autograd.grad(attention(*leaves), leaves, grad)

    return {
        "fwd_ms": time_ms(forward, device),
        "fwd_bwd_ms": time_ms(forward_backward, device),
        "fwd_mb": peak_memory(forward, device) / 2**20,
        "fwd_bwd_mb": peak_memory(forward_backward, device) / 2**20,
    }


def run(device: str, dtype: torch.dtype, shapes, causal: bool = True) -> List[dict]:
    rows = []
    for shape in shapes:
        mine = measure(ours(causal), shape, dtype, device)
        base = measure(sdpa(causal), shape, dtype, device)
        rows.append({"shape": shape, "ours": mine, "sdpa": base})
        b, hq, hkv, seq, d = shape
        print(f"{device} {str(dtype).replace('torch.', ''):8s} {'causal' if causal else 'full  '} seq {seq:5d} "
              f"d {d:3d} | fwd {mine['fwd_ms']:8.2f} ms vs {base['fwd_ms']:8.2f} ms "
              f"| fwd+bwd {mine['fwd_bwd_ms']:8.2f} ms vs {base['fwd_bwd_ms']:8.2f} ms "
              f"(x{base['fwd_bwd_ms'] / mine['fwd_bwd_ms']:.2f}) "
              f"| peak fwd+bwd {mine['fwd_bwd_mb']:7.1f} MB vs {base['fwd_bwd_mb']:7.1f} MB", flush=True)
    return rows


def targets() -> List[str]:
    return [
        f"flash_attention goal on an Apple GPU (mps), forward+backward at seq {TARGET_SEQ}, "
        f"head_dim 64 and 128, float16: at least {TARGET_SPEEDUP:.0f}x the speed of F.scaled_dot_product_attention "
        f"and at most {TARGET_MEMORY_FRACTION:.0%} of its peak memory.",
    ]


def mac_ratios(dtype: torch.dtype = torch.float16) -> List[str]:
    """The goal's ratios, measured; only on mps (elsewhere the lines say why not)."""
    if not torch.backends.mps.is_available():
        return ["mac ratios: no MPS device here; not measured (CPU figures are not Mac figures)"]
    lines = []
    for d in HEAD_DIMS:
        shape = (BATCH, Q_HEADS, KV_HEADS, TARGET_SEQ, d)
        mine = measure(ours(True), shape, dtype, "mps")
        base = measure(sdpa(True), shape, dtype, "mps")
        speedup = base["fwd_bwd_ms"] / mine["fwd_bwd_ms"]
        memory = mine["fwd_bwd_mb"] / base["fwd_bwd_mb"] if base["fwd_bwd_mb"] > 0 else float("nan")
        lines.append(f"mps seq {TARGET_SEQ} head_dim {d} causal fwd+bwd: speedup x{speedup:.2f} "
                     f"(goal >= {TARGET_SPEEDUP}), peak memory {memory:.2f} of SDPA's "
                     f"(goal <= {TARGET_MEMORY_FRACTION}): {'MET' if speedup >= TARGET_SPEEDUP and memory <= TARGET_MEMORY_FRACTION else 'NOT MET'}")
    return lines


def print_mac_ratios() -> None:
    """Prints the goal's Mac ratios when an MPS device is present; prints nothing elsewhere."""
    if torch.backends.mps.is_available():
        for line in mac_ratios():
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="mps" if torch.backends.mps.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default: float16 on mps, "
                                                      "float32 on cpu)")
    parser.add_argument("--quick", action="store_true", help="the two smallest sequence lengths only")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if args.device == "mps" else torch.float32)
    seqs = MPS_SEQS if args.device == "mps" else CPU_SEQS
    shapes = _shapes(seqs[:2] if args.quick else seqs)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {BATCH}, q heads {Q_HEADS}, "
          f"k/v heads {KV_HEADS}; ours vs F.scaled_dot_product_attention")
    for causal in (True, False):
        run(args.device, dtype, shapes, causal)
    for line in targets():
        print(line)
    if torch.backends.mps.is_available():
        print_mac_ratios()
    else:
        print("no MPS device here: the Mac ratios are not measured; the figures above are CPU figures")


if __name__ == "__main__":
    main()
