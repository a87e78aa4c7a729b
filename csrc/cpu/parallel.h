// Loop scaffolding shared by the CPU loop files: the dtype switch and the
// parallel row partitions. Templates defined here stay baseline code; the
// copy-specific lambdas they call keep their own target.
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace my_mps_ops::cpu {

// fn(T{}) with T the C++ type of `dtype`: float, double, c10::Half or c10::BFloat16.
template <typename F>
void visit_float_dtype(c10::ScalarType dtype, const char* what, const F& fn) {
  switch (dtype) {
    case c10::ScalarType::Float: return fn(float{});
    case c10::ScalarType::Double: return fn(double{});
    case c10::ScalarType::Half: return fn(c10::Half{});
    case c10::ScalarType::BFloat16: return fn(c10::BFloat16{});
    default: TORCH_CHECK(false, what, ": no CPU kernel for dtype ", dtype);
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

// Rows per at::parallel_for task so that each task touches ~32K elements.
inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

}  // namespace my_mps_ops::cpu
