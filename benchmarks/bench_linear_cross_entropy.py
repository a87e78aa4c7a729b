"""linear_cross_entropy vs the unfused pair (hidden @ weight.T, then
F.cross_entropy) on this machine's CPU: forward+backward time and peak memory,
each implementation measured in its own fresh process (the process's own
allocations only), ratios from one run.

    python benchmarks/bench_linear_cross_entropy.py            # N=4096 H=2048 V=128256 float32 (a Llama-3-sized head)
    python benchmarks/bench_linear_cross_entropy.py --quick    # N=1024 H=512 V=32000

Peak memory is what the profiler's allocation records show at the peak of one
forward+backward above what existed before: "all" counts everything, "extra"
leaves out the gradients of hidden and weight (N*H + V*H), which every
implementation returns. Targets: extra peak at most 1/10 of the
unfused pair's, forward+backward time at least 1.0x. MPS rows need a Mac (not
measured here).
"""

import argparse
import json
import os
import subprocess
import sys

_PROBE = r"""
import json, sys, time, torch, torch.nn.functional as F, my_mps_ops
from my_mps_ops.memory import peak_allocated_mb
n, h, v, impl, repeats = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
g = torch.Generator().manual_seed(0)
hidden = torch.randn(n, h, generator=g, requires_grad=True)
weight = (torch.randn(v, h, generator=g) * h ** -0.5).requires_grad_()
target = torch.randint(0, v, (n,), generator=g)
def step():
    hidden.grad = weight.grad = None
    if impl == "ours":
        loss = my_mps_ops.linear_cross_entropy(hidden, weight, target)
    else:
        loss = F.cross_entropy(hidden @ weight.T, target)
    loss.backward()
    return loss.item()
losses = []
peak = peak_allocated_mb(lambda: losses.append(step()))  # also the warm-up
loss = losses[0]
times = []
for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
print(json.dumps(dict(loss=loss, peak=peak, grads=(n * h + v * h) * 4 / 2**20, time=sorted(times)[len(times) // 2])))
"""


def measure(n, h, v, impl, repeats):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", _PROBE, str(n), str(h), str(v), impl, str(repeats)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    n, h, v = (1024, 512, 32000) if args.quick else (4096, 2048, 128256)
    repeats = args.repeats or (3 if args.quick else 1)
    import torch

    print(f"linear_cross_entropy, cpu float32, N={n} H={h} V={v}, forward+backward, median of {repeats} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    ours, theirs = measure(n, h, v, "ours", repeats), measure(n, h, v, "unfused", repeats)
    print("| impl | time (s) | peak all (MB) | peak extra (MB) | loss |")
    print("|---|---:|---:|---:|---:|")
    for name, r in (("my_mps_ops.linear_cross_entropy", ours), ("hidden @ weight.T + F.cross_entropy", theirs)):
        print(f"| {name} | {r['time']:.2f} | {r['peak']:.0f} | {r['peak'] - r['grads']:.0f} | {r['loss']:.6f} |")
    speed = theirs["time"] / ours["time"]
    extra = (ours["peak"] - ours["grads"]) / (theirs["peak"] - theirs["grads"])
    print(f"speed vs unfused: {speed:.2f}x (target >= 1.0x: {'met' if speed >= 1.0 else 'NOT met'})")
    print(f"extra peak memory vs unfused: {extra:.3f} (target <= 0.1: {'met' if extra <= 0.1 else 'NOT met'}); "
          f"all peak: {ours['peak'] / theirs['peak']:.3f}")


if __name__ == "__main__":
    main()
