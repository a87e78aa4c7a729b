// Helpers shared by every op family: argument checks, the Metal type name of a
// dtype, and the vector helpers of the CPU kernels.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace my_mps_ops {

// float32, float16 and bfloat16 everywhere; float64 too on CPU (for gradcheck).
inline void check_float_dtype(const at::Tensor& t, const char* op, const char* arg) {
  const auto dt = t.scalar_type();
  const bool ok = dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 ||
                  (dt == at::kDouble && !t.is_mps());
  TORCH_CHECK(ok, op, ": ", arg, " must be float32, float16 or bfloat16 (float64 on cpu only), got ", dt,
              " on ", t.device());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg,
                             const char* ref_arg) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", arg, " must have the same dtype as ", ref_arg,
              " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg,
                              const char* ref_arg) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", arg, " must be on the same device as ", ref_arg, " (",
              ref.device(), "), got ", t.device());
}

// Norm parameters (weight, bias) have the input's dtype, or are float32 for a
// float16 / bfloat16 input, as torch.nn.functional.layer_norm and rms_norm
// accept (e.g. float32 weights under autocast); the output keeps the input's
// dtype and a parameter's gradient has the parameter's dtype.
inline void check_param_dtype(const at::Tensor& p, const at::Tensor& input, const char* op, const char* arg) {
  const auto pt = p.scalar_type(), it = input.scalar_type();
  TORCH_CHECK(pt == it || (pt == at::kFloat && (it == at::kHalf || it == at::kBFloat16)), op, ": ", arg,
              " must have the dtype of input (", it, "), or be float32 when input is float16 or bfloat16; got ", pt);
}

// A parameter as the CPU kernels read it: in the accumulation dtype (float32;
// float64 for float64 input). Undefined when absent.
inline at::Tensor param_for_cpu(const std::optional<at::Tensor>& p, const at::Tensor& input) {
  if (!p.has_value()) return at::Tensor();
  return p->to(input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

// A parameter as the Metal kernels read it: in the input's dtype (a float32
// parameter of a narrow input is rounded to it). Without one, `input` itself
// (the kernels bind a buffer there but do not read it).
inline at::Tensor param_for_metal(const std::optional<at::Tensor>& p, const at::Tensor& input) {
  return p.has_value() ? p->to(input.scalar_type()).contiguous() : input;
}

// The MSL element type name used in [[host_name]] suffixes, e.g. "rms_norm_forward_bfloat".
inline const char* metal_type_name(at::ScalarType dt) {
  switch (dt) {
    case at::kFloat: return "float";
    case at::kHalf: return "half";
    case at::kBFloat16: return "bfloat";
    default: TORCH_CHECK(false, "my_mps_ops: no Metal kernels for dtype ", dt);
  }
}

// Threads for a threadgroup that owns one row of n elements, each thread
// reading `per_thread` of them per pass: a multiple of the SIMD width, at most
// the pipeline's limit.
inline uint32_t row_threadgroup_size(int64_t n, int64_t per_thread, uint32_t max_threads, uint32_t simd_width) {
  const int64_t wanted = (n + per_thread - 1) / per_thread;
  int64_t threads = ((wanted + simd_width - 1) / simd_width) * simd_width;
  threads = std::max<int64_t>(threads, simd_width);
  const int64_t cap = (max_threads / simd_width) * simd_width;
  return static_cast<uint32_t>(std::min<int64_t>(threads, cap));
}

// Dispatch over the dtypes the CPU kernels take.
#define MY_MPS_OPS_DISPATCH_CPU_TYPES(TYPE, NAME, ...)          \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace cpu {

// Accumulation type: float32 for float32/float16/bfloat16, float64 for float64.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// float32 vectors as GCC/Clang vector types: plain operators that become one
// instruction per vector. Used where auto-vectorisation of lane arrays fails
// (reductions with a max, the exp of a reduction). The loops are templates on
// the vector type V: f32x8 in the AVX2 copies, f32x16 in the AVX-512 ones,
// f32x4 (one SSE2 / NEON register) in the baseline ones — GCC lowers the wider
// types without AVX through the stack, about ten times slower.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // no vector crosses a non-inlined call
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));  // only inlined into AVX-512 copies
typedef int32_t i32x16 __attribute__((vector_size(64)));

// The same-width int32 vector of V (float for scalar code).
template <typename V> struct IntLanes;
template <> struct IntLanes<float> { using type = int32_t; };
template <> struct IntLanes<f32x4> { using type = i32x4; };
template <> struct IntLanes<f32x8> { using type = i32x8; };
template <> struct IntLanes<f32x16> { using type = i32x16; };

