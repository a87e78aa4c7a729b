"""The emulator's performance counters (my_mps_ops/emulator/profile.py): exact on
planted kernels whose counts are known by hand (a coalesced and a strided copy,
a kernel reading its input twice, a transpose through threadgroup memory with
and without padding, a reduction with known barriers and SIMD-group calls, a
simdgroup_matrix product), for ops' launches too, and without changing
results; the projection's model (projection.py) on known numbers."""

import json
import os
import subprocess

import pytest
import torch

import my_mps_ops
from my_mps_ops import _emulator
from my_mps_ops.emulator import compile_shader, profile, projection
from my_mps_ops.testing import metal_emulation

SRC = r"""
#include <metal_stdlib>
using namespace metal;

kernel void copy_k(device const float* x, device float* out, constant uint& n,
                   uint i [[thread_position_in_grid]]) {
  if (i < n) out[i] = x[i];  // @copy
}

kernel void strided_k(device const float* x, device float* out, constant uint& n, constant uint& stride,
                      uint i [[thread_position_in_grid]]) {
  if (i < n) out[i] = x[i * stride];  // @strided
}

kernel void twice_k(device const float* x, device float* out, constant uint& n,
                    uint i [[thread_position_in_grid]]) {
  if (i < n) out[i] = x[i] + x[(i + n / 2) % n];  // @twice
}

kernel void vec_copy_k(device const float4* x, device float4* out, uint i [[thread_position_in_grid]]) {
  out[i] = x[i];  // @vec
}

// 32x32 tiles: out = x^T through threadgroup memory (one threadgroup of 32x32 threads per tile).
template <uint Pad>
kernel void transpose_k(device const float* x, device float* out,
                        uint2 t [[thread_position_in_threadgroup]], uint2 g [[threadgroup_position_in_grid]]) {
  threadgroup float tile[32][32 + Pad];
  const uint base = (g.y * 2 + g.x) * 1024;
  tile[t.y][t.x] = x[base + t.y * 32 + t.x];  // @tile_store
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[base + t.y * 32 + t.x] = tile[t.x][t.y];  // @tile_load
}
template [[host_name("transpose_plain")]] kernel void transpose_k<0>(device const float*, device float*, uint2, uint2);
template [[host_name("transpose_padded")]] kernel void transpose_k<1>(device const float*, device float*, uint2, uint2);

// A block sum: simd_sum per SIMD group, partials through threadgroup memory, two barriers.
kernel void block_sum_k(device const float* x, device float* out,
                        uint i [[thread_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
                        uint lane [[thread_index_in_simdgroup]], uint sg [[simdgroup_index_in_threadgroup]],
                        uint g [[threadgroup_position_in_grid]]) {
  threadgroup float partials[8];
  float v = simd_sum(x[i]);
  if (lane == 0) partials[sg] = v;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    v = simd_sum(lane < 8 ? partials[lane] : 0.0f);
    if (lane == 0) out[g] = exp(v * 0.0f) * v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// 8-byte threadgroup accesses: 32 lanes ask for 64 words, which take two passes of 32 banks at least.
kernel void wide_k(device const float2* x, device float2* out, uint i [[thread_index_in_threadgroup]]) {
  threadgroup float2 buf[64];
  buf[i] = x[i];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[i] = buf[i] + buf[(i * 2) % 64];  // @wide
}

// One 8x8x8 multiply-accumulate per SIMD group.
kernel void mma_k(device const float* a, device const float* b, device float* c,
                  uint sg [[simdgroup_index_in_threadgroup]]) {
  simdgroup_float8x8 ma, mb, mc = simdgroup_float8x8(0);
  simdgroup_load(ma, a);
  simdgroup_load(mb, b);
  simdgroup_multiply_accumulate(mc, ma, mb, mc);
  if (sg == 0) simdgroup_store(mc, c);
}
"""


def _line(tag: str) -> str:
    for n, text in enumerate(SRC.splitlines(), 1):
        if f"// @{tag}" in text:
            return f":{n}"
    raise KeyError(tag)


@pytest.fixture(scope="module")
def lib():
    return compile_shader(SRC)


N = 1024


