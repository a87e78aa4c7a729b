"""The emulator's Metal standard library under code shaped like translated kernels and
shader-library idioms (type traits, metal::array, relational functions); the header's
own compile time (programs built by stdlib_harness).
"""

import math
import subprocess

import pytest

from stdlib_harness import GXX, FLAGS, run_program, to_half, to_float32, bfloat_bits, bfloat_value, needs_gxx

pytestmark = needs_gxx


# Code shaped like translated kernels ---------------------------------------------------------------


KERNEL_IDIOMS = r"""
// What the translator produces from typical templated MSL (address spaces erased).
template <typename T>
void rms_norm_row(const T* x, const T* w, T* out, const uint& n, float eps, uint tid) {
  float acc = 0;
  for (uint i = 0; i < n; ++i) acc += float(x[i]) * float(x[i]);
  float inv = metal::precise::rsqrt(acc / n + eps);
  T scale = static_cast<T>(inv);
  T zero = 0;
  for (uint i = tid; i < n; ++i) {
    T y = x[i] * scale * w[i];
    out[i] = max(y, zero) + T(0);
  }
}
template void rms_norm_row<float>(const float*, const float*, float*, const uint&, float, uint);
template void rms_norm_row<half>(const half*, const half*, half*, const uint&, float, uint);
template void rms_norm_row<bfloat>(const bfloat*, const bfloat*, bfloat*, const uint&, float, uint);

void vec4_kernel(const float* in, half* out, uint gid) {
  const float4 v = reinterpret_cast<const float4*>(in)[gid];
  float4 r = select(float4(0), v, v > 0.0f);           // relu
  r = clamp(r, 0, 6) + fast::tanh(float4(0));
  reinterpret_cast<half4*>(out)[gid] = half4(r);
  uint3 pos = uint3(gid, 0, 0);
  out[0] = half(float(pos.x) + float(__mtl::swizzle<1, 2>(pos).x));
}
"""


def test_kernel_idioms_compile_and_compute(tmp_path):
    v = run_program(
        tmp_path,
        r"""
        float xf[4] = {1, -2, 3, -4}, wf[4] = {1, 1, 1, 1}, of[4];
        uint n = 4;
        rms_norm_row<float>(xf, wf, of, n, 0.0f, 0);
        for (int i = 0; i < 4; ++i) { char k[8]; std::snprintf(k, 8, "f%d", i); out(k, of[i]); }
        half xh[4] = {half(1.0f), half(-2.0f), half(3.0f), half(-4.0f)}, wh[4], oh[4];
        bfloat xb[4] = {1.0f, -2.0f, 3.0f, -4.0f}, wb[4], ob[4];
        for (int i = 0; i < 4; ++i) { wh[i] = half(1.0f); wb[i] = 1.0f; }
        rms_norm_row<half>(xh, wh, oh, n, 0.0f, 0);
        rms_norm_row<bfloat>(xb, wb, ob, n, 0.0f, 0);
        out("h2", oh[2]); out("b2", ob[2]); out("h1", oh[1]);
        float in[8] = {-1, 0.5f, 7, 2, 0, 0, 0, 0};
        half o[8];
        vec4_kernel(in, o, 0);
        out("v1", o[1]); out("v2", o[2]); out("v3", o[3]); out("v0", o[0]);
        """,
        globals_src=KERNEL_IDIOMS,
    )
    inv = to_float32(1 / to_float32(math.sqrt(7.5)))  # 1.0f / sqrtf(30.0f / 4)
    assert v["f0"] == pytest.approx(1 * inv, rel=1e-7) and v["f1"] == 0.0
    assert v["f2"] == pytest.approx(3 * inv, rel=1e-7)
    assert v["h2"] == to_half(to_half(3.0) * to_half(inv)) and v["h1"] == 0.0
    assert v["b2"] == bfloat_value(bfloat_bits(3.0 * bfloat_value(bfloat_bits(inv))))
    assert v["v1"] == 0.5 and v["v2"] == 6.0 and v["v3"] == 2.0 and v["v0"] == 0.0


