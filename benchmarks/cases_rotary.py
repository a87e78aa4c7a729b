"""Benchmark cases for rotary_embedding (see bench_ops.py for the case format)."""

import torch

import my_mps_ops


def _inputs(shape, dtype, device):
    batch, seq, heads, dim = shape
    ang = torch.outer(torch.arange(seq, dtype=torch.float32), torch.rand(dim // 2))
    return torch.randn(shape, dtype=dtype, device=device), ang.cos().to(device), ang.sin().to(device)


def _composite(x, cos, sin):  # the usual rotate_half formulation
    c = torch.cat((cos, cos), -1)[None, :, None].to(x.dtype)
    s = torch.cat((sin, sin), -1)[None, :, None].to(x.dtype)
    x1, x2 = x.chunk(2, -1)
    return x * c + torch.cat((-x2, x1), -1) * s


CASES = [{
    "op": "rotary_embedding",
    "shapes": [(4, 2048, 32, 128)],
    "quick_shapes": [(2, 1024, 16, 128)],
    # Emulator-sized stand-ins for --model (bench_ops.py): batch 1, 64 positions (the cos/sin tables then
    # scale with x, which they do not: they are under 1% of the bytes here).
    "model_shapes": {(4, 2048, 32, 128): (1, 64, 32, 128), (2, 1024, 16, 128): (1, 64, 16, 128)},
    "dtypes": [torch.float32, torch.bfloat16],
    "make_inputs": _inputs,
    "ours": lambda x, c, s: my_mps_ops.rotary_embedding(x, c, s),
    "baselines": {"composite": _composite},
    "grad_inputs": [0],
    "targets": [((2, 1024, 16, 128), torch.float32, "fwd+bwd", "composite", 1.5)],
}]
