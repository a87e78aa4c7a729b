// Launches of shaders/rms_norm.metal and shaders/layer_norm.metal (built in
// metal/norm.cpp).
#pragma once

#include "ops/norm.h"
#include "shaders/include/norm.h"

namespace my_mps_ops::metal {

// Every tensor is contiguous, `shape` rows (at least one) of cols elements,
// outputs allocated. Parameters are in the input's dtype (param_for_metal).
// An undefined tensor is absent (weight, bias, residual, grad_residual_out)
// or not wanted (a gradient); parameter gradients have their parameter's dtype.
struct RmsNormForwardTensors {
  at::Tensor input, weight, out;
  at::Tensor residual, residual_out;  // fused_add_rms_norm: residual_out = input + residual is normalised
};
struct RmsNormBackwardTensors {
  at::Tensor grad_out, input, weight;
  at::Tensor grad_residual_out;  // fused_add_rms_norm: added to grad_input
  at::Tensor grad_input, grad_weight;
};
struct LayerNormForwardTensors {
  at::Tensor input, weight, bias, out;
};
struct LayerNormBackwardTensors {
  at::Tensor grad_out, input, weight;
  at::Tensor grad_input, grad_weight, grad_bias;
};

void rms_norm_forward(const char* op, const RmsNormForwardTensors& t, const NormRows& shape, double eps);
void rms_norm_backward(const char* op, const RmsNormBackwardTensors& t, const NormRows& shape, double eps);
void layer_norm_forward(const char* op, const LayerNormForwardTensors& t, const NormRows& shape, double eps);
void layer_norm_backward(const char* op, const LayerNormBackwardTensors& t, const NormRows& shape, double eps);

}  // namespace my_mps_ops::metal
