"""The emulator's Metal standard library: simdgroup_matrix (multiply-accumulate,
thread_elements through the runtime's lane hooks) and the floatCxR matrix types
(programs built by stdlib_harness).
"""

import subprocess

from stdlib_harness import (PRELUDE, bfloat_bits, bfloat_value, compile_cpp, needs_gxx, run_program, to_float32,
                            to_half)

pytestmark = needs_gxx


# simdgroup_matrix ------------------------------------------------------------------------------------


def matmul(a, b):
    return [[sum(a[r][k] * b[k][c] for k in range(8)) for c in range(8)] for r in range(8)]


def test_simdgroup_matrix_float_multiply_accumulate(tmp_path):
    # A lives at origin (column 3, row 2) of a 12-column row-major buffer; B is read transposed
    # from a 8-column buffer; C is filled with 0.5. D = A*B + C is stored at origin (2, 1) of a
    # 10-column buffer, and transposed into others (with zero and non-zero origins).
    v = run_program(
        tmp_path,
        r"""
        float abuf[12 * 12], bbuf[64], dbuf[10 * 10], tbuf[64];
        for (int i = 0; i < 144; ++i) abuf[i] = float(i % 13) - 6.0f;
        for (int i = 0; i < 64; ++i) bbuf[i] = float((i * 7) % 11) * 0.25f;
        for (int i = 0; i < 100; ++i) dbuf[i] = -99.0f;
        simdgroup_float8x8 a, b, d;
        simdgroup_float8x8 c = make_filled_simdgroup_matrix<float, 8, 8>(0.5f);
        simdgroup_load(a, abuf, 12, ulong2(3, 2));
        simdgroup_load(b, bbuf, 8, 0, true);
        simdgroup_multiply_accumulate(d, a, b, c);
        simdgroup_store(d, dbuf, 10, ulong2(2, 1));
        simdgroup_store(d, tbuf, 8, ulong2(0), true);
        simdgroup_float8x8 p;
        simdgroup_multiply(p, a, b);
        simdgroup_float8x8 diag = simdgroup_float8x8(2.0f);
        simdgroup_float8x8 twice;
        simdgroup_multiply(twice, diag, a);        // diagonal 2: doubles every element of a
        simdgroup_multiply_accumulate(c, c, diag, c);   // destination aliasing its inputs
        // transposed load and store with non-zero origins (origin in the matrix's coordinates)
        float ebuf[10 * 10], ubuf[12 * 12];
        for (int i = 0; i < 100; ++i) ebuf[i] = float(i);
        for (int i = 0; i < 144; ++i) ubuf[i] = -7.0f;
        simdgroup_float8x8 e;
        simdgroup_load(e, ebuf, 10, ulong2(1, 2), true);
        simdgroup_store(d, ubuf, 12, ulong2(2, 1), true);
        for (int i = 0; i < 64; ++i) { char k[16]; std::snprintf(k, 16, "e%d", i); out(k, e.__elements[i / 8][i % 8]); }
        for (int i = 0; i < 144; ++i) { char k[16]; std::snprintf(k, 16, "u%d", i); out(k, ubuf[i]); }
        for (int i = 0; i < 100; ++i) { char k[16]; std::snprintf(k, 16, "d%d", i); out(k, dbuf[i]); }
        for (int i = 0; i < 64; ++i) { char k[16]; std::snprintf(k, 16, "t%d", i); out(k, tbuf[i]); }
        for (int i = 0; i < 64; ++i) { char k[16]; std::snprintf(k, 16, "p%d", i); out(k, p.__elements[i / 8][i % 8]); }
        for (int i = 0; i < 64; ++i) { char k[16]; std::snprintf(k, 16, "w%d", i); out(k, twice.__elements[i / 8][i % 8]); }
        out("alias", c.__elements[0][0]); out("alias_off", c.__elements[0][1]);
        """,
    )
    abuf = [float(i % 13) - 6.0 for i in range(144)]
    bbuf = [float((i * 7) % 11) * 0.25 for i in range(64)]
    A = [[abuf[(2 + r) * 12 + 3 + c] for c in range(8)] for r in range(8)]
    B = [[bbuf[c * 8 + r] for c in range(8)] for r in range(8)]  # transposed load
    P = matmul(A, B)
    D = [[P[r][c] + 0.5 for c in range(8)] for r in range(8)]  # exact: small multiples of 0.25
    for i in range(100):
        row, col = divmod(i, 10)
        inside = 1 <= row < 9 and 2 <= col < 10
        assert v[f"d{i}"] == (D[row - 1][col - 2] if inside else -99.0), i
    for i in range(64):
        r, c = divmod(i, 8)
        assert v[f"t{i}"] == D[c][r]
        assert v[f"p{i}"] == P[r][c]
        assert v[f"w{i}"] == 2 * A[r][c]
    assert v["alias"] == 0.5 * 2 + 0.5 and v["alias_off"] == 0.5 * 2 + 0.5
    # transposed: element (r, c) lives at memory row origin.x + c, memory column origin.y + r
    for i in range(64):
        r, c = divmod(i, 8)
        assert v[f"e{i}"] == (1 + c) * 10 + (2 + r)
    expected_u = [-7.0] * 144
    for r in range(8):
        for c in range(8):
            expected_u[(2 + c) * 12 + (1 + r)] = D[r][c]
    assert [v[f"u{i}"] for i in range(144)] == expected_u


