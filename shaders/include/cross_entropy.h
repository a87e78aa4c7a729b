// Cross-entropy: the launch parameters shared by shaders/cross_entropy.metal
// and its launch building (csrc/metal/cross_entropy.cpp).
#pragma once

#include "common.h"

MY_MPS_OPS_SHADER_NAMESPACE_BEGIN

// Logits each thread reads per pass over its row (one threadgroup per row), a
// threadgroup's width apart (coalesced across the lanes of a SIMD group).
MY_MPS_OPS_CONSTANT uint32_t kCrossEntropyReadsPerThread = 4;

// The backward computes softmax as exp(z - lse) with the forward's float32
// lse = m + log(s) while |lse| is below this bound (its rounding then costs
// at most 2^-18 relative); past it (huge or masked logits, where the rounding
// can drop log(s) altogether) it recomputes the row's m and s and uses
// exp((z - m) - log(s)), as F.cross_entropy rounds.
MY_MPS_OPS_REAL_CONSTANT kCrossEntropyExactLseBound = MY_MPS_OPS_REAL(64.0);

// Rows of `classes` contiguous logits, one int64 target per row.
struct CrossEntropyParams {
  int64_t ignore_index;  // first: its 8-byte alignment leaves no padding
  uint32_t classes;
  float label_smoothing;
};

MY_MPS_OPS_SHADER_NAMESPACE_END
