// What the norm entry files (ops/rms_norm.cpp, ops/layer_norm.cpp) share: the
// checks of input, eps, parameters and grad_out, the rows a norm runs over,
// the CPU kernels' per-chunk parameter-gradient sums, and the forms an
// optional tensor takes for the kernels, for Meta and for autograd.
#pragma once

#include "ops/common.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>

namespace my_mps_ops {

inline void check_norm_input(const char* op, const at::Tensor& input, double eps) {
  check_float_dtype(input, op, "input");
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least one dimension");
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), op, ": eps must be finite and non-negative, got ", eps);
}

// A weight or bias: absent, or one value per element of input's last
// dimension, of a dtype check_param_dtype accepts, on input's device.
inline void check_norm_param(const char* op, const std::optional<at::Tensor>& p, const char* name,
                             const at::Tensor& input) {
  if (!p.has_value()) return;
  TORCH_CHECK(p->dim() == 1 && p->sym_size(0) == input.sym_size(-1), op, ": ", name,
              " must have shape [input.size(-1)] = [", input.sym_size(-1), "], got ", p->sym_sizes());
  check_param_dtype(*p, input, op, name);
  check_same_device(*p, input, op, name, "input");
}

inline void check_norm_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& input) {
  TORCH_CHECK(grad_out.sym_sizes() == input.sym_sizes(), op, ": grad_out must have the shape of input ",
              input.sym_sizes(), ", got ", grad_out.sym_sizes());
  check_same_dtype(grad_out, input, op, "grad_out", "input");
  check_same_device(grad_out, input, op, "grad_out", "input");
}

// A norm's input as rows of `cols` elements (none when cols is 0).
struct NormRows {
  int64_t rows, cols;
};
inline NormRows norm_rows(const at::Tensor& input) {
  const int64_t cols = input.size(-1);
  return {cols == 0 ? 0 : input.numel() / cols, cols};
}

// A contiguous tensor of the shape and dtype of `like`: outputs and input gradients.
inline at::Tensor empty_contiguous_like(const at::Tensor& like) {
  return at::empty_like(like, at::MemoryFormat::Contiguous);
}

// The CPU kernels sum a parameter's gradient over fixed chunks of rows, at
// most one per thread (deterministic, no atomics), into zeroed rows of
// partial sums in the accumulation dtype; the gradient is their sum in the
// parameter's dtype.
// The row chunks of the CPU weight-gradient partial sums: a function of the
// row count only, not of the thread count, so the gradients are bitwise the
// same for any number of threads (up to kMaxGradChunks chunks run in parallel).
constexpr int64_t kMaxGradChunks = 64;
inline int64_t cpu_grad_chunks(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(rows, kMaxGradChunks));
}
inline at::Tensor zeroed_grad_partials(int64_t chunks, int64_t cols, const at::Tensor& input) {
  const auto accumulation = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::zeros({chunks, cols}, input.options().dtype(accumulation));
}
inline at::Tensor grad_from_partials(const at::Tensor& partials, const at::Tensor& param) {
  // Chunk by chunk, in order: how at::sum splits a reduction can follow the thread count.
  at::Tensor total = partials[0].clone();
  for (int64_t c = 1; c < partials.size(0); ++c) total.add_(partials[c]);
  return total.to(param.scalar_type());
}

// A parameter's gradient as the Meta kernels give it: the parameter's shape
// and dtype when wanted, else the unwanted-gradient stand-in.
inline at::Tensor param_grad_meta(bool wanted, const std::optional<at::Tensor>& param, const at::Tensor& input) {
  return wanted && param.has_value() ? empty_contiguous_like(*param) : unwanted_grad(input);
}

// An optional tensor as the kernels read it: contiguous, undefined when absent.
inline at::Tensor contiguous_or_absent(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// A tensor's elements as the CPU kernels' arguments take them: nullptr when undefined.
inline const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }
inline void* mutable_data_or_null(const at::Tensor& t) { return t.defined() ? t.mutable_data_ptr() : nullptr; }

// A parameter as metal/norm.h takes it: param_for_metal's form, undefined when absent.
inline at::Tensor metal_param(const std::optional<at::Tensor>& param, const at::Tensor& input) {
  return param.has_value() ? param_for_metal(param, input) : at::Tensor();
}

// An optional parameter as autograd saves it (undefined when absent), and back.
inline at::Tensor saved_param(const std::optional<at::Tensor>& param) { return param.value_or(at::Tensor()); }
inline std::optional<at::Tensor> param_from_saved(const at::Tensor& saved) {
  return saved.defined() ? std::optional<at::Tensor>(saved) : std::nullopt;
}

}  // namespace my_mps_ops
