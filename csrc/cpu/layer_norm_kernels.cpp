// cpu copies: baseline avx2
// CPU loops of LayerNorm over each row, y = (x - mean) * rstd * w + b with
// rstd = 1 / sqrt(var + eps), as torch.nn.functional.layer_norm. The
// statistics take two passes over the row (the mean, then the variance of
// x - mean), which keeps rows with a large mean accurate.
//
// float32 / float16 / bfloat16 accumulate in float32 on the copy's Vec
// (narrow rows are widened into a float32 row of the task's own first).
// float64 (gradcheck) runs plain loops without fused multiply-adds, so every
// copy gives the same float64 results.
#include "cpu/dispatch.h"
#include "cpu/layer_norm.h"
#include "cpu/norm_rows.h"
#include "cpu/parallel.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#include <utility>

MY_MPS_OPS_CPU_KERNELS_BEGIN
namespace {

using norm_rows::result_row;
using norm_rows::row_sum;
using norm_rows::store_row;

// ---- float32 / float16 / bfloat16

// (mean, rstd) of a float32 row. The mean is the first element plus the mean
// of the deviations from it: exact for a row of equal values (whose output is
// then exactly the bias, as F.layer_norm's), and closer for rows whose spread
// is small next to their mean.
__attribute__((always_inline)) inline std::pair<float, float> row_stats_f32(const float* x, int64_t n, float eps) {
  const float shift = n > 0 ? x[0] : 0.0f;
  const float mean = shift + row_sum(x, n, norm_rows::Deviation{shift}) / static_cast<float>(n);
  const float sq = row_sum(x, n, norm_rows::SquaredDeviation{mean});
  return {mean, 1.0f / std::sqrt(sq / static_cast<float>(n) + eps)};
}

// Rows [begin, end). `row` (cols floats; unused for float32) holds a narrow
// row widened, then the result.
template <typename T>
void forward_rows_f32(const LayerNormForwardArgs& a, int64_t begin, int64_t end, float* row) {
  constexpr int64_t L = vec::kLanes<Vec>;
  const int64_t n = a.cols;
  const auto* x = static_cast<const T*>(a.input);
  auto* y = static_cast<T*>(a.out);
  const auto* w = static_cast<const float*>(a.weight);
  const auto* b = static_cast<const float*>(a.bias);
  const float eps = static_cast<float>(a.eps);
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = vec::widened(x + r * n, row, n);
    float* yr = result_row(y + r * n, row);  // row: each element read, then written
    const auto [mean, rstd] = row_stats_f32(xr, n, eps);
    const Vec mv = vec::splatv<Vec>(mean), rv = vec::splatv<Vec>(rstd);
    int64_t i = 0;
    for (; i + L <= n; i += L) {
      Vec v = (vec::loadv<Vec>(xr + i) - mv) * rv;
      if (w != nullptr) v *= vec::loadv<Vec>(w + i);
      if (b != nullptr) v += vec::loadv<Vec>(b + i);
      vec::storev(yr + i, v);
    }
    for (; i < n; ++i) {
      float v = (xr[i] - mean) * rstd;
      if (w != nullptr) v *= w[i];
      if (b != nullptr) v += b[i];
      yr[i] = v;
    }
    store_row(row, y + r * n, n);
  }
}

