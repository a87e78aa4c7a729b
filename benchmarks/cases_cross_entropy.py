"""Benchmark cases for cross_entropy (see bench_ops.py for the case format),
and `python benchmarks/cases_cross_entropy.py --memory` for the peak extra
memory of forward+backward, each implementation in a fresh process."""

import os
import subprocess
import sys

import torch
import torch.nn.functional as F

import my_mps_ops


def _inputs(shape, dtype, device):
    n, v = shape
    return torch.randn(n, v, dtype=dtype, device=device), torch.randint(0, v, (n,), device=device)


CASES = [{
    "op": "cross_entropy",
    "shapes": [(4096, 32768), (4096, 131072)],
    "quick_shapes": [(1024, 32768)],
    # Emulator-sized stand-ins for --model (bench_ops.py): fewer rows, the same vocabulary.
    "model_shapes": {(4096, 32768): (16, 32768), (4096, 131072): (4, 131072), (1024, 32768): (16, 32768)},
    "dtypes": [torch.float32, torch.bfloat16],
    "make_inputs": _inputs,
    "ours": lambda z, t: my_mps_ops.cross_entropy(z, t),
    "baselines": {"F.cross_entropy": lambda z, t: F.cross_entropy(z, t),
                  "log_softmax + nll": lambda z, t: F.nll_loss(torch.log_softmax(z, -1), t)},
    "grad_inputs": [0],
    "targets": [((1024, 32768), torch.float32, "fwd+bwd", "log_softmax + nll", 1.5)],
    "memory_targets": [((4096, 131072), torch.float32, "fwd+bwd", "F.cross_entropy", 0.5),
                       ((1024, 32768), torch.float32, "fwd+bwd", "F.cross_entropy", 0.5)],
}]

_PROBE = r"""
import resource, sys, torch, torch.nn.functional as F, my_mps_ops
n, v, impl = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
z = torch.randn(n, v, requires_grad=True); t = torch.randint(0, v, (n,))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loss = my_mps_ops.cross_entropy(z, t) if impl == "ours" else F.cross_entropy(z, t)
loss.backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def peak_extra_memory_mb(n, v, impl):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", _PROBE, str(n), str(v), impl], capture_output=True, text=True,
                         env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__" and "--memory" in sys.argv:
    n, v = 4096, 131072
    ours, theirs = peak_extra_memory_mb(n, v, "ours"), peak_extra_memory_mb(n, v, "F.cross_entropy")
    print(f"cross_entropy N={n} V={v} float32 cpu, peak extra RSS over forward+backward (process high-water mark):")
    print(f"  my_mps_ops {ours:.0f} MB, F.cross_entropy {theirs:.0f} MB, ratio {ours / theirs:.2f} "
          f"(target <= 0.5: {'met' if ours <= 0.5 * theirs else 'NOT met'})")
