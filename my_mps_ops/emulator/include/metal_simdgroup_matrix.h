// simdgroup_matrix for the emulator's metal_stdlib.
//
// On the GPU an 8x8 simdgroup_matrix is spread over the 32 lanes of a SIMD group. Here every lane
// holds and computes the whole matrix redundantly. Metal requires all lanes of the SIMD group to
// execute these operations together with the same arguments, so every lane's copy is identical
// and equal to the distributed matrix; the operations need no communication between lanes.
// (A kernel that breaks that rule, or that edits its own lane's elements through
// thread_elements(), is not supported: thread_elements() is not provided.)
//
// Products are accumulated in float (double for double) and rounded once to the destination's
// element type; for half and bfloat that is at least as accurate as the hardware, whose internal
// accumulation precision Apple does not document.
#pragma once

#include "metal_types.h"

namespace metal {

template <class T, int Cols, int Rows> struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "Metal defines simdgroup_matrix for 8x8 only");
  T __elements[Rows][Cols];  // row-major: __elements[row][column]

  simdgroup_matrix() = default;
  // Metal: "creates a diagonal matrix with the given value" (zero elsewhere).
  template <class S, std::enable_if_t<__mtl::is_scalar_v<S>, int> = 0> simdgroup_matrix(S diagonal) {
    for (int r = 0; r < Rows; ++r)
      for (int c = 0; c < Cols; ++c) __elements[r][c] = r == c ? T(diagonal) : T(0);
  }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <class T, int Cols, int Rows>
inline simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(__mtl::type_identity_t<T> value) {
  simdgroup_matrix<T, Cols, Rows> m;
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < Cols; ++c) m.__elements[r][c] = value;
  return m;
}

// Element (row r, column c) of the matrix is read from
//   src[(origin.y + r) * elements_per_row + (origin.x + c)]      without transpose,
//   src[(origin.x + c) * elements_per_row + (origin.y + r)]      with transpose_matrix,
// i.e. matrix_origin is (column, row) of the matrix's top-left element in the matrix's own
// (logical) coordinates, and a transposed source is stored column-major with elements_per_row
// elements per column. The spec does not spell this out; it follows the AIR intrinsic's form
// (origin applied through the same (column, row) strides as the element index, the strides
// swapped for a transposed source) and the convention of public Metal GEMM code built on it.
// With a zero origin (what kernels use almost always) both readings agree.
namespace simdgroup_detail {
inline ulong element_offset(ulong r, ulong c, ulong elements_per_row, ulong2 origin, bool transpose) {
  return transpose ? (origin.x + c) * elements_per_row + (origin.y + r) : (origin.y + r) * elements_per_row + (origin.x + c);
}
}  // namespace simdgroup_detail

template <class T, int Cols, int Rows, class U>
inline void simdgroup_load(simdgroup_matrix<T, Cols, Rows>& d, const U* src, ulong elements_per_row = Cols,
                           ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false) {
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < Cols; ++c)
      d.__elements[r][c] =
          T(src[simdgroup_detail::element_offset(ulong(r), ulong(c), elements_per_row, matrix_origin, transpose_matrix)]);
}

// The inverse of simdgroup_load with the same arguments.
template <class T, int Cols, int Rows, class U>
inline void simdgroup_store(const simdgroup_matrix<T, Cols, Rows>& a, U* dst, ulong elements_per_row = Cols,
                            ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false) {
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < Cols; ++c)
      dst[simdgroup_detail::element_offset(ulong(r), ulong(c), elements_per_row, matrix_origin, transpose_matrix)] =
          U(a.__elements[r][c]);
}

// d = a * b + c
template <class TD, class TA, class TB, class TC, int Cols, int Rows, int K>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<TD, Cols, Rows>& d, const simdgroup_matrix<TA, K, Rows>& a,
                                          const simdgroup_matrix<TB, Cols, K>& b,
                                          const simdgroup_matrix<TC, Cols, Rows>& c) {
  typedef __mtl::compute_t<TD> C;
  simdgroup_matrix<TD, Cols, Rows> result;  // a temporary: d may alias a, b or c
  for (int r = 0; r < Rows; ++r)
    for (int col = 0; col < Cols; ++col) {
      C sum = C(c.__elements[r][col]);
      for (int k = 0; k < K; ++k) sum += C(a.__elements[r][k]) * C(b.__elements[k][col]);
      result.__elements[r][col] = TD(sum);
    }
  d = result;
}

// d = a * b
template <class TD, class TA, class TB, int Cols, int Rows, int K>
inline void simdgroup_multiply(simdgroup_matrix<TD, Cols, Rows>& d, const simdgroup_matrix<TA, K, Rows>& a,
                               const simdgroup_matrix<TB, Cols, K>& b) {
  typedef __mtl::compute_t<TD> C;
  simdgroup_matrix<TD, Cols, Rows> result;
  for (int r = 0; r < Rows; ++r)
    for (int col = 0; col < Cols; ++col) {
      C sum = C(0);
      for (int k = 0; k < K; ++k) sum += C(a.__elements[r][k]) * C(b.__elements[k][col]);
      result.__elements[r][col] = TD(sum);
    }
  d = result;
}

}  // namespace metal
