"""The emulator's Metal standard library at the MSL level, through
my_mps_ops.emulator.compile_shader: scalars, vectors, colour components, select and
math, atomics, simdgroup_matrix.
"""

import math

import pytest

from stdlib_harness import to_half, needs_gxx

pytestmark = needs_gxx


# The same coverage at the MSL level, through my_mps_ops.emulator.compile_shader --------------------
# (skipped until the emulator's Python API is built in this tree)


def _compile_shader():
    try:
        from my_mps_ops.emulator import compile_shader
    except Exception as exc:  # not built yet, or no emulator in this build
        pytest.skip(f"my_mps_ops.emulator.compile_shader unavailable: {exc}")
    return compile_shader


MSL_SCALARS = r"""
#include <metal_stdlib>
using namespace metal;

kernel void half_bfloat_ops(device const float* x [[buffer(0)]],
                            device half* h [[buffer(1)]],
                            device bfloat* b [[buffer(2)]],
                            device half* counts [[buffer(3)]],
                            device uint* bits [[buffer(4)]],
                            uint i [[thread_position_in_grid]]) {
  h[i] = half(x[i]) * 3.0h + 1.0h;       // rounded to half after each operation
  b[i] = bfloat(x[i]);                    // round to nearest even
  half s = 0.0h;
  for (int k = 0; k < 3000; ++k) s += 1.0h;   // stalls at 2048
  counts[i] = s;
  bits[i] = as_type<uint>(x[i]);
}
"""


def test_msl_half_bfloat_and_as_type():
    torch = pytest.importorskip("torch")
    lib = _compile_shader()(MSL_SCALARS)
    x = torch.tensor([0.1, -1.7, 1.0 + 2.0**-8, 1.0078125 + 2.0**-8, 1000.3, 3.0e38, -0.0, 65504.0])
    n = x.numel()
    h = torch.empty(n, dtype=torch.float16)
    b = torch.empty(n, dtype=torch.bfloat16)
    counts = torch.empty(n, dtype=torch.float16)
    bits = torch.empty(n, dtype=torch.int32)
    lib.half_bfloat_ops(x, h, b, counts, bits, threads=n, group_size=n)
    expected_h = [to_half(to_half(to_half(v) * 3.0) + 1.0) for v in x.tolist()]
    assert h.float().tolist() == expected_h
    assert b.view(torch.int16).tolist() == x.bfloat16().view(torch.int16).tolist()  # torch rounds RNE too
    assert counts.float().tolist() == [2048.0] * n
    assert bits.tolist() == x.view(torch.int32).tolist()


MSL_VECTORS = r"""
#include <metal_stdlib>
using namespace metal;

struct Item {
  float a;
  float3 v;   // 16-byte aligned: offset 16, struct size 32
};

kernel void vector_ops(device const float4* in [[buffer(0)]],
                       device float4* out [[buffer(1)]],
                       device const packed_float3* p [[buffer(2)]],
                       device float* pout [[buffer(3)]],
                       device const Item* items [[buffer(4)]],
                       device float* iout [[buffer(5)]],
                       uint i [[thread_position_in_grid]]) {
  float4 v = in[i];
  float4 w = float4(v.zy, 0.0f, 1.0f);
  w.xw = v.wx;
  w.yz += float2(10.0f);
  out[i] = w;
  float3 q = p[i];
  pout[i] = q.x + 10.0f * q.y + 100.0f * q.z;
  iout[i] = items[i].a + items[i].v.z;
}

kernel void select_math(device const float* x [[buffer(0)]],
                        device float* out [[buffer(1)]],
                        uint i [[thread_position_in_grid]]) {
  float v = x[i];
  float4 s = select(float4(-1.0f), float4(v), float4(v) > float4(0.0f, 1.0f, 2.0f, 3.0f));
  out[i * 8 + 0] = s.x + s.y + s.z + s.w;
  out[i * 8 + 1] = clamp(v, 0.0f, 1.0f);
  out[i * 8 + 2] = fma(v, 2.0f, 1.0f);
  out[i * 8 + 3] = dot(float3(v, 1.0f, 2.0f), float3(1.0f, 2.0f, 3.0f));
  out[i * 8 + 4] = fast::exp(v);
  out[i * 8 + 5] = precise::tanh(v);
  out[i * 8 + 6] = rsqrt(abs(v) + 1.0f);
  out[i * 8 + 7] = fract(v);
}
"""


