"""The Metal emulator reports the bugs a GPU hides: each test plants one defect
in a small kernel and asserts the emulator names it."""

import pytest
import torch

from my_mps_ops import _C
from my_mps_ops.emulator import compile_shader

SRC = r"""
#include <metal_stdlib>
using namespace metal;

kernel void divergent_barrier(device float* x, uint tid [[thread_position_in_threadgroup]]) {
  if (tid < 16) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  } else {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  x[tid] = 1.0;
}

kernel void early_return_before_barrier(device float* x, uint tid [[thread_position_in_threadgroup]]) {
  if (tid >= 40) return;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  x[tid] = 1.0;
}

kernel void divergent_simd(device float* x, uint lane [[thread_index_in_simdgroup]]) {
  float v = 1.0;
  if (lane < 8) {
    v = simd_sum(v);
  } else {
    v = simd_max(v);
  }
  x[lane] = v;
}

kernel void simd_against_barrier(device float* x, uint tid [[thread_position_in_threadgroup]]) {
  float v = 1.0;
  if (tid < 32) {
    v = simd_sum(v);
  } else {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  x[tid] = v;
}

kernel void write_past_end(device float* out [[buffer(0)]], constant uint& n [[buffer(1)]],
                           uint i [[thread_position_in_grid]]) {
  device float* p = out + n; p[i] = 1.0;  // n too many, through a pointer (guard page)
}

kernel void read_past_end(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                          uint i [[thread_position_in_grid]]) {
  device const float* p = in + 64; out[i] = p[i];  // one element count too far
}

kernel void write_into_padding(device uchar* out, uint i [[thread_position_in_grid]]) {
  device uchar* p = out + 1; p[i] = 7;  // one byte past a 13-byte buffer: inside the 16-byte alignment padding
}

kernel void takes_uint(device uint* out, constant uint& n, uint i [[thread_position_in_grid]]) {
  out[i] = n;
}

kernel void two_buffers(device float* a [[buffer(0)]], device float* b [[buffer(1)]],
                        uint i [[thread_position_in_grid]]) {
  a[i] = b[i];
}

kernel void big_threadgroup_memory(device float* x, uint tid [[thread_position_in_threadgroup]]) {
  threadgroup float big[9000];  // 36 KB
  big[tid] = 1.0;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  x[tid] = big[tid];
}

kernel void reads_poisoned_threadgroup_memory(device float* x, uint tid [[thread_position_in_threadgroup]]) {
  threadgroup float tile[32];
  if (tid == 0) tile[0] = 1.0;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  x[tid] = tile[tid];  // only tile[0] was written
}

kernel void shuffle_from_inactive_lane(device float* x, uint lane [[thread_index_in_simdgroup]]) {
  x[lane] = simd_shuffle(float(lane), ushort(20));
}
"""


@pytest.fixture(scope="module")
def lib():
    return compile_shader(SRC)


def test_divergent_barrier_call_sites(lib):
    with pytest.raises(RuntimeError, match=r"divergent_barrier.*barriers reached at different call sites.*\.metal:7"):
        lib.divergent_barrier(torch.zeros(64), threads=64, group_size=64)


def test_early_return_before_barrier(lib):
    with pytest.raises(RuntimeError, match=r"barrier at .*\.metal:16 reached by 40 of 64 threads.*had returned"):
        lib.early_return_before_barrier(torch.zeros(64), threads=64, group_size=64)


def test_divergent_simd_group_functions(lib):
    with pytest.raises(RuntimeError, match=r"SIMD-group functions reached at different call sites"):
        lib.divergent_simd(torch.zeros(32), threads=32, group_size=32)


def test_simd_function_against_barrier(lib):
    # Lanes 0-31 finish after their simd_sum; 32-63 wait at a barrier alone.
    with pytest.raises(RuntimeError, match=r"barrier at .*\.metal:35 reached by 32 of 64 threads"):
        lib.simd_against_barrier(torch.zeros(64), threads=64, group_size=64)


def test_out_of_bounds_write_names_buffer_and_thread(lib):
    out = torch.zeros(100)
    with pytest.raises(RuntimeError, match=r"out-of-bounds write at byte offset 400 of a 400-byte buffer bound at "
                                           r"buffer\(0\) 'out' by thread_position_in_grid \(0, 0, 0\)"):
        lib.write_past_end(out, 100, threads=1, group_size=1, arg_casts={1: "int32"})
    assert torch.equal(out, torch.zeros(100))  # nothing copied back after a fault


