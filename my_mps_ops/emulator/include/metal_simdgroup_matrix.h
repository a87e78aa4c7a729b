// simdgroup_matrix for the emulator's metal_stdlib.
//
// On the GPU an 8x8 simdgroup_matrix is spread over the 32 lanes of a SIMD group. Here every lane
// holds and computes the whole matrix redundantly. Metal requires all lanes of the SIMD group to
// execute these operations together with the same arguments, so every lane's copy is identical
// and equal to the distributed matrix; load/store/multiply need no communication between lanes.
//
// thread_elements() gives a lane its two elements as the hardware distributes them (row
// (q & 4) + (lane / 2) % 4, columns (q & 2) * 2 + (lane % 2) * 2 and + 1, with q = lane / 4).
// Reading them needs only the lane index. Writing them (MLX-style fragment loads) leaves each
// lane's copy correct only at its own two elements, so the matrix is marked and, before its next
// full use (multiply, store, copy into another matrix is fine), the lanes exchange their elements
// with one all-gather. Both hooks come from the runtime (metal_runtime.h), declared weak here so
// that kernels which never call thread_elements() do not depend on them.
//
// Under the race check (MTL_EMU_RACE_CHECK) each lane's load and store is recorded for its own
// two elements only, the accesses the hardware makes for that lane; the whole-matrix copies every
// lane makes here are left out of the check, and so is the arithmetic on matrices (thread memory).
//
// Products are accumulated in float (double for double) and rounded once to the destination's
// element type; for half and bfloat that is at least as accurate as the hardware, whose internal
// accumulation precision Apple does not document. Element types may be mixed (float accumulator,
// half/bfloat operands), as Metal allows.
#pragma once

#include <cstdio>

#include "metal_types.h"

namespace __mtl {
// Runtime hooks (see above): the calling thread's index in its SIMD group, and an all-gather among
// the lanes of the SIMD group (lane i's `bytes` bytes from `mine` land at all + i * bytes).
__attribute__((weak)) unsigned short simdgroup_lane_id();
__attribute__((weak)) void simdgroup_allgather(const void* mine, void* all, unsigned long bytes);
#ifdef MTL_EMU_RACE_CHECK
// Records an access for the race check (metal_race_check.cpp).
void race_record(const void* address, size_t bytes, bool write);
#endif
#ifdef MTL_EMU_PROFILE
// Counts a multiply-accumulate's FLOPs for the profile counters (metal_profile.cpp), once per SIMD group.
void profile_mma(unsigned long flops);
#endif

// (row, first column) of the two elements lane `lane` holds in an 8x8 simdgroup_matrix.
inline void simdgroup_matrix_lane_position(unsigned lane, int& row, int& col) {
  const unsigned q = lane / 4;
  row = int((q & 4) + (lane / 2) % 4);
  col = int((q & 2) * 2 + (lane % 2) * 2);
}
// Whether a weak hook was defined (through a parameter: a direct test warns once it is defined).
template <class F> inline bool hook_defined(F* f) { return f != nullptr; }
[[noreturn]] inline void simdgroup_matrix_missing_hook() {
  std::fputs("metal emulator: simdgroup_matrix::thread_elements() needs the runtime's lane hooks "
             "(__mtl::simdgroup_lane_id, __mtl::simdgroup_allgather)\n", stderr);
  __builtin_abort();
}
}  // namespace __mtl

namespace metal {

template <class T, int Cols, int Rows> struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "Metal defines simdgroup_matrix for 8x8 only");
  T __elements[Rows][Cols];  // row-major: __elements[row][column]
  bool __fragmented;         // lanes wrote their own elements only (see thread_elements)

  MTL_EMU_UNCHECKED simdgroup_matrix() : __fragmented(false) {}
  // Metal: "creates a diagonal matrix with the given value" (zero elsewhere).
  template <class S, std::enable_if_t<__mtl::is_scalar_v<S>, int> = 0> MTL_EMU_UNCHECKED simdgroup_matrix(S diagonal) : __fragmented(false) {
    for (int r = 0; r < Rows; ++r)
      for (int c = 0; c < Cols; ++c) __elements[r][c] = r == c ? T(diagonal) : T(0);
  }

  // The calling lane's two elements, as a 2-vector reference (they are adjacent in a row).
  MTL_EMU_UNCHECKED vec<T, 2, true>& thread_elements() {
    __fragmented = true;  // the caller may write through the reference
    return *reinterpret_cast<vec<T, 2, true>*>(&__lane_element());
  }
  MTL_EMU_UNCHECKED vec<T, 2> thread_elements() const {
    const T* e = &const_cast<simdgroup_matrix*>(this)->__lane_element();
    return vec<T, 2>(e[0], e[1]);
  }

  // Makes every lane's copy whole again after thread_elements() writes (one all-gather).
  MTL_EMU_UNCHECKED void __make_whole() {
    if (!__fragmented) return;
    if (!__mtl::hook_defined(&__mtl::simdgroup_allgather)) __mtl::simdgroup_matrix_missing_hook();
    T mine[2];
    const T* own = &__lane_element();
    mine[0] = own[0];
    mine[1] = own[1];
    T all[64];
    __mtl::simdgroup_allgather(mine, all, sizeof(mine));
    for (unsigned lane = 0; lane < 32; ++lane) {
      int r, c;
      __mtl::simdgroup_matrix_lane_position(lane, r, c);
      __elements[r][c] = all[2 * lane];
      __elements[r][c + 1] = all[2 * lane + 1];
    }
    __fragmented = false;
  }

  MTL_EMU_UNCHECKED T& __lane_element() {
    if (!__mtl::hook_defined(&__mtl::simdgroup_lane_id)) __mtl::simdgroup_matrix_missing_hook();
    int r, c;
    __mtl::simdgroup_matrix_lane_position(__mtl::simdgroup_lane_id(), r, c);
    return __elements[r][c];
  }
};

