// CPU loops of quantized_linear (cpu/quantized_kernels.cpp): a range of rows
// of a quantized weight expanded to float32, for the tile matmuls of
// ops/quantized_linear.cpp (many rows of x), and the fused products for a few
// rows that expand the codes a chunk at a time and never hold the float
// weight. Formats: my_mps_ops/quantization.py.
#pragma once

#include "cpu/dispatch.h"

#include <cstdint>

namespace my_mps_ops::cpu {

enum class QuantMode : int32_t { Affine = 0, NF4 = 1, FP4 = 2 };

struct DequantizeRowsArgs {
  const void* qweight;  // affine: uint32 words, row-major [rows, cols * bits / 32]; nf4/fp4: uint8 [rows, cols / 2]
  const float* scales;  // [rows, cols / group_size] as float32 (the absmax for nf4/fp4)
  const float* biases;  // [rows, cols / group_size] as float32 (affine only)
  float* out;           // [row_end - row_begin, cols]
  int64_t row_begin, row_end, cols, group_size;
  int32_t bits;
  QuantMode mode;
};

using DequantizeRowsFn = void (*)(const DequantizeRowsArgs& args);

MY_MPS_OPS_CPU_STUB(dequantize_rows_stub, DequantizeRowsFn);

// The fused products with W [out_features, in_features] held quantized, for a
// few rows of x (at most kQuantMatvecMaxRows):
//   quantized_matvec:   out[rows, out_features] = in[rows, in_features] @ W^T (+ bias)
//   quantized_matvec_t: out[rows, in_features]  = in[rows, out_features] @ W
// in, bias and out are float32, or float64 when is_double (the weight is
// expanded in float32, products and sums are float64), all contiguous. Each output
// element is summed by one thread in a fixed order: results do not depend on
// the number of threads.
constexpr int64_t kQuantMatvecMaxRows = 8;

struct QuantMatvecArgs {
  const void* qweight;  // as DequantizeRowsArgs
  const float* scales;
  const float* biases;
  const void* in;
  const void* bias;  // [out_features] or nullptr (quantized_matvec only)
  void* out;
  int64_t rows, out_features, in_features, group_size;
  int32_t bits;
  QuantMode mode;
  bool is_double;
};

using QuantMatvecFn = void (*)(const QuantMatvecArgs& args);

MY_MPS_OPS_CPU_STUB(quantized_matvec_stub, QuantMatvecFn);
MY_MPS_OPS_CPU_STUB(quantized_matvec_t_stub, QuantMatvecFn);

}  // namespace my_mps_ops::cpu
