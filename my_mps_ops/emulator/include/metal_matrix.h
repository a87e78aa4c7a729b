// Metal matrix types (floatCxR, halfCxR) for the emulator's metal_stdlib.
//
// A matrix<T, C, R> has C columns of R components, stored column by column as vec<T, R> (so
// float3x3 is three 16-byte float3 columns, 48 bytes, as in Metal); m[c] is column c.
// Construction from one scalar puts it on the diagonal (zero elsewhere), as in GLSL and Metal.
#pragma once

#include "metal_types.h"

namespace metal {

template <class T, int C, int R> struct matrix {
  static_assert(C >= 2 && C <= 4 && R >= 2 && R <= 4, "Metal matrices have 2 to 4 columns and rows");
  vec<T, R> columns[C];

  matrix() = default;
  explicit matrix(T diagonal) {
    for (int c = 0; c < C; ++c)
      for (int r = 0; r < R; ++r) columns[c][r] = c == r ? diagonal : T(0);
  }
  // C column vectors, or C * R scalars in column-major order.
  template <class... A, std::enable_if_t<(sizeof...(A) == C && (std::is_same<std::decay_t<A>, vec<T, R>>::value && ...)) ||
                                             (sizeof...(A) == C * R && (__mtl::is_scalar_v<std::decay_t<A>> && ...)),
                                         int> = 0>
  matrix(const A&... args) {
    if constexpr (sizeof...(A) == C) {
      int c = 0;
      ((columns[c++] = args), ...);
    } else {
      int k = 0;
      ((columns[k / R][k % R] = T(args), ++k), ...);
    }
  }
  template <class U, std::enable_if_t<!std::is_same<U, T>::value, int> = 0>
  explicit matrix(const matrix<U, C, R>& o) {
    for (int c = 0; c < C; ++c) columns[c] = vec<T, R>(o.columns[c]);
  }

  vec<T, R>& operator[](int c) { return columns[c]; }
  const vec<T, R>& operator[](int c) const { return columns[c]; }

  matrix& operator+=(const matrix& o) { return *this = *this + o; }
  matrix& operator-=(const matrix& o) { return *this = *this - o; }
  matrix& operator*=(T s) { return *this = *this * s; }
  template <int K = C, std::enable_if_t<K == R, int> = 0> matrix& operator*=(const matrix& o) { return *this = *this * o; }
};

template <class T, int C, int R> inline matrix<T, C, R> operator+(const matrix<T, C, R>& a, const matrix<T, C, R>& b) {
  matrix<T, C, R> m;
  for (int c = 0; c < C; ++c) m.columns[c] = a.columns[c] + b.columns[c];
  return m;
}
template <class T, int C, int R> inline matrix<T, C, R> operator-(const matrix<T, C, R>& a, const matrix<T, C, R>& b) {
  matrix<T, C, R> m;
  for (int c = 0; c < C; ++c) m.columns[c] = a.columns[c] - b.columns[c];
  return m;
}
template <class T, int C, int R> inline matrix<T, C, R> operator-(const matrix<T, C, R>& a) {
  matrix<T, C, R> m;
  for (int c = 0; c < C; ++c) m.columns[c] = -a.columns[c];
  return m;
}
template <class T, int C, int R, class S, std::enable_if_t<__mtl::is_scalar_v<S>, int> = 0>
inline matrix<T, C, R> operator*(const matrix<T, C, R>& a, S s) {
  matrix<T, C, R> m;
  for (int c = 0; c < C; ++c) m.columns[c] = a.columns[c] * T(s);
  return m;
}
template <class T, int C, int R, class S, std::enable_if_t<__mtl::is_scalar_v<S>, int> = 0>
inline matrix<T, C, R> operator*(S s, const matrix<T, C, R>& a) {
  return a * s;
}
// matrix * column vector: sum over columns of m[c] * v[c]
template <class T, int C, int R, bool P> inline vec<T, R> operator*(const matrix<T, C, R>& m, const vec<T, C, P>& v) {
  vec<T, R> r = m.columns[0] * v[0];
  for (int c = 1; c < C; ++c) r += m.columns[c] * v[c];
  return r;
}
// row vector * matrix: component c is dot(v, m[c])
template <class T, int C, int R, bool P> inline vec<T, C> operator*(const vec<T, R, P>& v, const matrix<T, C, R>& m) {
  vec<T, C> r;
  for (int c = 0; c < C; ++c) {
    T s = v[0] * m.columns[c][0];
    for (int k = 1; k < R; ++k) s += v[k] * m.columns[c][k];
    r[c] = s;
  }
  return r;
}
// (R x K) * (K x C): column c of the product is a * b[c]
template <class T, int K, int R, int C>
inline matrix<T, C, R> operator*(const matrix<T, K, R>& a, const matrix<T, C, K>& b) {
  matrix<T, C, R> m;
  for (int c = 0; c < C; ++c) m.columns[c] = a * b.columns[c];
  return m;
}

template <class T, int C, int R> inline matrix<T, R, C> transpose(const matrix<T, C, R>& a) {
  matrix<T, R, C> m;
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) m.columns[r][c] = a.columns[c][r];
  return m;
}

template <class T> inline T determinant(const matrix<T, 2, 2>& m) {
  return m[0][0] * m[1][1] - m[1][0] * m[0][1];
}
template <class T> inline T determinant(const matrix<T, 3, 3>& m) {
  return m[0][0] * (m[1][1] * m[2][2] - m[2][1] * m[1][2]) - m[1][0] * (m[0][1] * m[2][2] - m[2][1] * m[0][2]) +
         m[2][0] * (m[0][1] * m[1][2] - m[1][1] * m[0][2]);
}
template <class T> inline T determinant(const matrix<T, 4, 4>& m) {
  // Laplace expansion along the first column.
  T det = T(0);
  for (int i = 0; i < 4; ++i) {
    matrix<T, 3, 3> minor_;
    for (int c = 1; c < 4; ++c)
      for (int r = 0, rr = 0; r < 4; ++r)
        if (r != i) minor_.columns[c - 1][rr++] = m[c][r];
    const T term = m[0][i] * determinant(minor_);
    det = (i % 2 == 0) ? T(det + term) : T(det - term);
  }
  return det;
}

#define MTL_MATRIX_TYPEDEFS(T, NAME) \
  typedef matrix<T, 2, 2> NAME##2x2; \
  typedef matrix<T, 2, 3> NAME##2x3; \
  typedef matrix<T, 2, 4> NAME##2x4; \
  typedef matrix<T, 3, 2> NAME##3x2; \
  typedef matrix<T, 3, 3> NAME##3x3; \
  typedef matrix<T, 3, 4> NAME##3x4; \
  typedef matrix<T, 4, 2> NAME##4x2; \
  typedef matrix<T, 4, 3> NAME##4x3; \
  typedef matrix<T, 4, 4> NAME##4x4;
MTL_MATRIX_TYPEDEFS(float, float)
MTL_MATRIX_TYPEDEFS(half, half)
#undef MTL_MATRIX_TYPEDEFS

}  // namespace metal
