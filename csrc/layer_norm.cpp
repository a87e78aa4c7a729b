// LayerNorm over the last dimension, matching torch.nn.functional.layer_norm:
// y = (x - mean) * rsqrt(var + eps) * w + b.
//
// CPU kernels (per row, float32 accumulation, two-pass statistics, vectorised,
// parallel), the Metal path (shaders/layer_norm.metal), Meta kernels and the
// C++ autograd Function whose backward is the registered layer_norm_backward.
#include "metal/launch.h"
#include "op_common.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

namespace my_mps_ops {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using cpu::acc_t;

constexpr const char* kOp = "my_mps_ops.layer_norm";
constexpr const char* kBackwardOp = "my_mps_ops.layer_norm_backward";

void check_param(const char* op, const OptTensor& p, const char* name, const Tensor& input) {
  if (!p.has_value()) return;
  TORCH_CHECK(p->dim() == 1 && p->sym_size(0) == input.sym_size(-1), op, ": ", name,
              " must have shape [input.size(-1)] = [", input.sym_size(-1), "], got ", p->sym_sizes());
  check_param_dtype(*p, input, op, name);
  check_same_device(*p, input, op, name, "input");
}

void check_inputs(const char* op, const Tensor& input, const OptTensor& weight, const OptTensor& bias, double eps) {
  check_float_dtype(input, op, "input");
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least one dimension");
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), op, ": eps must be finite and non-negative, got ", eps);
  check_param(op, weight, "weight", input);
  if (weight.has_value() && bias.has_value())  // one grad kernel writes both in one dtype
    check_same_dtype(*bias, *weight, op, "bias", "weight");
  check_param(op, bias, "bias", input);
}

void check_backward_inputs(const Tensor& grad_out, const Tensor& input, const OptTensor& weight,
                           const OptTensor& bias, double eps) {
  check_inputs(kBackwardOp, input, weight, bias, eps);
  TORCH_CHECK(grad_out.sym_sizes() == input.sym_sizes(), kBackwardOp, ": grad_out must have the shape of input ",
              input.sym_sizes(), ", got ", grad_out.sym_sizes());
  check_same_dtype(grad_out, input, kBackwardOp, "grad_out", "input");
  check_same_device(grad_out, input, kBackwardOp, "grad_out", "input");
}

Tensor no_grad_output(const Tensor& like) { return at::empty({0}, like.options()); }

// ---------------------------------------------------------------- CPU kernels

// (mean, rstd) of one float64 row: mean first, then the variance of x - mean.
inline std::pair<double, double> row_stats_f64(const double* xr, int64_t n, double eps) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += xr[i];
  const double mean = sum / static_cast<double>(n);
  double sq = 0;
  for (int64_t i = 0; i < n; ++i) sq += (xr[i] - mean) * (xr[i] - mean);
  return {mean, 1.0 / std::sqrt(sq / static_cast<double>(n) + eps)};
}

// ---- float32-accumulating rows (float32 / float16 / bfloat16) on vectors V:
// cpu::f32x8 in the AVX2 copies, cpu::f32x4 in the baseline ones.
// float32 rows are read in place; narrow rows are widened into a per-thread
// float row first (and the result narrowed from it). Weight and bias arrive
// as float32 (param_for_cpu). float64 (gradcheck) runs the plain loops below.

template <typename V>
__attribute__((always_inline)) inline float sum_f32(const float* x, int64_t n) {
  constexpr int64_t L = cpu::kLanes<V>;
  V s0{}, s1{};
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) s0 += cpu::loadv<V>(x + i), s1 += cpu::loadv<V>(x + i + L);
  float s = cpu::reduce_sumv(s0 + s1);
  for (; i < n; ++i) s += x[i];
  return s;
}

// (mean, rstd), two-pass like row_stats_f64.
template <typename V>
__attribute__((always_inline)) inline std::pair<float, float> row_stats_f32(const float* x, int64_t n, float eps) {
  constexpr int64_t L = cpu::kLanes<V>;
  const float mean = sum_f32<V>(x, n) / static_cast<float>(n);
  const V mv = cpu::splatv<V>(mean);
  V q0{}, q1{};
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    const V a = cpu::loadv<V>(x + i) - mv, b = cpu::loadv<V>(x + i + L) - mv;
    q0 += a * a, q1 += b * b;
  }
  float sq = cpu::reduce_sumv(q0 + q1);
  for (; i < n; ++i) sq += (x[i] - mean) * (x[i] - mean);
  return {mean, 1.0f / std::sqrt(sq / static_cast<float>(n) + eps)};
}

