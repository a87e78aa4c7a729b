// Metal scalar and vector types, swizzles, as_type, numeric_limits and the numeric constants.
// Part of the emulator's metal_stdlib (see metal_stdlib.h).
#pragma once

#include <cfloat>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <type_traits>

// Emulator code that touches only the calling thread's own memory (SIMD-group exchange slots,
// simdgroup_matrix elements): left out of the race check's instrumentation (metal_race_check.cpp),
// which it would only slow down.
#ifdef MTL_EMU_RACE_CHECK
#define MTL_EMU_UNCHECKED __attribute__((no_sanitize("thread")))
#else
#define MTL_EMU_UNCHECKED
#endif

namespace metal {

// ---------------------------------------------------------------------------------------------
// Scalars
// ---------------------------------------------------------------------------------------------

// g++ 12 on x86-64 implements _Float16 arithmetic by computing in float and rounding to half after
// every operation, which is what Metal's half arithmetic gives.
typedef _Float16 half;
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;  // Metal long/ulong are 64-bit, as long is on Linux x86-64.
using std::ptrdiff_t;
using std::size_t;

// bfloat: 1 sign, 8 exponent, 7 mantissa bits (the top half of a float). No compiler here has an
// arithmetic __bf16, so this is a class: conversion from float rounds to nearest even, conversion
// to float is exact, arithmetic is done in float and rounded back (as a bfloat ALU would round
// each result).
// The class lives in a namespace of its own, with only its operators: in Metal bfloat is a built-in
// type, which has no associated namespace, so argument-dependent lookup must not bring metal's
// functions into an unqualified call (c10::metal's `simd_max(x)` inside namespace c10::metal, with
// c10::metal::simd_max and metal::simd_max both viable, would be ambiguous).
namespace __mtl_bfloat {
struct bfloat {
  uint16_t bits;

  bfloat() = default;
  // Implicit from float so that `T x = 0;` / `out[i] = acc;` in templated kernels compile as they
  // do in Metal. Mixed expressions are resolved by the templated operators below, not by this.
  constexpr bfloat(float f) : bits(round_from_float(f)) {}
  constexpr operator float() const { return __builtin_bit_cast(float, uint32_t(bits) << 16); }

