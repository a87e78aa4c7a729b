// Metal math, common, geometric, relational and integer functions for the emulator's metal_stdlib.
//
// Floating functions accept float, half, bfloat (and double, which translated literals may
// produce) and vectors of them. half and bfloat are computed in float and rounded once to the
// argument type, which is at least as accurate as Metal's half-precision ALUs. metal::fast:: and
// metal::precise:: name the same (correctly rounded libm) implementations: the emulator does not
// reproduce fast-math error, so tests comparing GPU results need tolerances anyway.
//
// Only functions Metal defines are declared: erf, lgamma, expm1, log1p, cbrt, hypot... are not
// Metal functions, and shader libraries (PyTorch's c10/metal) define their own under those names.
//
// Mixed scalar arguments are accepted with the integer converted (`max(x, 0)`, `clamp(x, 0, 1)`);
// vector arguments may be mixed with scalars, which are broadcast.
#pragma once

#include "metal_types.h"
#ifdef MTL_EMU_PROFILE
#include "metal_profile.h"
#define MTL_EMU_COUNT_TRANSCENDENTAL() ::__mtl::profile_transcendental()
#else
#define MTL_EMU_COUNT_TRANSCENDENTAL() ((void)0)
#endif

namespace __mtl {
// Libm through GCC builtins (no <cmath>), one overload per computation type.
// The transcendental ones (MTL_LIBM1T/2T) are counted by the profile counters.
#define MTL_LIBM1(NAME, FB, DB)                                   \
  inline float NAME(float x) { return __builtin_##FB(x); }       \
  inline double NAME(double x) { return __builtin_##DB(x); }
#define MTL_LIBM1T(NAME, FB, DB)                                                                      \
  inline float NAME(float x) { MTL_EMU_COUNT_TRANSCENDENTAL(); return __builtin_##FB(x); }           \
  inline double NAME(double x) { MTL_EMU_COUNT_TRANSCENDENTAL(); return __builtin_##DB(x); }
#define MTL_LIBM2T(NAME, FB, DB)                                                                       \
  inline float NAME(float x, float y) { MTL_EMU_COUNT_TRANSCENDENTAL(); return __builtin_##FB(x, y); } \
  inline double NAME(double x, double y) { MTL_EMU_COUNT_TRANSCENDENTAL(); return __builtin_##DB(x, y); }
#define MTL_LIBM2(NAME, FB, DB)                                             \
  inline float NAME(float x, float y) { return __builtin_##FB(x, y); }     \
  inline double NAME(double x, double y) { return __builtin_##DB(x, y); }
MTL_LIBM1T(m_sqrt, sqrtf, sqrt)
MTL_LIBM1T(m_exp, expf, exp)
MTL_LIBM1T(m_exp2, exp2f, exp2)
MTL_LIBM1T(m_log, logf, log)
MTL_LIBM1T(m_log2, log2f, log2)
MTL_LIBM1T(m_log10, log10f, log10)
MTL_LIBM1T(m_sin, sinf, sin)
MTL_LIBM1T(m_cos, cosf, cos)
MTL_LIBM1T(m_tan, tanf, tan)
MTL_LIBM1T(m_asin, asinf, asin)
MTL_LIBM1T(m_acos, acosf, acos)
MTL_LIBM1T(m_atan, atanf, atan)
MTL_LIBM1T(m_sinh, sinhf, sinh)
MTL_LIBM1T(m_cosh, coshf, cosh)
MTL_LIBM1T(m_tanh, tanhf, tanh)
MTL_LIBM1T(m_asinh, asinhf, asinh)
MTL_LIBM1T(m_acosh, acoshf, acosh)
MTL_LIBM1T(m_atanh, atanhf, atanh)
MTL_LIBM1(m_floor, floorf, floor)
MTL_LIBM1(m_ceil, ceilf, ceil)
MTL_LIBM1(m_round, roundf, round)
MTL_LIBM1(m_trunc, truncf, trunc)
MTL_LIBM1(m_rint, rintf, rint)
MTL_LIBM1(m_fabs, fabsf, fabs)
MTL_LIBM2T(m_pow, powf, pow)
MTL_LIBM2T(m_atan2, atan2f, atan2)
MTL_LIBM2(m_fmod, fmodf, fmod)
MTL_LIBM2(m_copysign, copysignf, copysign)
MTL_LIBM2(m_fmin, fminf, fmin)
MTL_LIBM2(m_fmax, fmaxf, fmax)
MTL_LIBM2(m_fdim, fdimf, fdim)
MTL_LIBM2(m_nextafter, nextafterf, nextafter)
#undef MTL_LIBM1
#undef MTL_LIBM2
#undef MTL_LIBM1T
#undef MTL_LIBM2T
inline float m_fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline double m_fma(double a, double b, double c) { return __builtin_fma(a, b, c); }
inline float m_exp10(float x) { MTL_EMU_COUNT_TRANSCENDENTAL(); return __builtin_powf(10.0f, x); }
inline double m_exp10(double x) { MTL_EMU_COUNT_TRANSCENDENTAL(); return __builtin_pow(10.0, x); }
inline float m_ldexp(float x, int e) { return __builtin_ldexpf(x, e); }
inline double m_ldexp(double x, int e) { return __builtin_ldexp(x, e); }
inline float m_frexp(float x, int* e) { return __builtin_frexpf(x, e); }
inline double m_frexp(double x, int* e) { return __builtin_frexp(x, e); }

template <class T> using enable_float = std::enable_if_t<is_float_scalar_v<T>, T>;
template <class T> using enable_int = std::enable_if_t<is_int_scalar_v<T>, T>;
}  // namespace __mtl

namespace metal {

// Lifts a scalar function to vectors (and scalar/vector mixes), component by component. The
// result element type is whatever the scalar overload returns for the vector's element type.
#define MTL_LIFT1(NAME)                                                                            \
  template <class T, int N, bool P>                                                                \
  inline auto NAME(const vec<T, N, P>& v)->vec<decltype(NAME(v[0])), N> {                         \
    vec<decltype(NAME(v[0])), N> r;                                                                \
    for (int i = 0; i < N; ++i) r[i] = NAME(v[i]);                                                 \
    return r;                                                                                      \
  }
#define MTL_LIFT2(NAME)                                                                            \
  template <class A, class B, class V = __mtl::vec_common_t<A, B>, class E = typename V::value_type, \
            class R = decltype(NAME(E(), E()))>                                                    \
  inline vec<R, __mtl::vec_common<std::decay_t<A>, std::decay_t<B>>::n> NAME(const A& a, const B& b) { \
    constexpr int N = __mtl::vec_common<std::decay_t<A>, std::decay_t<B>>::n;                      \
    vec<R, N> r;                                                                                   \
    for (int i = 0; i < N; ++i) r[i] = NAME(__mtl::elem<E>(a, i), __mtl::elem<E>(b, i));          \
    return r;                                                                                      \
  }
#define MTL_LIFT3(NAME)                                                                            \
  template <class A, class B, class C, class V = __mtl::vec_common_t<A, B, C>,                    \
            class E = typename V::value_type, class R = decltype(NAME(E(), E(), E()))>             \
  inline vec<R, __mtl::vec_common<std::decay_t<A>, std::decay_t<B>, std::decay_t<C>>::n> NAME(    \
      const A& a, const B& b, const C& c) {                                                        \
    constexpr int N = __mtl::vec_common<std::decay_t<A>, std::decay_t<B>, std::decay_t<C>>::n;     \
    vec<R, N> r;                                                                                   \
    for (int i = 0; i < N; ++i)                                                                    \
      r[i] = NAME(__mtl::elem<E>(a, i), __mtl::elem<E>(b, i), __mtl::elem<E>(c, i));              \
    return r;                                                                                      \
  }

// A class that converts to float (uniform<float>, a user's wrapper): Apple's math functions are
// overloads for float and half, not templates, so such an argument takes the float one.
template <class T>
constexpr bool __converts_to_float_only_v = std::is_class<T>::value && !::__mtl::is_vec_v<T> &&
                                            !::__mtl::is_scalar_v<T> && std::is_convertible<const T&, float>::value;

// ----- floating unary functions: T f(T) -----
#define MTL_FLOAT1(NAME, EXPR)                                                                     \
  template <class T> inline __mtl::enable_float<T> NAME(T x_) {                                    \
    typedef __mtl::compute_t<T> C;                                                                 \
    const C x = C(x_);                                                                             \
    return T(EXPR);                                                                                \
  }                                                                                                \
  template <class T, std::enable_if_t<__converts_to_float_only_v<T>, int> = 0>                     \
  inline float NAME(const T& x) {                                                                  \
    return NAME(float(x));                                                                         \
  }                                                                                                \
  MTL_LIFT1(NAME)
MTL_FLOAT1(sqrt, __mtl::m_sqrt(x))
MTL_FLOAT1(rsqrt, C(1) / __mtl::m_sqrt(x))
MTL_FLOAT1(exp, __mtl::m_exp(x))
MTL_FLOAT1(exp2, __mtl::m_exp2(x))
MTL_FLOAT1(exp10, __mtl::m_exp10(x))
MTL_FLOAT1(log, __mtl::m_log(x))
MTL_FLOAT1(log2, __mtl::m_log2(x))
MTL_FLOAT1(log10, __mtl::m_log10(x))
MTL_FLOAT1(sin, __mtl::m_sin(x))
MTL_FLOAT1(cos, __mtl::m_cos(x))
MTL_FLOAT1(tan, __mtl::m_tan(x))
// x * pi in double: the float product alone would be off by up to an ulp of the argument.
MTL_FLOAT1(sinpi, __mtl::m_sin(double(x) * 3.14159265358979323846))
MTL_FLOAT1(cospi, __mtl::m_cos(double(x) * 3.14159265358979323846))
MTL_FLOAT1(tanpi, __mtl::m_tan(double(x) * 3.14159265358979323846))
MTL_FLOAT1(asin, __mtl::m_asin(x))
MTL_FLOAT1(acos, __mtl::m_acos(x))
MTL_FLOAT1(atan, __mtl::m_atan(x))
MTL_FLOAT1(sinh, __mtl::m_sinh(x))
MTL_FLOAT1(cosh, __mtl::m_cosh(x))
MTL_FLOAT1(tanh, __mtl::m_tanh(x))
MTL_FLOAT1(asinh, __mtl::m_asinh(x))
MTL_FLOAT1(acosh, __mtl::m_acosh(x))
MTL_FLOAT1(atanh, __mtl::m_atanh(x))
MTL_FLOAT1(floor, __mtl::m_floor(x))
MTL_FLOAT1(ceil, __mtl::m_ceil(x))
MTL_FLOAT1(round, __mtl::m_round(x))  // halfway cases away from zero
MTL_FLOAT1(trunc, __mtl::m_trunc(x))
MTL_FLOAT1(rint, __mtl::m_rint(x))  // halfway cases to even
MTL_FLOAT1(fabs, __mtl::m_fabs(x))
// fract: x - floor(x), kept below 1 (Metal: fmin(x - floor(x), 0x1.fffffep-1f)).
MTL_FLOAT1(fract, __mtl::m_fmin(x - __mtl::m_floor(x), C(0x1.fffffep-1)))
MTL_FLOAT1(saturate, __mtl::m_fmin(__mtl::m_fmax(x, C(0)), C(1)))
// sign: 1.0 for x > 0, -1.0 for x < 0, x itself for +-0 and 0 for NaN.
MTL_FLOAT1(sign, x > C(0) ? C(1) : (x < C(0) ? C(-1) : (x == C(0) ? x : C(0))))
#undef MTL_FLOAT1

// ----- classification: bool f(T), bool vectors for vectors -----
#define MTL_CLASSIFY(NAME, EXPR)                                                                   \
  template <class T> inline std::enable_if_t<__mtl::is_float_scalar_v<T>, bool> NAME(T x_) {       \
    const __mtl::compute_t<T> x = __mtl::compute_t<T>(x_);                                        \
    return EXPR;                                                                                   \
  }                                                                                                \
  MTL_LIFT1(NAME)
MTL_CLASSIFY(isnan, __builtin_isnan(x))
MTL_CLASSIFY(isinf, __builtin_isinf(x) != 0)
MTL_CLASSIFY(isfinite, __builtin_isfinite(x))
MTL_CLASSIFY(isnormal, __builtin_isnormal(x))
MTL_CLASSIFY(signbit, __builtin_signbit(x) != 0)
#undef MTL_CLASSIFY

// ----- relational: bool for scalars, bool vectors for vectors -----
#define MTL_RELATIONAL(NAME, EXPR)                                                                 \
  template <class A, class B, class T = __mtl::scalar_common_t<A, B>,                              \
            std::enable_if_t<__mtl::is_float_scalar_v<T>, int> = 0>                                \
  inline bool NAME(A x_, B y_) {                                                                   \
    typedef __mtl::compute_t<T> C;                                                                 \
    const C x = C(T(x_)), y = C(T(y_));                                                            \
    return EXPR;                                                                                   \
  }                                                                                                \
  MTL_LIFT2(NAME)
MTL_RELATIONAL(isunordered, __builtin_isunordered(x, y))
MTL_RELATIONAL(isordered, !__builtin_isunordered(x, y))
MTL_RELATIONAL(isequal, x == y)
MTL_RELATIONAL(isnotequal, x != y)
MTL_RELATIONAL(isgreater, __builtin_isgreater(x, y))
MTL_RELATIONAL(isgreaterequal, __builtin_isgreaterequal(x, y))
MTL_RELATIONAL(isless, __builtin_isless(x, y))
MTL_RELATIONAL(islessequal, __builtin_islessequal(x, y))
MTL_RELATIONAL(islessgreater, __builtin_islessgreater(x, y))
#undef MTL_RELATIONAL

// ----- abs: floats and integers -----
template <class T> inline std::enable_if_t<__mtl::is_float_scalar_v<T>, T> abs(T x) {
  return T(__mtl::m_fabs(__mtl::compute_t<T>(x)));
}
template <class T> inline std::enable_if_t<__mtl::is_int_scalar_v<T>, T> abs(T x) {
  typedef std::make_unsigned_t<T> U;
  return x < T(0) ? T(U(0) - U(x)) : x;  // unsigned negation: no overflow for the minimum value
}
MTL_LIFT1(abs)

// ----- binary floating functions -----
// Metal declares these for (float, float) and (half, half) only; mixed arguments convert. The exact
// overloads are plain functions, the mixed ones a template taking its second argument as a pack: less
// specialized than a library's own `template <class T, class U> f(T, U)` (PyTorch's c10/metal/utils.h
// has pow so), which wins a mixed call as it does against Metal's plain functions.
#define MTL_FLOAT2(NAME, EXPR)                                                                     \
  template <class A, class... B, class T = __mtl::scalar_common_t<A, B...>,                        \
            std::enable_if_t<sizeof...(B) == 1 && __mtl::is_float_scalar_v<T>, int> = 0>           \
  inline T NAME(A x_, B... y_) {                                                                   \
    typedef __mtl::compute_t<T> C;                                                                 \
    const C x = C(T(x_)), y = C(T(y_...));                                                         \
    return T(EXPR);                                                                                \
  }                                                                                                \
  inline float NAME(float x, float y) { return NAME<float, float>(x, y); }                         \
  inline half NAME(half x, half y) { return NAME<half, half>(x, y); }                              \
  MTL_LIFT2(NAME)
MTL_FLOAT2(pow, __mtl::m_pow(x, y))
MTL_FLOAT2(powr, __mtl::m_pow(x, y))  // defined for x >= 0 in Metal; same value there
MTL_FLOAT2(atan2, __mtl::m_atan2(x, y))
MTL_FLOAT2(fmod, __mtl::m_fmod(x, y))
MTL_FLOAT2(copysign, __mtl::m_copysign(x, y))
MTL_FLOAT2(fmin, __mtl::m_fmin(x, y))  // a NaN argument yields the other argument
MTL_FLOAT2(fmax, __mtl::m_fmax(x, y))
MTL_FLOAT2(fdim, __mtl::m_fdim(x, y))
MTL_FLOAT2(nextafter, __mtl::m_nextafter(x, y))
MTL_FLOAT2(step, y < x ? C(0) : C(1))  // step(edge, x)
#undef MTL_FLOAT2

// min/max: fmin/fmax for floating types, the usual comparison for integers.
template <class A, class... B, class T = __mtl::scalar_common_t<A, B...>,
          std::enable_if_t<sizeof...(B) == 1, int> = 0>
inline T min(A x_, B... y_) {
  const T x = T(x_), y = T(y_...);
  if constexpr (__mtl::is_float_scalar_v<T>) {
    return T(__mtl::m_fmin(__mtl::compute_t<T>(x), __mtl::compute_t<T>(y)));
  } else {
    return y < x ? y : x;
  }
}
template <class A, class... B, class T = __mtl::scalar_common_t<A, B...>,
          std::enable_if_t<sizeof...(B) == 1, int> = 0>
inline T max(A x_, B... y_) {
  const T x = T(x_), y = T(y_...);
  if constexpr (__mtl::is_float_scalar_v<T>) {
    return T(__mtl::m_fmax(__mtl::compute_t<T>(x), __mtl::compute_t<T>(y)));
  } else {
    return x < y ? y : x;
  }
}
MTL_LIFT2(min)
MTL_LIFT2(max)
// Metal's min/max of two scalars of one type are plain functions: they win over a library's own
// templates (`template <class T, class U> T min(T, U)` in PyTorch's c10/metal/utils.h) on an exact
// match; the mixed-type template above loses to such a template (it takes its second argument as a
// pack), as Metal's conversions to its plain functions do.
#define MTL_MINMAX_EXACT(T) \
  inline T min(T x, T y) { return min<T, T>(x, y); } \
  inline T max(T x, T y) { return max<T, T>(x, y); }
MTL_MINMAX_EXACT(char)
MTL_MINMAX_EXACT(uchar)
MTL_MINMAX_EXACT(short)
MTL_MINMAX_EXACT(ushort)
MTL_MINMAX_EXACT(int)
MTL_MINMAX_EXACT(uint)
MTL_MINMAX_EXACT(long)
MTL_MINMAX_EXACT(ulong)
MTL_MINMAX_EXACT(half)
MTL_MINMAX_EXACT(float)
#undef MTL_MINMAX_EXACT

// ----- ternary -----
template <class A, class B, class C_, class T = __mtl::scalar_common_t<A, B, C_>>
inline T clamp(A x, B lo, C_ hi) {
  return min(max(T(x), T(lo)), T(hi));
}
MTL_LIFT3(clamp)
template <class A, class B, class C_, class T = __mtl::scalar_common_t<A, B, C_>,
          std::enable_if_t<__mtl::is_float_scalar_v<T>, int> = 0>
inline T fma(A a, B b, C_ c) {
  typedef __mtl::compute_t<T> C;
  return T(__mtl::m_fma(C(T(a)), C(T(b)), C(T(c))));
}
MTL_LIFT3(fma)
template <class A, class B, class C_, class T = __mtl::scalar_common_t<A, B, C_>,
          std::enable_if_t<__mtl::is_float_scalar_v<T>, int> = 0>
inline T mad(A a, B b, C_ c) {
  typedef __mtl::compute_t<T> C;
  return T(__mtl::m_fma(C(T(a)), C(T(b)), C(T(c))));
}
MTL_LIFT3(mad)
// mix(x, y, a) = x + (y - x) * a
template <class A, class B, class C_, class T = __mtl::scalar_common_t<A, B, C_>,
          std::enable_if_t<__mtl::is_float_scalar_v<T>, int> = 0>
inline T mix(A x_, B y_, C_ a_) {
  typedef __mtl::compute_t<T> C;
  const C x = C(T(x_)), y = C(T(y_)), a = C(T(a_));
  return T(x + (y - x) * a);
}
MTL_LIFT3(mix)
// smoothstep(edge0, edge1, x): t = clamp((x - edge0) / (edge1 - edge0), 0, 1); t * t * (3 - 2t)
template <class A, class B, class C_, class T = __mtl::scalar_common_t<A, B, C_>,
          std::enable_if_t<__mtl::is_float_scalar_v<T>, int> = 0>
inline T smoothstep(A e0_, B e1_, C_ x_) {
  typedef __mtl::compute_t<T> C;
  const C e0 = C(T(e0_)), e1 = C(T(e1_)), x = C(T(x_));
  C t = (x - e0) / (e1 - e0);
  t = __mtl::m_fmin(__mtl::m_fmax(t, C(0)), C(1));
  return T(t * t * (C(3) - C(2) * t));
}
MTL_LIFT3(smoothstep)
template <class A, class B, class C_, class T = __mtl::scalar_common_t<A, B, C_>>
inline T min3(A a, B b, C_ c) { return min(min(T(a), T(b)), T(c)); }
template <class A, class B, class C_, class T = __mtl::scalar_common_t<A, B, C_>>
inline T max3(A a, B b, C_ c) { return max(max(T(a), T(b)), T(c)); }
template <class A, class B, class C_, class T = __mtl::scalar_common_t<A, B, C_>>
inline T median3(A a, B b, C_ c) {
  return max(min(T(a), T(b)), min(max(T(a), T(b)), T(c)));
}
MTL_LIFT3(min3)
MTL_LIFT3(max3)
MTL_LIFT3(median3)

// ldexp / frexp / modf / sincos
template <class T> inline __mtl::enable_float<T> ldexp(T x, int e) {
  return T(__mtl::m_ldexp(__mtl::compute_t<T>(x), e));
}
template <class T, int N, bool P, class I, bool Q>
inline vec<T, N> ldexp(const vec<T, N, P>& x, const vec<I, N, Q>& e) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = ldexp(x[i], int(e[i]));
  return r;
}
template <class T> inline __mtl::enable_float<T> frexp(T x, int& e) {
  return T(__mtl::m_frexp(__mtl::compute_t<T>(x), &e));
}
template <class T> inline __mtl::enable_float<T> modf(T x, T& whole) {
  const T w = trunc(x);
  whole = w;
  return __builtin_isinf(float(x)) ? copysign(T(0), x) : T(x - w);
}
template <class T> inline __mtl::enable_float<T> sincos(T x, T& cosval) {
  cosval = cos(x);
  return sin(x);
}
template <class T, int N, bool P, bool Q> inline vec<T, N> sincos(const vec<T, N, P>& x, vec<T, N, Q>& cosval) {
  vec<T, N> s;
  for (int i = 0; i < N; ++i) s[i] = sincos(x[i], cosval[i]);
  return s;
}

// ----- select(a, b, c): c ? b : a, per component for bool vectors -----
template <class T, std::enable_if_t<__mtl::is_scalar_v<T> || std::is_pointer<T>::value, int> = 0>
inline T select(T a, T b, bool c) {
  return c ? b : a;
}
template <class T, int N, bool P, bool Q> inline vec<T, N> select(const vec<T, N, P>& a, const vec<T, N, Q>& b, bool c) {
  return c ? vec<T, N>(b) : vec<T, N>(a);
}
template <class T, int N, bool P, bool Q, bool R>
inline vec<T, N> select(const vec<T, N, P>& a, const vec<T, N, Q>& b, const vec<bool, N, R>& c) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = c[i] ? b[i] : a[i];
  return r;
}

// ----- geometric (computed in float for half/bfloat, rounded once) -----
template <class T, int N, bool P, bool Q> inline T dot(const vec<T, N, P>& a, const vec<T, N, Q>& b) {
  typedef __mtl::compute_t<T> C;
  C s = C(a[0]) * C(b[0]);  // not 0 + ...: keeps the sign of a zero result, as x0*y0 + x1*y1 + ...
  for (int i = 1; i < N; ++i) s += C(a[i]) * C(b[i]);
  return T(s);
}
template <class T, bool P, bool Q> inline vec<T, 3> cross(const vec<T, 3, P>& a, const vec<T, 3, Q>& b) {
  typedef __mtl::compute_t<T> C;
  return vec<T, 3>(T(C(a[1]) * C(b[2]) - C(a[2]) * C(b[1])), T(C(a[2]) * C(b[0]) - C(a[0]) * C(b[2])),
                   T(C(a[0]) * C(b[1]) - C(a[1]) * C(b[0])));
}
template <class T, int N, bool P> inline T length_squared(const vec<T, N, P>& a) { return dot(a, a); }
template <class T, int N, bool P> inline T length(const vec<T, N, P>& a) {
  typedef __mtl::compute_t<T> C;
  C s = C(a[0]) * C(a[0]);
  for (int i = 1; i < N; ++i) s += C(a[i]) * C(a[i]);
  return T(__mtl::m_sqrt(s));
}
template <class T, int N, bool P, bool Q> inline T distance(const vec<T, N, P>& a, const vec<T, N, Q>& b) {
  return length(vec<T, N>(a) - vec<T, N>(b));
}
template <class T, int N, bool P, bool Q> inline T distance_squared(const vec<T, N, P>& a, const vec<T, N, Q>& b) {
  return length_squared(vec<T, N>(a) - vec<T, N>(b));
}
template <class T, int N, bool P> inline vec<T, N> normalize(const vec<T, N, P>& a) {
  typedef __mtl::compute_t<T> C;
  C s = C(a[0]) * C(a[0]);
  for (int i = 1; i < N; ++i) s += C(a[i]) * C(a[i]);
  const C inv = C(1) / __mtl::m_sqrt(s);
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = T(C(a[i]) * inv);
  return r;
}
// faceforward / reflect / refract (graphics, but part of <metal_geometric>)
template <class T, int N, bool P, bool Q, bool R>
inline vec<T, N> faceforward(const vec<T, N, P>& n, const vec<T, N, Q>& i, const vec<T, N, R>& nref) {
  return dot(nref, i) < T(0) ? vec<T, N>(n) : -n;
}
template <class T, int N, bool P, bool Q> inline vec<T, N> reflect(const vec<T, N, P>& i, const vec<T, N, Q>& n) {
  return i - T(2) * dot(n, i) * n;
}
template <class T, int N, bool P, bool Q, class S>
inline vec<T, N> refract(const vec<T, N, P>& i, const vec<T, N, Q>& n, S eta_) {
  typedef __mtl::compute_t<T> C;
  const C eta = C(eta_), d = C(dot(n, i));
  const C k = C(1) - eta * eta * (C(1) - d * d);
  if (k < C(0)) return vec<T, N>(T(0));
  vec<T, N> r;
  for (int j = 0; j < N; ++j) r[j] = T(eta * C(i[j]) - (eta * d + __mtl::m_sqrt(k)) * C(n[j]));
  return r;
}
template <class T> inline __mtl::enable_float<T> dot(T a, T b) { return T(a * b); }
template <class T> inline __mtl::enable_float<T> length(T a) { return abs(a); }

// ----- integer functions -----
namespace int_detail {
template <class T> using U = std::make_unsigned_t<T>;
template <class T> constexpr int bits = int(sizeof(T) * CHAR_BIT);
}  // namespace int_detail
template <class T> inline __mtl::enable_int<T> popcount(T x) {
  typedef int_detail::U<T> U;
  return T(__builtin_popcountll((unsigned long long)U(x)));
}
template <class T> inline __mtl::enable_int<T> clz(T x) {
  typedef int_detail::U<T> U;
  const unsigned long long u = (unsigned long long)U(x);
  return T(u == 0 ? int_detail::bits<T> : __builtin_clzll(u) - (64 - int_detail::bits<T>));
}
template <class T> inline __mtl::enable_int<T> ctz(T x) {
  typedef int_detail::U<T> U;
  const unsigned long long u = (unsigned long long)U(x);
  return T(u == 0 ? int_detail::bits<T> : __builtin_ctzll(u));
}
template <class T> inline __mtl::enable_int<T> reverse_bits(T x) {
  typedef int_detail::U<T> U;
  U u = U(x), r = 0;
  for (int i = 0; i < int_detail::bits<T>; ++i) r = U((r << 1) | ((u >> i) & 1u));
  return T(r);
}
// High half of the full product.
template <class A, class B, class T = __mtl::scalar_common_t<A, B>> inline __mtl::enable_int<T> mul_hi(A a_, B b_) {
  const T a = T(a_), b = T(b_);
  if constexpr (sizeof(T) == 8) {
    typedef std::conditional_t<std::is_signed<T>::value, __int128, unsigned __int128> W;
    return T((W(a) * W(b)) >> 64);
  } else {
    typedef std::conditional_t<std::is_signed<T>::value, int64_t, uint64_t> W;
    return T((W(a) * W(b)) >> int_detail::bits<T>);
  }
}
// Rotate left by n modulo the bit width.
template <class A, class B, class T = __mtl::scalar_common_t<A, B>> inline __mtl::enable_int<T> rotate(A v_, B n_) {
  typedef int_detail::U<T> U;
  const U v = U(T(v_));
  const int w = int_detail::bits<T>;
  const int n = int(U(T(n_)) % U(w));
  return n == 0 ? T(v) : T(U((v << n) | (v >> (w - n))));
}
template <class A, class B, class T = __mtl::scalar_common_t<A, B>> inline __mtl::enable_int<T> addsat(A a_, B b_) {
  const T a = T(a_), b = T(b_);
  T r;
  if (!__builtin_add_overflow(a, b, &r)) return r;
  if (std::is_signed<T>::value) return b > T(0) ? numeric_limits<T>::max() : numeric_limits<T>::min();
  return numeric_limits<T>::max();
}
template <class A, class B, class T = __mtl::scalar_common_t<A, B>> inline __mtl::enable_int<T> subsat(A a_, B b_) {
  const T a = T(a_), b = T(b_);
  T r;
  if (!__builtin_sub_overflow(a, b, &r)) return r;
  if (std::is_signed<T>::value) return b < T(0) ? numeric_limits<T>::max() : numeric_limits<T>::min();
  return numeric_limits<T>::min();
}
// |a - b| without overflow, as the unsigned type of the same width.
template <class T> inline std::enable_if_t<__mtl::is_int_scalar_v<T>, int_detail::U<T>> absdiff(T a, T b) {
  typedef int_detail::U<T> U;
  return a > b ? U(U(a) - U(b)) : U(U(b) - U(a));
}
// (a + b) >> 1 and (a + b + 1) >> 1 without overflow.
template <class T> inline __mtl::enable_int<T> hadd(T a, T b) { return T((a >> 1) + (b >> 1) + (a & b & 1)); }
template <class T> inline __mtl::enable_int<T> rhadd(T a, T b) { return T((a >> 1) + (b >> 1) + ((a | b) & 1)); }
template <class T> inline __mtl::enable_int<T> extract_bits(T x, uint offset, uint bits) {
  typedef int_detail::U<T> U;
  if (bits == 0) return T(0);
  const int w = int_detail::bits<T>;
  if (std::is_signed<T>::value) {
    // Sign-extend the extracted field.
    return T(T(U(x) << (w - int(offset) - int(bits))) >> (w - int(bits)));
  }
  return T((U(x) >> offset) & (bits >= uint(w) ? U(~U(0)) : U((U(1) << bits) - 1u)));
}
template <class T> inline __mtl::enable_int<T> insert_bits(T base, T insert, uint offset, uint bits) {
  typedef int_detail::U<T> U;
  if (bits == 0) return base;
  const int w = int_detail::bits<T>;
  const U mask = U((bits >= uint(w) ? U(~U(0)) : U((U(1) << bits) - 1u)) << offset);
  return T((U(base) & U(~mask)) | ((U(insert) << offset) & mask));
}
// Metal spells it mulhi; mul_hi (OpenCL's name) is kept as an alias.
template <class A, class B, class T = __mtl::scalar_common_t<A, B>> inline __mtl::enable_int<T> mulhi(A a, B b) {
  return mul_hi(a, b);
}
// 24-bit multiplies: exact when the operands fit in 24 bits, which Metal requires.
template <class T> inline __mtl::enable_int<T> mul24(T a, T b) { return T(a * b); }
template <class T> inline __mtl::enable_int<T> mad24(T a, T b, T c) { return T(a * b + c); }
template <class T> inline __mtl::enable_int<T> madhi(T a, T b, T c) { return T(mul_hi(a, b) + c); }
template <class T> inline __mtl::enable_int<T> madsat(T a, T b, T c) {
  T p;
  if (__builtin_mul_overflow(a, b, &p)) {
    const bool negative = std::is_signed<T>::value && ((a < T(0)) != (b < T(0)));
    return negative ? numeric_limits<T>::min() : numeric_limits<T>::max();
  }
  return addsat(p, c);
}
template <class T> inline __mtl::enable_float<T> fmax3(T a, T b, T c) { return max3(a, b, c); }
template <class T> inline __mtl::enable_float<T> fmin3(T a, T b, T c) { return min3(a, b, c); }
template <class T> inline __mtl::enable_float<T> fmedian3(T a, T b, T c) { return median3(a, b, c); }
template <class T> inline std::enable_if_t<__mtl::is_float_scalar_v<T>, int> ilogb(T x) {
  return __builtin_ilogb(double(x));
}
MTL_LIFT1(popcount)
MTL_LIFT1(clz)
MTL_LIFT1(ctz)
MTL_LIFT1(reverse_bits)
MTL_LIFT2(mul_hi)
MTL_LIFT2(mulhi)
MTL_LIFT2(mul24)
MTL_LIFT3(mad24)
MTL_LIFT3(madhi)
MTL_LIFT3(madsat)
MTL_LIFT3(fmax3)
MTL_LIFT3(fmin3)
MTL_LIFT3(fmedian3)
MTL_LIFT1(ilogb)
MTL_LIFT2(rotate)
MTL_LIFT2(addsat)
MTL_LIFT2(subsat)
MTL_LIFT2(absdiff)
MTL_LIFT2(hadd)
MTL_LIFT2(rhadd)

#undef MTL_LIFT1
#undef MTL_LIFT2
#undef MTL_LIFT3

template <class A, class B> inline auto divide(const A& a, const B& b) -> decltype(a / b) { return a / b; }

// metal::fast:: and metal::precise:: spell the same functions (see the note at the top).
#define MTL_MATH_NAMES                                                                            \
  using metal::sqrt;                                                                              \
  using metal::rsqrt;                                                                             \
  using metal::exp;                                                                               \
  using metal::exp2;                                                                              \
  using metal::exp10;                                                                             \
  using metal::log;                                                                               \
  using metal::log2;                                                                              \
  using metal::log10;                                                                             \
  using metal::sin;                                                                               \
  using metal::cos;                                                                               \
  using metal::tan;                                                                               \
  using metal::sinpi;                                                                             \
  using metal::cospi;                                                                             \
  using metal::tanpi;                                                                             \
  using metal::asin;                                                                              \
  using metal::acos;                                                                              \
  using metal::atan;                                                                              \
  using metal::atan2;                                                                             \
  using metal::sinh;                                                                              \
  using metal::cosh;                                                                              \
  using metal::tanh;                                                                              \
  using metal::asinh;                                                                             \
  using metal::acosh;                                                                             \
  using metal::atanh;                                                                             \
  using metal::floor;                                                                             \
  using metal::ceil;                                                                              \
  using metal::round;                                                                             \
  using metal::trunc;                                                                             \
  using metal::rint;                                                                              \
  using metal::fract;                                                                             \
  using metal::fabs;                                                                              \
  using metal::abs;                                                                               \
  using metal::fmin;                                                                              \
  using metal::fmax;                                                                              \
  using metal::min;                                                                               \
  using metal::max;                                                                               \
  using metal::clamp;                                                                             \
  using metal::saturate;                                                                          \
  using metal::fmod;                                                                              \
  using metal::pow;                                                                               \
  using metal::powr;                                                                              \
  using metal::copysign;                                                                          \
  using metal::fma;                                                                               \
  using metal::mad;                                                                               \
  using metal::mix;                                                                               \
  using metal::sincos;                                                                            \
  using metal::ldexp;                                                                             \
  using metal::frexp;                                                                             \
  using metal::modf;                                                                              \
  using metal::normalize;                                                                         \
  using metal::length;                                                                            \
  using metal::distance;                                                                          \
  using metal::dot;                                                                               \
  using metal::smoothstep;                                                                        \
  using metal::step;                                                                              \
  using metal::sign;                                                                              \
  using metal::fdim;                                                                              \
  using metal::fmax3;                                                                             \
  using metal::fmin3;                                                                             \
  using metal::fmedian3;                                                                          \
  using metal::max3;                                                                              \
  using metal::min3;                                                                              \
  using metal::median3;                                                                           \
  using metal::isnan;                                                                             \
  using metal::isinf;                                                                             \
  using metal::isfinite;
namespace fast {
MTL_MATH_NAMES
using metal::divide;
}  // namespace fast
namespace precise {
MTL_MATH_NAMES
using metal::divide;
}  // namespace precise
#undef MTL_MATH_NAMES

}  // namespace metal
