// cpu copies: baseline avx2
// CPU loops of RMSNorm over each row, y = x * rstd * w with
// rstd = 1 / sqrt(mean(x^2) + eps), and of fused_add_rms_norm, whose forward
// first writes residual_out = x + residual (rounded to the dtype, as
// PyTorch's add) and normalises that, and whose backward adds
// grad_residual_out to the input gradient in the same pass.
//
// float32 / float16 / bfloat16 accumulate in float32 on the copy's Vec, one
// pass over a row each way (narrow rows are widened into a float32 row of the
// task's own first). float64 (gradcheck) runs plain loops without fused
// multiply-adds, so every copy gives the same float64 results.
#include "cpu/dispatch.h"
#include "cpu/norm_rows.h"
#include "cpu/parallel.h"
#include "cpu/rms_norm.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>

MY_MPS_OPS_CPU_KERNELS_BEGIN
namespace {

using norm_rows::result_row;
using norm_rows::row_sum;
using norm_rows::store_row;

// ---- float32 / float16 / bfloat16

// Rows [begin, end). `row` (cols floats; unused by float32 rms_norm) holds
// the row as float32 (widened, or residual_out as rounded), then the result.
template <typename T>
void forward_rows_f32(const RmsNormForwardArgs& a, int64_t begin, int64_t end, float* row) {
  constexpr int64_t L = vec::kLanes<Vec>;
  const int64_t n = a.cols;
  const auto* x = static_cast<const T*>(a.input);
  const auto* residual = static_cast<const T*>(a.residual);
  auto* residual_out = static_cast<T*>(a.residual_out);
  auto* y = static_cast<T*>(a.out);
  const auto* w = static_cast<const float*>(a.weight);
  const float eps = static_cast<float>(a.eps);
  for (int64_t r = begin; r < end; ++r) {
    const float* xr;
    if (residual != nullptr) {
      const T* xi = x + r * n;
      const T* ri = residual + r * n;
      T* h = residual_out + r * n;
      for (int64_t i = 0; i < n; ++i) {
        h[i] = static_cast<T>(static_cast<float>(xi[i]) + static_cast<float>(ri[i]));
        row[i] = static_cast<float>(h[i]);
      }
      xr = row;
    } else {
      xr = vec::widened(x + r * n, row, n);
    }
    const float rstd = 1.0f / std::sqrt(row_sum(xr, n, norm_rows::Square{}) / static_cast<float>(n) + eps);
    float* yr = result_row(y + r * n, row);  // row: each element read, then written
    const Vec rv = vec::splatv<Vec>(rstd);
    int64_t i = 0;
    for (; i + L <= n; i += L) {
      Vec v = vec::loadv<Vec>(xr + i) * rv;
      if (w != nullptr) v *= vec::loadv<Vec>(w + i);
      vec::storev(yr + i, v);
    }
    for (; i < n; ++i) yr[i] = w != nullptr ? xr[i] * rstd * w[i] : xr[i] * rstd;
    store_row(row, y + r * n, n);
  }
}

// grad_input = rstd * (g - x * rstd^2 * mean(g * x)) with g = grad_out * w
// (+ grad_residual_out); grad_weight += grad_out * x * rstd into this chunk's
// partial sums (dw_acc). x_row and dy_row (cols floats each) hold narrow rows
// widened; x_row then holds grad_input before it is narrowed.
template <typename T>
void backward_rows_f32(const RmsNormBackwardArgs& a, float* dw_acc, int64_t begin, int64_t end, float* x_row,
                       float* dy_row) {
  constexpr int64_t L = vec::kLanes<Vec>;
  const int64_t n = a.cols;
  const auto* dy = static_cast<const T*>(a.grad_out);
  const auto* x = static_cast<const T*>(a.input);
  const auto* w = static_cast<const float*>(a.weight);
  const auto* grad_residual_out = static_cast<const T*>(a.grad_residual_out);
  auto* dx = static_cast<T*>(a.grad_input);
  const float eps = static_cast<float>(a.eps);
  const float inv_n = 1.0f / static_cast<float>(n);
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = vec::widened(x + r * n, x_row, n);
    const float* dyr = vec::widened(dy + r * n, dy_row, n);
    Vec sq{}, dot{};
    int64_t i = 0;
    for (; i + L <= n; i += L) {
      const Vec xv = vec::loadv<Vec>(xr + i), d = vec::loadv<Vec>(dyr + i);
      const Vec g = w != nullptr ? d * vec::loadv<Vec>(w + i) : d;
      sq += xv * xv, dot += g * xv;
    }
    float sum_sq = vec::reduce_sumv(sq), sum_dot = vec::reduce_sumv(dot);
    for (; i < n; ++i) {
      const float g = w != nullptr ? dyr[i] * w[i] : dyr[i];
      sum_sq += xr[i] * xr[i], sum_dot += g * xr[i];
    }
    const float rstd = 1.0f / std::sqrt(sum_sq * inv_n + eps);
    const float coef = rstd * rstd * rstd * sum_dot * inv_n;  // rstd * (rstd^2 * mean(g*x))
    const Vec rv = vec::splatv<Vec>(rstd), cv = vec::splatv<Vec>(coef);
    const T* grad_residual_out_row = grad_residual_out != nullptr ? grad_residual_out + r * n : nullptr;
    float* dxr = dx != nullptr ? result_row(dx + r * n, x_row) : nullptr;  // x_row: read, then written
    for (i = 0; i + L <= n; i += L) {
      const Vec xv = vec::loadv<Vec>(xr + i), d = vec::loadv<Vec>(dyr + i);
      if (dw_acc != nullptr) vec::storev(dw_acc + i, vec::loadv<Vec>(dw_acc + i) + d * xv * rv);
      if (dx == nullptr) continue;
      const Vec g = w != nullptr ? d * vec::loadv<Vec>(w + i) : d;
      Vec v = g * rv - xv * cv;
      if (grad_residual_out_row != nullptr) {
        float grad_residual_out_f32[L];
        for (int j = 0; j < L; ++j) grad_residual_out_f32[j] = static_cast<float>(grad_residual_out_row[i + j]);
        v += vec::loadv<Vec>(grad_residual_out_f32);
      }
      vec::storev(dxr + i, v);
    }
    for (; i < n; ++i) {
      if (dw_acc != nullptr) dw_acc[i] += dyr[i] * xr[i] * rstd;
      if (dx == nullptr) continue;
      const float g = w != nullptr ? dyr[i] * w[i] : dyr[i];
      dxr[i] = g * rstd - xr[i] * coef +
               (grad_residual_out_row != nullptr ? static_cast<float>(grad_residual_out_row[i]) : 0.0f);
    }
    if (dx != nullptr) store_row(x_row, dx + r * n, n);
  }
}

