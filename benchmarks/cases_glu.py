"""Benchmark cases for swiglu / geglu (see bench_ops.py for the case format)."""

import torch
import torch.nn.functional as F

import my_mps_ops


def _inputs(shape, dtype, device):
    return torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device)


SHAPES = [(4096, 11008), (16384, 4096)]
# Emulator-sized stand-ins for --model (bench_ops.py): fewer rows, the same row length.
MODEL_SHAPES = {(4096, 11008): (16, 11008), (16384, 4096): (64, 4096), (4096, 4096): (64, 4096)}
CASES = [
    {
        "op": "swiglu",
        "shapes": SHAPES,
        "quick_shapes": [(4096, 4096)],
        "model_shapes": MODEL_SHAPES,
        "dtypes": [torch.float32, torch.bfloat16],
        "make_inputs": _inputs,
        "ours": my_mps_ops.swiglu,
        "baselines": {"composite": lambda g, u: F.silu(g) * u},
        "grad_inputs": [0, 1],
        "targets": [((4096, 4096), torch.float32, "fwd+bwd", "composite", 1.5)],
    },
    {
        "op": "geglu",
        "shapes": SHAPES,
        "quick_shapes": [(4096, 4096)],
        "model_shapes": MODEL_SHAPES,
        "dtypes": [torch.float32, torch.bfloat16],
        "make_inputs": _inputs,
        "ours": lambda g, u: my_mps_ops.geglu(g, u, "tanh"),
        "baselines": {"composite": lambda g, u: F.gelu(g, approximate="tanh") * u},
        "grad_inputs": [0, 1],
        "targets": [((4096, 4096), torch.float32, "fwd+bwd", "composite", 1.5)],
    },
]