def test_out_of_bounds_read(lib):
    with pytest.raises(RuntimeError, match=r"out-of-bounds read .* buffer\(0\) 'in'"):
        lib.read_past_end(torch.zeros(64), torch.zeros(64), threads=64, group_size=64)


def test_write_into_alignment_padding_is_caught(lib):
    with pytest.raises(RuntimeError, match=r"out-of-bounds write past the end of the 13-byte buffer"):
        lib.write_into_padding(torch.zeros(13, dtype=torch.uint8), threads=13, group_size=13)


def test_scalar_of_the_wrong_width(lib):
    out = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"scalar argument at buffer\(1\) has 8 bytes but parameter 'n' "
                                           r"\(constant uint&\) reads 4"):
        lib.takes_uint(out, 5, threads=4)  # a Python int binds 8 bytes
    lib.takes_uint(out, 5, threads=4, arg_casts={1: "int32"})
    assert out.tolist() == [5] * 4


def test_unbound_buffer(lib):
    with pytest.raises(RuntimeError, match=r"buffer\(1\) for parameter 'b' .* is not bound"):
        lib.two_buffers(torch.zeros(4), threads=4)


def test_threadgroup_too_large(lib):
    with pytest.raises(RuntimeError, match=r"threadgroup of 2048 threads .* exceeds the 1024"):
        lib.takes_uint(torch.zeros(2048, dtype=torch.int32), 1, threads=2048, group_size=2048,
                       arg_casts={1: "int32"})


def test_threadgroup_memory_too_large(lib):
    with pytest.raises(RuntimeError, match=r"36000 bytes of threadgroup memory exceed the 32 KB"):
        lib.big_threadgroup_memory(torch.zeros(32), threads=32, group_size=32)


def test_uninitialised_threadgroup_memory_reads_poison(lib):
    x = torch.zeros(32)
    lib.reads_poisoned_threadgroup_memory(x, threads=32, group_size=32)
    assert x[0] == 1.0 and torch.isnan(x[1:]).all()


def test_shuffle_from_inactive_lane_warns_and_returns_poison(lib):
    x = torch.zeros(32)
    with pytest.warns(UserWarning, match=r"read lane 20, which is not active"):
        lib.shuffle_from_inactive_lane(x, threads=16, group_size=16)  # lanes 16..31 do not exist
    assert torch.isnan(x[:16]).all()


def test_wrong_device_tensor(lib):
    with pytest.raises(RuntimeError, match="emulator runs cpu tensors"):
        lib.takes_uint(torch.zeros(4, dtype=torch.int32, device="meta"), 1, threads=4, arg_casts={1: "int32"})


def test_shipped_shaders_raise_no_diagnostics():
    """Every embedded shader builds for the emulator, and rms_norm's kernels run clean."""
    from my_mps_ops.testing import load_embedded_shaders, metal_emulation
    import my_mps_ops

    # (libraries specialised by function constants, built by earlier tests, are named "<shader>{...}")
    assert {name.split("{")[0] for name in load_embedded_shaders()} == set(_C.embedded_shaders())
    with metal_emulation():
        x = torch.randn(6, 5000, requires_grad=True)
        w = torch.randn(5000, requires_grad=True)
        my_mps_ops.rms_norm(x, w, 1e-6).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


def test_unsupported_threadgroup_declaration_is_refused():
    # A threadgroup declaration the translator cannot place must be refused
    # rather than have `threadgroup` erased into a per-thread variable. (Variables
    # with an initialiser and several declarators in one statement, which Apple's
    # compiler accepts, are placed: see test_emulator_fidelity.py.)
    from my_mps_ops.emulator.build import CompileError

    src = """
#include <metal_stdlib>
using namespace metal;
kernel void k(device float* out, uint i [[thread_position_in_grid]]) {
  threadgroup float acc = 0.0f, *p = &acc;
  out[i] = *p;
}
"""
    with pytest.raises(CompileError, match="unsupported threadgroup declaration"):
        compile_shader(src, strict=False)
