// Gated activations: the launch parameters and the constants of the
// activation formulas, shared by shaders/glu.metal and the CPU loops
// (csrc/cpu/glu_kernels.cpp) and launch building (csrc/metal/glu.cpp).
#pragma once

#include "common.h"

MY_MPS_OPS_SHADER_NAMESPACE_BEGIN

// Columns each thread of the glu kernels handles (the grid's width apart).
MY_MPS_OPS_CONSTANT uint32_t kGluColumnsPerThread = 4;

// GELU's approximation, as geglu's `approximate` argument names it.
MY_MPS_OPS_CONSTANT uint32_t kGeluErf = 0;
MY_MPS_OPS_CONSTANT uint32_t kGeluTanh = 1;

// Rows of `cols` elements; each input's rows are its own stride apart (a
// contiguous tensor, or a slice of one along its last dimension such as the
// halves of a fused gate/up projection); outputs are contiguous. Grid:
// (ceil(cols / kGluColumnsPerThread), rows).
struct GluShape {
  uint32_t rows;
  uint32_t cols;
  uint32_t gate_stride;
  uint32_t up_stride;
  uint32_t grad_stride;  // backward: grad_out's row stride
  uint32_t approximate;  // geglu: kGeluErf or kGeluTanh
};

// GELU's constants: sqrt(1/2), 1/sqrt(2 pi), sqrt(2/pi) and the tanh form's cubic coefficient.
MY_MPS_OPS_REAL_CONSTANT kSqrtHalf = MY_MPS_OPS_REAL(0.70710678118654752440);
MY_MPS_OPS_REAL_CONSTANT kInvSqrt2Pi = MY_MPS_OPS_REAL(0.39894228040143267794);
MY_MPS_OPS_REAL_CONSTANT kSqrt2OverPi = MY_MPS_OPS_REAL(0.79788456080286535588);
MY_MPS_OPS_REAL_CONSTANT kTanhCoef = MY_MPS_OPS_REAL(0.044715);

// erf(|x|) ~ 1 - t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-x^2) with
// t = 1 / (1 + p |x|): Abramowitz & Stegun 7.1.26, |error| < 1.5e-7 (Metal has no erf).
MY_MPS_OPS_CONSTANT float kErfP = 0.3275911f;
MY_MPS_OPS_CONSTANT float kErfA1 = 0.254829592f;
MY_MPS_OPS_CONSTANT float kErfA2 = -0.284496736f;
MY_MPS_OPS_CONSTANT float kErfA3 = 1.421413741f;
MY_MPS_OPS_CONSTANT float kErfA4 = -1.453152027f;
MY_MPS_OPS_CONSTANT float kErfA5 = 1.061405429f;

MY_MPS_OPS_SHADER_NAMESPACE_END