def test_simdgroup_matrix_half_and_bfloat(tmp_path):
    v = run_program(
        tmp_path,
        r"""
        half ah[64], bh[64], oh[64];
        bfloat ab[64], bb[64], ob[64];
        for (int i = 0; i < 64; ++i) {
          ah[i] = half(0.1f * float(i % 9) - 0.3f); bh[i] = half(1.0f / float(1 + i % 5));
          ab[i] = bfloat(0.1f * float(i % 9) - 0.3f); bb[i] = bfloat(1.0f / float(1 + i % 5));
        }
        simdgroup_half8x8 a, b, d;
        simdgroup_load(a, ah); simdgroup_load(b, bh);
        simdgroup_multiply_accumulate(d, a, b, simdgroup_half8x8(0));
        simdgroup_store(d, oh);
        simdgroup_bfloat8x8 x, y, z;
        simdgroup_load(x, ab); simdgroup_load(y, bb);
        simdgroup_multiply(z, x, y);
        simdgroup_store(z, ob);
        for (int i = 0; i < 64; ++i) {
          char k[16];
          std::snprintf(k, 16, "h%d", i); out(k, oh[i]);
          std::snprintf(k, 16, "b%d", i); out(k, ob[i]);
        }
        """,
    )
    f32 = to_float32
    ah = [to_half(f32(f32(0.1 * (i % 9)) - 0.3)) for i in range(64)]
    bh = [to_half(f32(1.0 / (1 + i % 5))) for i in range(64)]
    ab = [bfloat_value(bfloat_bits(f32(f32(0.1 * (i % 9)) - 0.3))) for i in range(64)]
    bb = [bfloat_value(bfloat_bits(f32(1.0 / (1 + i % 5)))) for i in range(64)]

    def float_accumulated(a, b, r, c):
        # products and the running sum in float32, as the header documents
        s = 0.0
        for k in range(8):
            s = f32(s + f32(a[r * 8 + k] * b[k * 8 + c]))
        return s

    for i in range(64):
        r, c = divmod(i, 8)
        assert v[f"h{i}"] == to_half(float_accumulated(ah, bh, r, c)), i
        assert v[f"b{i}"] == bfloat_value(bfloat_bits(float_accumulated(ab, bb, r, c))), i


