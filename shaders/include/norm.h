// Norms over the last dimension (rms_norm, fused_add_rms_norm, layer_norm):
// the launch parameters shared by shaders/rms_norm.metal,
// shaders/layer_norm.metal and their launch building (csrc/metal/norm.cpp).
#pragma once

#include "common.h"

MY_MPS_OPS_SHADER_NAMESPACE_BEGIN

// Elements each thread of a row kernel reads per pass over the row (one
// threadgroup per row), a threadgroup's width apart: thread t reads t,
// t + threads, ... so that a SIMD group's lanes read consecutive elements.
MY_MPS_OPS_CONSTANT uint32_t kNormReadsPerThread = 4;

// Bits of the kernels' `flags`: which optional tensors are bound for real
// (an absent one is bound to a stand-in that is neither read nor written).
MY_MPS_OPS_CONSTANT uint32_t kNormHasWeight = 1u << 0;
MY_MPS_OPS_CONSTANT uint32_t kNormHasBias = 1u << 1;
MY_MPS_OPS_CONSTANT uint32_t kNormWantGradInput = 1u << 2;
MY_MPS_OPS_CONSTANT uint32_t kNormWantGradWeight = 1u << 3;
MY_MPS_OPS_CONSTANT uint32_t kNormWantGradBias = 1u << 4;
// fused_add_rms_norm's backward: grad_residual_out is added to grad_input.
MY_MPS_OPS_CONSTANT uint32_t kNormAddGradResidualOut = 1u << 5;

// The row kernels: one threadgroup per contiguous row of `cols` elements.
struct NormRowParams {
  float eps;
  uint32_t cols;
  uint32_t flags;
};

// The parameter-gradient kernels over contiguous rows of `cols` elements:
// first one thread per (column, chunk of rows_per_chunk rows) writes a
// partial sum, then one thread per column sums the `chunks` partials.
struct NormColumnParams {
  uint32_t cols;
  uint32_t rows;
  uint32_t rows_per_chunk;
  uint32_t chunks;
  uint32_t flags;
};

MY_MPS_OPS_SHADER_NAMESPACE_END
