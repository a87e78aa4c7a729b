"""Benchmark cases for rms_norm (see bench_ops.py for the case format)."""

import torch
import torch.nn.functional as F

import my_mps_ops

EPS = 1e-6


def _inputs(shape, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device)
    w = torch.randn(shape[-1], dtype=dtype, device=device)
    return x, w


def _composite(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


CASES = [
    {
        "op": "rms_norm",
        "shapes": [(4096, 4096), (16384, 1024), (8, 2048, 4096)],
        "quick_shapes": [(4096, 4096)],
        "dtypes": [torch.float32, torch.bfloat16],
        "make_inputs": _inputs,
        "ours": lambda x, w: my_mps_ops.rms_norm(x, w, EPS),
        "baselines": {
            "F.rms_norm": lambda x, w: F.rms_norm(x, (x.shape[-1],), w, EPS),
            "composite": _composite,
        },
        "grad_inputs": [0, 1],
        # Issue targets, checked on cpu: (shape, dtype, mode, baseline, minimum speedup)
        "targets": [((4096, 4096), torch.float32, "fwd+bwd", "composite", 2.0),
                    ((4096, 4096), torch.float32, "fwd+bwd", "F.rms_norm", 1.0)],
    },
]
