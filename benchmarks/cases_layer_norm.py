"""Benchmark cases for layer_norm (see bench_ops.py for the case format)."""

import torch
import torch.nn.functional as F

import my_mps_ops

EPS = 1e-5


def _inputs(shape, dtype, device):
    return (torch.randn(shape, dtype=dtype, device=device), torch.randn(shape[-1], dtype=dtype, device=device),
            torch.randn(shape[-1], dtype=dtype, device=device))


def _composite(x, w, b):
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) * torch.rsqrt(var + EPS) * w + b


CASES = [{
    "op": "layer_norm",
    "shapes": [(4096, 4096), (16384, 1024)],
    "quick_shapes": [(4096, 4096)],
    # Emulator-sized stand-ins for --model (bench_ops.py): fewer rows, the same row length.
    "model_shapes": {(4096, 4096): (512, 4096), (16384, 1024): (512, 1024)},
    "dtypes": [torch.float32, torch.bfloat16],
    "make_inputs": _inputs,
    "ours": lambda x, w, b: my_mps_ops.layer_norm(x, w, b, EPS),
    "baselines": {"F.layer_norm": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS),
                  "composite": _composite},
    "grad_inputs": [0, 1, 2],
    "targets": [((4096, 4096), torch.float32, "fwd+bwd", "composite", 1.5)],
}]