  static constexpr bfloat from_bits(uint16_t b) {
    bfloat r{};
    r.bits = b;
    return r;
  }
  static constexpr uint16_t round_from_float(float f) {
    uint32_t u = __builtin_bit_cast(uint32_t, f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    return uint16_t(u >> 16);
  }

  constexpr bfloat operator-() const { return from_bits(uint16_t(bits ^ 0x8000u)); }
  constexpr bfloat operator+() const { return *this; }
  bfloat& operator++() { return *this = bfloat(float(*this) + 1.0f); }
  bfloat& operator--() { return *this = bfloat(float(*this) - 1.0f); }
  bfloat operator++(int) { bfloat old = *this; ++*this; return old; }
  bfloat operator--(int) { bfloat old = *this; --*this; return old; }
  // From a class that converts to an arithmetic type (a mask type with `operator bool()`): in MSL
  // bfloat is a built-in type and that is one user-defined conversion; here it would be two.
  template <class U, std::enable_if_t<std::is_class<U>::value && !std::is_same<U, bfloat>::value &&
                                          std::is_convertible<const U&, float>::value, int> = 0>
  bfloat& operator=(const U& o) { return *this = bfloat(float(o)); }
  template <class U> bfloat& operator+=(const U& o) { return *this = bfloat(*this + o); }
  template <class U> bfloat& operator-=(const U& o) { return *this = bfloat(*this - o); }
  template <class U> bfloat& operator*=(const U& o) { return *this = bfloat(*this * o); }
  template <class U> bfloat& operator/=(const U& o) { return *this = bfloat(*this / o); }
};
}  // namespace __mtl_bfloat
using __mtl_bfloat::bfloat;
typedef bfloat bfloat16_t;

template <class T, int N, bool Packed = false> struct vec;
template <class T, int N> using packed_vec = vec<T, N, true>;

}  // namespace metal

// Helpers the translator and the runtime header refer to. Global (not metal::__mtl) so that
// `__mtl::` is unambiguous with or without `using namespace metal;`.
namespace __mtl {
using metal::bfloat;
using metal::half;

// An integer literal operand of `?:` whose other operand is a bfloat converts to it, as in Metal (the
// translator writes this form); with any other type it stays as it is.
template <class Other, class L> constexpr auto cond_operand(L lit) {
  if constexpr (std::is_same<std::remove_cv_t<std::remove_reference_t<Other>>, bfloat>::value) {
    return bfloat(float(lit));
  } else {
    return lit;
  }
}
// The operands of any other `?:`, as the translator writes them: `(cond_tag<decltype(b)>(), a)`. An
// integer-typed operand whose other operand is a bfloat converts to bfloat, as to Metal's built-in type
// (the class converts both ways, which C++ finds ambiguous); a bfloat beside a float becomes a float, by
// the usual arithmetic conversions. Anything else passes through, lvalues as lvalues; a void operand
// takes the built-in comma.
template <class Other> struct cond_tag {};
template <class Other, class L> constexpr decltype(auto) operator,(cond_tag<Other>, L&& x) {
  using O = std::remove_cv_t<std::remove_reference_t<Other>>;
  using X = std::remove_cv_t<std::remove_reference_t<L>>;
  if constexpr (std::is_same<O, bfloat>::value && (std::is_integral<X>::value || std::is_enum<X>::value)) {
    return bfloat(float(x));
  } else if constexpr (std::is_same<X, bfloat>::value && std::is_same<O, float>::value) {
    return float(x);
  } else if constexpr (std::is_lvalue_reference<L>::value) {
    return static_cast<L&&>(x);
  } else {
    return X(static_cast<L&&>(x));
  }
}
using metal::vec;

template <class T> struct is_float_scalar : std::false_type {};
template <> struct is_float_scalar<float> : std::true_type {};
template <> struct is_float_scalar<double> : std::true_type {};
template <> struct is_float_scalar<half> : std::true_type {};
template <> struct is_float_scalar<bfloat> : std::true_type {};
template <class T> constexpr bool is_float_scalar_v = is_float_scalar<std::remove_cv_t<T>>::value;

template <class T> constexpr bool is_int_scalar_v = std::is_integral<std::remove_cv_t<T>>::value;
template <class T> constexpr bool is_scalar_v = is_float_scalar_v<T> || is_int_scalar_v<T>;

template <class T> struct vec_traits {
  static constexpr bool is_vec = false;
  static constexpr int size = 0;
  typedef void elem;
};
template <class T, int N, bool P> struct vec_traits<vec<T, N, P>> {
  static constexpr bool is_vec = true;
  static constexpr int size = N;
  typedef T elem;
};
template <class T> constexpr bool is_vec_v = vec_traits<std::remove_cv_t<std::remove_reference_t<T>>>::is_vec;
template <class T> struct scalar_of { typedef T type; };  // a vector's element type, a scalar's own
template <class T, int N, bool P> struct scalar_of<vec<T, N, P>> { typedef T type; };

// The type computations happen in: double for double, float for every narrower floating type.
template <class T> using compute_t = std::conditional_t<std::is_same<T, double>::value, double, float>;

template <class T> struct type_identity { typedef T type; };
template <class T> using type_identity_t = typename type_identity<T>::type;

// Rank of floating types for mixed-type results: half and bfloat meet in float.
template <class T> struct float_rank;
template <> struct float_rank<half> { static constexpr int value = 1; };
template <> struct float_rank<bfloat> { static constexpr int value = 1; };
template <> struct float_rank<float> { static constexpr int value = 2; };
template <> struct float_rank<double> { static constexpr int value = 3; };

// Result type of a binary operation on two scalars, SFINAE-friendly (no `type` unless both are
// scalars): equal types give that type; a floating type beats an integer (Metal converts the
// integer, e.g. `max(x, 0)` on float x); half with bfloat gives float; integers follow C++.
template <class A, class B, class = void> struct scalar_common {};
template <class A, class B>
struct scalar_common<A, B, std::enable_if_t<is_scalar_v<A> && is_scalar_v<B>>> {
  static constexpr bool fa = is_float_scalar_v<A>, fb = is_float_scalar_v<B>;
  template <class X, class Y, bool FX, bool FY> struct pick { typedef std::common_type_t<X, Y> type; };
  template <class X, class Y> struct pick<X, Y, true, false> { typedef X type; };
  template <class X, class Y> struct pick<X, Y, false, true> { typedef Y type; };
  template <class X, class Y> struct pick<X, Y, true, true> {
    typedef std::conditional_t<
        std::is_same<X, Y>::value, X,
        std::conditional_t<(float_rank<X>::value > float_rank<Y>::value), X,
                           std::conditional_t<(float_rank<Y>::value > float_rank<X>::value), Y, float>>>
        type;
  };
  typedef std::conditional_t<std::is_same<A, B>::value, A, typename pick<A, B, fa, fb>::type> type;
};
template <class Enable, class... T> struct scalar_common_n {};
template <class A> struct scalar_common_n<std::enable_if_t<is_scalar_v<A>>, A> { typedef A type; };
template <class A, class B, class... R>
struct scalar_common_n<std::void_t<typename scalar_common<A, B>::type>, A, B, R...>
    : scalar_common_n<void, typename scalar_common<A, B>::type, R...> {};
template <class... T> using scalar_common_t = typename scalar_common_n<void, std::decay_t<T>...>::type;

// Vector result of a call mixing vectors and scalars: every vector has the same length N and
// element type T, scalars are broadcast (converted to T). No `type` unless at least one argument
// is a vector.
template <class... A> struct vec_common;
template <> struct vec_common<> {
  static constexpr int n = 0;
  typedef void elem;
  static constexpr bool ok = true;
};
template <class A, class... R> struct vec_common<A, R...> {
  typedef vec_common<R...> rest;
  static constexpr bool a_vec = is_vec_v<A>;
  static constexpr int an = a_vec ? vec_traits<A>::size : 0;
  typedef typename vec_traits<A>::elem aelem;
  static constexpr int n = an ? an : rest::n;
  typedef std::conditional_t<a_vec, aelem, typename rest::elem> elem;
  static constexpr bool ok = rest::ok && (a_vec ? ((rest::n == 0 || rest::n == an) &&
                                                    (std::is_void<typename rest::elem>::value ||
                                                     std::is_same<typename rest::elem, aelem>::value))
                                                 : is_scalar_v<A>);
};
template <class... A>
using vec_common_t = std::enable_if_t<vec_common<std::decay_t<A>...>::ok && (vec_common<std::decay_t<A>...>::n > 0),
                                      vec<typename vec_common<std::decay_t<A>...>::elem, vec_common<std::decay_t<A>...>::n>>;

// Component i of a vector argument, or the broadcast scalar, converted to T.
template <class T, class U, int N, bool P> inline T elem(const vec<U, N, P>& v, int i) { return T(v[i]); }
template <class T, class S, std::enable_if_t<is_scalar_v<S>, int> = 0> inline T elem(const S& s, int) { return T(s); }

// Storage: plain members x, y, z, w so that `.x` in shader code needs no rewriting. Metal lays
// out vectors of 3 like vectors of 4 (float3: 16 bytes, aligned to 16); packed vectors have the
// element's alignment and no padding (packed_float3: 12 bytes).
// The colour names .r .g .b .a share each component's storage through an
// anonymous union, so they need no rewriting either (a translator rewrite of a
// single `.a` could not tell a vector from a user struct's member `a`).
#define MTL_COMPONENT(xyzw, rgba) union { T xyzw; T rgba; }
template <class T, int N, bool P> struct vec_storage;
template <class T> struct alignas(2 * sizeof(T)) vec_storage<T, 2, false> {
  MTL_COMPONENT(x, r); MTL_COMPONENT(y, g);
};
template <class T> struct alignas(4 * sizeof(T)) vec_storage<T, 3, false> {
  MTL_COMPONENT(x, r); MTL_COMPONENT(y, g); MTL_COMPONENT(z, b);
};
template <class T> struct alignas(4 * sizeof(T)) vec_storage<T, 4, false> {
  MTL_COMPONENT(x, r); MTL_COMPONENT(y, g); MTL_COMPONENT(z, b); MTL_COMPONENT(w, a);
};
template <class T> struct vec_storage<T, 2, true> { MTL_COMPONENT(x, r); MTL_COMPONENT(y, g); };
template <class T> struct vec_storage<T, 3, true> { MTL_COMPONENT(x, r); MTL_COMPONENT(y, g); MTL_COMPONENT(z, b); };
template <class T> struct vec_storage<T, 4, true> {
  MTL_COMPONENT(x, r); MTL_COMPONENT(y, g); MTL_COMPONENT(z, b); MTL_COMPONENT(w, a);
};
#undef MTL_COMPONENT

template <class V, int... I> struct swizzle_proxy;
template <class T> struct is_swizzle_proxy : std::false_type {};
template <class V, int... I> struct is_swizzle_proxy<swizzle_proxy<V, I...>> : std::true_type {};

template <class A> struct component_count { static constexpr int value = is_scalar_v<A> ? 1 : -1000; };
template <class T, int N, bool P> struct component_count<vec<T, N, P>> { static constexpr int value = N; };
template <class V, int... I> struct component_count<swizzle_proxy<V, I...>> { static constexpr int value = int(sizeof...(I)); };
template <class... A> constexpr int component_total = (0 + ... + component_count<std::decay_t<A>>::value);

}  // namespace __mtl

namespace metal {

template <class T, int N, bool Packed> struct vec : __mtl::vec_storage<T, N, Packed> {
  static_assert(N >= 2 && N <= 4, "Metal vectors have 2, 3 or 4 components");
  typedef T value_type;

  vec() = default;
  vec(const vec&) = default;
  vec& operator=(const vec&) = default;

  // Broadcast: `float4 v = 0.0f;`, `float3(1)`.
  vec(T s) {
    for (int i = 0; i < N; ++i) (*this)[i] = s;
  }
  // Same element type, other layout (packed <-> aligned): implicit, as in Metal.
  template <bool Q, std::enable_if_t<Q != Packed, int> = 0> vec(const vec<T, N, Q>& o) {
    for (int i = 0; i < N; ++i) (*this)[i] = o[i];
  }
  // Other element type: explicit (`float4(h)` with h a half4), converting each component.
  template <class U, bool Q, std::enable_if_t<!std::is_same<U, T>::value, int> = 0>
  explicit vec(const vec<U, N, Q>& o) {
    for (int i = 0; i < N; ++i) (*this)[i] = T(o[i]);
  }
  // Component lists mixing scalars and vectors: float4(v.xy, 0, 1), float4(v3, 1), uint3(x, y, z).
  template <class A0, class A1, class... R,
            std::enable_if_t<__mtl::component_total<A0, A1, R...> <= N, int> = 0>
  vec(const A0& a0, const A1& a1, const R&... rest) {
    int k = 0;
    put(k, a0);
    put(k, a1);
    (put(k, rest), ...);
    // Fewer components only from a brace list (`uint4 v = {a, b, c};`, the rest zero); the strict
    // front end refuses `float4(a, b)`, as Metal does.
    for (; k < N; ++k) (*this)[k] = T(0);
  }

  T& operator[](int i) { return reinterpret_cast<T*>(this)[i]; }
  const T& operator[](int i) const { return reinterpret_cast<const T*>(this)[i]; }

  template <class U> vec& operator+=(const U& o) { return *this = *this + o; }
  template <class U> vec& operator-=(const U& o) { return *this = *this - o; }
  template <class U> vec& operator*=(const U& o) { return *this = *this * o; }
  template <class U> vec& operator/=(const U& o) { return *this = *this / o; }
  template <class U> vec& operator%=(const U& o) { return *this = *this % o; }
  template <class U> vec& operator&=(const U& o) { return *this = *this & o; }
  template <class U> vec& operator|=(const U& o) { return *this = *this | o; }
  template <class U> vec& operator^=(const U& o) { return *this = *this ^ o; }
  template <class U> vec& operator<<=(const U& o) { return *this = *this << o; }
  template <class U> vec& operator>>=(const U& o) { return *this = *this >> o; }

 private:
  template <class S> void put(int& k, const S& s) { (*this)[k++] = T(s); }
  template <class U, int M, bool Q> void put(int& k, const vec<U, M, Q>& v) {
    for (int i = 0; i < M; ++i) (*this)[k++] = T(v[i]);
  }
  template <class V, int... I> void put(int& k, const __mtl::swizzle_proxy<V, I...>& p) { put(k, p.get()); }
};

// Elementwise operators: vector-vector (same element type and length, either layout) and
// scalar broadcast on either side (the scalar converted to the element type). Results are
// aligned (unpacked) vectors, as in Metal.
#define MTL_VEC_BINARY_OP(OP)                                                                       \
  template <class T, int N, bool P, bool Q>                                                         \
  inline vec<T, N> operator OP(const vec<T, N, P>& a, const vec<T, N, Q>& b) {                      \
    vec<T, N> r;                                                                                    \
    for (int i = 0; i < N; ++i) r[i] = T(a[i] OP b[i]);                                             \
    return r;                                                                                       \
  }                                                                                                 \
  template <class T, int N, bool P, class S, std::enable_if_t<__mtl::is_scalar_v<S>, int> = 0>    \
  inline vec<T, N> operator OP(const vec<T, N, P>& a, const S& s) {                                 \
    const T b = T(s);                                                                               \
    vec<T, N> r;                                                                                    \
    for (int i = 0; i < N; ++i) r[i] = T(a[i] OP b);                                                \
    return r;                                                                                       \
  }                                                                                                 \
  template <class T, int N, bool P, class S, std::enable_if_t<__mtl::is_scalar_v<S>, int> = 0>    \
  inline vec<T, N> operator OP(const S& s, const vec<T, N, P>& b) {                                 \
    const T a = T(s);                                                                               \
    vec<T, N> r;                                                                                    \
    for (int i = 0; i < N; ++i) r[i] = T(a OP b[i]);                                                \
    return r;                                                                                       \
  }
MTL_VEC_BINARY_OP(+)
MTL_VEC_BINARY_OP(-)
MTL_VEC_BINARY_OP(*)
MTL_VEC_BINARY_OP(/)
MTL_VEC_BINARY_OP(%)
MTL_VEC_BINARY_OP(&)
MTL_VEC_BINARY_OP(|)
MTL_VEC_BINARY_OP(^)
MTL_VEC_BINARY_OP(<<)
MTL_VEC_BINARY_OP(>>)
#undef MTL_VEC_BINARY_OP

#define MTL_VEC_COMPARE_OP(OP)                                                                      \
  template <class T, int N, bool P, bool Q>                                                         \
  inline vec<bool, N> operator OP(const vec<T, N, P>& a, const vec<T, N, Q>& b) {                   \
    vec<bool, N> r;                                                                                 \
    for (int i = 0; i < N; ++i) r[i] = a[i] OP b[i];                                                \
    return r;                                                                                       \
  }                                                                                                 \
  template <class T, int N, bool P, class S, std::enable_if_t<__mtl::is_scalar_v<S>, int> = 0>    \
  inline vec<bool, N> operator OP(const vec<T, N, P>& a, const S& s) {                              \
    const T b = T(s);                                                                               \
    vec<bool, N> r;                                                                                 \
    for (int i = 0; i < N; ++i) r[i] = a[i] OP b;                                                   \
    return r;                                                                                       \
  }                                                                                                 \
  template <class T, int N, bool P, class S, std::enable_if_t<__mtl::is_scalar_v<S>, int> = 0>    \
  inline vec<bool, N> operator OP(const S& s, const vec<T, N, P>& b) {                              \
    const T a = T(s);                                                                               \
    vec<bool, N> r;                                                                                 \
    for (int i = 0; i < N; ++i) r[i] = a OP b[i];                                                   \
    return r;                                                                                       \
  }
MTL_VEC_COMPARE_OP(==)
MTL_VEC_COMPARE_OP(!=)
MTL_VEC_COMPARE_OP(<)
MTL_VEC_COMPARE_OP(>)
MTL_VEC_COMPARE_OP(<=)
MTL_VEC_COMPARE_OP(>=)
MTL_VEC_COMPARE_OP(&&)
MTL_VEC_COMPARE_OP(||)
#undef MTL_VEC_COMPARE_OP

template <class T, int N, bool P> inline vec<T, N> operator-(const vec<T, N, P>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = T(-a[i]);
  return r;
}
template <class T, int N, bool P> inline vec<T, N> operator+(const vec<T, N, P>& a) { return a; }
template <class T, int N, bool P> inline vec<T, N> operator~(const vec<T, N, P>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = T(~a[i]);
  return r;
}
template <class T, int N, bool P> inline vec<bool, N> operator!(const vec<T, N, P>& a) {
  vec<bool, N> r;
  for (int i = 0; i < N; ++i) r[i] = !a[i];
  return r;
}

// all()/any() on bool vectors (and on bool, for code that calls them on a scalar comparison).
template <int N, bool P> inline bool all(const vec<bool, N, P>& v) {
  for (int i = 0; i < N; ++i)
    if (!v[i]) return false;
  return true;
}
template <int N, bool P> inline bool any(const vec<bool, N, P>& v) {
  for (int i = 0; i < N; ++i)
    if (v[i]) return true;
  return false;
}
inline bool all(bool b) { return b; }
inline bool any(bool b) { return b; }

// ---------------------------------------------------------------------------------------------
// bfloat arithmetic and comparisons with any scalar. Templates (exact matches) so that the
// implicit conversions both ways never make `b * 2.0f` ambiguous. constexpr: bfloat is usable in
// constant expressions, as in Metal (`static_assert(bfloat(1) + bfloat(2) == bfloat(3))`). bfloat op bfloat/integer
// gives bfloat; with float (double) gives float (double); with half gives float.
// ---------------------------------------------------------------------------------------------
namespace bfloat_detail {
template <class A, class B>
using enable_bf = std::enable_if_t<(std::is_same<A, bfloat>::value || std::is_same<B, bfloat>::value) &&
                                   __mtl::is_scalar_v<A> && __mtl::is_scalar_v<B>>;
}
namespace __mtl_bfloat {  // (found by argument-dependent lookup, as built-in operators would be)
#define MTL_BFLOAT_ARITH(OP)                                                                        \
  template <class A, class B, class = bfloat_detail::enable_bf<A, B>,                              \
            class R = __mtl::scalar_common_t<A, B>>                                                 \
  constexpr R operator OP(const A& a, const B& b) {                                                \
    typedef __mtl::compute_t<R> C;                                                                  \
    return R(C(a) OP C(b));                                                                         \
  }
MTL_BFLOAT_ARITH(+)
MTL_BFLOAT_ARITH(-)
MTL_BFLOAT_ARITH(*)
MTL_BFLOAT_ARITH(/)
#undef MTL_BFLOAT_ARITH
#define MTL_BFLOAT_COMPARE(OP)                                                                      \
  template <class A, class B, class = bfloat_detail::enable_bf<A, B>>                              \
  constexpr bool operator OP(const A& a, const B& b) {                                             \
    typedef __mtl::compute_t<__mtl::scalar_common_t<A, B>> C;                                       \
    return C(a) OP C(b);                                                                            \
  }
MTL_BFLOAT_COMPARE(==)
MTL_BFLOAT_COMPARE(!=)
MTL_BFLOAT_COMPARE(<)
MTL_BFLOAT_COMPARE(>)
MTL_BFLOAT_COMPARE(<=)
MTL_BFLOAT_COMPARE(>=)
#undef MTL_BFLOAT_COMPARE
}  // namespace __mtl_bfloat

// ---------------------------------------------------------------------------------------------
// Type traits (<metal_type_traits>): the std ones, with half and bfloat counted as floating point
// and vectors distinguished from scalars as Metal does.
// ---------------------------------------------------------------------------------------------
using std::add_const;
using std::add_const_t;
using std::add_pointer;
using std::add_pointer_t;
using std::bool_constant;
using std::conditional;
using std::conditional_t;
using std::decay;
using std::decay_t;
using std::declval;
using std::enable_if;
using std::enable_if_t;
using std::false_type;
using std::integral_constant;
using std::is_base_of;
using std::is_base_of_v;
using std::is_class;
using std::is_class_v;
using std::is_const;
using std::is_const_v;
using std::is_convertible;
using std::is_convertible_v;
using std::is_enum;
using std::is_enum_v;
using std::is_pointer;
using std::is_pointer_v;
using std::is_same;
using std::is_same_v;
using std::is_trivially_copyable;
using std::is_trivially_copyable_v;
using std::is_void;
using std::is_void_v;
using std::make_signed;
using std::make_signed_t;
using std::make_unsigned;
using std::make_unsigned_t;
using std::remove_const;
using std::remove_const_t;
using std::remove_cv;
using std::remove_cv_t;
using std::remove_pointer;
using std::remove_pointer_t;
using std::remove_reference;
using std::remove_reference_t;
using std::remove_volatile;
using std::remove_volatile_t;
using std::true_type;
using std::underlying_type;
using std::underlying_type_t;
// Apple's internal trait combinators (under `#pragma METAL internals : enable`); no void_t:
// Metal's library has none, and libraries define their own metal::void_t.
template <class... B> struct _disjunction : std::disjunction<B...> {};
template <class... B> struct _conjunction : std::conjunction<B...> {};
// remove_addrspace: address spaces are erased to nothing, `constant` to const (a constexpr
// variable's type, `const int` in C++, is `constant int` in Metal).
template <class T> struct remove_addrspace { typedef std::remove_const_t<T> type; };
template <class T> using remove_addrspace_t = typename remove_addrspace<T>::type;
// Metal's is_floating_point and is_integral hold for vectors of such elements too (c10/metal's
// is_scalar_floating_point_v is `is_floating_point_v<T> && is_scalar_v<T>`; its complex half2 functors
// are selected by is_floating_point_v); is_arithmetic and is_scalar stay scalar.
template <class T> struct is_floating_point
    : bool_constant<__mtl::is_float_scalar_v<typename __mtl::scalar_of<std::remove_cv_t<T>>::type>> {};
template <class T> constexpr bool is_floating_point_v = is_floating_point<T>::value;
template <class T> struct is_integral
    : bool_constant<std::is_integral<typename __mtl::scalar_of<std::remove_cv_t<T>>::type>::value> {};
template <class T> constexpr bool is_integral_v = is_integral<T>::value;
template <class T> struct is_arithmetic : bool_constant<__mtl::is_scalar_v<T>> {};
template <class T> constexpr bool is_arithmetic_v = is_arithmetic<T>::value;
template <class T> struct is_scalar : bool_constant<__mtl::is_scalar_v<T>> {};
template <class T> constexpr bool is_scalar_v = is_scalar<T>::value;
template <class T> struct is_vector : bool_constant<__mtl::is_vec_v<T>> {};
template <class T> constexpr bool is_vector_v = is_vector<T>::value;
template <class T>
struct is_signed : bool_constant<__mtl::is_float_scalar_v<T> || std::is_signed<std::remove_cv_t<T>>::value> {};
template <class T> constexpr bool is_signed_v = is_signed<T>::value;
template <class T> struct is_unsigned : std::is_unsigned<T> {};
template <class T> constexpr bool is_unsigned_v = is_unsigned<T>::value;
// Number of components: 1 for scalars, N for vectors.
template <class T> struct vec_elements : integral_constant<int, __mtl::is_vec_v<T> ? __mtl::vec_traits<std::remove_cv_t<T>>::size : 1> {};

// uniform<T> (MSL 2.0): a value the same in every thread; reads as T, arithmetic gives T (which
// converts back).
template <class T> struct uniform {
  T __value;
  uniform() = default;
  constexpr uniform(T v) : __value(v) {}
  constexpr operator T() const { return __value; }
};
template <class T> constexpr uniform<T> make_uniform(T v) { return uniform<T>(v); }

// metal::array<T, N> (<metal_array>): a fixed-size aggregate, brace-initialisable.
template <class T, size_t N> struct array {
  T __elements[N > 0 ? N : 1];
  T& operator[](size_t i) { return __elements[i]; }
  const T& operator[](size_t i) const { return __elements[i]; }
  constexpr size_t size() const { return N; }
  T* data() { return __elements; }
  const T* data() const { return __elements; }
  T* begin() { return __elements; }
  T* end() { return __elements + N; }
  const T* begin() const { return __elements; }
  const T* end() const { return __elements + N; }
};

// ---------------------------------------------------------------------------------------------
// Typedefs
// ---------------------------------------------------------------------------------------------
#define MTL_VEC_TYPEDEFS(T, NAME)                                                                   \
  typedef vec<T, 2> NAME##2;                                                                        \
  typedef vec<T, 3> NAME##3;                                                                        \
  typedef vec<T, 4> NAME##4;                                                                        \
  typedef vec<T, 2, true> packed_##NAME##2;                                                         \
  typedef vec<T, 3, true> packed_##NAME##3;                                                         \
  typedef vec<T, 4, true> packed_##NAME##4;
MTL_VEC_TYPEDEFS(float, float)
MTL_VEC_TYPEDEFS(half, half)
MTL_VEC_TYPEDEFS(bfloat, bfloat)
MTL_VEC_TYPEDEFS(bool, bool)
MTL_VEC_TYPEDEFS(char, char)
MTL_VEC_TYPEDEFS(uchar, uchar)
MTL_VEC_TYPEDEFS(short, short)
MTL_VEC_TYPEDEFS(ushort, ushort)
MTL_VEC_TYPEDEFS(int, int)
MTL_VEC_TYPEDEFS(uint, uint)
MTL_VEC_TYPEDEFS(long, long)
MTL_VEC_TYPEDEFS(ulong, ulong)
#undef MTL_VEC_TYPEDEFS

// ---------------------------------------------------------------------------------------------
// as_type: reinterpret the bits; Metal requires equal sizes.
// ---------------------------------------------------------------------------------------------
template <class To, class From> inline To as_type(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "as_type<T>(x) requires sizeof(T) == sizeof(x)");
  To r;
  __builtin_memcpy(static_cast<void*>(&r), static_cast<const void*>(&x), sizeof(To));
  return r;
}

// ---------------------------------------------------------------------------------------------
// numeric_limits (metal::numeric_limits, as in <metal_numeric_limits>)
// ---------------------------------------------------------------------------------------------
template <class T, class = void> struct numeric_limits {
  static constexpr bool is_specialized = false;
};
template <class T> struct numeric_limits<T, std::enable_if_t<std::is_integral<T>::value>> {
  static constexpr bool is_specialized = true;
  static constexpr bool is_signed = T(-1) < T(0);
  static constexpr bool is_integer = true;
  static constexpr bool is_exact = true;
  static constexpr bool has_infinity = false;
  static constexpr bool has_quiet_NaN = false;
  static constexpr int digits = int(sizeof(T) * CHAR_BIT) - (is_signed ? 1 : 0);
  static constexpr T max() {
    return is_signed ? T((uint64_t(1) << (sizeof(T) * CHAR_BIT - 1)) - 1) : T(~T(0));
  }
  static constexpr T min() { return is_signed ? T(-max() - 1) : T(0); }
  static constexpr T lowest() { return min(); }
  static constexpr T epsilon() { return T(0); }
  // As C++'s: defined (zero) for integers too, so `is_floating_point_v<T> ? infinity() : max()` compiles.
  static constexpr T infinity() { return T(0); }
  static constexpr T quiet_NaN() { return T(0); }
  static constexpr T signaling_NaN() { return T(0); }
  static constexpr T denorm_min() { return T(0); }
  static constexpr T round_error() { return T(0); }
};
template <> struct numeric_limits<float> {
  static constexpr bool is_specialized = true, is_signed = true, is_integer = false, is_exact = false;
  static constexpr bool has_infinity = true, has_quiet_NaN = true;
  static constexpr int digits = 24;
  static constexpr float max() { return FLT_MAX; }
  static constexpr float min() { return FLT_MIN; }
  static constexpr float lowest() { return -FLT_MAX; }
  static constexpr float epsilon() { return FLT_EPSILON; }
  static constexpr float denorm_min() { return __FLT_DENORM_MIN__; }
  static constexpr float infinity() { return __builtin_inff(); }
  static constexpr float quiet_NaN() { return __builtin_nanf(""); }
};
template <> struct numeric_limits<half> {
  static constexpr bool is_specialized = true, is_signed = true, is_integer = false, is_exact = false;
  static constexpr bool has_infinity = true, has_quiet_NaN = true;
  static constexpr int digits = 11;
  static constexpr half max() { return half(65504.0f); }
  static constexpr half min() { return half(6.103515625e-05f); }  // 2^-14
  static constexpr half lowest() { return half(-65504.0f); }
  static constexpr half epsilon() { return half(0.0009765625f); }  // 2^-10
  static constexpr half denorm_min() { return half(5.9604644775390625e-08f); }  // 2^-24
  static constexpr half infinity() { return half(__builtin_inff()); }
  static constexpr half quiet_NaN() { return half(__builtin_nanf("")); }
};
template <> struct numeric_limits<bfloat> {
  static constexpr bool is_specialized = true, is_signed = true, is_integer = false, is_exact = false;
  static constexpr bool has_infinity = true, has_quiet_NaN = true;
  static constexpr int digits = 8;
  static constexpr bfloat max() { return bfloat::from_bits(0x7f7f); }
  static constexpr bfloat min() { return bfloat::from_bits(0x0080); }
  static constexpr bfloat lowest() { return bfloat::from_bits(0xff7f); }
  static constexpr bfloat epsilon() { return bfloat::from_bits(0x3c00); }  // 2^-7
  static constexpr bfloat denorm_min() { return bfloat::from_bits(0x0001); }
  static constexpr bfloat infinity() { return bfloat::from_bits(0x7f80); }
  static constexpr bfloat quiet_NaN() { return bfloat::from_bits(0x7fc0); }
};
template <class T> struct numeric_limits<const T> : numeric_limits<T> {};
// A vector's: its element's limits, each in every component (c10/metal's logaddexp reads
// `constexpr auto inf = numeric_limits<float2>::infinity().x;`; vectors are no literal types here, and
// the translator makes such a variable const).
template <class T, int N, bool P> struct numeric_limits<vec<T, N, P>> {
  typedef numeric_limits<T> E;
  typedef vec<T, N> V;
  static constexpr bool is_specialized = E::is_specialized, is_signed = E::is_signed, is_integer = E::is_integer;
  static constexpr bool is_exact = E::is_exact, has_infinity = E::has_infinity, has_quiet_NaN = E::has_quiet_NaN;
  static constexpr int digits = E::digits;
  static V max() { return V(E::max()); }
  static V min() { return V(E::min()); }
  static V lowest() { return V(E::lowest()); }
  static V epsilon() { return V(E::epsilon()); }
  static V denorm_min() { return V(E::denorm_min()); }
  static V infinity() { return V(E::infinity()); }
  static V quiet_NaN() { return V(E::quiet_NaN()); }
};

}  // namespace metal

