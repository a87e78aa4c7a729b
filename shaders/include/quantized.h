// quantized_linear: the launch parameters and constants shared by
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

// The fused products for a few rows of x (quantized_matvec: out = x @ W^T,
// quantized_matvec_t: grad_x = grad_out @ W).
// Rows of x at most (each thread keeps a sum per row).
MY_MPS_OPS_CONSTANT uint32_t kQuantMatvecMaxRows = 8;
// quantized_matvec: output features per SIMD group of 32 lanes, and values
// each lane expands per step (a 4-bit word; 8 divides every group).
MY_MPS_OPS_CONSTANT uint32_t kQuantMatvecOutRows = 4;
MY_MPS_OPS_CONSTANT uint32_t kQuantMatvecLaneValues = 8;
MY_MPS_OPS_CONSTANT uint32_t kQuantMatvecSimdWidth = 32;
// quantized_matvec_t: consecutive columns of grad_x per thread (one float4).
MY_MPS_OPS_CONSTANT uint32_t kQuantMatvecTCols = 4;

struct QuantMatvecParams {
  uint32_t rows;          // rows of x / grad_out, at most kQuantMatvecMaxRows
  uint32_t out_features;  // rows of W
  uint32_t in_features;   // columns of W
  uint32_t group_size;
  uint32_t bits;
  uint32_t mode;
  uint32_t has_bias;  // quantized_matvec: add bias[out_features]
};

MY_MPS_OPS_SHADER_NAMESPACE_END
