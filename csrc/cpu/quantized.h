// CPU loop of quantized_linear (cpu/quantized_kernels.cpp): a range of rows
// of a quantized weight expanded to float32, for the tile matmuls of
// ops/quantized_linear.cpp. Formats: my_mps_ops/quantization.py.
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

}  // namespace my_mps_ops::cpu