// ---------------------------------------------------------------------------------------------
// Swizzles. The translator rewrites `v.zyx` to __mtl::swizzle<2,1,0>(v) where it is read and to
// __mtl::swizzle_ref<...>(v) where it is assigned. One index gives the scalar (a reference for
// swizzle_ref).
// ---------------------------------------------------------------------------------------------
namespace __mtl {

template <class T, int K> struct swizzle_result { typedef metal::vec<T, K> type; };
template <class T> struct swizzle_result<T, 1> { typedef T type; };

template <int... I, class T, int N, bool P>
inline typename swizzle_result<T, int(sizeof...(I))>::type swizzle(const metal::vec<T, N, P>& v) {
  static_assert(sizeof...(I) >= 1 && sizeof...(I) <= 4, "a swizzle selects 1 to 4 components");
  static_assert(((I >= 0 && I < N) && ...), "swizzle component out of range for this vector");
  return typename swizzle_result<T, int(sizeof...(I))>::type{v[I]...};
}
// Scalars accept .x/.xx... too (clang's vector extension allows it on Metal scalars).
template <int... I, class S, std::enable_if_t<is_scalar_v<S>, int> = 0>
inline typename swizzle_result<S, int(sizeof...(I))>::type swizzle(const S& s) {
  static_assert(((I == 0) && ...), "a scalar has only component x");
  return typename swizzle_result<S, int(sizeof...(I))>::type{((void)I, s)...};
}

// Writable view of selected components of a vector lvalue.
template <class V, int... I> struct swizzle_proxy {
  typedef typename vec_traits<V>::elem T;
  static constexpr int K = int(sizeof...(I));
  typedef metal::vec<T, K> value_type;
  V& v;

  operator value_type() const { return value_type{v[I]...}; }
  value_type get() const { return value_type{v[I]...}; }

  swizzle_proxy& operator=(const value_type& r) {
    const int idx[K] = {I...};
    for (int k = 0; k < K; ++k) v[idx[k]] = r[k];
    return *this;
  }
  swizzle_proxy& operator=(const swizzle_proxy& o) { return *this = o.get(); }
  template <class U> swizzle_proxy& operator+=(const U& o) { return *this = get() + o; }
  template <class U> swizzle_proxy& operator-=(const U& o) { return *this = get() - o; }
  template <class U> swizzle_proxy& operator*=(const U& o) { return *this = get() * o; }
  template <class U> swizzle_proxy& operator/=(const U& o) { return *this = get() / o; }
  template <class U> swizzle_proxy& operator%=(const U& o) { return *this = get() % o; }
  template <class U> swizzle_proxy& operator&=(const U& o) { return *this = get() & o; }
  template <class U> swizzle_proxy& operator|=(const U& o) { return *this = get() | o; }
  template <class U> swizzle_proxy& operator^=(const U& o) { return *this = get() ^ o; }
  template <class U> swizzle_proxy& operator<<=(const U& o) { return *this = get() << o; }
  template <class U> swizzle_proxy& operator>>=(const U& o) { return *this = get() >> o; }
  T& operator[](int k) {
    const int idx[K] = {I...};
    return v[idx[k]];
  }
};

// A proxy used as an operand reads as its vector value (for translators that emit swizzle_ref for
// every swizzle of an lvalue). Function templates (max, dot, ...) still need __mtl::swizzle.
#define MTL_PROXY_BINARY_OP(OP)                                                                     \
  template <class V, int... I, class R, std::enable_if_t<!is_swizzle_proxy<R>::value, int> = 0>    \
  inline auto operator OP(const swizzle_proxy<V, I...>& p, const R& r)->decltype(p.get() OP r) {   \
    return p.get() OP r;                                                                           \
  }                                                                                                \
  template <class L, class V, int... I, std::enable_if_t<!is_swizzle_proxy<L>::value, int> = 0>    \
  inline auto operator OP(const L& l, const swizzle_proxy<V, I...>& p)->decltype(l OP p.get()) {   \
    return l OP p.get();                                                                           \
  }                                                                                                \
  template <class V, int... I, class W, int... J>                                                  \
  inline auto operator OP(const swizzle_proxy<V, I...>& p, const swizzle_proxy<W, J...>& q)        \
      ->decltype(p.get() OP q.get()) {                                                             \
    return p.get() OP q.get();                                                                     \
  }
MTL_PROXY_BINARY_OP(+)
MTL_PROXY_BINARY_OP(-)
MTL_PROXY_BINARY_OP(*)
MTL_PROXY_BINARY_OP(/)
MTL_PROXY_BINARY_OP(%)
MTL_PROXY_BINARY_OP(&)
MTL_PROXY_BINARY_OP(|)
MTL_PROXY_BINARY_OP(^)
MTL_PROXY_BINARY_OP(<<)
MTL_PROXY_BINARY_OP(>>)
MTL_PROXY_BINARY_OP(==)
MTL_PROXY_BINARY_OP(!=)
MTL_PROXY_BINARY_OP(<)
MTL_PROXY_BINARY_OP(>)
MTL_PROXY_BINARY_OP(<=)
MTL_PROXY_BINARY_OP(>=)
#undef MTL_PROXY_BINARY_OP
template <class V, int... I> inline auto operator-(const swizzle_proxy<V, I...>& p) -> decltype(-p.get()) { return -p.get(); }
template <class V, int... I> inline auto operator!(const swizzle_proxy<V, I...>& p) -> decltype(!p.get()) { return !p.get(); }
template <class V, int... I> inline auto operator~(const swizzle_proxy<V, I...>& p) -> decltype(~p.get()) { return ~p.get(); }

template <int I0, int I1, int... I, class T, int N, bool P>
inline swizzle_proxy<metal::vec<T, N, P>, I0, I1, I...> swizzle_ref(metal::vec<T, N, P>& v) {
  static_assert(sizeof...(I) <= 2, "a swizzle selects 1 to 4 components");
  static_assert(I0 < N && I1 < N && ((I < N) && ...), "swizzle component out of range for this vector");
  return swizzle_proxy<metal::vec<T, N, P>, I0, I1, I...>{v};
}
template <int I0, class T, int N, bool P> inline T& swizzle_ref(metal::vec<T, N, P>& v) {
  static_assert(I0 >= 0 && I0 < N, "swizzle component out of range for this vector");
  return v[I0];
}

}  // namespace __mtl

