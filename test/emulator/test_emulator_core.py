"""The Metal emulator's execution model, through my_mps_ops.emulator.compile_shader:
builtins, grids, argument binding, threadgroup memory, barriers, SIMD-group
functions, atomics — each against hand-computed results."""

import struct

import pytest
import torch

from my_mps_ops.emulator import compile_shader

BUILTINS_SRC = r"""
#include <metal_stdlib>
using namespace metal;

// One row of 12 uints per thread: every builtin, flattened.
kernel void builtins_3d(device uint* out [[buffer(0)]],
                        uint3 tpig [[thread_position_in_grid]],
                        uint3 tgpig [[threadgroup_position_in_grid]],
                        uint3 tptg [[thread_position_in_threadgroup]],
                        uint tiitg [[thread_index_in_threadgroup]],
                        uint3 tptgs [[threads_per_threadgroup]],
                        uint3 tgpg [[threadgroups_per_grid]],
                        uint3 tpg [[threads_per_grid]],
                        ushort lane [[thread_index_in_simdgroup]],
                        ushort sg [[simdgroup_index_in_threadgroup]],
                        uint width [[threads_per_simdgroup]],
                        uint sgs [[simdgroups_per_threadgroup]]) {
  const uint linear = (tpig.z * tpg.y + tpig.y) * tpg.x + tpig.x;
  device uint* o = out + linear * 20;
  o[0] = tpig.x; o[1] = tpig.y; o[2] = tpig.z;
  o[3] = tgpig.x; o[4] = tgpig.y; o[5] = tgpig.z;
  o[6] = tptg.x; o[7] = tptg.y; o[8] = tptg.z;
  o[9] = tiitg;
  o[10] = tptgs.x; o[11] = tptgs.y; o[12] = tptgs.z;
  o[13] = tgpg.x; o[14] = tgpg.y;
  o[15] = tpg.x; o[16] = tpg.y;
  o[17] = lane; o[18] = sg;
  o[19] = width * 1000 + sgs;
}

kernel void positions_2d(device uint2* out, constant uint& width, uint2 pos [[thread_position_in_grid]]) {
  out[pos.y * width + pos.x] = pos;
}
"""


