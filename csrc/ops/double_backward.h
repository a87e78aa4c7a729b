// The Autograd kernel of the backward ops (rms_norm_backward, ...): they have
// no derivative formula, so a gradient computed with create_graph=True gets a
// node that raises, naming the forward op, when it is differentiated again
// (torch's autogradNotImplementedFallback named only "<op>_backward").
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <string>

namespace my_mps_ops {

inline void double_backward_unsupported(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                                        torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  torch::autograd::variable_list inputs;
  for (const c10::IValue& arg : torch::jit::last(*stack, schema.arguments().size())) {
    if (arg.isTensor() && arg.toTensor().defined()) inputs.push_back(arg.toTensor());
  }
  const bool record = torch::autograd::compute_requires_grad(inputs);  // false unless create_graph=True
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  if (!record) return;
  // "my_mps_ops::rms_norm_backward" -> "my_mps_ops.rms_norm"
  std::string forward = schema.name();
  forward.replace(forward.find("::"), 2, ".");
  for (const char* suffix : {"_backward", "_with_grad"}) {
    const auto at = forward.rfind(suffix);
    if (at != std::string::npos) {
      forward.erase(at);
      break;
    }
  }
  auto node = c10::make_intrusive<torch::autograd::Error>(
      forward + ": double backward is not supported (its gradient has no derivative formula); use torch's ops "
                "where second derivatives are needed",
      torch::autograd::collect_next_edges(inputs));
  for (const c10::IValue& out : torch::jit::last(*stack, schema.returns().size())) {
    if (out.isTensor() && out.toTensor().defined() && out.toTensor().is_floating_point()) {
      torch::autograd::set_history(out.toTensor(), node);
    }
  }
}

inline torch::CppFunction double_backward_unsupported_kernel() {
  return torch::CppFunction::makeFromBoxedFunction<&double_backward_unsupported>();
}

}  // namespace my_mps_ops