namespace simdgroup_detail {
// The matrix itself when whole, else a whole copy (operands are taken by const reference).
template <class T, int C, int R> MTL_EMU_UNCHECKED inline simdgroup_matrix<T, C, R> whole(const simdgroup_matrix<T, C, R>& m) {
  simdgroup_matrix<T, C, R> copy = m;
  copy.__make_whole();
  return copy;
}
}  // namespace simdgroup_detail
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

// Rows defaults to Cols, as in the MSL specification's declaration
// (PyTorch's Quantized.metal writes make_filled_simdgroup_matrix<float, 8>).
template <class T, int Cols, int Rows = Cols>
MTL_EMU_UNCHECKED inline simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(__mtl::type_identity_t<T> value) {
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

#ifdef MTL_EMU_RACE_CHECK
// The calling lane's two elements, as the hardware accesses them.
template <class U>
inline void record_lane_elements(const U* base, ulong elements_per_row, ulong2 origin, bool transpose, bool write) {
  if (!__mtl::hook_defined(&__mtl::simdgroup_lane_id)) return;
  int r, c;
  __mtl::simdgroup_matrix_lane_position(__mtl::simdgroup_lane_id(), r, c);
  for (int k = 0; k < 2; ++k)
    __mtl::race_record(base + element_offset(ulong(r), ulong(c + k), elements_per_row, origin, transpose), sizeof(U),
                       write);
}
#endif
}  // namespace simdgroup_detail

template <class T, int Cols, int Rows, class U>
MTL_EMU_UNCHECKED inline void simdgroup_load(simdgroup_matrix<T, Cols, Rows>& d, const U* src, ulong elements_per_row = Cols,
                           ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false) {
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < Cols; ++c)
      d.__elements[r][c] =
          T(src[simdgroup_detail::element_offset(ulong(r), ulong(c), elements_per_row, matrix_origin, transpose_matrix)]);
  d.__fragmented = false;
#ifdef MTL_EMU_RACE_CHECK
  simdgroup_detail::record_lane_elements(src, elements_per_row, matrix_origin, transpose_matrix, false);
#endif
}

// The inverse of simdgroup_load with the same arguments.
template <class T, int Cols, int Rows, class U>
MTL_EMU_UNCHECKED inline void simdgroup_store(const simdgroup_matrix<T, Cols, Rows>& a_, U* dst, ulong elements_per_row = Cols,
                            ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false) {
  const simdgroup_matrix<T, Cols, Rows>& a = a_.__fragmented ? simdgroup_detail::whole(a_) : a_;
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < Cols; ++c)
      dst[simdgroup_detail::element_offset(ulong(r), ulong(c), elements_per_row, matrix_origin, transpose_matrix)] =
          U(a.__elements[r][c]);
#ifdef MTL_EMU_RACE_CHECK
  simdgroup_detail::record_lane_elements(dst, elements_per_row, matrix_origin, transpose_matrix, true);
#endif
}

// d = a * b + c
template <class TD, class TA, class TB, class TC, int Cols, int Rows, int K>
MTL_EMU_UNCHECKED inline void simdgroup_multiply_accumulate(simdgroup_matrix<TD, Cols, Rows>& d, const simdgroup_matrix<TA, K, Rows>& a_,
                                          const simdgroup_matrix<TB, Cols, K>& b_,
                                          const simdgroup_matrix<TC, Cols, Rows>& c_) {
  if (a_.__fragmented || b_.__fragmented || c_.__fragmented) {
    simdgroup_multiply_accumulate(d, simdgroup_detail::whole(a_), simdgroup_detail::whole(b_), simdgroup_detail::whole(c_));
    return;
  }
  const auto& a = a_;
  const auto& b = b_;
  const auto& c = c_;
#ifdef MTL_EMU_PROFILE
  __mtl::profile_mma(2ul * Rows * Cols * K);
#endif
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
MTL_EMU_UNCHECKED inline void simdgroup_multiply(simdgroup_matrix<TD, Cols, Rows>& d, const simdgroup_matrix<TA, K, Rows>& a_,
                               const simdgroup_matrix<TB, Cols, K>& b_) {
  if (a_.__fragmented || b_.__fragmented) {
    simdgroup_multiply(d, simdgroup_detail::whole(a_), simdgroup_detail::whole(b_));
    return;
  }
  const auto& a = a_;
  const auto& b = b_;
#ifdef MTL_EMU_PROFILE
  __mtl::profile_mma(2ul * Rows * Cols * K);
#endif
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

// `a * b` on matrices of one element type (MSL's operator* for simdgroup_matrix).
template <class T, int Cols, int Rows, int K>
inline simdgroup_matrix<T, Cols, Rows> operator*(const simdgroup_matrix<T, K, Rows>& a,
                                                 const simdgroup_matrix<T, Cols, K>& b) {
  simdgroup_matrix<T, Cols, Rows> d;
  simdgroup_multiply(d, a, b);
  return d;
}

}  // namespace metal
