// The one SIMD dialect of the CPU loop files: float32 (and float64) vectors
// as GCC/Clang vector types (plain operators, one instruction per vector),
// lane helpers, a vectorisable exp, streaming stores and float16/bfloat16 <->
// float32 rows.
//
// Not an ordinary header: cpu/dispatch.h includes it inside each copy's
// namespace (my_mps_ops::cpu::<capability>::vec) and target region, so every
// copy of a loop file gets its own helpers compiled for its instruction set
// (nothing is shared between copies, so no inline function compiled for AVX2
// can stand in for the baseline one), and a helper taking a 32-byte vector is
// itself an AVX2 function (clang rejects passing one to a baseline function).
// Its prerequisites (<cstdint>, <cstring>, <type_traits>, <utility>, c10's
// Half and BFloat16) are included by cpu/dispatch.h before it.
//
// Each copy sees `Vec`, the natural float32 vector of its target: f32x4 (one
// SSE2 / NEON register) in the baseline copy, f32x8 in the AVX2 copy, f32x16
// in the AVX-512 copy. GCC lowers a type wider than the target's registers
// through the stack (about ten times slower), so a loop uses its copy's Vec.
#ifndef MY_MPS_OPS_CPU_CAPABILITY
#error "cpu/vec.h is included by cpu/dispatch.h inside a loop file's copy"
#endif



// Accumulation type: float32 for float32/float16/bfloat16, float64 for float64.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Functions defined between these two are not compiled with fused
// multiply-adds (a * b + c rounded once) even in copies whose target has FMA,
// so their results are the same in every copy: for the float64 loops, which
// gradcheck and the tests across copies compare exactly. Under GCC the
// setting belongs to the function a loop ends up in after inlining, so such
// functions are called only from each other or through at::parallel_for and
// cpu/parallel.h (baseline code, which cannot inline a copy's function).
#if defined(__clang__)
#define MY_MPS_OPS_NO_FP_CONTRACT_BEGIN _Pragma("float_control(push)") _Pragma("clang fp contract(off)")
#define MY_MPS_OPS_NO_FP_CONTRACT_END _Pragma("float_control(pop)")
#else
#define MY_MPS_OPS_NO_FP_CONTRACT_BEGIN _Pragma("GCC push_options") _Pragma("GCC optimize(\"fp-contract=off\")")
#define MY_MPS_OPS_NO_FP_CONTRACT_END _Pragma("GCC pop_options")
#endif

// Vector types: used where auto-vectorisation of lane arrays fails
// (reductions with a max, the exp of a reduction). Loops are templates on the
// vector type V and are instantiated with the Vec of their copy.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // no vector crosses a non-inlined call
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));  // only inlined into AVX-512 copies
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef double f64x2 __attribute__((vector_size(16)));  // float64 (gradcheck) paths
typedef double f64x4 __attribute__((vector_size(32)));
typedef double f64x8 __attribute__((vector_size(64)));

// The same-width int32 vector of V (float for scalar code).
template <typename V> struct IntLanes;
template <> struct IntLanes<float> { using type = int32_t; };
template <> struct IntLanes<f32x4> { using type = i32x4; };
template <> struct IntLanes<f32x8> { using type = i32x8; };
template <> struct IntLanes<f32x16> { using type = i32x16; };

// The element type of a vector type (the type itself for a scalar), and the
// number of lanes.
template <typename V, typename = void>
struct LaneOf { using type = V; };
template <typename V>
struct LaneOf<V, std::void_t<decltype(std::declval<V&>()[0])>> {
  using type = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<V&>()[0])>>;
};
template <typename V>
using lane_t = typename LaneOf<V>::type;
template <typename V>
constexpr int64_t kLanes = int64_t(sizeof(V) / sizeof(lane_t<V>));

// The same-width vector of double for a float vector's copy (f32x4 -> f64x2
// keeps one register per vector in every copy).
template <typename V> struct DoubleLanes;
template <> struct DoubleLanes<f32x4> { using type = f64x2; };
template <> struct DoubleLanes<f32x8> { using type = f64x4; };
template <> struct DoubleLanes<f32x16> { using type = f64x8; };

// Unaligned loads and stores of a vector from / to its element type.
template <typename V, typename E>
__attribute__((always_inline)) inline V loadv(const E* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V, typename E>
__attribute__((always_inline)) inline void storev(E* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename V, typename E>
__attribute__((always_inline)) inline V splatv(E c) {
  return V{} + c;
}
template <typename V>
__attribute__((always_inline)) inline V maxv(V a, V b) {
  return a > b ? a : b;
}
template <typename V>
__attribute__((always_inline)) inline lane_t<V> reduce_maxv(V v) {
  lane_t<V> m = v[0];
  for (int i = 1; i < kLanes<V>; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
template <typename V>
__attribute__((always_inline)) inline lane_t<V> reduce_sumv(V v) {
  lane_t<V> s = 0;
  for (int i = 0; i < kLanes<V>; ++i) s += v[i];
  return s;
}

// exp for float32, one lane (exp_f32) or a vector, from one definition:
// libm's expf is a call per element, this vectorises. Cody-Waite range
// reduction and a degree-6 polynomial, ~2 ulp; saturates outside [-87, 88];
// k = round(x / ln 2) comes from adding 1.5 * 2^23, which leaves k in the low
// mantissa bits (no float->int->float round trip). NaN stays NaN.
// exp_poly_in_range is the reduction and polynomial alone, for x in [-87, 88].
template <typename V>
__attribute__((always_inline)) inline V exp_poly_in_range(V x) {
  using Int = typename IntLanes<V>::type;
  constexpr float kRoundShift = 12582912.0f;  // 1.5 * 2^23; its bits are 0x4B400000
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
template <typename V>
__attribute__((always_inline)) inline V exp_poly(V x) {
  x = x < -87.0f ? splatv<V>(-87.0f) : x;
  x = x > 88.0f ? splatv<V>(88.0f) : x;
  return exp_poly_in_range(x);
}
// exp_poly for arguments that cannot exceed 88, such as values minus their
// maximum: the same result without the upper clamp, which GCC compiles to a
// compare and a blend per vector (a fifth of the time of an exp loop).
template <typename V>
__attribute__((always_inline)) inline V exp_poly_nonpositive(V x) {
  return exp_poly_in_range(x < -87.0f ? splatv<V>(-87.0f) : x);
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
#if defined(__clang__)
  // clang checks an asm operand against the target of the function it is
  // written in (baseline here), so it takes its builtin instead.
  __builtin_nontemporal_store(v, reinterpret_cast<V*>(p));
#else
  asm volatile("vmovntps %1, %0" : "=m"(*reinterpret_cast<V*>(p)) : "v"(v));
#endif
}
__attribute__((always_inline)) inline void stream_fence() { __builtin_ia32_sfence(); }
#else
template <typename V>
__attribute__((always_inline)) inline void streamv(float* p, V v) {
  storev(p, v);
}
__attribute__((always_inline)) inline void stream_fence() {}
#endif
// A vector store, streaming (non-temporal) when kStream.
template <bool kStream, typename V>
__attribute__((always_inline)) inline void store_maybe_streaming(float* p, V v) {
  if constexpr (kStream) streamv(p, v);
  else storev(p, v);
}
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