def test_builtins_3d_non_uniform_grid():
    lib = compile_shader(BUILTINS_SRC)
    grid, group = (5, 3, 2), (4, 2, 2)  # edge threadgroups are partial in x and y
    out = torch.full((5 * 3 * 2 * 20,), 0xFFFFFFFF, dtype=torch.int64).to(torch.int32)
    lib.builtins_3d(out, threads=grid, group_size=group)
    rows = out.view(-1, 20).to(torch.int64) & 0xFFFFFFFF
    for z in range(2):
        for y in range(3):
            for x in range(5):
                r = rows[(z * 3 + y) * 5 + x].tolist()
                g = (x // 4, y // 2, z // 2)
                t = (x % 4, y % 2, z % 2)
                size = (min(4, 5 - g[0] * 4), min(2, 3 - g[1] * 2), 2)
                index = t[0] + t[1] * size[0] + t[2] * size[0] * size[1]
                count = size[0] * size[1] * size[2]
                assert r[0:3] == [x, y, z]
                assert r[3:6] == list(g)
                assert r[6:9] == list(t)
                assert r[9] == index
                assert r[10:13] == list(size)  # the real size of edge threadgroups
                assert r[13:15] == [2, 2]
                assert r[15:17] == [5, 3]
                assert r[17] == index % 32 and r[18] == index // 32
                assert r[19] == 32 * 1000 + (count + 31) // 32


def test_two_dimensional_grid_and_uint2_builtin():
    lib = compile_shader(BUILTINS_SRC)
    out = torch.zeros(7 * 3 * 2, dtype=torch.int32)
    lib.positions_2d(out, 7, threads=(7, 3), group_size=(4, 2), arg_casts={1: "int32"})
    pos = out.view(3, 7, 2)
    assert torch.equal(pos[..., 0], torch.arange(7).repeat(3, 1).int())
    assert torch.equal(pos[..., 1], torch.arange(3).view(3, 1).repeat(1, 7).int())


BINDING_SRC = r"""
#include <metal_stdlib>
using namespace metal;

constant float kScale = 3.0;       // program-scope constant
constant constexpr int kTable[4] = {1, 10, 100, 1000};

struct Params { uint n; float bias; };

// Explicit indices out of declaration order.
kernel void explicit_indices(device float* out [[buffer(2)]],
                             device const float* in [[buffer(0)]],
                             constant Params& p [[buffer(1)]],
                             uint i [[thread_position_in_grid]]) {
  if (i < p.n) out[i] = in[i] * kScale + p.bias + float(kTable[i % 4]);
}

// No attributes: buffers take indices in declaration order.
kernel void automatic_indices(device const int* a, device const int* b, device int* c, constant int& k,
                              uint i [[thread_position_in_grid]]) {
  c[i] = a[i] * k + b[i];
}

template <typename T>
kernel void scale(device T* x, constant float& s, uint i [[thread_position_in_grid]]) {
  x[i] = T(float(x[i]) * s);
}
template [[host_name("scale_float")]] kernel void scale<float>(device float*, constant float&, uint);
template [[host_name("scale_half")]] kernel void scale<half>(device half*, constant float&, uint);
template [[host_name("scale_bfloat")]] kernel void scale<bfloat>(device bfloat*, constant float&, uint);

// Threadgroup memory sized at launch ([[threadgroup(0)]]) is not available
// through compile_shader; static threadgroup arrays are.
kernel void reverse_in_group(device const float* in, device float* out,
                             uint tid [[thread_position_in_threadgroup]],
                             uint gid [[threadgroup_position_in_grid]],
                             uint n [[threads_per_threadgroup]]) {
  threadgroup float tile[64];
  tile[tid] = in[gid * n + tid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[gid * n + tid] = tile[n - 1 - tid];
}
"""


def test_explicit_indices_struct_argument_and_program_constants():
    lib = compile_shader(BINDING_SRC)
    x = torch.arange(10, dtype=torch.float32)
    out = torch.zeros(10)
    params = struct.pack("<If", 10, 0.5)
    # Buffers in index order 0, 1, 2: in, params, out.
    lib.explicit_indices(x, _bytes_tensor(params), out, threads=10)
    expected = x * 3 + 0.5 + torch.tensor([1.0, 10, 100, 1000]).repeat(3)[:10]
    assert torch.equal(out, expected)


def _bytes_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def test_automatic_indices_and_int64_default_scalar():
    lib = compile_shader(BINDING_SRC)
    a, b, c = torch.arange(6, dtype=torch.int32), torch.ones(6, dtype=torch.int32), torch.zeros(6, dtype=torch.int32)
    lib.automatic_indices(a, b, c, 7, threads=6, arg_casts={3: "int32"})
    assert c.tolist() == [1, 8, 15, 22, 29, 36]


@pytest.mark.parametrize("dtype,name", [(torch.float32, "scale_float"), (torch.float16, "scale_half"),
                                        (torch.bfloat16, "scale_bfloat")])
def test_template_instantiations_by_host_name(dtype, name):
    lib = compile_shader(BINDING_SRC)
    x = torch.tensor([1.0, -2.0, 0.25, 3.0], dtype=dtype)
    getattr(lib, name)(x, 1.5)
    assert torch.equal(x, torch.tensor([1.5, -3.0, 0.375, 4.5], dtype=dtype))


def test_static_threadgroup_memory_and_barrier():
    lib = compile_shader(BINDING_SRC)
    assert lib.reverse_in_group.static_thread_group_memory_length == 64 * 4
    assert lib.reverse_in_group.max_threads_per_threadgroup == 1024
    assert lib.reverse_in_group.thread_execution_width == 32
    x = torch.arange(3 * 64, dtype=torch.float32)
    out = torch.zeros_like(x)
    lib.reverse_in_group(x, out, threads=3 * 64, group_size=64)
    assert torch.equal(out.view(3, 64), x.view(3, 64).flip(1))


LOCAL_SIZE_SRC = r"""
#include <metal_stdlib>
using namespace metal;
// A one-letter element type and a size from kernel-local constants.
template <typename T>
kernel void reverse_padded(const device T* x, device T* out, uint i [[thread_position_in_threadgroup]],
                           uint g [[threadgroup_position_in_grid]]) {
  constexpr int kWidth = 64;
  constexpr constant int kPad = 1;
  const int kUnused = 3;  // not part of any size
  threadgroup T buf[kWidth + kPad];
  buf[i] = x[g * kWidth + i];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[g * kWidth + i] = buf[kWidth - 1 - i] + T(kUnused - 3);
}
template [[host_name("reverse_padded_float")]] kernel void reverse_padded<float>(
    const device float*, device float*, uint, uint);
"""


def test_threadgroup_array_of_template_type_sized_by_local_constants():
    # Such an array once became a per-thread local array (silently wrong
    # results): it must be threadgroup memory, 65 floats, shared by the group.
    lib = compile_shader(LOCAL_SIZE_SRC)
    assert lib.reverse_padded_float.static_thread_group_memory_length == 65 * 4
    x = torch.randn(2 * 64)
    out = torch.empty_like(x)
    lib.reverse_padded_float(x, out, threads=2 * 64, group_size=64)
    assert torch.equal(out.view(2, 64), x.view(2, 64).flip(1))


def test_storage_offset_views_bind_at_their_offset():
    lib = compile_shader(BINDING_SRC)
    base = torch.arange(12, dtype=torch.float32)
    view = base[4:8]
    lib.scale_float(view, 2.0)
    assert base.tolist() == [0, 1, 2, 3, 8, 10, 12, 14, 8, 9, 10, 11]


SIMD_SRC = r"""
#include <metal_stdlib>
using namespace metal;

// Each thread writes 16 results of SIMD-group functions over x = lane + 1.
kernel void simd_all_functions(device float* out, device const int* shifts,
                               uint i [[thread_position_in_grid]],
                               uint lane [[thread_index_in_simdgroup]]) {
  const float x = float(lane + 1);
  const int ix = int(lane + 1);
  device float* o = out + i * 16;
  o[0] = simd_sum(x);
  o[1] = simd_product(lane < 4 ? x : 1.0f);
  o[2] = simd_min(x);
  o[3] = simd_max(x);
  o[4] = float(simd_and(ix | 64));
  o[5] = float(simd_or(ix));
  o[6] = float(simd_xor(ix));
  o[7] = simd_shuffle(x, ushort(shifts[0]));
  o[8] = simd_shuffle_up(x, ushort(shifts[1]));
  o[9] = simd_shuffle_down(x, ushort(shifts[1]));
  o[10] = simd_shuffle_xor(x, ushort(shifts[2]));
  o[11] = simd_broadcast(x, ushort(shifts[0]));
  o[12] = simd_prefix_inclusive_sum(x);
  o[13] = simd_prefix_exclusive_sum(x);
  o[14] = float(uint64_t(simd_ballot(lane % 3 == 0)) & 0xFFFFFFFFu);
  o[15] = float(int(simd_all(x > 0.0f)) * 10 + int(simd_any(x > 31.0f)));
}
"""


def test_simd_group_functions():
    lib = compile_shader(SIMD_SRC)
    out = torch.zeros(64 * 16)
    lib.simd_all_functions(out, torch.tensor([5, 3, 6], dtype=torch.int32), threads=64, group_size=64)
    o = out.view(64, 16)
    lanes = torch.arange(32, dtype=torch.float32)
    x = lanes + 1
    ints = [l + 1 for l in range(32)]
    xor = 0
    andv, orv = 0xFFFFFFFF, 0
    for v in ints:
        xor ^= v
        andv &= v | 64
        orv |= v
    ballot = sum(1 << l for l in range(32) if l % 3 == 0)
    for sg in range(2):
        r = o[sg * 32:(sg + 1) * 32]
        assert torch.all(r[:, 0] == 528)
        assert torch.all(r[:, 1] == 24)
        assert torch.all(r[:, 2] == 1) and torch.all(r[:, 3] == 32)
        assert torch.all(r[:, 4] == andv) and torch.all(r[:, 5] == orv) and torch.all(r[:, 6] == xor)
        assert torch.all(r[:, 7] == 6)
        assert torch.equal(r[:, 8], torch.where(lanes < 3, x, x - 3))  # lanes below delta keep their value
        assert torch.equal(r[:, 9], torch.where(lanes + 3 >= 32, x, x + 3))
        assert torch.equal(r[:, 10], (lanes.int() ^ 6).float() + 1)
        assert torch.all(r[:, 11] == 6)
        assert torch.equal(r[:, 12], torch.cumsum(x, 0))
        assert torch.equal(r[:, 13], torch.cumsum(x, 0) - x)
        assert torch.all(r[:, 14] == float(ballot))
        assert torch.all(r[:, 15] == 11)


def test_simd_functions_skip_lanes_outside_the_grid():
    lib = compile_shader(SIMD_SRC)
    out = torch.zeros(40 * 16)
    # 40 threads: the second SIMD group has 8 live lanes.
    lib.simd_all_functions(out, torch.tensor([0, 0, 0], dtype=torch.int32), threads=40, group_size=64)
    o = out.view(40, 16)
    assert torch.all(o[:32, 0] == 528)
    assert torch.all(o[32:, 0] == sum(range(1, 9)))
    assert torch.all(o[32:, 3] == 8)


PARTIAL_SIMD_SRC = r"""
#include <metal_stdlib>
using namespace metal;

// Part of a SIMD group runs simd_sum while the rest waits at the barrier:
// the sum is over the active lanes only (Metal's rule).
kernel void partial_simd_sum(device float* out, uint lane [[thread_index_in_simdgroup]],
                             uint tid [[thread_position_in_threadgroup]]) {
  float v = float(lane + 1);
  if (lane < 12) v = simd_sum(v);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = v;
}

// A loop whose trip count depends on the lane, with a collective inside: each
// iteration runs over the lanes still in the loop; lanes that left it wait at
// the barrier meanwhile.
kernel void simd_sum_in_divergent_loop(device float* out, uint lane [[thread_index_in_simdgroup]],
                                       uint tid [[thread_position_in_threadgroup]]) {
  float acc = 0.0f;
  for (uint k = 0; k <= lane / 8; ++k) acc += simd_sum(1.0f);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = acc;
}
"""


def test_simd_function_over_the_active_lanes_of_a_simd_group():
    lib = compile_shader(PARTIAL_SIMD_SRC)
    out = torch.zeros(64)
    lib.partial_simd_sum(out, threads=64, group_size=64)
    lanes = torch.arange(64) % 32
    expected = torch.where(lanes < 12, torch.tensor(float(sum(range(1, 13)))), (lanes + 1).float())
    assert torch.equal(out, expected)


def test_simd_function_in_a_loop_with_lane_dependent_trip_count():
    lib = compile_shader(PARTIAL_SIMD_SRC)
    out = torch.zeros(64)
    lib.simd_sum_in_divergent_loop(out, threads=64, group_size=64)
    # Iteration k runs with the lanes whose lane / 8 >= k: 32 - 8k of them.
    expected = [float(sum(32 - 8 * k for k in range(lane % 32 // 8 + 1))) for lane in range(64)]
    assert out.tolist() == expected


ATOMIC_SRC = r"""
#include <metal_stdlib>
using namespace metal;

kernel void histogram(device const uint* values, device atomic_uint* bins, device atomic_int* total,
                      device atomic_float* fsum, device atomic_int* maximum,
                      uint i [[thread_position_in_grid]]) {
  atomic_fetch_add_explicit(&bins[values[i] % 8], 1u, memory_order_relaxed);
  atomic_fetch_sub_explicit(total, int(values[i]), memory_order_relaxed);
  atomic_fetch_add_explicit(fsum, 0.5f, memory_order_relaxed);
  atomic_fetch_max_explicit(maximum, int(values[i]), memory_order_relaxed);
}

kernel void group_count(device uint* out, uint tid [[thread_position_in_threadgroup]],
                        uint gid [[threadgroup_position_in_grid]]) {
  threadgroup atomic_uint counter;
  if (tid == 0) atomic_store_explicit(&counter, 0u, memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  atomic_fetch_add_explicit(&counter, tid, memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) out[gid] = atomic_load_explicit(&counter, memory_order_relaxed);
}
"""


def test_device_atomics_across_threadgroups():
    lib = compile_shader(ATOMIC_SRC)
    values = torch.arange(4096, dtype=torch.int32)
    bins = torch.zeros(8, dtype=torch.int32)
    total = torch.zeros(1, dtype=torch.int32)
    fsum = torch.zeros(1)
    maximum = torch.zeros(1, dtype=torch.int32)
    lib.histogram(values, bins, total, fsum, maximum, threads=4096, group_size=64)
    assert bins.tolist() == [512] * 8
    assert total.item() == -sum(range(4096))
    assert fsum.item() == 2048.0
    assert maximum.item() == 4095


def test_threadgroup_atomics():
    lib = compile_shader(ATOMIC_SRC)
    out = torch.zeros(5, dtype=torch.int32)
    lib.group_count(out, threads=5 * 128, group_size=128)
    assert out.tolist() == [sum(range(128))] * 5


def test_include_of_shared_headers(tmp_path):
    (tmp_path / "helpers.h").write_text("#pragma once\ninline float twice(float x) { return 2.0 * x; }\n")
    src = '#include <metal_stdlib>\n#include "helpers.h"\nusing namespace metal;\n' \
          "kernel void k(device float* x, uint i [[thread_position_in_grid]]) { x[i] = twice(x[i]); }\n"
    lib = compile_shader(src, include_dirs=[str(tmp_path)])
    x = torch.tensor([1.0, 2.0])
    lib.k(x)
    assert x.tolist() == [2.0, 4.0]


def test_compile_errors_point_at_the_metal_line():
    src = "#include <metal_stdlib>\nusing namespace metal;\nkernel void k(device float* x, uint i [[thread_position_in_grid]]) {\n  x[i] = undefined_name;\n}\n"
    with pytest.raises(RuntimeError, match=r"\.metal:4"):
        compile_shader(src)


ADDRESS_SPACE_SRC = r"""
#include <metal_stdlib>
using namespace metal;

inline void bump(thread float* p) { *p += 1.0f; }
inline float first(threadgroup const float* t) { return t[0]; }
inline float scaled(constant float& s, device const float* x, uint i) { return s * x[i]; }

kernel void spaces(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                   constant float& s [[buffer(2)]], threadgroup float* scratch [[threadgroup(0)]],
                   uint i [[thread_position_in_grid]], uint tid [[thread_position_in_threadgroup]]) {
  float local = scaled(s, x, i);
  bump(&local);                       // thread address space
  scratch[tid] = local;               // threadgroup memory sized at launch
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[i] = local + first(scratch);
}
"""


def test_address_spaces_and_threadgroup_memory_sized_at_launch_uniform_grid():
    from my_mps_ops import _emulator

    lib = compile_shader(ADDRESS_SPACE_SRC)
    kernel = [k for k in _emulator.kernels(lib._key) if k["name"] == "spaces"][0]
    kinds = [(p["name"], p["kind"], p["index"], p["bytes"]) for p in kernel["params"]]
    assert kinds[:4] == [("x", "buffer", 0, 0), ("out", "buffer", 1, 0), ("s", "buffer", 2, 4),
                         ("scratch", "threadgroup", 0, 0)]
    x = torch.arange(8, dtype=torch.float32)
    out = torch.zeros(8)
    scale = struct.pack("<f", 2.0)
    # A uniform grid (dispatchThreadgroups): 2 groups of 4, 16 bytes of threadgroup memory each.
    _emulator.launch(lib._key, "spaces", [x, out, scale], [2, 1, 1], [4, 1, 1], True, [(0, 16)])
    local = 2 * x + 1
    assert out.tolist() == (local + torch.tensor([local[0]] * 4 + [local[4]] * 4)).tolist()
    with pytest.raises(RuntimeError, match=r"threadgroup\(0\) for parameter 'scratch' has no memory length"):
        _emulator.launch(lib._key, "spaces", [x, out, scale], [2, 1, 1], [4, 1, 1], True, [])
    # Threadgroup memory is numbered in the order given, so entries must list indices 0, 1, ...
    with pytest.raises(ValueError, match=r"entry 0 is for threadgroup\(1\); entries must give indices 0, 1"):
        _emulator.launch(lib._key, "spaces", [x, out, scale], [2, 1, 1], [4, 1, 1], True, [(1, 16)])
