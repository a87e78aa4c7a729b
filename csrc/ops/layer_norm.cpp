// LayerNorm over the last dimension, as torch.nn.functional.layer_norm:
// y = (x - mean) * rsqrt(var + eps) * w + b.
//
// Loops: cpu/layer_norm_kernels.cpp; Metal: metal/norm.cpp and
// shaders/layer_norm.metal.
#include "cpu/layer_norm.h"
#include "metal/norm.h"
#include "ops/autograd_emulation.h"
#include "ops/double_backward.h"
#include "ops/norm.h"

#include <ATen/ops/layer_norm.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <tuple>

namespace my_mps_ops {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr const char* kLayerNormOp = "my_mps_ops.layer_norm";
constexpr const char* kLayerNormBackwardOp = "my_mps_ops.layer_norm_backward";

void check_inputs(const char* op, const Tensor& input, const OptTensor& weight, const OptTensor& bias, double eps) {
  check_norm_input(op, input, eps);
  check_norm_param(op, weight, "weight", input);
  if (weight.has_value() && bias.has_value())  // one grad kernel writes both in one dtype
    check_same_dtype(*bias, *weight, op, "bias", "weight");
  check_norm_param(op, bias, "bias", input);
}

void check_backward_inputs(const Tensor& grad_out, const Tensor& input, const OptTensor& weight,
                           const OptTensor& bias, double eps) {
  check_inputs(kLayerNormBackwardOp, input, weight, bias, eps);
  check_norm_grad_out(kLayerNormBackwardOp, grad_out, input);
}

Tensor layer_norm_forward(const Tensor& input, const OptTensor& weight, const OptTensor& bias, double eps) {
  const Tensor x = input.contiguous();
  Tensor out = empty_contiguous_like(x);
  const NormRows shape = norm_rows(x);
  if (shape.rows == 0) return out;
  if (use_metal_path(x)) {
    metal::layer_norm_forward(kLayerNormOp, {x, metal_param(weight, x), metal_param(bias, x), out}, shape, eps);
  } else {
    const Tensor w = param_for_cpu(weight, x), b = param_for_cpu(bias, x);
    cpu::layer_norm_forward_stub(x.scalar_type(),
                                 cpu::LayerNormForwardArgs{x.const_data_ptr(), data_or_null(w), data_or_null(b),
                                                           out.mutable_data_ptr(), shape.rows, shape.cols, eps});
  }
  return out;
}

// (grad_input, grad_weight, grad_bias) as output_mask asks (else unwanted_grad).
std::tuple<Tensor, Tensor, Tensor> layer_norm_backward(const Tensor& grad_out, const Tensor& input,
                                                       const OptTensor& weight, const OptTensor& bias, double eps,
                                                       std::array<bool, 3> output_mask) {
  const Tensor x = input.contiguous(), dy = grad_out.contiguous();
  const bool want_input = output_mask[0], want_weight = output_mask[1] && weight.has_value(),
             want_bias = output_mask[2] && bias.has_value();
  Tensor grad_input = want_input ? empty_contiguous_like(x) : unwanted_grad(x);
  const NormRows shape = norm_rows(x);
  const bool runs_kernels = shape.rows > 0 && (want_input || want_weight || want_bias);
  if (use_metal_path(x)) {
    Tensor grad_weight = want_weight ? empty_contiguous_like(*weight) : unwanted_grad(x);
    Tensor grad_bias = want_bias ? empty_contiguous_like(*bias) : unwanted_grad(x);
    if (shape.rows == 0) {
      if (want_weight) grad_weight.zero_();
      if (want_bias) grad_bias.zero_();
    }
    if (runs_kernels) {
      metal::layer_norm_backward(kLayerNormBackwardOp,
                                 {dy, x, metal_param(weight, x), want_input ? grad_input : Tensor(),
                                  want_weight ? grad_weight : Tensor(), want_bias ? grad_bias : Tensor()},
                                 shape, eps);
    }
    return {grad_input, grad_weight, grad_bias};
  }
  const int64_t chunks = cpu_grad_chunks(shape.rows);
  Tensor weight_partials = want_weight ? zeroed_grad_partials(chunks, shape.cols, x) : Tensor();
  Tensor bias_partials = want_bias ? zeroed_grad_partials(chunks, shape.cols, x) : Tensor();
  if (runs_kernels) {
    const Tensor w = param_for_cpu(weight, x);
    cpu::layer_norm_backward_stub(
        x.scalar_type(),
        cpu::LayerNormBackwardArgs{dy.const_data_ptr(), x.const_data_ptr(), data_or_null(w),
                                   want_input ? grad_input.mutable_data_ptr() : nullptr,
                                   mutable_data_or_null(weight_partials), mutable_data_or_null(bias_partials),
                                   shape.rows, shape.cols, chunks, eps});
  }
  return {grad_input, want_weight ? grad_from_partials(weight_partials, *weight) : unwanted_grad(x),
          want_bias ? grad_from_partials(bias_partials, *bias) : unwanted_grad(x)};
}

// ------------------------------------------------------- CPU and MPS kernels

Tensor layer_norm_impl(const Tensor& input, const OptTensor& weight, const OptTensor& bias, double eps) {
  check_inputs(kLayerNormOp, input, weight, bias, eps);
  return layer_norm_forward(input, weight, bias, eps);
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_impl(const Tensor& grad_out, const Tensor& input,
                                                            const OptTensor& weight, const OptTensor& bias,
                                                            double eps, std::array<bool, 3> output_mask) {
  check_backward_inputs(grad_out, input, weight, bias, eps);
  return layer_norm_backward(grad_out, input, weight, bias, eps, output_mask);
}

// ------------------------------------------------------------ Meta kernels
// Shapes only; symbolic-size safe.

Tensor layer_norm_meta(const Tensor& input, const OptTensor& weight, const OptTensor& bias, double eps) {
  check_inputs(kLayerNormOp, input, weight, bias, eps);
  return empty_contiguous_like(input);
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_meta(const Tensor& grad_out, const Tensor& input,
                                                            const OptTensor& weight, const OptTensor& bias,
                                                            double eps, std::array<bool, 3> output_mask) {
  check_backward_inputs(grad_out, input, weight, bias, eps);
  return {output_mask[0] ? empty_contiguous_like(input) : unwanted_grad(input),
          param_grad_meta(output_mask[1], weight, input), param_grad_meta(output_mask[2], bias, input)};
}

// ---------------------------------------------------------------- autograd

class LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                        const OptTensor& bias, double eps) {
    static auto op =
        typed_op<Tensor(const Tensor&, const OptTensor&, const OptTensor&, double)>("my_mps_ops::layer_norm");
    Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = op.call(input, weight, bias, eps);
    }
    save_metal_emulation(ctx);
    ctx->save_for_backward({input, saved_param(weight), saved_param(bias)});
    ctx->saved_data["eps"] = eps;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const BackwardEmulationScope emulation(ctx);
    static auto op = typed_op<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                                 const OptTensor&, double, std::array<bool, 3>)>(
        "my_mps_ops::layer_norm_backward");
    const auto saved = ctx->get_saved_variables();
    const OptTensor weight = param_from_saved(saved[1]);
    const OptTensor bias = param_from_saved(saved[2]);
    // needs_input_grad counts the tensors the forward was given: an absent
    // weight takes no slot, so a bias without a weight is the second.
    const size_t bias_slot = weight.has_value() ? 2 : 1;
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), weight.has_value() && ctx->needs_input_grad(1),
                                   bias.has_value() && ctx->needs_input_grad(bias_slot)};
    if (!grads[0].defined() || (!mask[0] && !mask[1] && !mask[2])) return {Tensor(), Tensor(), Tensor(), Tensor()};
    auto [grad_input, grad_weight, grad_bias] =
        op.call(grads[0], saved[0], weight, bias, ctx->saved_data["eps"].toDouble(), mask);
    return {mask[0] ? grad_input : Tensor(), mask[1] ? grad_weight : Tensor(), mask[2] ? grad_bias : Tensor(),
            Tensor()};
  }
};

Tensor layer_norm_autograd(const Tensor& input, const OptTensor& weight, const OptTensor& bias, double eps) {
  if (under_functorch_differentiation(input, weight, bias)) {  // F.layer_norm itself (ops/common.h)
    check_inputs(kLayerNormOp, input, weight, bias, eps);
    return at::layer_norm(input, {input.size(-1)}, weight, bias, eps);
  }
  return LayerNormFunction::apply(input, weight, bias, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(my_mps_ops, CPU, m) {
  m.impl("layer_norm", &layer_norm_impl);
  m.impl("layer_norm_backward", &layer_norm_backward_impl);
}

TORCH_LIBRARY_IMPL(my_mps_ops, MPS, m) {
  m.impl("layer_norm", &layer_norm_impl);
  m.impl("layer_norm_backward", &layer_norm_backward_impl);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Meta, m) {
  m.impl("layer_norm", &layer_norm_meta);
  m.impl("layer_norm_backward", &layer_norm_backward_meta);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Autograd, m) {
  m.impl("layer_norm", &layer_norm_autograd);
  // The backward has no derivative of its own: double backward raises clearly.
  m.impl("layer_norm_backward", double_backward_unsupported_kernel());
}

}  // namespace my_mps_ops
