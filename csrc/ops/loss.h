// What the loss ops (cross_entropy, linear_cross_entropy) share: the
// reduction argument, and per-row losses reduced and their gradient spread
// back to rows as F.cross_entropy does (mean over the rows not ignored).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>

namespace my_mps_ops {

enum class Reduction { None, Mean, Sum };

inline Reduction parse_reduction(const char* op, c10::string_view r) {
  if (r == "mean") return Reduction::Mean;
  if (r == "sum") return Reduction::Sum;
  if (r == "none") return Reduction::None;
  TORCH_CHECK(false, op, ": reduction must be \"mean\", \"sum\" or \"none\", got \"", r, "\"");
}

// Per-row factor of the gradient: grad_loss for "none", broadcast for "sum",
// divided by the number of counted rows for "mean".
inline at::Tensor row_scale(const at::Tensor& grad_loss, const at::Tensor& target, int64_t ignore_index,
                            Reduction reduction, at::ScalarType dtype) {
  const int64_t n = target.size(0);
  at::Tensor g = grad_loss.to(dtype);
  if (reduction == Reduction::None) return g.contiguous();
  if (reduction == Reduction::Mean) g = g.div(target.ne(ignore_index).sum().to(dtype));
  return g.reshape({1}).expand({n}).contiguous();
}

inline at::Tensor reduce_rows(const at::Tensor& losses, const at::Tensor& target, int64_t ignore_index,
                              Reduction reduction, at::ScalarType dtype) {
  if (reduction == Reduction::None) return losses.to(dtype);
  at::Tensor total = losses.sum();
  if (reduction == Reduction::Mean) total = total.div(target.ne(ignore_index).sum().to(losses.scalar_type()));
  return total.to(dtype);
}

}  // namespace my_mps_ops
