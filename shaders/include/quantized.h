// quantized_linear: the launch parameters and code tables shared by
// shaders/quantized.metal and its launch building (csrc/metal/quantized.cpp).
#pragma once

#include "common.h"

MY_MPS_OPS_SHADER_NAMESPACE_BEGIN

// Formats (my_mps_ops/quantization.py).
MY_MPS_OPS_CONSTANT uint32_t kQuantAffine = 0;
MY_MPS_OPS_CONSTANT uint32_t kQuantNF4 = 1;
MY_MPS_OPS_CONSTANT uint32_t kQuantFP4 = 2;

// Rows [row_begin, row_begin + rows) of a [*, cols] quantized weight expanded
// to float32 [rows, cols].
struct DequantizeRowsParams {
  uint32_t row_begin;
  uint32_t rows;
  uint32_t cols;
  uint32_t group_size;
  uint32_t bits;
  uint32_t mode;
};

MY_MPS_OPS_SHADER_NAMESPACE_END