template <typename V>
constexpr int64_t kLanes = int64_t(sizeof(V) / sizeof(float));
template <typename V>
__attribute__((always_inline)) inline V loadv(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V>
__attribute__((always_inline)) inline void storev(float* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename V>
__attribute__((always_inline)) inline V splatv(float c) {
  return V{} + c;
}
template <typename V>
__attribute__((always_inline)) inline V maxv(V a, V b) {
  return a > b ? a : b;
}
template <typename V>
__attribute__((always_inline)) inline float reduce_maxv(V v) {
  float m = v[0];
  for (int i = 1; i < kLanes<V>; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
template <typename V>
__attribute__((always_inline)) inline float reduce_sumv(V v) {
  float s = 0;
  for (int i = 0; i < kLanes<V>; ++i) s += v[i];
  return s;
}

// exp for float32, one lane (exp_f32) or a vector, from one definition:
// libm's expf is a call per element, this vectorises. Cody-Waite range
// reduction and a degree-6 polynomial, ~2 ulp; saturates outside [-87, 88];
// k = round(x / ln 2) comes from adding 1.5 * 2^23, which leaves k in the low
// mantissa bits (no float->int->float round trip). NaN stays NaN.
template <typename V>
__attribute__((always_inline)) inline V exp_poly(V x) {
  using Int = typename IntLanes<V>::type;
  constexpr float kRoundShift = 12582912.0f;  // 1.5 * 2^23; its bits are 0x4B400000
  x = x < -87.0f ? splatv<V>(-87.0f) : x;
  x = x > 88.0f ? splatv<V>(88.0f) : x;
  const V shifted = x * 1.44269504088896341f + kRoundShift;
  const V k = shifted - kRoundShift;
  const V r = x - k * 0.693359375f + k * 2.12194440e-4f;
  V p = splatv<V>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  Int k_int;
  std::memcpy(&k_int, &shifted, sizeof(k_int));
  const Int bits = (k_int - 0x4B400000 + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
__attribute__((always_inline)) inline float exp_f32(float x) { return exp_poly(x); }

// Streaming (non-temporal) stores for outputs much larger than the caches:
// they skip the read-for-ownership of each written line, about a quarter of
// the traffic of an elementwise backward. x86-64 AVX copies only; elsewhere a
// plain store. stream_fence orders the streamed lines before the thread's work
// is handed back.
constexpr int64_t kStreamMinBytes = int64_t(16) << 20;
#if defined(__x86_64__) && defined(__GNUC__)
// Inline asm rather than the builtins: a builtin would tie every always_inline
// caller to the AVX target; these are only ever inlined into AVX2 / AVX-512
// copies. streamv needs an address aligned to the vector's size.
template <typename V>
__attribute__((always_inline)) inline void streamv(float* p, V v) {
  static_assert(sizeof(V) == 32 || sizeof(V) == 64);
  asm volatile("vmovntps %1, %0" : "=m"(*reinterpret_cast<V*>(p)) : "v"(v));
}
__attribute__((always_inline)) inline void stream_fence() { __builtin_ia32_sfence(); }
#else
template <typename V>
__attribute__((always_inline)) inline void streamv(float* p, V v) {
  storev(p, v);
}
__attribute__((always_inline)) inline void stream_fence() {}
#endif
// Elements of float before p reaches an alignment of `bytes`.
inline int64_t floats_to_align(const float* p, int64_t bytes) {
  return int64_t((bytes - reinterpret_cast<uintptr_t>(p) % bytes) % bytes) / int64_t(sizeof(float));
}
#pragma GCC diagnostic pop

// Conversions between T and float32 over n elements. bfloat16 goes eight
// lanes at a time with integer ops (c10::BFloat16's scalar conversion has a
// NaN branch that keeps loops scalar): widening is a 16-bit shift; narrowing
// rounds to nearest even and keeps NaN a quiet NaN, like c10.
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

template <typename T>
__attribute__((always_inline)) inline void widen(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (; i + 8 <= n; i += 8) {
      u16x8 h;
      std::memcpy(&h, src + i, sizeof(h));
      const u32x8 bits = __builtin_convertvector(h, u32x8) << 16;
      std::memcpy(dst + i, &bits, sizeof(bits));
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
__attribute__((always_inline)) inline void narrow(const float* src, T* dst, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (; i + 8 <= n; i += 8) {
      f32x8 v;
      u32x8 bits;
      std::memcpy(&v, src + i, sizeof(v));
      std::memcpy(&bits, &v, sizeof(bits));
      const u32x8 rounded = (bits + (0x7FFFu + ((bits >> 16) & 1u))) >> 16;
      const u32x8 out = v != v ? u32x8{} + 0x7FC0u : rounded;
      const u16x8 h = __builtin_convertvector(out, u16x8);
      std::memcpy(dst + i, &h, sizeof(h));
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// A row as float32: float32 rows are used in place, narrow ones are widened
// into `buffer` (n floats).
template <typename T>
__attribute__((always_inline)) inline const float* widened(const T* src, float* buffer, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    widen(src, buffer, n);
    return buffer;
  }
}

// Runs fn(chunk, row_begin, row_end, scratch) over `chunks` fixed chunks of
// `rows` rows, in parallel. Fixed chunks keep per-chunk partial sums (weight
// gradients) deterministic; `scratch` is scratch_floats floats per task.
template <typename F>
void parallel_row_chunks(int64_t rows, int64_t chunks, int64_t scratch_floats, const F& fn) {
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<float> scratch(scratch_floats);
    for (int64_t c = chunk_begin; c < chunk_end; ++c)
      fn(c, rows * c / chunks, rows * (c + 1) / chunks, scratch.data());
  });
}

// A tensor read as `rows` rows of `cols` contiguous elements, row_stride apart:
// a contiguous tensor, or a slice of one along the last dimension (the halves
// of a fused gate/up projection from chunk(2, -1)). Elementwise kernels read
// such views in place instead of copying them; nullopt for any other layout.
struct RowView {
  int64_t rows, cols, row_stride;
};
inline std::optional<RowView> row_view(const at::Tensor& t) {
  const int64_t dim = t.dim();
  const int64_t cols = dim == 0 ? 1 : t.size(-1);
  if (dim > 0 && cols > 1 && t.stride(-1) != 1) return std::nullopt;
  int64_t rows = 1, row_stride = -1, expected = -1;
  for (int64_t d = dim - 2; d >= 0; --d) {
    rows *= t.size(d);
    if (t.size(d) == 1) continue;  // any stride
    if (row_stride < 0) row_stride = expected = t.stride(d);
    if (t.stride(d) != expected) return std::nullopt;
    expected = t.stride(d) * t.size(d);
  }
  return RowView{rows, cols, row_stride < 0 ? cols : row_stride};
}

// Whether this CPU runs the AVX2+FMA copies of the hot loops (x86-64 only;
// those copies are compiled with __attribute__((target("avx2,fma")))), and the
// AVX-512 copies (target("avx512f,avx2,fma"), sixteen lanes per vector).
// MY_MPS_OPS_CPU_ISA=baseline|avx2|avx512, read once, caps the copies used so
// that the tests run every copy on one machine (the baseline copy is the code
// non-x86 CPUs run); unset means the best the CPU has.
#if defined(__x86_64__) && defined(__GNUC__)
#define MY_MPS_OPS_X86_AVX2_COPIES 1
enum class CpuIsa { Baseline, Avx2, Avx512 };
inline CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
    CpuIsa best = CpuIsa::Baseline;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      best = __builtin_cpu_supports("avx512f") ? CpuIsa::Avx512 : CpuIsa::Avx2;
    const char* cap = std::getenv("MY_MPS_OPS_CPU_ISA");
    if (cap == nullptr || *cap == 0 || std::strcmp(cap, "avx512") == 0) return best;
    if (std::strcmp(cap, "avx2") == 0) return std::min(best, CpuIsa::Avx2);
    TORCH_CHECK(std::strcmp(cap, "baseline") == 0,
                "MY_MPS_OPS_CPU_ISA must be baseline, avx2 or avx512, got \"", cap, "\"");
    return CpuIsa::Baseline;
  }();
  return isa;
}
inline bool has_avx2_fma() { return cpu_isa() >= CpuIsa::Avx2; }
inline bool has_avx512() { return cpu_isa() >= CpuIsa::Avx512; }
#endif

// Which copies of the CPU loops run here: "avx512", "avx2" or "baseline".
inline const char* cpu_isa_name() {
#ifdef MY_MPS_OPS_X86_AVX2_COPIES
  if (has_avx512()) return "avx512";
  if (has_avx2_fma()) return "avx2";
#endif
  return "baseline";
}

// Rows per at::parallel_for task so that each task touches ~32K elements.
inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

}  // namespace cpu
}  // namespace my_mps_ops