// grad_input = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = grad_out * w;
// grad_weight += grad_out * xhat and grad_bias += grad_out into this chunk's
// partial sums (dw_acc, db_acc). x_row and dy_row (cols floats each) hold
// narrow rows widened; x_row then holds grad_input before it is narrowed.
template <typename T>
void backward_rows_f32(const LayerNormBackwardArgs& a, float* dw_acc, float* db_acc, int64_t begin, int64_t end,
                       float* x_row, float* dy_row) {
  constexpr int64_t L = vec::kLanes<Vec>;
  const int64_t n = a.cols;
  const auto* dy = static_cast<const T*>(a.grad_out);
  const auto* x = static_cast<const T*>(a.input);
  const auto* w = static_cast<const float*>(a.weight);
  auto* dx = static_cast<T*>(a.grad_input);
  const float eps = static_cast<float>(a.eps);
  const float inv_n = 1.0f / static_cast<float>(n);
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = vec::widened(x + r * n, x_row, n);
    const float* dyr = vec::widened(dy + r * n, dy_row, n);
    const auto [mean, rstd] = row_stats_f32(xr, n, eps);
    const Vec mv = vec::splatv<Vec>(mean), rv = vec::splatv<Vec>(rstd);
    Vec sg{}, sgx{};
    int64_t i = 0;
    for (; i + L <= n; i += L) {
      const Vec xhat = (vec::loadv<Vec>(xr + i) - mv) * rv, d = vec::loadv<Vec>(dyr + i);
      const Vec g = w != nullptr ? d * vec::loadv<Vec>(w + i) : d;
      sg += g, sgx += g * xhat;
      if (dw_acc != nullptr) vec::storev(dw_acc + i, vec::loadv<Vec>(dw_acc + i) + d * xhat);
      if (db_acc != nullptr) vec::storev(db_acc + i, vec::loadv<Vec>(db_acc + i) + d);
    }
    float sum_g = vec::reduce_sumv(sg), sum_gx = vec::reduce_sumv(sgx);
    for (; i < n; ++i) {
      const float xhat = (xr[i] - mean) * rstd, d = dyr[i], g = w != nullptr ? d * w[i] : d;
      sum_g += g, sum_gx += g * xhat;
      if (dw_acc != nullptr) dw_acc[i] += d * xhat;
      if (db_acc != nullptr) db_acc[i] += d;
    }
    if (dx == nullptr) continue;
    const float mean_g = sum_g * inv_n, mean_gx = sum_gx * inv_n;
    const Vec mgv = vec::splatv<Vec>(mean_g), mgxv = vec::splatv<Vec>(mean_gx);
    float* dxr = result_row(dx + r * n, x_row);  // x_row: read, then written
    for (i = 0; i + L <= n; i += L) {
      const Vec xhat = (vec::loadv<Vec>(xr + i) - mv) * rv, d = vec::loadv<Vec>(dyr + i);
      const Vec g = w != nullptr ? d * vec::loadv<Vec>(w + i) : d;
      vec::storev(dxr + i, rv * (g - mgv - xhat * mgxv));
    }
    for (; i < n; ++i) {
      const float xhat = (xr[i] - mean) * rstd, d = dyr[i], g = w != nullptr ? d * w[i] : d;
      dxr[i] = rstd * (g - mean_g - xhat * mean_gx);
    }
    store_row(x_row, dx + r * n, n);
  }
}

template <typename T>
void forward_f32(const LayerNormForwardArgs& a) {
  norm_rows::parallel_rows(a.rows, a.cols, std::is_same_v<T, float> ? 0 : a.cols,
                           [&](int64_t begin, int64_t end, float* row) { forward_rows_f32<T>(a, begin, end, row); });
}

template <typename T>
void backward_f32(const LayerNormBackwardArgs& a) {
  const int64_t n = a.cols;
  auto* dw_partials = static_cast<float*>(a.grad_weight_partials);
  auto* db_partials = static_cast<float*>(a.grad_bias_partials);
  cpu::parallel_row_chunks(a.rows, a.chunks, 2 * n, [&](int64_t c, int64_t begin, int64_t end, float* scratch) {
    backward_rows_f32<T>(a, dw_partials != nullptr ? dw_partials + c * n : nullptr,
                         db_partials != nullptr ? db_partials + c * n : nullptr, begin, end, scratch, scratch + n);
  });
}

// ---- float64: the same formulas, plain loops

MY_MPS_OPS_NO_FP_CONTRACT_BEGIN

// (mean, rstd) of a float64 row, two passes as row_stats_f32.
inline std::pair<double, double> row_stats_f64(const double* xr, int64_t n, double eps) {
  const double shift = n > 0 ? xr[0] : 0.0;
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += xr[i] - shift;
  const double mean = shift + sum / static_cast<double>(n);
  double sq = 0;
  for (int64_t i = 0; i < n; ++i) sq += (xr[i] - mean) * (xr[i] - mean);
  return {mean, 1.0 / std::sqrt(sq / static_cast<double>(n) + eps)};
}

