// Row helpers shared by the norm loop files (cpu/rms_norm_kernels.cpp and
// cpu/layer_norm_kernels.cpp), compiled into each of their copies: a row sum
// on the copy's vectors, where a row's float32 result goes, and the parallel
// split of the rows.
#pragma once

#ifndef MY_MPS_OPS_CPU_CAPABILITY
#error "cpu/norm_rows.h is included by the norm loop files, inside a copy"
#endif

#include "cpu/dispatch.h"
#include "cpu/parallel.h"

#include <cstdint>
#include <type_traits>
#include <vector>

MY_MPS_OPS_CPU_KERNELS_BEGIN
namespace norm_rows {

// What row_sum adds up per element. Each takes a Vec or one float (the same
// arithmetic on each lane).
struct Value {
  template <typename V>
  __attribute__((always_inline)) V operator()(V x) const { return x; }
};
struct Square {
  template <typename V>
  __attribute__((always_inline)) V operator()(V x) const { return x * x; }
};
struct Deviation {
  float shift;
  template <typename V>
  __attribute__((always_inline)) V operator()(V x) const { return x - shift; }
};
struct SquaredDeviation {
  float mean;
  template <typename V>
  __attribute__((always_inline)) V operator()(V x) const {
    const V d = x - mean;
    return d * d;
  }
};

// The sum of term(x[i]) over a float32 row: two vector accumulators, each
// over every other vector, their lanes added up, then the tail.
template <typename Term>
__attribute__((always_inline)) inline float row_sum(const float* x, int64_t n, Term term) {
  constexpr int64_t L = vec::kLanes<Vec>;
  Vec s0{}, s1{};
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) s0 += term(vec::loadv<Vec>(x + i)), s1 += term(vec::loadv<Vec>(x + i + L));
  float s = vec::reduce_sumv(s0 + s1);
  for (; i < n; ++i) s += term(x[i]);
  return s;
}

// Where a row's float32 result is written: the output row itself for float32,
// else `scratch` (n floats), narrowed into the output by store_row.
template <typename T>
__attribute__((always_inline)) inline float* result_row(T* out, float* scratch) {
  if constexpr (std::is_same_v<T, float>) return out;
  else return scratch;
}
template <typename T>
__attribute__((always_inline)) inline void store_row(const float* result, T* out, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) vec::narrow(result, out, n);
}

// fn(begin, end, scratch) over the rows [0, rows) in parallel tasks of about
// 32K elements (cpu::row_grain); scratch holds scratch_floats floats of the task's own.
template <typename F>
void parallel_rows(int64_t rows, int64_t cols, int64_t scratch_floats, const F& fn) {
  at::parallel_for(0, rows, cpu::row_grain(cols), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(scratch_floats);
    fn(begin, end, scratch.data());
  });
}

}  // namespace norm_rows
MY_MPS_OPS_CPU_KERNELS_END