def test_coalesced_copy(lib):
    x, out = torch.randn(N), torch.empty(N)
    p = lib.copy_k(x, out, N, threads=N, group_size=256, arg_casts={2: "int32"}, profile=True)
    assert torch.equal(out, x)
    assert p.kernel == "copy_k" and p.threads == N and p.threadgroups == 4
    assert (p.bytes_loaded, p.bytes_stored, p.compulsory_bytes, p.bytes_ratio) == (4 * N, 4 * N, 8 * N, 1.0)
    load, store = p.site(_line("copy"), "load"), p.site(_line("copy"), "store")
    assert load.line.endswith(".metal" + _line("copy"))
    assert (load.instructions, load.segments, load.min_segments, load.efficiency) == (N // 32, 2 * N // 32, 2 * N // 32, 1.0)
    assert store.efficiency == 1.0 and p.coalescing == 1.0
    assert p.buffer("x")["distinct_read"] == 4 * N and p.buffer("out")["distinct_written"] == 4 * N
    assert all(b["name"] != "n" for b in p.buffers)  # constant references are argument-table data


@pytest.mark.parametrize("stride,segment,expected", [(2, 64, 0.5), (16, 64, 2 / 32), (4, 64, 0.25), (4, 256, 0.5)])
def test_strided_copy(lib, stride, segment, expected):
    x, out = torch.randn(N * stride), torch.empty(N)
    with profile(segment_bytes=segment) as prof:
        lib.strided_k(x, out, N, stride, threads=N, group_size=256, arg_casts={2: "int32", 3: "int32"})
    assert torch.equal(out, x[::stride])
    (p,) = prof.launches
    assert p.segment_bytes == segment
    assert p.site(_line("strided"), "load").efficiency == pytest.approx(expected, abs=0)
    assert p.site(_line("strided"), "store").efficiency == 1.0
    assert p.bytes_ratio == 1.0  # every byte read once: strided, not repeated


def test_input_read_twice(lib):
    x, out = torch.randn(N), torch.empty(N)
    p = lib.twice_k(x, out, N, threads=N, group_size=256, arg_casts={2: "int32"}, profile=True)
    bx = p.buffer("x")
    assert bx["loaded"] == 2 * bx["distinct_read"] == 2 * 4 * N
    assert p.bytes_ratio == (8 * N + 4 * N) / (8 * N)
    site = p.site(_line("twice"), "load")
    assert site.instructions == 2 * N // 32 and site.efficiency == 1.0


def test_vector_access_is_one_access(lib):
    x, out = torch.randn(N, 4), torch.empty(N, 4)
    p = lib.vec_copy_k(x, out, threads=N, group_size=256, profile=True)
    assert torch.equal(out, x)
    load = p.site(_line("vec"), "load")
    assert load.instructions == N // 32 and load.lane_accesses == N and load.efficiency == 1.0


# 32 lanes read a column: one bank for all 32 words (31 passes beyond the one needed), or with a
# padded row 32 banks; with 16 banks the 32 words need 2 passes anyway (padded: 2, plain: 32).
@pytest.mark.parametrize("kernel,conflicts,banks", [("transpose_plain", 31, 32), ("transpose_padded", 0, 32),
                                                    ("transpose_plain", 30, 16), ("transpose_padded", 0, 16)])
def test_transpose_bank_conflicts(lib, kernel, conflicts, banks):
    x, out = torch.randn(4, 32, 32), torch.empty(4, 32, 32)
    with profile(banks=banks) as prof:
        getattr(lib, kernel)(x, out, threads=(64, 64), group_size=(32, 32))
    assert torch.equal(out, x.transpose(1, 2))
    (p,) = prof.launches
    accesses = 4 * 32  # 4 threadgroups of 32 SIMD groups
    load, store = p.site(_line("tile_load"), "load"), p.site(_line("tile_store"), "store")
    assert (load.space, load.where, load.instructions) == ("threadgroup", "tile", accesses)
    assert load.conflicts == conflicts * accesses
    assert store.conflicts == 0
    assert p.threadgroup_memory_bytes == 32 * (32 + (kernel == "transpose_padded")) * 4
    assert p.barriers_per_thread == 1
    assert p.coalescing == 1.0


def test_wide_threadgroup_accesses(lib):
    x, out = torch.randn(64, 2), torch.empty(64, 2)
    p = lib.wide_k(x, out, threads=64, group_size=64, profile=True)
    buf = x.clone()
    torch.testing.assert_close(out, buf + buf[(torch.arange(64) * 2) % 64], rtol=0, atol=0)
    loads = [s for s in p.threadgroup_sites() if s.kind == "load"]
    # One site (one line): per SIMD group, consecutive float2 (64 words: 2 passes, no conflict), then
    # every other float2 (words 4i, 4i+1: 4 words in a bank, 2 passes beyond the 2 needed).
    assert [(s.instructions, s.conflicts, s.conflicted) for s in loads] == [(4, 4, 2)], [s.describe() for s in loads]


def test_reduction_barriers_and_simd_calls(lib):
    groups, size = 3, 256
    x = torch.randn(groups * size)
    out = torch.empty(groups)
    plain = torch.empty(groups)
    lib.block_sum_k(x, plain, threads=groups * size, group_size=size)
    p = lib.block_sum_k(x, out, threads=groups * size, group_size=size, profile=True)
    assert torch.equal(out, plain)  # profiling changes no result
    assert torch.allclose(out, x.view(groups, size).sum(1), atol=1e-4)
    assert p.barriers_per_thread == 2 and p.barriers == 2 * groups
    assert p.simd_calls == groups * (size // 32 + 1)  # every SIMD group once, then SIMD group 0 again
    assert p.transcendentals == groups  # one exp per threadgroup
    assert p.threadgroup_memory_bytes == 32
    assert p.threadgroups_per_core(32768) == 1024 and p.threadgroups_per_core(None) is None


def test_simdgroup_matrix_flops(lib):
    a, b, c = torch.randn(8, 8), torch.randn(8, 8), torch.empty(8, 8)
    p = lib.mma_k(a, b, c, threads=128, group_size=64, profile=True)
    torch.testing.assert_close(c, a @ b)
    assert p.mma_flops == 4 * 2 * 8 * 8 * 8  # 4 SIMD groups, one 8x8x8 each
    # each lane loads its own two elements of a and b: a SIMD group reads each matrix once
    assert p.buffer("a")["loaded"] == 4 * 8 * 8 * 4 and p.buffer("a")["distinct_read"] == 8 * 8 * 4


def test_nested_blocks_and_off(lib):
    x, out = torch.randn(N), torch.empty(N)
    with profile() as outer:
        with profile() as inner:
            lib.copy_k(x, out, N, threads=N, group_size=256, arg_casts={2: "int32"})
        lib.copy_k(x, out, N, threads=N, group_size=256, arg_casts={2: "int32"})
    assert len(inner.launches) == 1 and len(outer.launches) == 2
    # Off: the plain library runs, nothing is recorded, and it carries no counters.
    lib.copy_k(x, out, N, threads=N, group_size=256, arg_casts={2: "int32"})
    assert _emulator.take_profile_records() == []
    symbols = subprocess.run(["nm", "-D", lib.path], capture_output=True, text=True).stdout
    assert "mtl_emu_profile_result" not in symbols and "mtl_emu_race_begin" not in symbols
    with pytest.raises(ValueError):
        with profile(segment_bytes=0):
            pass


def test_op_launches_under_metal_emulation():
    x, w = torch.randn(8, 1024), torch.randn(1024)
    with metal_emulation():
        plain = my_mps_ops.rms_norm(x, w, 1e-6)
        with profile() as prof:
            y = my_mps_ops.rms_norm(x, w, 1e-6)
    assert torch.equal(y, plain)
    (p,) = prof.launches
    assert p.kernel.startswith("rms_norm_forward")
    assert p.buffer("x")["distinct_read"] == x.numel() * 4 and p.buffer("y")["distinct_written"] == y.numel() * 4
    assert all(s.line.startswith(("rms_norm.metal:", "reduce.h:", "norm.h:")) for s in p.sites), p.report()


@pytest.mark.parametrize("op", ["rms_norm", "fused_add_rms_norm", "layer_norm"])
def test_norm_kernels_move_at_most_a_quarter_above_compulsory(op):
    """Rows kept in registers, weights read once per threadgroup of rows, row statistics staged in threadgroup
    memory for the parameter gradients: every launch of the forward and backward stays within 1.25x of its
    compulsory bytes (each input read once, each output written once)."""
    torch.manual_seed(0)
    x = torch.randn(256, 1024, requires_grad=True)
    w, b = torch.randn(1024, requires_grad=True), torch.randn(1024, requires_grad=True)
    with metal_emulation(), profile() as prof:
        if op == "rms_norm":
            y = my_mps_ops.rms_norm(x, w, 1e-6)
        elif op == "layer_norm":
            y = my_mps_ops.layer_norm(x, w, b, 1e-5)
        else:
            out, residual_out = my_mps_ops.ops.fused_add_rms_norm(x, x * 0.5, w, 1e-6)
            y = out + residual_out * residual_out
        y.backward(torch.randn_like(y))
    assert len(prof.launches) == 4, prof.report()
    for launch in prof.launches:
        assert launch.bytes_moved <= 1.25 * launch.compulsory_bytes, launch.report()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_reads_its_tables_once_per_position(dtype):
    """The threads of a position rotate every head there (q's and k's in rotary_qk) from one read of its cos/sin:
    every launch within 1.1x of its compulsory bytes (the tables were read once per head: 1.45x-1.9x)."""
    torch.manual_seed(0)
    q = torch.randn(2, 16, 8, 64, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 16, 2, 64, dtype=dtype)
    angles = torch.randn(16, 32)
    cos, sin = angles.cos(), angles.sin()
    with metal_emulation(), profile() as prof:
        y = my_mps_ops.rotary_embedding(q, cos, sin)
        y.backward(torch.randn_like(y))
        my_mps_ops.ops.rotary_embedding_qk(q.detach(), k, cos, sin)
    assert [l.kernel.rsplit("_", 1)[0] for l in prof.launches] == ["rotary", "rotary", "rotary_qk"], prof.report()
    for launch in prof.launches:
        assert launch.bytes_moved <= 1.1 * launch.compulsory_bytes, launch.report()


def test_cross_entropy_kernels_read_a_row_at_most_twice_coalesced():
    """cross_entropy's forward and backward read each logit once (the row's target, scale and lse once per row, not
    once per thread); linear_cross_entropy's row pass, which forms the loss and the gradient in one launch, reads a
    row twice (an online max and sum, then the gradient written in place): 1.5x its compulsory bytes. Every access
    coalesced (rows of 8192 float32 logits start on segment boundaries)."""
    torch.manual_seed(0)
    h, w = torch.randn(16, 64, requires_grad=True), torch.randn(8192, 64, requires_grad=True)
    target = torch.randint(0, 8192, (16,))
    logits = torch.randn(16, 8192, requires_grad=True)
    with metal_emulation(), profile() as prof:
        my_mps_ops.linear_cross_entropy(h, w, target).backward()
        my_mps_ops.cross_entropy(logits, target).backward()
    bound = {"linear_cross_entropy_rows": 1.51, "cross_entropy_forward_float": 1.01,
             "cross_entropy_backward_float": 1.01}
    assert [l.kernel for l in prof.launches] == list(bound), prof.report()
    for launch in prof.launches:
        assert launch.bytes_moved <= bound[launch.kernel] * launch.compulsory_bytes, launch.report()
        assert launch.coalescing == 1.0, launch.report()


# ------------------------------------------------------------- projection

def test_chip_table_has_a_source_for_every_number():
    chips = projection.load_chips()
    assert {"M1", "M2", "M3", "M4", "M5"} <= {c.family for c in chips.values()}
    for chip in chips.values():
        for field in ("bandwidth_gbs", "fp32_tflops", "fp16_tflops", "gpu_cores"):
            entry = chip.raw[field]
            assert entry.get("source"), (chip.name, field)
            assert entry.get("value") is not None or entry.get("unknown"), (chip.name, field)


def test_projection_model():
    chip = projection.load_chips()["M1 Max"]  # 400 GB/s, 10.4 TFLOPS FP32
    model = projection.Model(chip, bandwidth_fraction=0.5, dispatch_us=10.0)
    t = model.time(bytes_moved=400e9 * 0.5 * 1e-3, flops=0.0, dispatches=1)  # 1 ms of memory traffic
    assert t == pytest.approx(1e-3 + 10e-6)
    t = model.time(bytes_moved=0, flops=10.4e12 * 2e-3, dispatches=2)  # 2 ms of FP32 arithmetic
    assert t == pytest.approx(2e-3 + 20e-6)
    assert "projected" in model.describe()


def test_composite_projection_counts_aten_ops():
    x = torch.randn(64, 256)
    with projection.AtenRecorder() as rec:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    names = [op.name for op in rec.ops]
    assert names == ["aten.pow.Tensor_Scalar", "aten.mean.dim", "aten.add.Tensor", "aten.rsqrt.default",
                     "aten.mul.Tensor"], names
    n = x.numel() * 4
    row = 64 * 4
    assert rec.ops[0].bytes == 2 * n and rec.ops[1].bytes == n + row and rec.ops[4].bytes == 2 * n + row
    assert rec.bytes == sum(op.bytes for op in rec.ops) and rec.dispatches == 5


def test_composite_attention_flops():
    q, k, v = (torch.randn(1, 2, 32, 8, requires_grad=True) for _ in range(3))
    for causal, factor in ((False, 1.0), (True, 0.5)):
        with projection.AtenRecorder() as rec:
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(torch.ones(1, 2, 32, 8))
        flops = [op.flops for op in rec.ops if op.flops]
        assert flops == [4.0 * q.numel() * 32 * factor, 2.5 * 4.0 * q.numel() * 32 * factor]
