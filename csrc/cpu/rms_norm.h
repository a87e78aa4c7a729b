// CPU loops of RMSNorm and fused_add_rms_norm (cpu/rms_norm_kernels.cpp):
// their entry points, one stub each, called by ops/rms_norm.cpp.
#pragma once

#include "cpu/dispatch.h"

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace my_mps_ops::cpu {

// Contiguous rows of `cols` elements of `dtype`. The weight (nullptr when
// absent) is in the accumulation dtype: float32, float64 for float64 input.
struct RmsNormForwardArgs {
  const void* input;
  const void* weight;
  // fused_add_rms_norm: residual_out = input + residual, rounded to dtype, is
  // written and normalised in place of input. nullptr for rms_norm.
  const void* residual;
  void* residual_out;
  void* out;
  int64_t rows, cols;
  double eps;
};

// grad_input (nullptr when not wanted) is the normalisation's input gradient
// plus grad_residual_out when that is given (fused_add_rms_norm).
// grad_weight_partials (nullptr when not wanted): `chunks` zeroed rows of
// `cols` sums in the accumulation dtype, one per fixed chunk of rows (the
// caller adds them up: deterministic, no atomics).
struct RmsNormBackwardArgs {
  const void* grad_out;
  const void* input;
  const void* weight;
  const void* grad_residual_out;
  void* grad_input;
  void* grad_weight_partials;
  int64_t rows, cols, chunks;
  double eps;
};

using RmsNormForwardFn = void (*)(c10::ScalarType dtype, const RmsNormForwardArgs& args);
using RmsNormBackwardFn = void (*)(c10::ScalarType dtype, const RmsNormBackwardArgs& args);

MY_MPS_OPS_CPU_STUB(rms_norm_forward_stub, RmsNormForwardFn);
MY_MPS_OPS_CPU_STUB(rms_norm_backward_stub, RmsNormBackwardFn);

}  // namespace my_mps_ops::cpu
