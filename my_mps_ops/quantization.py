"""Weight quantization formats for quantized linear layers: quantize /
dequantize, bit-compatible with the libraries users bring weights from.

- ``mode="affine"``: MLX's group-wise affine format (``mlx.core.quantize``):
  groups of ``group_size`` (32, 64, 128) along the last (input) dimension,
  ``w ~ q * scale + bias`` with q in [0, 2^bits - 1] for bits 2, 3, 4, 5, 6, 8,
  packed little-endian into uint32 words (bit i of the bit stream at bit i % 32
  of word i // 32); scales and biases in the weight's dtype. Weights converted
  for MLX load as they are.
- ``mode="nf4"`` / ``"fp4"``: bitsandbytes' 4-bit codebooks (QLoRA's
  NormalFloat4 and bitsandbytes' FP4): blocks of ``group_size`` consecutive
  weights scaled by their absolute maximum (float32), each value the nearest
  of 16 codes (ties as bitsandbytes breaks them), two codes per uint8 (the
  first in the high nibble), as
  ``bitsandbytes.functional.quantize_4bit`` stores them for a weight whose
  input dimension is a multiple of the block size.

``quantize`` returns ``(qweight, scales, biases)`` (biases is None for the
codebook modes, whose scales are the absmax); ``dequantize`` takes them back.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUP_SIZES = (32, 64, 128)
MODES = ("affine", "nf4", "fp4")

# bitsandbytes' code tables (functional.get_4bit_type), index = stored nibble.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
FP4_CODE = (0.0, 0.0052083333, 0.6666666667, 1.0, 0.3333333333, 0.5, 0.1666666667, 0.25,
            0.0, -0.0052083333, -0.6666666667, -1.0, -0.3333333333, -0.5, -0.1666666667, -0.25)


def _check(weight: Tensor, bits: int, group_size: int, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"my_mps_ops.quantize: mode must be one of {MODES}, got {mode!r}")
    if not weight.is_floating_point():
        raise TypeError(f"my_mps_ops.quantize: weight must be floating point, got {weight.dtype}")
    if mode == "affine":
        if bits not in AFFINE_BITS:
            raise ValueError(f"my_mps_ops.quantize: affine bits must be one of {AFFINE_BITS}, got {bits}")
        if group_size not in AFFINE_GROUP_SIZES:
            raise ValueError(f"my_mps_ops.quantize: affine group_size must be one of {AFFINE_GROUP_SIZES}, "
                             f"got {group_size}")
    elif bits != 4:
        raise ValueError(f"my_mps_ops.quantize: {mode} stores 4 bits per weight, got bits={bits}")
    if weight.dim() < 1 or weight.shape[-1] % group_size != 0:
        raise ValueError(f"my_mps_ops.quantize: the last dimension ({weight.shape[-1] if weight.dim() else 0}) must be "
                         f"a multiple of group_size {group_size}")


def _pack_bits(q: Tensor, bits: int) -> Tensor:
    """uint32 words of the little-endian bit stream of q's values (last dim)."""
    q = q.to(torch.int64)
    shifts = torch.arange(bits, device=q.device)
    stream = ((q.unsqueeze(-1) >> shifts) & 1).flatten(-2)  # [..., n * bits] bits
    # explicit sizes, not -1: a weight with no rows has no elements to infer them from
    stream = stream.reshape(*stream.shape[:-1], stream.shape[-1] // 32, 32)
    words = (stream << torch.arange(32, device=q.device)).sum(-1)
    return words.to(torch.uint32)


def _unpack_bits(words: Tensor, bits: int, count: int) -> Tensor:
    stream = (words.to(torch.int64).unsqueeze(-1) >> torch.arange(32, device=words.device)) & 1
    stream = stream.flatten(-2)[..., :count * bits].reshape(*words.shape[:-1], count, bits)
    return (stream << torch.arange(bits, device=words.device)).sum(-1)


def _affine_quantize(weight: Tensor, bits: int, group_size: int) -> Tuple[Tensor, Tensor, Tensor]:
    # MLX's reference (mlx/ops.cpp, affine_quantize): float32 statistics, the
    # scale chosen so that the group's edge with the larger magnitude is exact.
    n_bins = float((1 << bits) - 1)
    groups = weight.reshape(*weight.shape[:-1], weight.shape[-1] // group_size, group_size)
    w_max = groups.amax(-1, keepdim=True).float()
    w_min = groups.amin(-1, keepdim=True).float()
    mask = w_min.abs() > w_max.abs()
    scales = torch.clamp_min((w_max - w_min) / n_bins, 1e-7)
    scales = torch.where(mask, scales, -scales)
    edge = torch.where(mask, w_min, w_max)
    q0 = torch.round(edge / scales)
    scales = torch.where(q0 != 0, edge / q0, scales)
    biases = torch.where(q0 == 0, torch.zeros_like(edge), edge)
    q = torch.clamp(torch.round((groups - biases) / scales), 0, n_bins)
    qweight = _pack_bits(q.flatten(-2), bits)
    return qweight, scales.squeeze(-1).to(weight.dtype), biases.squeeze(-1).to(weight.dtype)


def _codebook(mode: str, device) -> Tensor:
    return torch.tensor(NF4_CODE if mode == "nf4" else FP4_CODE, dtype=torch.float32, device=device)


def _codebook_quantize(weight: Tensor, group_size: int, mode: str) -> Tuple[Tensor, Tensor]:
    # As bitsandbytes' reference quantize_4bit: values times the reciprocal of
    # the block's absmax, clamped to [-1, 1], bucketed between the midpoints of
    # the sorted codes (FP4's +0 and -0 codes sorted stably: a small positive
    # value takes the later one).
    groups = weight.float().reshape(*weight.shape[:-1], weight.shape[-1] // group_size, group_size)
    absmax = groups.abs().amax(-1, keepdim=True)
    scaled = torch.clamp(groups * (1.0 / absmax.clamp(min=1e-38)), -1, 1)
    code = _codebook(mode, weight.device)
    order = torch.argsort(code, stable=True)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    index = order[torch.bucketize(scaled, bounds)]
    nibbles = index.flatten(-2).to(torch.uint8)
    packed = (nibbles[..., 0::2] << 4) | nibbles[..., 1::2]
    return packed, absmax.squeeze(-1)


def quantize(weight: Tensor, bits: int = 4, group_size: int = 64,
             mode: str = "affine") -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(qweight, scales, biases) of ``weight`` [..., in] (module docstring for
    the formats). affine: qweight uint32 [..., in * bits / 32], scales and
    biases [..., in / group_size] in weight's dtype. nf4 / fp4: qweight uint8
    [..., in / 2], scales the float32 absmax [..., in / group_size], biases None."""
    _check(weight, bits, group_size, mode)
    if mode == "affine":
        return _affine_quantize(weight, bits, group_size)
    packed, absmax = _codebook_quantize(weight, group_size, mode)
    return packed, absmax, None


def dequantize(qweight: Tensor, scales: Tensor, biases: Optional[Tensor] = None, bits: int = 4,
               group_size: int = 64, mode: str = "affine", dtype: Optional[torch.dtype] = None) -> Tensor:
    """The weight ``quantize`` stored: affine ``q * scale + bias`` in the scales'
    dtype (as mlx.core.dequantize), codebook ``code[q] * absmax`` in float32
    (as bitsandbytes' dequantize_4bit); ``dtype`` converts the result."""
    if mode not in MODES:
        raise ValueError(f"my_mps_ops.dequantize: mode must be one of {MODES}, got {mode!r}")
    groups = scales.shape[-1]
    count = groups * group_size
    if mode == "affine":
        if biases is None:
            raise ValueError("my_mps_ops.dequantize: affine mode needs biases")
        q = _unpack_bits(qweight, bits, count).reshape(*qweight.shape[:-1], groups, group_size)
        out = (q.to(scales.dtype) * scales.unsqueeze(-1) + biases.unsqueeze(-1)).flatten(-2)
    else:
        nibbles = torch.stack(((qweight >> 4) & 0xF, qweight & 0xF), -1).flatten(-2).to(torch.int64)
        values = _codebook(mode, qweight.device)[nibbles].reshape(*qweight.shape[:-1], groups, group_size)
        out = (values * scales.float().unsqueeze(-1)).flatten(-2)
    return out if dtype is None else out.to(dtype)