void forward_f64(const LayerNormForwardArgs& a) {
  const int64_t n = a.cols;
  const auto* x = static_cast<const double*>(a.input);
  auto* y = static_cast<double*>(a.out);
  const auto* w = static_cast<const double*>(a.weight);
  const auto* b = static_cast<const double*>(a.bias);
  const double eps = a.eps;
  at::parallel_for(0, a.rows, cpu::row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const double* xr = x + r * n;
      double* yr = y + r * n;
      const auto [mean, rstd] = row_stats_f64(xr, n, eps);
      for (int64_t i = 0; i < n; ++i) {
        double v = (xr[i] - mean) * rstd;
        if (w != nullptr) v *= w[i];
        if (b != nullptr) v += b[i];
        yr[i] = v;
      }
    }
  });
}

void backward_f64(const LayerNormBackwardArgs& a) {
  const int64_t n = a.cols;
  const auto* dy = static_cast<const double*>(a.grad_out);
  const auto* x = static_cast<const double*>(a.input);
  const auto* w = static_cast<const double*>(a.weight);
  auto* dx = static_cast<double*>(a.grad_input);
  auto* dw_partials = static_cast<double*>(a.grad_weight_partials);
  auto* db_partials = static_cast<double*>(a.grad_bias_partials);
  const double eps = a.eps;
  const double inv_n = 1.0 / static_cast<double>(n);
  cpu::parallel_row_chunks(a.rows, a.chunks, 0, [&](int64_t c, int64_t begin, int64_t end, float*) {
    double* dw_acc = dw_partials != nullptr ? dw_partials + c * n : nullptr;
    double* db_acc = db_partials != nullptr ? db_partials + c * n : nullptr;
    for (int64_t r = begin; r < end; ++r) {
      const double* xr = x + r * n;
      const double* dyr = dy + r * n;
      const auto [mean, rstd] = row_stats_f64(xr, n, eps);
      double sum_g = 0, sum_gx = 0;
      for (int64_t i = 0; i < n; ++i) {
        const double xhat = (xr[i] - mean) * rstd;
        const double g = w != nullptr ? dyr[i] * w[i] : dyr[i];
        sum_g += g;
        sum_gx += g * xhat;
        if (dw_acc != nullptr) dw_acc[i] += dyr[i] * xhat;
        if (db_acc != nullptr) db_acc[i] += dyr[i];
      }
      if (dx == nullptr) continue;
      const double mean_g = sum_g * inv_n, mean_gx = sum_gx * inv_n;
      for (int64_t i = 0; i < n; ++i) {
        const double xhat = (xr[i] - mean) * rstd;
        const double g = w != nullptr ? dyr[i] * w[i] : dyr[i];
        dx[r * n + i] = rstd * (g - mean_g - xhat * mean_gx);
      }
    }
  });
}

MY_MPS_OPS_NO_FP_CONTRACT_END

}  // namespace

void layer_norm_forward(c10::ScalarType dtype, const LayerNormForwardArgs& args) {
  cpu::visit_float_dtype(dtype, "layer_norm", [&](auto type_tag) {
    using T = decltype(type_tag);
    if constexpr (std::is_same_v<T, double>) forward_f64(args);
    else forward_f32<T>(args);
  });
}

void layer_norm_backward(c10::ScalarType dtype, const LayerNormBackwardArgs& args) {
  cpu::visit_float_dtype(dtype, "layer_norm_backward", [&](auto type_tag) {
    using T = decltype(type_tag);
    if constexpr (std::is_same_v<T, double>) backward_f64(args);
    else backward_f32<T>(args);
  });
}

MY_MPS_OPS_CPU_KERNELS_END

MY_MPS_OPS_REGISTER_CPU_KERNEL(my_mps_ops::cpu::layer_norm_forward_stub, layer_norm_forward);
MY_MPS_OPS_REGISTER_CPU_KERNEL(my_mps_ops::cpu::layer_norm_backward_stub, layer_norm_backward);
