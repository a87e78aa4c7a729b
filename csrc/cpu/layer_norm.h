// CPU loops of LayerNorm (cpu/layer_norm_kernels.cpp): their entry points,
// one stub each, called by ops/layer_norm.cpp.
#pragma once

#include "cpu/dispatch.h"

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace my_mps_ops::cpu {

// Contiguous rows of `cols` elements of `dtype`. Weight and bias (nullptr
// when absent) are in the accumulation dtype: float32, float64 for float64 input.
struct LayerNormForwardArgs {
  const void* input;
  const void* weight;
  const void* bias;
  void* out;
  int64_t rows, cols;
  double eps;
};

// grad_input is nullptr when not wanted. The partials (nullptr when not
// wanted) are `chunks` zeroed rows of `cols` sums in the accumulation dtype,
// one per fixed chunk of rows (the caller adds them up: deterministic, no
// atomics).
struct LayerNormBackwardArgs {
  const void* grad_out;
  const void* input;
  const void* weight;
  void* grad_input;
  void* grad_weight_partials;
  void* grad_bias_partials;
  int64_t rows, cols, chunks;
  double eps;
};

using LayerNormForwardFn = void (*)(c10::ScalarType dtype, const LayerNormForwardArgs& args);
using LayerNormBackwardFn = void (*)(c10::ScalarType dtype, const LayerNormBackwardArgs& args);

MY_MPS_OPS_CPU_STUB(layer_norm_forward_stub, LayerNormForwardFn);
MY_MPS_OPS_CPU_STUB(layer_norm_backward_stub, LayerNormBackwardFn);

}  // namespace my_mps_ops::cpu