template <typename T>
void forward_f32(const RmsNormForwardArgs& a) {
  const bool reads_in_place = std::is_same_v<T, float> && a.residual == nullptr;
  norm_rows::parallel_rows(a.rows, a.cols, reads_in_place ? 0 : a.cols, [&](int64_t begin, int64_t end, float* row) {
    forward_rows_f32<T>(a, begin, end, row);
  });
}

template <typename T>
void backward_f32(const RmsNormBackwardArgs& a) {
  const int64_t n = a.cols;
  auto* partials = static_cast<float*>(a.grad_weight_partials);
  cpu::parallel_row_chunks(a.rows, a.chunks, 2 * n, [&](int64_t c, int64_t begin, int64_t end, float* scratch) {
    backward_rows_f32<T>(a, partials != nullptr ? partials + c * n : nullptr, begin, end, scratch, scratch + n);
  });
}

// ---- float64: the same formulas, plain loops

MY_MPS_OPS_NO_FP_CONTRACT_BEGIN

void forward_f64(const RmsNormForwardArgs& a) {
  const int64_t n = a.cols;
  const auto* x = static_cast<const double*>(a.input);
  const auto* residual = static_cast<const double*>(a.residual);
  auto* residual_out = static_cast<double*>(a.residual_out);
  auto* y = static_cast<double*>(a.out);
  const auto* w = static_cast<const double*>(a.weight);
  const double eps = a.eps;
  at::parallel_for(0, a.rows, cpu::row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const double* xr = x + r * n;
      if (residual != nullptr) {
        double* hr = residual_out + r * n;
        for (int64_t i = 0; i < n; ++i) hr[i] = xr[i] + residual[r * n + i];
        xr = hr;
      }
      double sum_sq = 0;
      for (int64_t i = 0; i < n; ++i) sum_sq += xr[i] * xr[i];
      const double rstd = 1.0 / std::sqrt(sum_sq / static_cast<double>(n) + eps);
      double* yr = y + r * n;
      for (int64_t i = 0; i < n; ++i) yr[i] = w != nullptr ? xr[i] * rstd * w[i] : xr[i] * rstd;
    }
  });
}