LANE_HOOKS = r"""
// A stand-in for the runtime: 32 OS threads are the lanes of one SIMD group; the hooks the header
// declares weak are defined here as metal_runtime.h would define them.
#include <cstring>
#include <thread>
#include <mutex>
#include <condition_variable>
#include <vector>
struct LaneBarrier {
  std::mutex m; std::condition_variable cv; int count = 0, generation = 0;
  void wait() {
    std::unique_lock<std::mutex> l(m);
    int g = generation;
    if (++count == 32) { count = 0; ++generation; cv.notify_all(); }
    else cv.wait(l, [&] { return g != generation; });
  }
};
static LaneBarrier lane_barrier;
static unsigned char exchange_area[32 * 64];
namespace __mtl {
thread_local unsigned short current_lane;
unsigned short simdgroup_lane_id() { return current_lane; }
void simdgroup_allgather(const void* mine, void* all, unsigned long bytes) {
  std::memcpy(exchange_area + current_lane * bytes, mine, bytes);
  lane_barrier.wait();
  std::memcpy(all, exchange_area, 32 * bytes);
  lane_barrier.wait();
}
}  // namespace __mtl
// PyTorch-gemm style: whole loads, results read per lane through thread_elements().
void kernel_read(const float* a, const float* b, float* c, ushort lane) {
  simdgroup_float8x8 ma, mb, mc = simdgroup_float8x8(0);
  simdgroup_load(ma, a);
  simdgroup_load(mb, b);
  simdgroup_multiply_accumulate(mc, ma, mb, mc);
  const short q = lane / 4, fm = (q & 4) + ((lane / 2) % 4), fn = (q & 2) * 2 + (lane % 2) * 2;
  float2 e = mc.thread_elements();
  c[fm * 8 + fn] = e[0];
  c[fm * 8 + fn + 1] = mc.thread_elements()[1];
}
// MLX style: each lane writes its fragment, then the matrices are used whole (mixed precision).
void kernel_write(const half* a, const half* b, float* c, ushort lane) {
  simdgroup_half8x8 ma, mb;
  simdgroup_float8x8 mc = make_filled_simdgroup_matrix<float, 8, 8>(0.5f);
  const short q = lane / 4, fm = (q & 4) + ((lane / 2) % 4), fn = (q & 2) * 2 + (lane % 2) * 2;
  ma.thread_elements() = half2(a[fm * 8 + fn], a[fm * 8 + fn + 1]);
  mb.thread_elements()[0] = b[fm * 8 + fn];
  mb.thread_elements()[1] = b[fm * 8 + fn + 1];
  simdgroup_multiply_accumulate(mc, ma, mb, mc);
  simdgroup_store(mc, c);
}
"""


def test_simdgroup_matrix_thread_elements_with_runtime_hooks(tmp_path):
    v = run_program(
        tmp_path,
        r"""
        float a[64], b[64], c1[64] = {}, c2[64] = {};
        half ah[64], bh[64];
        for (int i = 0; i < 64; ++i) {
          a[i] = float(i % 7) - 3; b[i] = float(i % 5) * 0.5f; ah[i] = half(a[i]); bh[i] = half(b[i]);
        }
        std::vector<std::thread> lanes;
        for (int l = 0; l < 32; ++l)
          lanes.emplace_back([&, l] { __mtl::current_lane = l; kernel_read(a, b, c1, l); kernel_write(ah, bh, c2, l); });
        for (auto& t : lanes) t.join();
        for (int i = 0; i < 64; ++i) { char k[16]; std::snprintf(k, 16, "r%d", i); out(k, c1[i]); }
        for (int i = 0; i < 64; ++i) { char k[16]; std::snprintf(k, 16, "w%d", i); out(k, c2[i]); }
        """,
        globals_src=LANE_HOOKS,
        extra_flags=("-pthread",),
    )
    a = [[float(i % 7) - 3 for i in range(r * 8, r * 8 + 8)] for r in range(8)]
    b = [[float(i % 5) * 0.5 for i in range(r * 8, r * 8 + 8)] for r in range(8)]
    product = matmul(a, b)  # small multiples of 0.5: exact in float and half
    for i in range(64):
        r, c = divmod(i, 8)
        assert v[f"r{i}"] == product[r][c], i
        assert v[f"w{i}"] == product[r][c] + 0.5, i