MSL_COLOUR_COMPONENTS = r"""
#include <metal_stdlib>
using namespace metal;
struct Params { float a; float r; };  // members named like colour components stay members
kernel void colours(const device float4* x, device float4* out, device half2* hout, constant Params& p,
                    uint i [[thread_position_in_grid]]) {
  float4 v = x[i];
  float4 o;
  o.r = v.a * p.a; o.g = v.b + p.r; o.b = v.g; o.a = v.r;
  half2 h = half2(v.xy);
  h.g += h.r;
  packed_float3 pk = packed_float3(v.xyz);
  o.x += pk.b - v.z;  // .b of a packed vector is its z
  out[i] = o;
  hout[i] = h;
}
"""


def test_msl_single_colour_components():
    # .r .g .b .a on vectors (reads and writes, float/half/packed), next to a
    # struct whose members are called a and r.
    torch = pytest.importorskip("torch")
    lib = _compile_shader()(MSL_COLOUR_COMPONENTS)
    x = torch.randn(40, 4)
    out = torch.empty(40, 4)
    hout = torch.empty(40, 2, dtype=torch.float16)
    lib.colours(x, out, hout, torch.tensor([2.0, 3.0]), threads=40, group_size=32)
    expected = torch.stack([x[:, 3] * 2, x[:, 2] + 3, x[:, 1], x[:, 0]], 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    h = x[:, :2].half()
    assert torch.equal(hout[:, 0], h[:, 0]) and torch.equal(hout[:, 1], (h[:, 1].float() + h[:, 0].float()).half())


def test_msl_vectors_swizzles_packed_and_struct_layout():
    torch = pytest.importorskip("torch")
    lib = _compile_shader()(MSL_VECTORS)
    n = 5
    vin = torch.arange(4 * n, dtype=torch.float32).reshape(n, 4)
    out = torch.empty(n, 4)
    p = torch.arange(3 * n, dtype=torch.float32)
    pout = torch.empty(n)
    items = torch.full((n, 8), -1.0)
    items[:, 0] = torch.arange(n, dtype=torch.float32)  # a
    items[:, 6] = 100.0 * torch.arange(n, dtype=torch.float32)  # v.z at float offset 4 + 2
    iout = torch.empty(n)
    lib.vector_ops(vin, out, p, pout, items, iout, threads=n, group_size=n)
    for i in range(n):
        x, y, z, w = vin[i].tolist()
        assert out[i].tolist() == [w, y + 10, 0.0 + 10, x]
        assert pout[i].item() == p[3 * i].item() + 10 * p[3 * i + 1].item() + 100 * p[3 * i + 2].item()
        assert iout[i].item() == i + 100.0 * i


def test_msl_select_and_math():
    torch = pytest.importorskip("torch")
    lib = _compile_shader()(MSL_VECTORS)
    x = torch.tensor([-1.5, 0.25, 1.5, 2.5, 3.75])
    n = x.numel()
    out = torch.empty(n * 8)
    lib.select_math(x, out, threads=n, group_size=n)
    out = out.reshape(n, 8)
    for i, v in enumerate(x.tolist()):
        row = out[i].tolist()
        assert row[0] == sum(v if v > t else -1.0 for t in (0.0, 1.0, 2.0, 3.0))
        assert row[1] == min(max(v, 0.0), 1.0) and row[2] == v * 2 + 1 and row[3] == v + 2 + 6
        assert row[4] == pytest.approx(math.exp(v), rel=1e-6)
        assert row[5] == pytest.approx(math.tanh(v), rel=1e-6)
        assert row[6] == pytest.approx(1 / math.sqrt(abs(v) + 1), rel=1e-6)
        assert row[7] == v - math.floor(v)


MSL_ATOMICS = r"""
#include <metal_stdlib>
using namespace metal;

kernel void atomics(device atomic_uint* counter [[buffer(0)]],
                    device atomic_float* fsum [[buffer(1)]],
                    device atomic_int* mx [[buffer(2)]],
                    device uint* per_group [[buffer(3)]],
                    device atomic_uint* cas_target [[buffer(4)]],
                    device uint* cas_won [[buffer(5)]],
                    uint i [[thread_position_in_grid]],
                    uint group [[threadgroup_position_in_grid]],
                    uint lid [[thread_index_in_threadgroup]]) {
  threadgroup atomic_uint local_count;
  if (lid == 0) atomic_store_explicit(&local_count, 0u, memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  atomic_fetch_add_explicit(counter, 1u, memory_order_relaxed);
  atomic_fetch_add_explicit(fsum, 0.5f, memory_order_relaxed);
  atomic_fetch_max_explicit(mx, int(i) * 3 - 100, memory_order_relaxed);
  atomic_fetch_add_explicit(&local_count, 1u, memory_order_relaxed);
  uint expected = 0u;
  if (atomic_compare_exchange_weak_explicit(cas_target, &expected, i + 1, memory_order_relaxed,
                                            memory_order_relaxed)) {
    cas_won[0] = i + 1;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (lid == 0) per_group[group] = atomic_load_explicit(&local_count, memory_order_relaxed);
}
"""


def test_msl_atomics_on_device_and_threadgroup_memory():
    torch = pytest.importorskip("torch")
    lib = _compile_shader()(MSL_ATOMICS)
    threads, group = 4096, 256
    counter = torch.zeros(1, dtype=torch.int32)
    fsum = torch.zeros(1)
    mx = torch.full((1,), -(2**31), dtype=torch.int32)
    per_group = torch.zeros(threads // group, dtype=torch.int32)
    cas_target = torch.zeros(1, dtype=torch.int32)
    cas_won = torch.zeros(1, dtype=torch.int32)
    lib.atomics(counter, fsum, mx, per_group, cas_target, cas_won, threads=threads, group_size=group)
    assert counter.item() == threads
    assert fsum.item() == 0.5 * threads
    assert mx.item() == (threads - 1) * 3 - 100
    assert per_group.tolist() == [group] * (threads // group)
    assert cas_target.item() != 0 and cas_won.item() == cas_target.item()  # exactly one thread won


MSL_SIMDGROUP_MATRIX = r"""
#include <metal_stdlib>
using namespace metal;

// C = A * B^T + 1 for one 8x8 tile, by one SIMD group.
template <typename T>
kernel void tile_mma(device const T* a [[buffer(0)]],
                     device const T* b [[buffer(1)]],
                     device T* c [[buffer(2)]],
                     uint lane [[thread_index_in_simdgroup]]) {
  simdgroup_matrix<T, 8, 8> ma, mb;
  simdgroup_matrix<T, 8, 8> mc = make_filled_simdgroup_matrix<T, 8, 8>(T(1));
  simdgroup_load(ma, a, 8);
  simdgroup_load(mb, b, 8, ulong2(0, 0), true);
  simdgroup_multiply_accumulate(mc, ma, mb, mc);
  simdgroup_store(mc, c, 8);
}
template [[host_name("tile_mma_float")]] kernel void tile_mma<float>(device const float*, device const float*, device float*, uint);
template [[host_name("tile_mma_half")]] kernel void tile_mma<half>(device const half*, device const half*, device half*, uint);
template [[host_name("tile_mma_bfloat")]] kernel void tile_mma<bfloat>(device const bfloat*, device const bfloat*, device bfloat*, uint);
"""


@pytest.mark.parametrize("dtype_name", ["float", "half", "bfloat"])
def test_msl_simdgroup_matrix_multiply_accumulate(dtype_name):
    torch = pytest.importorskip("torch")
    dtype = {"float": torch.float32, "half": torch.float16, "bfloat": torch.bfloat16}[dtype_name]
    lib = _compile_shader()(MSL_SIMDGROUP_MATRIX)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 8, generator=gen).to(dtype)
    b = torch.randn(8, 8, generator=gen).to(dtype)
    c = torch.empty(8, 8, dtype=dtype)
    getattr(lib, f"tile_mma_{dtype_name}")(a, b, c, threads=32, group_size=32)
    # float accumulation of the exactly-converted inputs, rounded once to the element type
    expected = (a.double() @ b.double().T + 1).to(dtype)
    tol = {"float": (1e-5, 1e-5), "half": (2e-3, 2e-3), "bfloat": (1.6e-2, 1.6e-2)}[dtype_name]
    torch.testing.assert_close(c, expected, rtol=tol[0], atol=tol[1])
