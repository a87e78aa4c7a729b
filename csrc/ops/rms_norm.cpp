// RMSNorm over the last dimension, y = x * rsqrt(mean(x^2) + eps) * w, and
// fused_add_rms_norm, the pre-norm residual stream of Llama blocks in one
// pass: residual_out = x + residual, out = rms_norm(residual_out). Its
// backward adds grad_residual_out to the normalisation's input gradient in
// the same pass; x and residual both get that sum.
//
// Loops: cpu/rms_norm_kernels.cpp; Metal: metal/norm.cpp and
// shaders/rms_norm.metal.
#include "cpu/rms_norm.h"
#include "metal/norm.h"
#include "ops/autograd_emulation.h"
#include "ops/double_backward.h"
#include "ops/norm.h"

#include <ATen/ops/rms_norm.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <tuple>

namespace my_mps_ops {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr const char* kRmsNormOp = "my_mps_ops.rms_norm";
constexpr const char* kRmsNormBackwardOp = "my_mps_ops.rms_norm_backward";
constexpr const char* kFusedOp = "my_mps_ops.fused_add_rms_norm";
constexpr const char* kFusedBackwardOp = "my_mps_ops.fused_add_rms_norm_backward";

void check_inputs(const char* op, const Tensor& input, const OptTensor& weight, double eps) {
  check_norm_input(op, input, eps);
  check_norm_param(op, weight, "weight", input);
}

void check_backward_inputs(const char* op, const Tensor& grad_out, const Tensor& input, const OptTensor& weight,
                           double eps) {
  check_inputs(op, input, weight, eps);
  check_norm_grad_out(op, grad_out, input);
}

void check_fused_inputs(const Tensor& x, const Tensor& residual, const OptTensor& weight, double eps) {
  check_inputs(kFusedOp, x, weight, eps);
  TORCH_CHECK(residual.sym_sizes() == x.sym_sizes(), kFusedOp, ": residual must have the shape of x ", x.sym_sizes(),
              ", got ", residual.sym_sizes());
  // x and residual may differ in dtype: promoted as x + residual is.
  check_float_dtype(residual, kFusedOp, "residual");
  check_same_device(residual, x, kFusedOp, "residual", "x");
}

void check_fused_backward_inputs(const Tensor& grad_out, const OptTensor& grad_residual_out,
                                 const Tensor& residual_out, const OptTensor& weight, double eps) {
  check_backward_inputs(kFusedBackwardOp, grad_out, residual_out, weight, eps);
  if (!grad_residual_out.has_value()) return;
  TORCH_CHECK(grad_residual_out->sym_sizes() == residual_out.sym_sizes(), kFusedBackwardOp,
              ": grad_residual_out must have the shape of residual_out ", residual_out.sym_sizes(), ", got ",
              grad_residual_out->sym_sizes());
  check_same_dtype(*grad_residual_out, residual_out, kFusedBackwardOp, "grad_residual_out", "residual_out");
  check_same_device(*grad_residual_out, residual_out, kFusedBackwardOp, "grad_residual_out", "residual_out");
}

// (out, residual_out): with a residual (fused_add_rms_norm; contiguous, else
// undefined), residual_out = input + residual and out = rms_norm(residual_out);
// without, out = rms_norm(input) and residual_out is undefined.
std::tuple<Tensor, Tensor> rms_norm_forward(const char* op, const Tensor& input, const Tensor& residual,
                                            const OptTensor& weight, double eps) {
  const Tensor x = input.contiguous();
  Tensor out = empty_contiguous_like(x);
  Tensor residual_out = residual.defined() ? empty_contiguous_like(x) : Tensor();
  const NormRows shape = norm_rows(x);
  if (shape.rows == 0) return {out, residual_out};
  if (use_metal_path(x)) {
    const Tensor w = metal_param(weight, x);
    metal::rms_norm_forward(op, {x, w, out, residual, residual_out}, shape, eps);
  } else {
    const Tensor w = param_for_cpu(weight, x);
    cpu::rms_norm_forward_stub(x.scalar_type(),
                               cpu::RmsNormForwardArgs{x.const_data_ptr(), data_or_null(w), data_or_null(residual),
                                                       mutable_data_or_null(residual_out), out.mutable_data_ptr(),
                                                       shape.rows, shape.cols, eps});
  }
  return {out, residual_out};
}

// (grad_input, grad_weight) as output_mask asks (else unwanted_grad). A
// grad_residual_out (fused_add_rms_norm; contiguous, else undefined) is added
// to grad_input.
std::tuple<Tensor, Tensor> rms_norm_backward(const char* op, const Tensor& grad_out, const Tensor& input,
                                             const OptTensor& weight, double eps, std::array<bool, 2> output_mask,
                                             const Tensor& grad_residual_out) {
  const Tensor x = input.contiguous(), dy = grad_out.contiguous();
  const bool want_input = output_mask[0], want_weight = output_mask[1] && weight.has_value();
  Tensor grad_input = want_input ? empty_contiguous_like(x) : unwanted_grad(x);
  const NormRows shape = norm_rows(x);
  const bool runs_kernels = shape.rows > 0 && (want_input || want_weight);
  if (use_metal_path(x)) {
    Tensor grad_weight = want_weight ? empty_contiguous_like(*weight) : unwanted_grad(x);
    if (want_weight && shape.rows == 0) grad_weight.zero_();
    if (runs_kernels) {
      const Tensor w = metal_param(weight, x);
      metal::rms_norm_backward(op,
                               {dy, x, w, grad_residual_out, want_input ? grad_input : Tensor(),
                                want_weight ? grad_weight : Tensor()},
                               shape, eps);
    }
    return {grad_input, grad_weight};
  }
  const int64_t chunks = cpu_grad_chunks(shape.rows);
  Tensor partials = want_weight ? zeroed_grad_partials(chunks, shape.cols, x) : Tensor();
  if (runs_kernels) {
    const Tensor w = param_for_cpu(weight, x);
    cpu::rms_norm_backward_stub(
        x.scalar_type(),
        cpu::RmsNormBackwardArgs{dy.const_data_ptr(), x.const_data_ptr(), data_or_null(w),
                                 data_or_null(grad_residual_out), want_input ? grad_input.mutable_data_ptr() : nullptr,
                                 mutable_data_or_null(partials), shape.rows, shape.cols, chunks, eps});
  }
  return {grad_input, want_weight ? grad_from_partials(partials, *weight) : unwanted_grad(x)};
}

// ------------------------------------------------------- CPU and MPS kernels

Tensor rms_norm_impl(const Tensor& input, const OptTensor& weight, double eps) {
  check_inputs(kRmsNormOp, input, weight, eps);
  return std::get<0>(rms_norm_forward(kRmsNormOp, input, Tensor(), weight, eps));
}

std::tuple<Tensor, Tensor> rms_norm_backward_impl(const Tensor& grad_out, const Tensor& input,
                                                  const OptTensor& weight, double eps,
                                                  std::array<bool, 2> output_mask) {
  check_backward_inputs(kRmsNormBackwardOp, grad_out, input, weight, eps);
  return rms_norm_backward(kRmsNormBackwardOp, grad_out, input, weight, eps, output_mask, Tensor());
}

std::tuple<Tensor, Tensor> fused_add_rms_norm_impl(const Tensor& x_in, const Tensor& residual_in,
                                                   const OptTensor& weight, double eps) {
  check_fused_inputs(x_in, residual_in, weight, eps);
  const auto [x, residual] = promoted_pair(x_in, residual_in);
  return rms_norm_forward(kFusedOp, x, residual.contiguous(), weight, eps);
}

std::tuple<Tensor, Tensor> fused_add_rms_norm_backward_impl(const Tensor& grad_out,
                                                            const OptTensor& grad_residual_out,
                                                            const Tensor& residual_out, const OptTensor& weight,
                                                            double eps, std::array<bool, 2> output_mask) {
  check_fused_backward_inputs(grad_out, grad_residual_out, residual_out, weight, eps);
  return rms_norm_backward(kFusedBackwardOp, grad_out, residual_out, weight, eps, output_mask,
                           contiguous_or_absent(grad_residual_out));
}

// ------------------------------------------------------------ Meta kernels
// Shapes only; symbolic-size safe.

std::tuple<Tensor, Tensor> backward_meta(const Tensor& input, const OptTensor& weight,
                                         std::array<bool, 2> output_mask) {
  return {output_mask[0] ? empty_contiguous_like(input) : unwanted_grad(input),
          param_grad_meta(output_mask[1], weight, input)};
}

Tensor rms_norm_meta(const Tensor& input, const OptTensor& weight, double eps) {
  check_inputs(kRmsNormOp, input, weight, eps);
  return empty_contiguous_like(input);
}

std::tuple<Tensor, Tensor> rms_norm_backward_meta(const Tensor& grad_out, const Tensor& input,
                                                  const OptTensor& weight, double eps,
                                                  std::array<bool, 2> output_mask) {
  check_backward_inputs(kRmsNormBackwardOp, grad_out, input, weight, eps);
  return backward_meta(input, weight, output_mask);
}

std::tuple<Tensor, Tensor> fused_add_rms_norm_meta(const Tensor& x, const Tensor& residual, const OptTensor& weight,
                                                   double eps) {
  check_fused_inputs(x, residual, weight, eps);
  const auto options = x.options().dtype(c10::promoteTypes(x.scalar_type(), residual.scalar_type()));
  return {at::empty_like(x, options, at::MemoryFormat::Contiguous),
          at::empty_like(x, options, at::MemoryFormat::Contiguous)};
}

std::tuple<Tensor, Tensor> fused_add_rms_norm_backward_meta(const Tensor& grad_out,
                                                            const OptTensor& grad_residual_out,
                                                            const Tensor& residual_out, const OptTensor& weight,
                                                            double eps, std::array<bool, 2> output_mask) {
  check_fused_backward_inputs(grad_out, grad_residual_out, residual_out, weight, eps);
  return backward_meta(residual_out, weight, output_mask);
}

// ---------------------------------------------------------------- autograd

class RMSNormFunction : public torch::autograd::Function<RMSNormFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                        double eps) {
    static auto op = typed_op<Tensor(const Tensor&, const OptTensor&, double)>("my_mps_ops::rms_norm");
    Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = op.call(input, weight, eps);
    }
    save_metal_emulation(ctx);
    ctx->save_for_backward({input, saved_param(weight)});
    ctx->saved_data["eps"] = eps;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const BackwardEmulationScope emulation(ctx);
    static auto op = typed_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, double,
                                                         std::array<bool, 2>)>("my_mps_ops::rms_norm_backward");
    const auto saved = ctx->get_saved_variables();
    const OptTensor weight = param_from_saved(saved[1]);
    const std::array<bool, 2> mask{ctx->needs_input_grad(0), weight.has_value() && ctx->needs_input_grad(1)};
    if (!grads[0].defined() || (!mask[0] && !mask[1])) return {Tensor(), Tensor(), Tensor()};
    auto [grad_input, grad_weight] = op.call(grads[0], saved[0], weight, ctx->saved_data["eps"].toDouble(), mask);
    return {mask[0] ? grad_input : Tensor(), mask[1] ? grad_weight : Tensor(), Tensor()};
  }
};