# Type traits, metal::array, relational functions, and library idioms ----------------------------------

LIBRARY_IDIOMS = r"""
// Patterns from shader libraries written against Metal's standard library (PyTorch's c10/metal
// style): metal:: type traits, metal::array, isunordered, templated helpers in a nested
// namespace named metal, sub-word atomics built from atomic<uint> compare-exchange.
namespace c10 { namespace metal {
template <typename T, unsigned N> using array = ::metal::array<T, N>;
template <typename T> ::metal::enable_if_t<::metal::is_floating_point_v<T>, T> max(T a, T b) {
  return ::metal::isunordered(a, b) ? NAN : ::metal::max(a, b);
}
template <typename U, typename V> using common_dtype = decltype(U(0) + V(0));
template <typename F, typename... Args>
using result_of = decltype(::metal::declval<F>()(::metal::declval<Args>()...));
template <typename T> constexpr bool is_complex_v = ::metal::is_same_v<T, float2> || ::metal::is_same_v<T, half2>;
template <typename T> static inline void atomic_add_subword(::metal::atomic<uint>* data, long offset, T value) {
  constexpr auto per_word = sizeof(uint) / sizeof(T);
  auto ptr = data + (offset / per_word);
  auto old = ::metal::atomic_load_explicit(ptr, ::metal::memory_order_relaxed);
  union { uint i; T t[per_word]; } val;
  do {
    val.i = old;
    val.t[offset & (per_word - 1)] += value;
  } while (!::metal::atomic_compare_exchange_weak_explicit(ptr, &old, val.i, ::metal::memory_order_relaxed,
                                                           ::metal::memory_order_relaxed));
}
}}  // namespace c10::metal
struct Square { float operator()(half x) const { return float(x) * float(x); } };
"""