template <typename T, typename V = cpu::f32x4>
__attribute__((always_inline)) inline void forward_rows_f32(const T* x, const float* w, const float* b, T* y,
                                                            int64_t begin, int64_t end, int64_t n, float eps,
                                                            float* row) {
  constexpr int64_t L = cpu::kLanes<V>;
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = cpu::widened(x + r * n, row, n);
    float* yr = std::is_same_v<T, float> ? reinterpret_cast<float*>(y + r * n) : row;  // row: read then written
    const auto [mean, rstd] = row_stats_f32<V>(xr, n, eps);
    const V mv = cpu::splatv<V>(mean), rv = cpu::splatv<V>(rstd);
    int64_t i = 0;
    for (; i + L <= n; i += L) {
      V v = (cpu::loadv<V>(xr + i) - mv) * rv;
      if (w != nullptr) v *= cpu::loadv<V>(w + i);
      if (b != nullptr) v += cpu::loadv<V>(b + i);
      cpu::storev(yr + i, v);
    }
    for (; i < n; ++i) {
      float v = (xr[i] - mean) * rstd;
      if (w != nullptr) v *= w[i];
      if (b != nullptr) v += b[i];
      yr[i] = v;
    }
    if constexpr (!std::is_same_v<T, float>) cpu::narrow(row, y + r * n, n);
  }
}

template <typename T, typename V = cpu::f32x4>
__attribute__((always_inline)) inline void backward_rows_f32(const T* dy, const T* x, const float* w, T* dx,
                                                             float* dw_acc, float* db_acc, int64_t begin,
                                                             int64_t end, int64_t n, float eps, float* x_row,
                                                             float* dy_row) {
  constexpr int64_t L = cpu::kLanes<V>;
  const float inv_n = 1.0f / static_cast<float>(n);
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = cpu::widened(x + r * n, x_row, n);
    const float* dyr = cpu::widened(dy + r * n, dy_row, n);
    const auto [mean, rstd] = row_stats_f32<V>(xr, n, eps);
    const V mv = cpu::splatv<V>(mean), rv = cpu::splatv<V>(rstd);
    V sg{}, sgx{};
    int64_t i = 0;
    for (; i + L <= n; i += L) {
      const V xhat = (cpu::loadv<V>(xr + i) - mv) * rv, d = cpu::loadv<V>(dyr + i);
      const V g = w != nullptr ? d * cpu::loadv<V>(w + i) : d;
      sg += g, sgx += g * xhat;
      if (dw_acc != nullptr) cpu::storev(dw_acc + i, cpu::loadv<V>(dw_acc + i) + d * xhat);
      if (db_acc != nullptr) cpu::storev(db_acc + i, cpu::loadv<V>(db_acc + i) + d);
    }
    float sum_g = cpu::reduce_sumv(sg), sum_gx = cpu::reduce_sumv(sgx);
    for (; i < n; ++i) {
      const float xhat = (xr[i] - mean) * rstd, d = dyr[i], g = w != nullptr ? d * w[i] : d;
      sum_g += g, sum_gx += g * xhat;
      if (dw_acc != nullptr) dw_acc[i] += d * xhat;
      if (db_acc != nullptr) db_acc[i] += d;
    }
    if (dx == nullptr) continue;
    const float mean_g = sum_g * inv_n, mean_gx = sum_gx * inv_n;
    const V mgv = cpu::splatv<V>(mean_g), mgxv = cpu::splatv<V>(mean_gx);
    float* dxr = std::is_same_v<T, float> ? reinterpret_cast<float*>(dx + r * n) : x_row;  // read then written
    for (i = 0; i + L <= n; i += L) {
      const V xhat = (cpu::loadv<V>(xr + i) - mv) * rv, d = cpu::loadv<V>(dyr + i);
      const V g = w != nullptr ? d * cpu::loadv<V>(w + i) : d;
      cpu::storev(dxr + i, rv * (g - mgv - xhat * mgxv));
    }
    for (; i < n; ++i) {
      const float xhat = (xr[i] - mean) * rstd, d = dyr[i], g = w != nullptr ? d * w[i] : d;
      dxr[i] = rstd * (g - mean_g - xhat * mean_gx);
    }
    if constexpr (!std::is_same_v<T, float>) cpu::narrow(x_row, dx + r * n, n);
  }
}

