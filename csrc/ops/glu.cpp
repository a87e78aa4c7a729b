// Gated activations of transformer MLPs: swiglu(gate, up) = silu(gate) * up
// and geglu(gate, up, approximate) = gelu(gate) * up.
//
// One pass each way; the backward recomputes the activation from gate rather
// than saving it (one tensor less kept alive per MLP in training). Inputs
// that are row views (e.g. the chunk(2, -1) halves of a fused gate/up
// projection) are read in place by both paths. Loops: cpu/glu_kernels.cpp;
// Metal: metal/glu.cpp and shaders/glu.metal.
#include "cpu/glu.h"
#include "metal/glu.h"
#include "ops/autograd_emulation.h"
#include "ops/common.h"
#include "ops/double_backward.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/silu.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>

namespace my_mps_ops {
namespace {

using at::Tensor;
using cpu::GluActivation;

GluActivation gelu_kind(const char* op, c10::string_view approximate) {
  if (approximate == "none") return GluActivation::GeluErf;
  if (approximate == "tanh") return GluActivation::GeluTanh;
  TORCH_CHECK(false, op, ": approximate must be \"none\" or \"tanh\", got \"", approximate, "\"");
}

const char* op_name(GluActivation act, bool backward) {
  if (act == GluActivation::SiLU) return backward ? "my_mps_ops.swiglu_backward" : "my_mps_ops.swiglu";
  return backward ? "my_mps_ops.geglu_backward" : "my_mps_ops.geglu";
}

// gate and up may differ in dtype: the forward ops promote them (as
// silu(gate) * up does); the backward ops take what the forward saved.
void check_inputs(const char* op, const Tensor& gate, const Tensor& up) {
  check_float_dtype(gate, op, "gate");
  check_float_dtype(up, op, "up");
  check_same_device(up, gate, op, "up", "gate");
  TORCH_CHECK(up.sym_sizes() == gate.sym_sizes(), op, ": up must have the shape of gate ", gate.sym_sizes(),
              ", got ", up.sym_sizes());
}

void check_backward_inputs(const char* op, const Tensor& grad_out, const Tensor& gate, const Tensor& up) {
  check_inputs(op, gate, up);
  check_same_dtype(up, gate, op, "up", "gate");
  check_same_dtype(grad_out, gate, op, "grad_out", "gate");
  check_same_device(grad_out, gate, op, "grad_out", "gate");
  TORCH_CHECK(grad_out.sym_sizes() == gate.sym_sizes(), op, ": grad_out must have the shape of gate ",
              gate.sym_sizes(), ", got ", grad_out.sym_sizes());
}

const char* kernel_stem(GluActivation act) { return act == GluActivation::SiLU ? "swiglu" : "geglu"; }
uint32_t shader_approximate(GluActivation act) {
  return act == GluActivation::GeluTanh ? shaders::kGeluTanh : shaders::kGeluErf;
}

Tensor empty_output(const Tensor& like) {
  return at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
}

Tensor glu_forward(GluActivation act, const Tensor& gate, const Tensor& up) {
  Tensor out = empty_output(gate);
  if (out.numel() == 0) return out;
  const auto [g, gv] = as_rows(gate);
  const auto [u, uv] = as_rows(up);
  if (use_metal_path(gate)) {
    metal::glu_forward(op_name(act, false), kernel_stem(act), shader_approximate(act), {g, u, out, gv, uv});
  } else {
    cpu::glu_forward_stub(gate.scalar_type(), act,
                          cpu::GluForwardArgs{g.const_data_ptr(), gv.row_stride, u.const_data_ptr(), uv.row_stride,
                                              out.mutable_data_ptr(), gv.rows, gv.cols});
  }
  return out;
}

std::tuple<Tensor, Tensor> glu_backward(GluActivation act, const Tensor& grad_out, const Tensor& gate,
                                        const Tensor& up) {
  Tensor grad_gate = empty_output(gate), grad_up = empty_output(gate);
  if (gate.numel() == 0) return {grad_gate, grad_up};
  const auto [dy, dyv] = as_rows(grad_out);
  const auto [g, gv] = as_rows(gate);
  const auto [u, uv] = as_rows(up);
  if (use_metal_path(gate)) {
    metal::glu_backward(op_name(act, true), kernel_stem(act), shader_approximate(act),
                        {dy, g, u, grad_gate, grad_up, dyv, gv, uv});
  } else {
    cpu::glu_backward_stub(gate.scalar_type(), act,
                           cpu::GluBackwardArgs{dy.const_data_ptr(), dyv.row_stride, g.const_data_ptr(), gv.row_stride,
                                                u.const_data_ptr(), uv.row_stride, grad_gate.mutable_data_ptr(),
                                                grad_up.mutable_data_ptr(), gv.rows, gv.cols});
  }
  return {grad_gate, grad_up};
}

// ------------------------------------------------------- CPU and MPS kernels

Tensor swiglu_impl(const Tensor& gate_in, const Tensor& up_in) {
  check_inputs(op_name(GluActivation::SiLU, false), gate_in, up_in);
  const auto [gate, up] = promoted_pair(gate_in, up_in);
  return glu_forward(GluActivation::SiLU, gate, up);
}

std::tuple<Tensor, Tensor> swiglu_backward_impl(const Tensor& grad_out, const Tensor& gate, const Tensor& up) {
  check_backward_inputs(op_name(GluActivation::SiLU, true), grad_out, gate, up);
  return glu_backward(GluActivation::SiLU, grad_out, gate, up);
}

Tensor geglu_impl(const Tensor& gate_in, const Tensor& up_in, c10::string_view approximate) {
  const GluActivation act = gelu_kind("my_mps_ops.geglu", approximate);
  check_inputs(op_name(act, false), gate_in, up_in);
  const auto [gate, up] = promoted_pair(gate_in, up_in);
  return glu_forward(act, gate, up);
}

std::tuple<Tensor, Tensor> geglu_backward_impl(const Tensor& grad_out, const Tensor& gate, const Tensor& up,
                                               c10::string_view approximate) {
  const GluActivation act = gelu_kind("my_mps_ops.geglu_backward", approximate);
  check_backward_inputs(op_name(act, true), grad_out, gate, up);
  return glu_backward(act, grad_out, gate, up);
}

// ------------------------------------------------------------ Meta kernels
// Shapes only; symbolic-size safe.

Tensor promoted_output(const Tensor& gate, const Tensor& up) {
  return at::empty_like(gate, gate.options().dtype(c10::promoteTypes(gate.scalar_type(), up.scalar_type())),
                        at::MemoryFormat::Contiguous);
}

Tensor swiglu_meta(const Tensor& gate, const Tensor& up) {
  check_inputs(op_name(GluActivation::SiLU, false), gate, up);
  return promoted_output(gate, up);
}

std::tuple<Tensor, Tensor> swiglu_backward_meta(const Tensor& grad_out, const Tensor& gate, const Tensor& up) {
  check_backward_inputs(op_name(GluActivation::SiLU, true), grad_out, gate, up);
  return {at::empty_like(gate, at::MemoryFormat::Contiguous), at::empty_like(gate, at::MemoryFormat::Contiguous)};
}

Tensor geglu_meta(const Tensor& gate, const Tensor& up, c10::string_view approximate) {
  check_inputs(op_name(gelu_kind("my_mps_ops.geglu", approximate), false), gate, up);
  return promoted_output(gate, up);
}

std::tuple<Tensor, Tensor> geglu_backward_meta(const Tensor& grad_out, const Tensor& gate, const Tensor& up,
                                               c10::string_view approximate) {
  check_backward_inputs(op_name(gelu_kind("my_mps_ops.geglu_backward", approximate), true), grad_out, gate, up);
  return {at::empty_like(gate, at::MemoryFormat::Contiguous), at::empty_like(gate, at::MemoryFormat::Contiguous)};
}

// ---------------------------------------------------------------- autograd

class SwiGLUFunction : public torch::autograd::Function<SwiGLUFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& gate, const Tensor& up) {
    static auto op = typed_op<Tensor(const Tensor&, const Tensor&)>("my_mps_ops::swiglu");
    at::AutoDispatchBelowADInplaceOrView guard;
    save_metal_emulation(ctx);
    ctx->save_for_backward({gate, up});
    return op.call(gate, up);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const BackwardEmulationScope emulation(ctx);
    static auto op = typed_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&)>(
        "my_mps_ops::swiglu_backward");
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return {Tensor(), Tensor()};
    auto [grad_gate, grad_up] = op.call(grads[0], saved[0], saved[1]);
    return {ctx->needs_input_grad(0) ? grad_gate : Tensor(), ctx->needs_input_grad(1) ? grad_up : Tensor()};
  }
};