// ---------------------------------------------------------------------------------------------
// Constants Metal's headers define as macros. INFINITY/NAN/HUGE_VALF/MAXFLOAT are spelled exactly
// as glibc's <math.h> spells them so that a later <cmath> redefines them silently.
// ---------------------------------------------------------------------------------------------
#ifndef INFINITY
#define INFINITY (__builtin_inff ())
#endif
#ifndef NAN
#define NAN (__builtin_nanf (""))
#endif
#ifndef HUGE_VALF
#define HUGE_VALF (__builtin_huge_valf ())
#endif
#ifndef MAXFLOAT
#define MAXFLOAT	3.40282347e+38F
#endif
#define MAXHALF (metal::half(65504.0f))
#define HALF_MAX (metal::half(65504.0f))
#define HALF_MIN (metal::half(6.103515625e-05f))
#define HALF_EPSILON (metal::half(0.0009765625f))
#define HALF_MANT_DIG 11
#define HALF_MAX_EXP 16
#define HALF_MIN_EXP (-13)
#define HUGE_VALH (metal::half(__builtin_inff ()))
#define BFLOAT_MAX (metal::bfloat::from_bits(0x7f7f))
#define BFLOAT_MIN (metal::bfloat::from_bits(0x0080))
#define BFLOAT_EPSILON (metal::bfloat::from_bits(0x3c00))
#define HUGE_VALBF (metal::bfloat::from_bits(0x7f80))