#ifdef MY_MPS_OPS_X86_AVX2_COPIES
template <typename T>
__attribute__((target("avx2,fma"))) void forward_rows_f32_avx2(const T* x, const float* w, const float* b, T* y,
                                                               int64_t begin, int64_t end, int64_t n, float eps,
                                                               float* row) {
  forward_rows_f32<T, cpu::f32x8>(x, w, b, y, begin, end, n, eps, row);
}
template <typename T>
__attribute__((target("avx2,fma"))) void backward_rows_f32_avx2(const T* dy, const T* x, const float* w, T* dx,
                                                                float* dw_acc, float* db_acc, int64_t begin,
                                                                int64_t end, int64_t n, float eps, float* x_row,
                                                                float* dy_row) {
  backward_rows_f32<T, cpu::f32x8>(dy, x, w, dx, dw_acc, db_acc, begin, end, n, eps, x_row, dy_row);
}
#endif

template <typename T>
void forward_f32_kernel(const T* x, const float* wp, const float* bp, T* y, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, cpu::row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> row(std::is_same_v<T, float> ? 0 : n);
#ifdef MY_MPS_OPS_X86_AVX2_COPIES
    if (cpu::has_avx2_fma()) return forward_rows_f32_avx2<T>(x, wp, bp, y, begin, end, n, eps, row.data());
#endif
    forward_rows_f32<T>(x, wp, bp, y, begin, end, n, eps, row.data());
  });
}

template <typename T>
void backward_f32_kernel(const T* dy, const T* x, const float* wp, T* dx, float* dw_partial, float* db_partial,
                         int64_t rows, int64_t n, int64_t chunks, float eps) {
  // Scratch: the widened x and dy rows of narrow types.
  cpu::parallel_row_chunks(rows, chunks, 2 * n, [&](int64_t c, int64_t begin, int64_t end, float* scratch) {
    float* dw_acc = dw_partial ? dw_partial + c * n : nullptr;
    float* db_acc = db_partial ? db_partial + c * n : nullptr;
#ifdef MY_MPS_OPS_X86_AVX2_COPIES
    if (cpu::has_avx2_fma())
      return backward_rows_f32_avx2<T>(dy, x, wp, dx, dw_acc, db_acc, begin, end, n, eps, scratch, scratch + n);
#endif
    backward_rows_f32<T>(dy, x, wp, dx, dw_acc, db_acc, begin, end, n, eps, scratch, scratch + n);
  });
}

