// What every op family's entry file shares: argument checks that name the
// argument, the choice between the Metal path and the native CPU kernels, the
// forms in which each path takes norm parameters, and dispatcher lookups for
// the autograd Functions.
#pragma once

#include "metal/launch.h"

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <utility>

namespace my_mps_ops {

// float32, float16 and bfloat16 everywhere; float64 too on CPU (for gradcheck).
inline void check_float_dtype(const at::Tensor& t, const char* op, const char* arg) {
  const auto dt = t.scalar_type();
  const bool ok = dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 ||
                  (dt == at::kDouble && !t.is_mps());
  TORCH_CHECK(ok, op, ": ", arg, " must be float32, float16 or bfloat16 (float64 on cpu only), got ", dt,
              " on ", t.device());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg,
                             const char* ref_arg) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", arg, " must have the same dtype as ", ref_arg,
              " (", ref.scalar_type(), "), got ", t.scalar_type());
}

// Two inputs of different float dtypes in the dtype PyTorch's type promotion
// gives their elementwise combination (e.g. bfloat16 and float32: float32),
// as the composite the op fuses would compute (no copy for a matching one).
// Non-float inputs are returned as they are, for the op's dtype check to name.
inline std::pair<at::Tensor, at::Tensor> promoted_pair(const at::Tensor& a, const at::Tensor& b) {
  if (!a.is_floating_point() || !b.is_floating_point()) return {a, b};
  const auto dtype = c10::promoteTypes(a.scalar_type(), b.scalar_type());
  return {a.to(dtype), b.to(dtype)};
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg,
                              const char* ref_arg) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", arg, " must be on the same device as ", ref_arg, " (",
              ref.device(), "), got ", t.device());
}

// Norm parameters (weight, bias) have the input's dtype, or are float32 for a
// float16 / bfloat16 input, as torch.nn.functional.layer_norm and rms_norm
// accept (e.g. float32 weights under autocast); the output keeps the input's
// dtype and a parameter's gradient has the parameter's dtype.
inline void check_param_dtype(const at::Tensor& p, const at::Tensor& input, const char* op, const char* arg) {
  const auto pt = p.scalar_type(), it = input.scalar_type();
  TORCH_CHECK(pt == it || (pt == at::kFloat && (it == at::kHalf || it == at::kBFloat16)), op, ": ", arg,
              " must have the dtype of input (", it, "), or be float32 when input is float16 or bfloat16; got ", pt);
}

// Whether `t` runs through the op's Metal kernels: every mps tensor, and cpu
// tensors of a dtype the shaders have while my_mps_ops.testing.metal_emulation()
// is on (the emulator then runs the same launches). Otherwise the native CPU
// kernels run (float64 always does: Metal has no float64).
inline bool use_metal_path(const at::Tensor& t) {
  return t.is_mps() || (metal::metal_emulation_enabled() && t.scalar_type() != at::kDouble);
}

// A parameter as the CPU kernels read it: in the accumulation dtype (float32;
// float64 for float64 input). Undefined when absent.
inline at::Tensor param_for_cpu(const std::optional<at::Tensor>& p, const at::Tensor& input) {
  if (!p.has_value()) return at::Tensor();
  return p->to(input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

// A parameter as the Metal kernels read it: in the input's dtype (a float32
// parameter of a narrow input is rounded to it). Without one, `input` itself
// (the kernels bind a buffer there but do not read it).
inline at::Tensor param_for_metal(const std::optional<at::Tensor>& p, const at::Tensor& input) {
  return p.has_value() ? p->to(input.scalar_type()).contiguous() : input;
}

// Whether one of torch.func's differentiating transforms (grad, vjp, jacrev,
// jvp, hessian) runs over these arguments: they wrap every tensor argument
// (dispatch key FuncTorchGradWrapper) and refuse C++ autograd Functions. The
// Autograd kernels then run the op as the PyTorch composite it stands for:
// PyTorch's values, differentiable to any order by the transform (as MLX's
// fast ops fall back to their composite under its transforms).
inline bool wrapped_for_functorch(const at::Tensor& t) {
  return t.defined() && t.key_set().has(c10::DispatchKey::FuncTorchGradWrapper);
}
inline bool wrapped_for_functorch(const std::optional<at::Tensor>& t) {
  return t.has_value() && wrapped_for_functorch(*t);
}
template <typename... Tensors>
bool under_functorch_differentiation(const Tensors&... tensors) {
  return (wrapped_for_functorch(tensors) || ...);
}

// The empty tensor a backward op returns for a gradient output_mask does not want.
inline at::Tensor unwanted_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

// A tensor read as `rows` rows of `cols` contiguous elements, row_stride apart:
// a contiguous tensor, or a slice of one along the last dimension (the halves
// of a fused gate/up projection from chunk(2, -1)). Elementwise kernels read
// such views in place instead of copying them; nullopt for any other layout.
struct RowView {
  int64_t rows, cols, row_stride;
};
inline std::optional<RowView> row_view(const at::Tensor& t) {
  const int64_t dim = t.dim();
  const int64_t cols = dim == 0 ? 1 : t.size(-1);
  if (dim > 0 && cols > 1 && t.stride(-1) != 1) return std::nullopt;
  int64_t rows = 1, row_stride = -1, expected = -1;
  for (int64_t d = dim - 2; d >= 0; --d) {
    rows *= t.size(d);
    if (t.size(d) == 1) continue;  // any stride
    if (row_stride < 0) row_stride = expected = t.stride(d);
    if (t.stride(d) != expected) return std::nullopt;
    expected = t.stride(d) * t.size(d);
  }
  return RowView{rows, cols, row_stride < 0 ? cols : row_stride};
}

// A tensor as a row view: in place when it is one, else a contiguous copy.
inline std::pair<at::Tensor, RowView> as_rows(const at::Tensor& t) {
  if (auto view = row_view(t)) return {t, *view};
  at::Tensor c = t.contiguous();
  return {c, *row_view(c)};
}

// The registered op `name` ("my_mps_ops::swiglu_backward") as a typed handle,
// for the autograd Functions (their backward is itself a registered op).
template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace my_mps_ops
