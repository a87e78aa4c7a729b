"""Benchmark cases for quantized_linear (see bench_ops.py for the case format): a 4096 x 4096 layer at 4 bits (MLX's
affine format, groups of 64) for decoding (1 and 8 rows) and prefill (512 rows), against dequantising the weight
and multiplying (my_mps_ops.dequantize, which is PyTorch tensor ops, then F.linear). Shapes are
(rows, in_features, out_features); benchmarks/bench_quantized_linear.py has the fuller CPU comparison."""

import torch
import torch.nn.functional as F

import my_mps_ops

BITS, GROUP, MODE = 4, 64, "affine"


def _inputs(shape, dtype, device):
    rows, in_features, out_features = shape
    g = torch.Generator().manual_seed(0)
    weight = 0.02 * torch.randn(out_features, in_features, generator=g)
    qweight, scales, biases = my_mps_ops.quantize(weight, BITS, GROUP, MODE)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    return x.to(device), qweight.to(device), scales.to(device), biases.to(device)


CASES = [
    {
        "op": "quantized_linear",
        "shapes": [(1, 4096, 4096), (8, 4096, 4096), (512, 4096, 4096)],
        "quick_shapes": [(1, 4096, 4096), (8, 4096, 4096)],
        # Emulator-sized stand-ins for --model: fewer output features (each is independent work).
        "model_shapes": {(1, 4096, 4096): (1, 4096, 256), (8, 4096, 4096): (8, 4096, 256),
                         (512, 4096, 4096): (512, 4096, 32)},
        "dtypes": [torch.float32],
        "make_inputs": _inputs,
        "ours": lambda x, q, s, b: my_mps_ops.quantized_linear(x, q, s, b, None, BITS, GROUP, MODE),
        "baselines": {"dequantize + F.linear":
                      lambda x, q, s, b: F.linear(x, my_mps_ops.dequantize(q, s, b, BITS, GROUP, MODE))},
        "grad_inputs": [0],
    },
]