void backward_f64(const RmsNormBackwardArgs& a) {
  const int64_t n = a.cols;
  const auto* dy = static_cast<const double*>(a.grad_out);
  const auto* x = static_cast<const double*>(a.input);
  const auto* w = static_cast<const double*>(a.weight);
  const auto* grad_residual_out = static_cast<const double*>(a.grad_residual_out);
  auto* dx = static_cast<double*>(a.grad_input);
  auto* partials = static_cast<double*>(a.grad_weight_partials);
  const double eps = a.eps;
  const double inv_n = 1.0 / static_cast<double>(n);
  cpu::parallel_row_chunks(a.rows, a.chunks, 0, [&](int64_t c, int64_t begin, int64_t end, float*) {
    double* dw_acc = partials != nullptr ? partials + c * n : nullptr;
    for (int64_t r = begin; r < end; ++r) {
      const double* xr = x + r * n;
      const double* dyr = dy + r * n;
      double sum_sq = 0, dot = 0;
      for (int64_t i = 0; i < n; ++i) {
        const double g = w != nullptr ? dyr[i] * w[i] : dyr[i];
        sum_sq += xr[i] * xr[i];
        dot += g * xr[i];
      }
      const double rstd = 1.0 / std::sqrt(sum_sq * inv_n + eps);
      const double coef = rstd * rstd * rstd * dot * inv_n;  // rstd * (rstd^2 * mean(g*x))
      for (int64_t i = 0; i < n; ++i) {
        if (dw_acc != nullptr) dw_acc[i] += dyr[i] * xr[i] * rstd;
        if (dx != nullptr) {
          const double g = w != nullptr ? dyr[i] * w[i] : dyr[i];
          dx[r * n + i] = g * rstd - xr[i] * coef + (grad_residual_out != nullptr ? grad_residual_out[r * n + i] : 0.0);
        }
      }
    }
  });
}

MY_MPS_OPS_NO_FP_CONTRACT_END

}  // namespace

void rms_norm_forward(c10::ScalarType dtype, const RmsNormForwardArgs& args) {
  cpu::visit_float_dtype(dtype, "rms_norm", [&](auto type_tag) {
    using T = decltype(type_tag);
    if constexpr (std::is_same_v<T, double>) forward_f64(args);
    else forward_f32<T>(args);
  });
}

void rms_norm_backward(c10::ScalarType dtype, const RmsNormBackwardArgs& args) {
  cpu::visit_float_dtype(dtype, "rms_norm_backward", [&](auto type_tag) {
    using T = decltype(type_tag);
    if constexpr (std::is_same_v<T, double>) backward_f64(args);
    else backward_f32<T>(args);
  });
}

MY_MPS_OPS_CPU_KERNELS_END

MY_MPS_OPS_REGISTER_CPU_KERNEL(my_mps_ops::cpu::rms_norm_forward_stub, rms_norm_forward);
MY_MPS_OPS_REGISTER_CPU_KERNEL(my_mps_ops::cpu::rms_norm_backward_stub, rms_norm_backward);
