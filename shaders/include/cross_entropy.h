// Cross-entropy: the launch parameters shared by shaders/cross_entropy.metal
// and its launch building (csrc/metal/cross_entropy.cpp).
#pragma once

#include "common.h"

MY_MPS_OPS_SHADER_NAMESPACE_BEGIN

// Logits each thread reads per pass over its row (one threadgroup per row).
MY_MPS_OPS_CONSTANT uint32_t kCrossEntropyReadsPerThread = 4;

// Rows of `classes` contiguous logits, one int64 target per row.
struct CrossEntropyParams {
  int64_t ignore_index;  // first: its 8-byte alignment leaves no padding
  uint32_t classes;
  float label_smoothing;
};

MY_MPS_OPS_SHADER_NAMESPACE_END
