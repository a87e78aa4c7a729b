// linear_cross_entropy's row pass: the launch parameters shared by
// shaders/linear_cross_entropy.metal and its launch building
// (csrc/metal/linear_cross_entropy.cpp).
#pragma once

#include "common.h"

MY_MPS_OPS_SHADER_NAMESPACE_BEGIN

// Logits each thread reads per pass over its row (one threadgroup per row).
MY_MPS_OPS_CONSTANT uint32_t kLinearCrossEntropyReadsPerThread = 4;

// Rows of `classes` contiguous float32 logits, one int64 target per row.
struct LinearCrossEntropyParams {
  int64_t ignore_index;  // first: its 8-byte alignment leaves no padding
  uint32_t classes;
  uint32_t write_gradient;  // 1: overwrite the logits with d loss / d logits
  float label_smoothing;
  float softcap;  // 0: none
  float z_loss;
  uint32_t padding;
};

MY_MPS_OPS_SHADER_NAMESPACE_END