#define M_E_F 2.71828182845904523536f
#define M_LOG2E_F 1.44269504088896340736f
#define M_LOG10E_F 0.434294481903251827651f
#define M_LN2_F 0.693147180559945309417f
#define M_LN10_F 2.30258509299404568402f
#define M_PI_F 3.14159265358979323846f
#define M_PI_2_F 1.57079632679489661923f
#define M_PI_4_F 0.785398163397448309616f
#define M_1_PI_F 0.318309886183790671538f
#define M_2_PI_F 0.636619772367581343076f
#define M_2_SQRTPI_F 1.12837916709551257390f
#define M_SQRT2_F 1.41421356237309504880f
#define M_SQRT1_2_F 0.707106781186547524401f
#define M_E_H (metal::half(M_E_F))
#define M_LOG2E_H (metal::half(M_LOG2E_F))
#define M_LOG10E_H (metal::half(M_LOG10E_F))
#define M_LN2_H (metal::half(M_LN2_F))
#define M_LN10_H (metal::half(M_LN10_F))
#define M_PI_H (metal::half(M_PI_F))
#define M_PI_2_H (metal::half(M_PI_2_F))
#define M_PI_4_H (metal::half(M_PI_4_F))
#define M_1_PI_H (metal::half(M_1_PI_F))
#define M_2_PI_H (metal::half(M_2_PI_F))
#define M_2_SQRTPI_H (metal::half(M_2_SQRTPI_F))
#define M_SQRT2_H (metal::half(M_SQRT2_F))
#define M_SQRT1_2_H (metal::half(M_SQRT1_2_F))
#define M_E_BF (metal::bfloat(M_E_F))
#define M_LOG2E_BF (metal::bfloat(M_LOG2E_F))
#define M_LOG10E_BF (metal::bfloat(M_LOG10E_F))
#define M_LN2_BF (metal::bfloat(M_LN2_F))
#define M_LN10_BF (metal::bfloat(M_LN10_F))
#define M_PI_BF (metal::bfloat(M_PI_F))
#define M_PI_2_BF (metal::bfloat(M_PI_2_F))
#define M_PI_4_BF (metal::bfloat(M_PI_4_F))
#define M_1_PI_BF (metal::bfloat(M_1_PI_F))
#define M_2_PI_BF (metal::bfloat(M_2_PI_F))
#define M_2_SQRTPI_BF (metal::bfloat(M_2_SQRTPI_F))
#define M_SQRT2_BF (metal::bfloat(M_SQRT2_F))
#define M_SQRT1_2_BF (metal::bfloat(M_SQRT1_2_F))