def test_simdgroup_matrix_thread_elements_without_hooks_fails_clearly(tmp_path):
    source = PRELUDE + r"""
    int main() {
      simdgroup_float8x8 m = simdgroup_float8x8(1.0f);
      float2 e = m.thread_elements();
      return int(e.x);
    }
    """
    proc, exe = compile_cpp(tmp_path, source)
    assert proc.returncode == 0, proc.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode != 0
    assert "needs the runtime's lane hooks" in run.stderr


def test_matrix_types(tmp_path):
    v = run_program(
        tmp_path,
        r"""
        out("size3x3", sizeof(float3x3)); out("size4x4", sizeof(float4x4)); out("size2x3", sizeof(float2x3));
        out("size_h3x3", sizeof(half3x3));
        float2x2 id = float2x2(1.0f);
        float3x2 m = float3x2(float2(1, 2), float2(3, 4), float2(5, 6));     // 3 columns, 2 rows
        float2x3 t = transpose(m);                                           // 2 columns, 3 rows
        float2 mv = m * float3(1, 1, 1);                                     // 2 rows
        float3 vm = float2(1, 1) * m;                                        // 3 columns
        float2x2 mt = m * t;                                                 // (2x3)(3x2)
        float2x2 s = float2x2(1, 2, 3, 4);                                   // column-major scalars
        float2x2 sum = s + id * 2.0f;
        float4x4 big = float4x4(float4(2, 0, 0, 0), float4(1, 3, 0, 0), float4(0, 0, 1, 0), float4(5, 0, 0, 4));
        half2x2 h = half2x2(s);
        out("id01", id[0][1]); out("id11", id[1][1]);
        out("t10", t[1][0]); out("t02", t[0][2]);
        out("mv0", mv.x); out("mv1", mv.y);
        out("vm0", vm.x); out("vm1", vm.y); out("vm2", vm.z);
        out("mt00", mt[0][0]); out("mt01", mt[0][1]); out("mt10", mt[1][0]); out("mt11", mt[1][1]);
        out("s10", s[1][0]); out("sum00", sum[0][0]); out("sum11", sum[1][1]);
        out("det2", determinant(s)); out("det3", determinant(float3x3(float3(2, 0, 1), float3(1, 3, 2), float3(1, 1, 1))));
        out("det4", determinant(big)); out("h11", h[1][1]);
        """,
    )
    assert (v["size3x3"], v["size4x4"], v["size2x3"], v["size_h3x3"]) == (48, 64, 32, 24)
    assert (v["id01"], v["id11"]) == (0.0, 1.0)
    assert (v["t10"], v["t02"]) == (2.0, 5.0)  # t = rows of m as columns: t[1] = (2, 4, 6)
    assert (v["mv0"], v["mv1"]) == (9.0, 12.0)
    assert (v["vm0"], v["vm1"], v["vm2"]) == (3.0, 7.0, 11.0)
    # m * m^T with m = [[1, 3, 5], [2, 4, 6]]: [[35, 44], [44, 56]]
    assert (v["mt00"], v["mt01"], v["mt10"], v["mt11"]) == (35.0, 44.0, 44.0, 56.0)
    assert v["s10"] == 3.0 and v["sum00"] == 3.0 and v["sum11"] == 6.0
    assert v["det2"] == 1 * 4 - 3 * 2
    # columns (2,0,1), (1,3,2), (1,1,1): rows [[2,1,1],[0,3,1],[1,2,1]] -> 2*(3-2) - 1*(0-1) + 1*(0-3) = 0
    assert v["det3"] == 0.0
    # upper triangular after reading columns as given: rows [[2,1,0,5],[0,3,0,0],[0,0,1,0],[0,0,0,4]]
    assert v["det4"] == 2 * 3 * 1 * 4 and v["h11"] == 4.0