// float64 (gradcheck) runs plain loops.
template <typename T>
void forward_cpu_kernel(const T* x, const acc_t<T>* w, const acc_t<T>* b, T* y, int64_t rows, int64_t n,
                        acc_t<T> eps) {
  if constexpr (!std::is_same_v<T, double>) {
    forward_f32_kernel<T>(x, w, b, y, rows, n, eps);
  } else {
    at::parallel_for(0, rows, cpu::row_grain(n), [&](int64_t begin, int64_t end) {
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
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w;
// dw = sum dy * xhat, db = sum dy over rows, per fixed chunk of rows (no
// atomics, deterministic), summed afterwards.
template <typename T>
void backward_cpu_kernel(const T* dy, const T* x, const acc_t<T>* w, T* dx, acc_t<T>* dw_partial, acc_t<T>* db_partial,
                         int64_t rows, int64_t n, int64_t chunks, acc_t<T> eps) {
  if constexpr (!std::is_same_v<T, double>) {
    backward_f32_kernel<T>(dy, x, w, dx, dw_partial, db_partial, rows, n, chunks, eps);
  } else {
    const double inv_n = 1.0 / static_cast<double>(n);
    at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      for (int64_t c = chunk_begin; c < chunk_end; ++c) {
        double* dw_acc = dw_partial ? dw_partial + c * n : nullptr;
        double* db_acc = db_partial ? db_partial + c * n : nullptr;
        for (int64_t r = rows * c / chunks; r < rows * (c + 1) / chunks; ++r) {
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
      }
    });
  }
}

// ------------------------------------------------------------ Metal path

constexpr const char* kLibrary = "layer_norm";
constexpr int64_t kReadsPerThread = 4;

Tensor forward_metal(const Tensor& input, const OptTensor& weight, const OptTensor& bias, double eps) {
  const Tensor x = input.contiguous();
  Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.size(-1);
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  if (rows == 0) return out;
  TORCH_CHECK(n <= UINT32_MAX, kOp, ": the last dimension is too large for the Metal kernel: ", n);
  const Tensor w = param_for_metal(weight, x);
  const Tensor b = param_for_metal(bias, x);
  auto& executor = metal::executor_for(x.device());
  const std::string kernel = std::string("layer_norm_forward_") + metal_type_name(x.scalar_type());
  const metal::PipelineInfo info = executor.pipeline_info(kLibrary, kernel);
  const uint32_t threads =
      row_threadgroup_size(n, kReadsPerThread, info.max_threads_per_threadgroup, info.thread_execution_width);
  metal::Launch launch(kLibrary, kernel);
  launch.buffer(x).buffer(w).buffer(b).buffer(out)
      .scalar<float>(static_cast<float>(eps))
      .scalar<uint32_t>(static_cast<uint32_t>(n))
      .scalar<uint32_t>((weight.has_value() ? 1u : 0u) | (bias.has_value() ? 2u : 0u))
      .dispatch_threadgroups({uint64_t(rows), 1, 1}, {threads, 1, 1});
  executor.run(launch);
  return out;
}

std::tuple<Tensor, Tensor, Tensor> backward_metal(const Tensor& grad_out, const Tensor& input,
                                                  const OptTensor& weight, const OptTensor& bias, double eps,
                                                  std::array<bool, 3> mask) {
  const Tensor x = input.contiguous(), dy = grad_out.contiguous();
  const bool want_dx = mask[0], want_dw = mask[1] && weight.has_value(), want_db = mask[2] && bias.has_value();
  Tensor dx = want_dx ? at::empty_like(x, at::MemoryFormat::Contiguous) : no_grad_output(x);
  Tensor dw = want_dw ? at::empty_like(*weight, at::MemoryFormat::Contiguous) : no_grad_output(x);
  Tensor db = want_db ? at::empty_like(*bias, at::MemoryFormat::Contiguous) : no_grad_output(x);
  const int64_t n = x.size(-1);
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  if (rows == 0) {
    if (want_dw) dw.zero_();
    if (want_db) db.zero_();
    return {dx, dw, db};
  }
  if (!want_dx && !want_dw && !want_db) return {dx, dw, db};
  TORCH_CHECK(n <= UINT32_MAX && rows <= UINT32_MAX, kBackwardOp, ": input is too large for the Metal kernel");
  const Tensor w = param_for_metal(weight, x);
  const char* type = metal_type_name(x.scalar_type());
  auto& executor = metal::executor_for(x.device());
  Tensor stats = at::empty({rows, 2}, x.options().dtype(at::kFloat));
  {
    const std::string kernel = std::string("layer_norm_backward_input_") + type;
    const metal::PipelineInfo info = executor.pipeline_info(kLibrary, kernel);
    const uint32_t threads =
        row_threadgroup_size(n, kReadsPerThread, info.max_threads_per_threadgroup, info.thread_execution_width);
    metal::Launch launch(kLibrary, kernel);
    launch.buffer(dy).buffer(x).buffer(w).buffer(want_dx ? dx : x).buffer(stats)
        .scalar<float>(static_cast<float>(eps))
        .scalar<uint32_t>(static_cast<uint32_t>(n))
        .scalar<uint32_t>((weight.has_value() ? 1u : 0u) | (want_dx ? 2u : 0u))
        .dispatch_threadgroups({uint64_t(rows), 1, 1}, {threads, 1, 1});
    executor.run(launch);
  }
  if (!want_dw && !want_db) return {dx, dw, db};
  const int64_t chunks = std::min<int64_t>(rows, 64);
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  Tensor partial = at::empty({2, chunks, n}, x.options().dtype(at::kFloat));
  {
    const std::string kernel = std::string("layer_norm_backward_params_partial_") + type;
    const metal::PipelineInfo info = executor.pipeline_info(kLibrary, kernel);
    const uint64_t group_x = std::min<uint64_t>(info.max_threads_per_threadgroup, uint64_t(n));
    metal::Launch launch(kLibrary, kernel);
    launch.buffer(dy).buffer(x).buffer(stats).buffer(partial)
        .scalar<uint32_t>(static_cast<uint32_t>(n))
        .scalar<uint32_t>(static_cast<uint32_t>(rows))
        .scalar<uint32_t>(static_cast<uint32_t>(rows_per_chunk))
        .scalar<uint32_t>(static_cast<uint32_t>(chunks))
        .dispatch_threads({uint64_t(n), uint64_t(chunks), 1}, {group_x, 1, 1});
    executor.run(launch);
  }
  {
    // Written in the parameters' dtype (float32 for float32 parameters of a narrow input).
    const std::string kernel =
        std::string("layer_norm_backward_params_reduce_") + metal_type_name((want_dw ? dw : db).scalar_type());
    const metal::PipelineInfo info = executor.pipeline_info(kLibrary, kernel);
    const uint64_t group_x = std::min<uint64_t>(info.max_threads_per_threadgroup, uint64_t(n));
    metal::Launch launch(kLibrary, kernel);
    launch.buffer(partial).buffer(want_dw ? dw : partial).buffer(want_db ? db : partial)
        .scalar<uint32_t>(static_cast<uint32_t>(n))
        .scalar<uint32_t>(static_cast<uint32_t>(chunks))
        .scalar<uint32_t>((want_dw ? 1u : 0u) | (want_db ? 2u : 0u))
        .dispatch_threads({uint64_t(n), 1, 1}, {group_x, 1, 1});
    executor.run(launch);
  }
  return {dx, dw, db};
}

// -------------------------------------------------------- per-device kernels

Tensor layer_norm_cpu(const Tensor& input, const OptTensor& weight, const OptTensor& bias, double eps) {
  check_inputs(kOp, input, weight, bias, eps);
  if (metal::metal_emulation_enabled()) return forward_metal(input, weight, bias, eps);
  const Tensor x = input.contiguous();
  Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.size(-1);
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  if (rows == 0) return out;
  const Tensor w = param_for_cpu(weight, x), b = param_for_cpu(bias, x);
  MY_MPS_OPS_DISPATCH_CPU_TYPES(x.scalar_type(), "layer_norm_cpu", [&] {
    forward_cpu_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), w.defined() ? w.const_data_ptr<acc_t<scalar_t>>() : nullptr,
                                 b.defined() ? b.const_data_ptr<acc_t<scalar_t>>() : nullptr,
                                 out.mutable_data_ptr<scalar_t>(), rows, n, static_cast<acc_t<scalar_t>>(eps));
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_cpu(const Tensor& grad_out, const Tensor& input,
                                                           const OptTensor& weight, const OptTensor& bias,
                                                           double eps, std::array<bool, 3> mask) {
  check_backward_inputs(grad_out, input, weight, bias, eps);
  if (metal::metal_emulation_enabled()) return backward_metal(grad_out, input, weight, bias, eps, mask);
  const Tensor x = input.contiguous(), dy = grad_out.contiguous();
  const bool want_dx = mask[0], want_dw = mask[1] && weight.has_value(), want_db = mask[2] && bias.has_value();
  Tensor dx = want_dx ? at::empty_like(x, at::MemoryFormat::Contiguous) : no_grad_output(x);
  const int64_t n = x.size(-1);
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(rows, at::get_num_threads()));
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor dw_partial = want_dw ? at::zeros({chunks, n}, x.options().dtype(acc_dtype)) : Tensor();
  Tensor db_partial = want_db ? at::zeros({chunks, n}, x.options().dtype(acc_dtype)) : Tensor();
  if (rows > 0 && (want_dx || want_dw || want_db)) {
    const Tensor w = param_for_cpu(weight, x);
    MY_MPS_OPS_DISPATCH_CPU_TYPES(x.scalar_type(), "layer_norm_backward_cpu", [&] {
      using Acc = acc_t<scalar_t>;
      backward_cpu_kernel<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                    w.defined() ? w.const_data_ptr<acc_t<scalar_t>>() : nullptr,
                                    want_dx ? dx.mutable_data_ptr<scalar_t>() : nullptr,
                                    want_dw ? dw_partial.mutable_data_ptr<Acc>() : nullptr,
                                    want_db ? db_partial.mutable_data_ptr<Acc>() : nullptr, rows, n, chunks,
                                    static_cast<Acc>(eps));
    });
  }
  Tensor dw = want_dw ? dw_partial.sum(0).to(weight->scalar_type()) : no_grad_output(x);
  Tensor db = want_db ? db_partial.sum(0).to(bias->scalar_type()) : no_grad_output(x);
  return {dx, dw, db};
}

Tensor layer_norm_mps(const Tensor& input, const OptTensor& weight, const OptTensor& bias, double eps) {
  check_inputs(kOp, input, weight, bias, eps);
  return forward_metal(input, weight, bias, eps);
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_mps(const Tensor& grad_out, const Tensor& input,
                                                           const OptTensor& weight, const OptTensor& bias,
                                                           double eps, std::array<bool, 3> mask) {
  check_backward_inputs(grad_out, input, weight, bias, eps);
  return backward_metal(grad_out, input, weight, bias, eps, mask);
}

Tensor layer_norm_meta(const Tensor& input, const OptTensor& weight, const OptTensor& bias, double eps) {
  check_inputs(kOp, input, weight, bias, eps);
  return at::empty_like(input, at::MemoryFormat::Contiguous);
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_meta(const Tensor& grad_out, const Tensor& input,
                                                            const OptTensor& weight, const OptTensor& bias,
                                                            double eps, std::array<bool, 3> mask) {
  check_backward_inputs(grad_out, input, weight, bias, eps);
  return {mask[0] ? at::empty_like(input, at::MemoryFormat::Contiguous) : no_grad_output(input),
          mask[1] && weight.has_value() ? at::empty_like(*weight, at::MemoryFormat::Contiguous)
                                        : no_grad_output(input),
          mask[2] && bias.has_value() ? at::empty_like(*bias, at::MemoryFormat::Contiguous) : no_grad_output(input)};
}

// ------------------------------------------------------------------ autograd

class LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                        const OptTensor& bias, double eps) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("my_mps_ops::layer_norm", "")
                         .typed<Tensor(const Tensor&, const OptTensor&, const OptTensor&, double)>();
    Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = op.call(input, weight, bias, eps);
    }
    ctx->save_for_backward({input, weight.value_or(Tensor()), bias.value_or(Tensor())});
    ctx->saved_data["eps"] = eps;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("my_mps_ops::layer_norm_backward", "")
                         .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                                   const OptTensor&, double, std::array<bool, 3>)>();
    const auto saved = ctx->get_saved_variables();
    const OptTensor weight = saved[1].defined() ? OptTensor(saved[1]) : std::nullopt;
    const OptTensor bias = saved[2].defined() ? OptTensor(saved[2]) : std::nullopt;
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), weight.has_value() && ctx->needs_input_grad(1),
                                   bias.has_value() && ctx->needs_input_grad(2)};
    if (!grads[0].defined() || (!mask[0] && !mask[1] && !mask[2])) return {Tensor(), Tensor(), Tensor(), Tensor()};
    auto [dx, dw, db] = op.call(grads[0], saved[0], weight, bias, ctx->saved_data["eps"].toDouble(), mask);
    return {mask[0] ? dx : Tensor(), mask[1] ? dw : Tensor(), mask[2] ? db : Tensor(), Tensor()};
  }
};

Tensor layer_norm_autograd(const Tensor& input, const OptTensor& weight, const OptTensor& bias, double eps) {
  return LayerNormFunction::apply(input, weight, bias, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(my_mps_ops, CPU, m) {
  m.impl("layer_norm", &layer_norm_cpu);
  m.impl("layer_norm_backward", &layer_norm_backward_cpu);
}

TORCH_LIBRARY_IMPL(my_mps_ops, MPS, m) {
  m.impl("layer_norm", &layer_norm_mps);
  m.impl("layer_norm_backward", &layer_norm_backward_mps);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Meta, m) {
  m.impl("layer_norm", &layer_norm_meta);
  m.impl("layer_norm_backward", &layer_norm_backward_meta);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Autograd, m) {
  m.impl("layer_norm", &layer_norm_autograd);
  m.impl("layer_norm_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace my_mps_ops
