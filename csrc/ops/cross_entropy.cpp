// Cross-entropy of logits [N, V] against integer targets [N], matching
// torch.nn.functional.cross_entropy (ignore_index, label_smoothing,
// reduction "mean" | "sum" | "none").
//
// The forward reads each row once and keeps only the per-row log-sum-exp
// (lse [N]) for the backward, which writes grad_logits in the logits' dtype
// directly: no [N, V] float32 intermediate (F.cross_entropy keeps
// log_softmax's [N, V]). The reduction over rows, and the backward's per-row
// factor, are ATen ops (no host sync). Loops: cpu/cross_entropy_kernels.cpp;
// Metal: metal/cross_entropy.cpp and shaders/cross_entropy.metal.
#include "cpu/cross_entropy.h"
#include "metal/cross_entropy.h"
#include "ops/autograd_emulation.h"
#include "ops/common.h"
#include "ops/double_backward.h"
#include "ops/loss.h"

#include <ATen/ops/empty.h>
#include <ATen/core/Reduction.h>
#include <ATen/ops/cross_entropy_loss.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/logsumexp.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <string>
#include <tuple>

namespace my_mps_ops {
namespace {

using at::Tensor;
constexpr const char* kCrossEntropyOp = "my_mps_ops.cross_entropy";
constexpr const char* kCrossEntropyBackwardOp = "my_mps_ops.cross_entropy_backward";

void check_inputs(const char* op, const Tensor& logits, const Tensor& target, double label_smoothing) {
  check_float_dtype(logits, op, "logits");
  TORCH_CHECK(logits.dim() == 2, op, ": logits must have shape [N, V], got ", logits.sym_sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64 class indices, got ",
              target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.sym_size(0) == logits.sym_size(0), op, ": target must have shape [N] = [",
              logits.sym_size(0), "], got ", target.sym_sizes());
  check_same_device(target, logits, op, "target", "logits");
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
}

// Per-row statistics (loss, lse, scale) of the native CPU kernels: float32,
// float64 for float64 logits (gradcheck). The Metal kernels keep float32.
at::ScalarType stats_dtype(const Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// (per-row losses, lse) of contiguous logits and target, float32 on the Metal
// path, stats_dtype on the native CPU one.
std::tuple<Tensor, Tensor> row_losses_and_lse(const Tensor& logits, const Tensor& target, int64_t ignore_index,
                                              double smoothing) {
  const int64_t rows = logits.size(0), v = logits.size(1);
  // Both paths: rows with no class have no loss (F.cross_entropy raises too).
  TORCH_CHECK(v > 0 || rows == 0, kCrossEntropyOp, ": logits must have at least one class");
  if (use_metal_path(logits)) {
    Tensor losses = at::empty({rows}, logits.options().dtype(at::kFloat));
    Tensor lse = at::empty({rows}, logits.options().dtype(at::kFloat));
    if (rows > 0) metal::cross_entropy_forward(kCrossEntropyOp, {logits, target, losses, lse}, ignore_index, smoothing);
    return {losses, lse};
  }
  Tensor losses = at::empty({rows}, logits.options().dtype(stats_dtype(logits)));
  Tensor lse = at::empty({rows}, logits.options().dtype(stats_dtype(logits)));
  if (rows == 0) return {losses, lse};
  const int64_t bad = cpu::cross_entropy_forward_stub(
      logits.scalar_type(),
      cpu::CrossEntropyForwardArgs{logits.const_data_ptr(), target.const_data_ptr<int64_t>(), losses.mutable_data_ptr(),
                                   lse.mutable_data_ptr(), rows, v, ignore_index, smoothing});
  TORCH_CHECK(bad < 0, kCrossEntropyOp, ": target[", bad, "] = ", bad >= 0 ? target.const_data_ptr<int64_t>()[bad] : 0,
              " is out of range for ", v, " classes (and is not ignore_index ", ignore_index, ")");
  return {losses, lse};
}

// ------------------------------------------------------- CPU and MPS kernels

std::tuple<Tensor, Tensor> cross_entropy_impl(const Tensor& logits_in, const Tensor& target_in, int64_t ignore_index,
                                              double smoothing, c10::string_view reduction_name) {
  const Reduction reduction = parse_reduction(kCrossEntropyOp, reduction_name);
  check_inputs(kCrossEntropyOp, logits_in, target_in, smoothing);
  const Tensor logits = logits_in.contiguous(), target = target_in.contiguous();
  auto [losses, lse] = row_losses_and_lse(logits, target, ignore_index, smoothing);
  return {reduce_rows(losses, target, ignore_index, reduction, logits.scalar_type()), lse};
}

Tensor cross_entropy_backward_impl(const Tensor& grad_loss, const Tensor& logits_in, const Tensor& target_in,
                                   const Tensor& lse, int64_t ignore_index, double smoothing,
                                   c10::string_view reduction_name) {
  const Reduction reduction = parse_reduction(kCrossEntropyBackwardOp, reduction_name);
  check_inputs(kCrossEntropyBackwardOp, logits_in, target_in, smoothing);
  const Tensor logits = logits_in.contiguous(), target = target_in.contiguous();
  Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  const int64_t rows = logits.size(0), v = logits.size(1);
  if (rows == 0 || v == 0) return grad;
  if (use_metal_path(logits)) {
    const Tensor scale = row_scale(grad_loss, target, ignore_index, reduction, at::kFloat);
    metal::cross_entropy_backward(kCrossEntropyBackwardOp, {logits, target, lse.contiguous(), scale, grad}, ignore_index,
                                  smoothing);
    return grad;
  }
  const Tensor scale = row_scale(grad_loss, target, ignore_index, reduction, stats_dtype(logits));
  const Tensor lse_c = lse.to(stats_dtype(logits)).contiguous();
  cpu::cross_entropy_backward_stub(
      logits.scalar_type(),
      cpu::CrossEntropyBackwardArgs{logits.const_data_ptr(), target.const_data_ptr<int64_t>(), lse_c.const_data_ptr(),
                                    scale.const_data_ptr(), grad.mutable_data_ptr(), rows, v, ignore_index,
                                    smoothing});
  return grad;
}

// ------------------------------------------------------------ Meta kernels
// Shapes only; symbolic-size safe.

std::tuple<Tensor, Tensor> cross_entropy_meta(const Tensor& logits, const Tensor& target, int64_t ignore_index,
                                              double smoothing, c10::string_view reduction_name) {
  const Reduction reduction = parse_reduction(kCrossEntropyOp, reduction_name);
  check_inputs(kCrossEntropyOp, logits, target, smoothing);
  Tensor loss = reduction == Reduction::None ? at::empty_symint({logits.sym_size(0)}, logits.options())
                                             : at::empty({}, logits.options());
  return {loss, at::empty_symint({logits.sym_size(0)}, logits.options().dtype(stats_dtype(logits)))};
}

Tensor cross_entropy_backward_meta(const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
                                   const Tensor& lse, int64_t ignore_index, double smoothing,
                                   c10::string_view reduction) {
  parse_reduction(kCrossEntropyBackwardOp, reduction);
  check_inputs(kCrossEntropyBackwardOp, logits, target, smoothing);
  return at::empty_like(logits, at::MemoryFormat::Contiguous);
}

// ---------------------------------------------------------------- autograd

class CrossEntropyFunction : public torch::autograd::Function<CrossEntropyFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& logits,
                                                const Tensor& target, int64_t ignore_index, double smoothing,
                                                c10::string_view reduction) {
    static auto op =
        typed_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, int64_t, double, c10::string_view)>(
            "my_mps_ops::cross_entropy");
    Tensor loss, lse;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(loss, lse) = op.call(logits, target, ignore_index, smoothing, reduction);
    }
    save_metal_emulation(ctx);
    ctx->save_for_backward({logits, target, lse});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["smoothing"] = smoothing;
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->mark_non_differentiable({lse});
    return {loss, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const BackwardEmulationScope emulation(ctx);
    static auto op = typed_op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, double,
                                     c10::string_view)>("my_mps_ops::cross_entropy_backward");
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    const std::string reduction = ctx->saved_data["reduction"].toStringRef();
    Tensor grad = op.call(grads[0], saved[0], saved[1], saved[2], ctx->saved_data["ignore_index"].toInt(),
                          ctx->saved_data["smoothing"].toDouble(), reduction);
    return {grad, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// Under torch.func's grad / vjp / jvp (ops/common.h): F.cross_entropy in the
// accumulation dtype, as the kernels compute it; lse as a plain output.
std::tuple<Tensor, Tensor> cross_entropy_composite(const Tensor& logits, const Tensor& target, int64_t ignore_index,
                                                   double smoothing, c10::string_view reduction_name) {
  const Reduction reduction = parse_reduction(kCrossEntropyOp, reduction_name);
  check_inputs(kCrossEntropyOp, logits, target, smoothing);
  const int64_t aten_reduction = reduction == Reduction::None   ? at::Reduction::None
                                 : reduction == Reduction::Mean ? at::Reduction::Mean
                                                                : at::Reduction::Sum;
  const Tensor acc = logits.to(stats_dtype(logits));
  Tensor loss = at::cross_entropy_loss(acc, target, std::nullopt, aten_reduction, ignore_index, smoothing);
  return {loss.to(logits.scalar_type()), at::logsumexp(acc, {1}).detach()};
}

std::tuple<Tensor, Tensor> cross_entropy_autograd(const Tensor& logits, const Tensor& target, int64_t ignore_index,
                                                  double smoothing, c10::string_view reduction) {
  if (under_functorch_differentiation(logits, target))
    return cross_entropy_composite(logits, target, ignore_index, smoothing, reduction);
  auto outs = CrossEntropyFunction::apply(logits, target, ignore_index, smoothing, reduction);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(my_mps_ops, CPU, m) {
  m.impl("cross_entropy", &cross_entropy_impl);
  m.impl("cross_entropy_backward", &cross_entropy_backward_impl);
}

TORCH_LIBRARY_IMPL(my_mps_ops, MPS, m) {
  m.impl("cross_entropy", &cross_entropy_impl);
  m.impl("cross_entropy_backward", &cross_entropy_backward_impl);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Meta, m) {
  m.impl("cross_entropy", &cross_entropy_meta);
  m.impl("cross_entropy_backward", &cross_entropy_backward_meta);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Autograd, m) {
  m.impl("cross_entropy", &cross_entropy_autograd);
  m.impl("cross_entropy_backward", double_backward_unsupported_kernel());
}

}  // namespace my_mps_ops
