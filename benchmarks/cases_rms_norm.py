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
        # Emulator-sized stand-ins for --model (bench_ops.py): fewer rows, the same row length.
        "model_shapes": {(4096, 4096): (512, 4096), (16384, 1024): (512, 1024), (8, 2048, 4096): (1, 512, 4096)},
        "dtypes": [torch.float32, torch.bfloat16],
        "make_inputs": _inputs,
        "ours": lambda x, w: my_mps_ops.rms_norm(x, w, EPS),
        "baselines": {
            "F.rms_norm": lambda x, w: F.rms_norm(x, (x.shape[-1],), w, EPS),
            "composite": _composite,
        },
        "grad_inputs": [0, 1],
        # Speed targets, checked on cpu: (shape, dtype, mode, baseline, minimum speedup)
        "targets": [((4096, 4096), torch.float32, "fwd+bwd", "composite", 2.0),
                    ((4096, 4096), torch.float32, "fwd+bwd", "F.rms_norm", 1.0)],
    },
]


def _fused_inputs(shape, dtype, device):
    x, w = _inputs(shape, dtype, device)
    return x, torch.randn(shape, dtype=dtype, device=device), w


def _fused_composite(x, r, w):
    h = x + r
    return F.rms_norm(h, (h.shape[-1],), w, EPS) + h  # both outputs consumed


CASES.append({
    "op": "fused_add_rms_norm",
    "shapes": [(4096, 4096), (16384, 1024)],
    "quick_shapes": [(4096, 4096)],
    "model_shapes": {(4096, 4096): (512, 4096), (16384, 1024): (512, 1024)},
    "dtypes": [torch.float32, torch.bfloat16],
    "make_inputs": _fused_inputs,
    "ours": lambda x, r, w: (lambda o: o[0] + o[1])(my_mps_ops.fused_add_rms_norm(x, r, w, EPS)),
    "baselines": {"add + F.rms_norm": _fused_composite,
                  "add + composite": lambda x, r, w: (lambda h: _composite(h, w) + h)(x + r)},
    "grad_inputs": [0, 1, 2],
    "targets": [((4096, 4096), torch.float32, "fwd+bwd", "add + composite", 1.5)],
})