// Both outputs carry gradients: grad_residual_out joins grad_out's
// contribution in one backward pass, and x and residual share the result.
class FusedAddRMSNormFunction : public torch::autograd::Function<FusedAddRMSNormFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& x,
                                                const Tensor& residual, const OptTensor& weight, double eps) {
    static auto op = typed_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, double)>(
        "my_mps_ops::fused_add_rms_norm");
    Tensor out, residual_out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, residual_out) = op.call(x, residual, weight, eps);
    }
    save_metal_emulation(ctx);
    ctx->save_for_backward({residual_out, saved_param(weight)});
    ctx->saved_data["eps"] = eps;
    return {out, residual_out};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const BackwardEmulationScope emulation(ctx);
    static auto op = typed_op<std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, const Tensor&,
                                                         const OptTensor&, double, std::array<bool, 2>)>(
        "my_mps_ops::fused_add_rms_norm_backward");
    const auto saved = ctx->get_saved_variables();
    const Tensor& residual_out = saved[0];
    const OptTensor weight = param_from_saved(saved[1]);
    const bool want_input = ctx->needs_input_grad(0) || ctx->needs_input_grad(1);
    const std::array<bool, 2> mask{want_input, weight.has_value() && ctx->needs_input_grad(2)};
    const Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(residual_out);
    const OptTensor grad_residual_out = grads[1].defined() ? OptTensor(grads[1]) : std::nullopt;
    auto [grad_input, grad_weight] =
        op.call(grad_out, grad_residual_out, residual_out, weight, ctx->saved_data["eps"].toDouble(), mask);
    return {ctx->needs_input_grad(0) ? grad_input : Tensor(), ctx->needs_input_grad(1) ? grad_input : Tensor(),
            mask[1] ? grad_weight : Tensor(), Tensor()};
  }
};

