"""my_mps_ops.quantize / dequantize: bit-for-bit the formats of the libraries
users bring weights from (MLX's affine format, bitsandbytes' NF4 and FP4),
compared with those libraries themselves; packing and representable weights
round-trip exactly."""

import numpy as np
import pytest
import torch

import my_mps_ops
from my_mps_ops.quantization import AFFINE_BITS, AFFINE_GROUP_SIZES, NF4_CODE, FP4_CODE, _pack_bits, _unpack_bits

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def weight(dtype, rows=6, cols=512, seed=0):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[0, :128] = 0.0  # an all-zero group
    w[1, :64] += 0.3  # a group that is all positive
    w[2, 64:128] -= 0.3  # and one all negative
    return w.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", AFFINE_BITS)
@pytest.mark.parametrize("group_size", AFFINE_GROUP_SIZES)
def test_affine_equals_mlx_bit_for_bit(dtype, bits, group_size):
    mx = pytest.importorskip("mlx.core")
    w = weight(dtype)
    q, scales, biases = my_mps_ops.quantize(w, bits, group_size, "affine")
    mx_dtype = {torch.float32: mx.float32, torch.float16: mx.float16, torch.bfloat16: mx.bfloat16}[dtype]
    mq, ms, mb = mx.quantize(mx.array(w.float().numpy()).astype(mx_dtype), group_size=group_size, bits=bits)
    assert q.dtype == torch.uint32 and q.shape == (6, 512 * bits // 32)
    assert scales.dtype == biases.dtype == dtype and scales.shape == (6, 512 // group_size)
    assert torch.equal(q.view(torch.int32), torch.from_numpy(np.array(mq).view(np.int32)))
    assert torch.equal(scales.float(), torch.from_numpy(np.array(ms.astype(mx.float32))))
    assert torch.equal(biases.float(), torch.from_numpy(np.array(mb.astype(mx.float32))))
    ours = my_mps_ops.dequantize(q, scales, biases, bits, group_size, "affine")
    theirs = mx.dequantize(mq, ms, mb, group_size=group_size, bits=bits)
    assert ours.dtype == dtype
    assert torch.equal(ours.float(), torch.from_numpy(np.array(theirs.astype(mx.float32))))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["nf4", "fp4"])
@pytest.mark.parametrize("block", [32, 64, 128, 256])
def test_codebooks_equal_bitsandbytes_bit_for_bit(dtype, mode, block):
    bf = pytest.importorskip("bitsandbytes.functional")
    w = weight(dtype) * 20
    w[3, 5] = -0.0
    q, absmax, biases = my_mps_ops.quantize(w, 4, block, mode)
    bq, state = bf.quantize_4bit(w, blocksize=block, quant_type=mode)
    assert biases is None and q.dtype == torch.uint8 and q.shape == (6, 256)
    assert torch.equal(q.flatten(), bq.flatten())
    assert torch.equal(absmax.flatten(), state.absmax.flatten().float())
    ours = my_mps_ops.dequantize(q, absmax, None, 4, block, mode, dtype=dtype)
    assert torch.equal(ours.flatten(), bf.dequantize_4bit(bq, state).flatten())


def test_code_tables_are_bitsandbytes():
    bf = pytest.importorskip("bitsandbytes.functional")
    for mode, table in (("nf4", NF4_CODE), ("fp4", FP4_CODE)):
        _, state = bf.quantize_4bit(torch.randn(64), blocksize=64, quant_type=mode)
        assert torch.equal(torch.tensor(table, dtype=torch.float32), state.code.float())


@pytest.mark.parametrize("bits", AFFINE_BITS)
def test_bit_packing_round_trips(bits):
    q = torch.randint(0, 1 << bits, (3, 256), generator=torch.Generator().manual_seed(bits))
    words = _pack_bits(q, bits)
    assert words.shape == (3, 256 * bits // 32)
    assert torch.equal(_unpack_bits(words, bits, 256), q)


@pytest.mark.parametrize("bits", AFFINE_BITS)
@pytest.mark.parametrize("group_size", AFFINE_GROUP_SIZES)
def test_representable_affine_weights_round_trip_exactly(bits, group_size):
    # Every group spans the codes 0 .. 2^bits - 1 on a power-of-two step: the
    # quantized form holds the weight exactly.
    n_bins = (1 << bits) - 1
    gen = torch.Generator().manual_seed(bits * group_size)
    codes = torch.randint(0, n_bins + 1, (4, 4 * group_size), generator=gen)
    codes[:, ::group_size] = 0
    codes[:, 1::group_size] = n_bins
    w = (codes - (1 << (bits - 1))).float() * 0.125
    q, scales, biases = my_mps_ops.quantize(w, bits, group_size)
    assert torch.equal(my_mps_ops.dequantize(q, scales, biases, bits, group_size), w)


@pytest.mark.parametrize("mode,table", [("nf4", NF4_CODE), ("fp4", FP4_CODE)])
def test_representable_codebook_weights_round_trip_exactly(mode, table):
    gen = torch.Generator().manual_seed(3)
    index = torch.randint(0, 16, (4, 256), generator=gen)
    index[:, ::64] = 3 if mode == "fp4" else 15  # a code of magnitude 1 in every block: its absmax
    absmax = 2.0 ** torch.randint(-4, 4, (4, 4), generator=gen).float()
    w = torch.tensor(table)[index] * absmax.repeat_interleave(64, 1)
    q, scales, _ = my_mps_ops.quantize(w, 4, 64, mode)
    assert torch.equal(my_mps_ops.dequantize(q, scales, None, 4, 64, mode), w)


def test_storage_at_4_bits_is_under_a_sixth_of_float32():
    # the memory target of 4-bit layers, for the weight alone: 4-bit codes plus one
    # float32 scale and bias per group of 64.
    w = torch.randn(256, 1024)
    q, scales, biases = my_mps_ops.quantize(w, 4, 64)
    stored = sum(t.numel() * t.element_size() for t in (q, scales, biases))
    assert stored / (w.numel() * 4) <= 0.16


def test_bad_arguments_raise_naming_them():
    w = torch.randn(4, 64)
    for kwargs, message in ((dict(mode="int4"), "mode must be one of"), (dict(bits=7), "bits must be one of"),
                            (dict(group_size=48), "group_size must be one of"),
                            (dict(mode="nf4", bits=8), "stores 4 bits"), (dict(group_size=128), "multiple of")):
        with pytest.raises(ValueError, match=message):
            my_mps_ops.quantize(w, **{"bits": 4, "group_size": 64, "mode": "affine", **kwargs})
    with pytest.raises(TypeError, match="floating point"):
        my_mps_ops.quantize(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="needs biases"):
        my_mps_ops.dequantize(torch.zeros(4, 8, dtype=torch.uint32), torch.ones(4, 1), None, 4, 64, "affine")