class GeGLUFunction : public torch::autograd::Function<GeGLUFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& gate, const Tensor& up,
                        c10::string_view approximate) {
    static auto op = typed_op<Tensor(const Tensor&, const Tensor&, c10::string_view)>("my_mps_ops::geglu");
    at::AutoDispatchBelowADInplaceOrView guard;
    save_metal_emulation(ctx);
    ctx->save_for_backward({gate, up});
    ctx->saved_data["approximate"] = std::string(approximate);
    return op.call(gate, up, approximate);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const BackwardEmulationScope emulation(ctx);
    static auto op =
        typed_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, c10::string_view)>(
            "my_mps_ops::geglu_backward");
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor()};
    const std::string approximate = ctx->saved_data["approximate"].toStringRef();
    auto [grad_gate, grad_up] = op.call(grads[0], saved[0], saved[1], approximate);
    return {ctx->needs_input_grad(0) ? grad_gate : Tensor(), ctx->needs_input_grad(1) ? grad_up : Tensor(),
            Tensor()};
  }
};

// Mixed dtypes are promoted here, differentiably, so each gradient comes back
// in its input's dtype.
// Under torch.func's grad / vjp / jvp the composites themselves (ops/common.h).
Tensor swiglu_autograd(const Tensor& gate_in, const Tensor& up_in) {
  if (under_functorch_differentiation(gate_in, up_in)) {
    check_inputs(op_name(GluActivation::SiLU, false), gate_in, up_in);
    return at::silu(gate_in) * up_in;
  }
  const auto [gate, up] = promoted_pair(gate_in, up_in);
  return SwiGLUFunction::apply(gate, up);
}
Tensor geglu_autograd(const Tensor& gate_in, const Tensor& up_in, c10::string_view approximate) {
  if (under_functorch_differentiation(gate_in, up_in)) {
    check_inputs(op_name(gelu_kind("my_mps_ops.geglu", approximate), false), gate_in, up_in);
    return at::gelu(gate_in, approximate) * up_in;
  }
  const auto [gate, up] = promoted_pair(gate_in, up_in);
  return GeGLUFunction::apply(gate, up, approximate);
}

}  // namespace

TORCH_LIBRARY_IMPL(my_mps_ops, CPU, m) {
  m.impl("swiglu", &swiglu_impl);
  m.impl("swiglu_backward", &swiglu_backward_impl);
  m.impl("geglu", &geglu_impl);
  m.impl("geglu_backward", &geglu_backward_impl);
}

TORCH_LIBRARY_IMPL(my_mps_ops, MPS, m) {
  m.impl("swiglu", &swiglu_impl);
  m.impl("swiglu_backward", &swiglu_backward_impl);
  m.impl("geglu", &geglu_impl);
  m.impl("geglu_backward", &geglu_backward_impl);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Meta, m) {
  m.impl("swiglu", &swiglu_meta);
  m.impl("swiglu_backward", &swiglu_backward_meta);
  m.impl("geglu", &geglu_meta);
  m.impl("geglu_backward", &geglu_backward_meta);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Autograd, m) {
  m.impl("swiglu", &swiglu_autograd);
  m.impl("geglu", &geglu_autograd);
  m.impl("swiglu_backward", double_backward_unsupported_kernel());
  m.impl("geglu_backward", double_backward_unsupported_kernel());
}

}  // namespace my_mps_ops