// Under torch.func's grad / vjp / jvp (ops/common.h): F.rms_norm itself.
Tensor rms_norm_composite(const Tensor& input, const OptTensor& weight, double eps) {
  check_inputs(kRmsNormOp, input, weight, eps);
  return at::rms_norm(input, {input.size(-1)}, weight, eps);
}

Tensor rms_norm_autograd(const Tensor& input, const OptTensor& weight, double eps) {
  if (under_functorch_differentiation(input, weight)) return rms_norm_composite(input, weight, eps);
  return RMSNormFunction::apply(input, weight, eps);
}

// Mixed dtypes are promoted here, differentiably, so each gradient comes back
// in its input's dtype.
std::tuple<Tensor, Tensor> fused_add_rms_norm_autograd(const Tensor& x_in, const Tensor& residual_in,
                                                       const OptTensor& weight, double eps) {
  if (under_functorch_differentiation(x_in, residual_in, weight)) {
    check_fused_inputs(x_in, residual_in, weight, eps);
    const Tensor residual_out = x_in + residual_in;
    return {at::rms_norm(residual_out, {residual_out.size(-1)}, weight, eps), residual_out};
  }
  const auto [x, residual] = promoted_pair(x_in, residual_in);
  auto outs = FusedAddRMSNormFunction::apply(x, residual, weight, eps);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(my_mps_ops, CPU, m) {
  m.impl("rms_norm", &rms_norm_impl);
  m.impl("rms_norm_backward", &rms_norm_backward_impl);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_impl);
  m.impl("fused_add_rms_norm_backward", &fused_add_rms_norm_backward_impl);
}

TORCH_LIBRARY_IMPL(my_mps_ops, MPS, m) {
  m.impl("rms_norm", &rms_norm_impl);
  m.impl("rms_norm_backward", &rms_norm_backward_impl);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_impl);
  m.impl("fused_add_rms_norm_backward", &fused_add_rms_norm_backward_impl);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Meta, m) {
  m.impl("rms_norm", &rms_norm_meta);
  m.impl("rms_norm_backward", &rms_norm_backward_meta);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_meta);
  m.impl("fused_add_rms_norm_backward", &fused_add_rms_norm_backward_meta);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Autograd, m) {
  m.impl("rms_norm", &rms_norm_autograd);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_autograd);
  // The backward ops have no derivative of their own: double backward raises clearly.
  m.impl("rms_norm_backward", double_backward_unsupported_kernel());
  m.impl("fused_add_rms_norm_backward", double_backward_unsupported_kernel());
}

}  // namespace my_mps_ops