def test_type_traits_array_relational_and_library_idioms(tmp_path):
    v = run_program(
        tmp_path,
        r"""
        out("fp_half", is_floating_point_v<half>); out("fp_bfloat", is_floating_point_v<bfloat>);
        out("fp_int", is_floating_point_v<int>); out("fp_float4", is_floating_point_v<float4>);
        out("int_bool", is_integral_v<bool>); out("int_uint", is_integral_v<uint>);
        out("scalar_half", is_scalar_v<half>); out("scalar_float4", is_scalar_v<float4>);
        out("vector_float4", is_vector_v<float4>); out("vector_float", is_vector_v<float>);
        out("signed_half", is_signed_v<half>); out("unsigned_uint", is_unsigned_v<uint>);
        out("elements3", vec_elements<float3>::value); out("elements1", vec_elements<float>::value);
        out("same", is_same_v<make_unsigned_t<int>, uint>);
        out("common_hf", is_same_v<c10::metal::common_dtype<half, float>, float>);
        out("common_bb", is_same_v<c10::metal::common_dtype<bfloat, bfloat>, bfloat>);
        out("common_bf", is_same_v<c10::metal::common_dtype<bfloat, float>, float>);
        out("result_of", is_same_v<c10::metal::result_of<Square, half>, float>);
        out("complex", c10::metal::is_complex_v<half2> && !c10::metal::is_complex_v<float>);
        c10::metal::array<float, 3> arr = {1.5f, 2.5f, 3.5f};
        float total = 0; for (float x : arr) total += x;
        out("arr_sum", total); out("arr_size", arr.size()); out("arr_1", arr[1]);
        out("nan_max", isnan(c10::metal::max(1.0f, NAN))); out("plain_max", c10::metal::max(half(1), half(2)));
        out("unord", isunordered(NAN, 1.0f)); out("ord", isordered(1.0f, 2.0f));
        out("gt", isgreater(2.0f, 1.0f)); out("gt_nan", isgreater(NAN, 1.0f)); out("le", islessequal(1.0f, 1.0f));
        out("lg", islessgreater(1.0f, 2.0f)); out("ne", isnotequal(NAN, NAN));
        bool4 uv = isunordered(float4(NAN, 1, 2, 3), 1.0f);
        out("unord_v", uv.x * 1000 + uv.y * 100 + uv.z * 10 + uv.w);
        uint words[2] = {0, 0};
        c10::metal::atomic_add_subword(reinterpret_cast<atomic_uint*>(words), 1, half(1.5f));
        c10::metal::atomic_add_subword(reinterpret_cast<atomic_uint*>(words), 1, half(0.25f));
        c10::metal::atomic_add_subword(reinterpret_cast<atomic_uint*>(words), 2, bfloat(2.0f));
        out("word0", words[0]); out("word1", words[1]);
        out("mulhi", mulhi(0x80000000u, 6u)); out("mul24", mul24(1000, 1000)); out("mad24", mad24(3, 4, 5));
        out("madhi", madhi(0x80000000u, 4u, 1u)); out("madsat", madsat(100000, 100000, 1) == INT_MAX);
        out("madsat_neg", madsat(-100000, 100000, 1) == INT_MIN); out("madsat_ok", madsat(7, 6, -2));
        out("fmax3", fmax3(1.0f, 5.0f, 3.0f)); out("fmedian3", fmedian3(1.0f, 5.0f, 3.0f)); out("ilogb", ilogb(48.0f));
        out("metal_version", __METAL_VERSION__);
        """,
        globals_src=LIBRARY_IDIOMS,
    )
    # (Metal's is_floating_point holds for vectors too: c10/metal defines is_scalar_floating_point_v as
    # `is_floating_point_v<T> && is_scalar_v<T>`, and PyTorch's complex float2/half2 functors are chosen by
    # is_floating_point_v)
    assert (v["fp_half"], v["fp_bfloat"], v["fp_int"], v["fp_float4"]) == (1, 1, 0, 1)
    assert (v["int_bool"], v["int_uint"], v["scalar_half"], v["scalar_float4"]) == (1, 1, 1, 0)
    assert (v["vector_float4"], v["vector_float"], v["signed_half"], v["unsigned_uint"]) == (1, 0, 1, 1)
    assert (v["elements3"], v["elements1"], v["same"]) == (3, 1, 1)
    assert (v["common_hf"], v["common_bb"], v["common_bf"], v["result_of"], v["complex"]) == (1, 1, 1, 1, 1)
    assert (v["arr_sum"], v["arr_size"], v["arr_1"]) == (7.5, 3, 2.5)
    assert v["nan_max"] == 1 and v["plain_max"] == 2.0
    assert (v["unord"], v["ord"], v["gt"], v["gt_nan"], v["le"], v["lg"], v["ne"]) == (1, 1, 1, 0, 1, 1, 1)
    assert v["unord_v"] == 1000
    # half 1.75 (0x3F00) in the upper 16 bits of word 0 (element 1); bfloat 2.0 (0x4000) low in word 1.
    assert v["word0"] == 0x3F000000 and v["word1"] == 0x4000
    assert v["mulhi"] == 3 and v["mul24"] == 1000000 and v["mad24"] == 17 and v["madhi"] == 3
    assert v["madsat"] == 1 and v["madsat_neg"] == 1 and v["madsat_ok"] == 40
    assert (v["fmax3"], v["fmedian3"], v["ilogb"]) == (5.0, 3.0, 5)
    assert v["metal_version"] >= 310


def test_header_compiles_alone_quickly_enough_to_matter(tmp_path):
    # Not a benchmark: a regression guard that the prelude stays cheap (measured ~0.05 s here;
    # <cmath> alone costs ~0.15 s). The bound is loose so that a loaded CI machine passes.
    import time

    src = tmp_path / "only_header.cpp"
    src.write_text('#include "metal_stdlib.h"\nusing namespace metal;\n')
    start = time.perf_counter()
    proc = subprocess.run([GXX, *FLAGS, "-c", str(src), "-o", str(tmp_path / "only_header.o")],
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 3.0, f"compiling the header alone took {elapsed:.2f} s"
