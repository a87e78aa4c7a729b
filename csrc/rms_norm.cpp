// RMSNorm over the last dimension: y = x * rsqrt(mean(x^2) + eps) * w.
//
// One file for the op family: argument checks, the CPU kernels (fused, one
// pass per row, float32 accumulation, eight-lane vectors + at::parallel_for), the Metal
// path (launches of shaders/rms_norm.metal, encoded on MPS or run by the
// emulator), Meta kernels, and the C++ autograd Function.
#include "metal/launch.h"
#include "op_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
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

constexpr const char* kOp = "my_mps_ops.rms_norm";
constexpr const char* kBackwardOp = "my_mps_ops.rms_norm_backward";

void check_inputs(const char* op, const Tensor& input, const OptTensor& weight, double eps) {
  check_float_dtype(input, op, "input");
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least one dimension");
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), op, ": eps must be finite and non-negative, got ", eps);
  if (weight.has_value()) {
    const Tensor& w = *weight;
    TORCH_CHECK(w.dim() == 1 && w.sym_size(0) == input.sym_size(-1), op,
                ": weight must have shape [input.size(-1)] = [", input.sym_size(-1), "], got ", w.sym_sizes());
    check_param_dtype(w, input, op, "weight");
    check_same_device(w, input, op, "weight", "input");
  }
}

void check_backward_inputs(const Tensor& grad_out, const Tensor& input, const OptTensor& weight, double eps) {
  check_inputs(kBackwardOp, input, weight, eps);
  TORCH_CHECK(grad_out.sym_sizes() == input.sym_sizes(), kBackwardOp, ": grad_out must have the shape of input ",
              input.sym_sizes(), ", got ", grad_out.sym_sizes());
  check_same_dtype(grad_out, input, kBackwardOp, "grad_out", "input");
  check_same_device(grad_out, input, kBackwardOp, "grad_out", "input");
}

// Empty stand-in for a gradient that output_mask says is not wanted.
Tensor no_grad_output(const Tensor& like) { return at::empty({0}, like.options()); }

// ---------------------------------------------------------------- CPU kernels

using cpu::acc_t;

// ---- float32-accumulating rows (float32 / float16 / bfloat16) on vectors V:
// cpu::f32x8 in the AVX2 copies, cpu::f32x4 in the baseline ones. float64
// (gradcheck) runs the plain loops below.
// Narrow rows are widened into per-thread float rows (cpu::widened).

template <typename V>
__attribute__((always_inline)) inline float sum_sq_f32(const float* x, int64_t n) {
  constexpr int64_t L = cpu::kLanes<V>;
  V s0{}, s1{};
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    const V a = cpu::loadv<V>(x + i), b = cpu::loadv<V>(x + i + L);
    s0 += a * a, s1 += b * b;
  }
  float s = cpu::reduce_sumv(s0 + s1);
  for (; i < n; ++i) s += x[i] * x[i];
  return s;
}

template <typename T, typename V = cpu::f32x4>
__attribute__((always_inline)) inline void forward_rows_f32(const T* x, const float* w, T* y, int64_t begin,
                                                            int64_t end, int64_t n, float eps, const T* residual,
                                                            T* residual_out, float* row) {
  constexpr int64_t L = cpu::kLanes<V>;
  for (int64_t r = begin; r < end; ++r) {
    const float* xr;
    if (residual != nullptr) {
      // h = x + residual rounded to T (as PyTorch's add), normalised as rounded.
      const T* a = x + r * n;
      const T* b = residual + r * n;
      T* h = residual_out + r * n;
      for (int64_t i = 0; i < n; ++i) {
        h[i] = static_cast<T>(static_cast<float>(a[i]) + static_cast<float>(b[i]));
        row[i] = static_cast<float>(h[i]);
      }
      xr = row;
    } else {
      xr = cpu::widened(x + r * n, row, n);
    }
    const float rstd = 1.0f / std::sqrt(sum_sq_f32<V>(xr, n) / static_cast<float>(n) + eps);
    float* yr = std::is_same_v<T, float> ? reinterpret_cast<float*>(y + r * n) : row;  // row: read then written
    const V rv = cpu::splatv<V>(rstd);
    int64_t i = 0;
    for (; i + L <= n; i += L) {
      V v = cpu::loadv<V>(xr + i) * rv;
      if (w != nullptr) v *= cpu::loadv<V>(w + i);
      cpu::storev(yr + i, v);
    }
    for (; i < n; ++i) yr[i] = w != nullptr ? xr[i] * rstd * w[i] : xr[i] * rstd;
    if constexpr (!std::is_same_v<T, float>) cpu::narrow(row, y + r * n, n);
  }
}

template <typename T, typename V = cpu::f32x4>
__attribute__((always_inline)) inline void backward_rows_f32(const T* dy, const T* x, const float* w, T* dx,
                                                             float* dw_acc, int64_t begin, int64_t end, int64_t n,
                                                             float eps, const T* dx_add, float* x_row,
                                                             float* dy_row) {
  constexpr int64_t L = cpu::kLanes<V>;
  const float inv_n = 1.0f / static_cast<float>(n);
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = cpu::widened(x + r * n, x_row, n);
    const float* dyr = cpu::widened(dy + r * n, dy_row, n);
    V sq{}, dot{};
    int64_t i = 0;
    for (; i + L <= n; i += L) {
      const V xv = cpu::loadv<V>(xr + i), d = cpu::loadv<V>(dyr + i);
      const V g = w != nullptr ? d * cpu::loadv<V>(w + i) : d;
      sq += xv * xv, dot += g * xv;
    }
    float sum_sq = cpu::reduce_sumv(sq), sum_dot = cpu::reduce_sumv(dot);
    for (; i < n; ++i) {
      const float g = w != nullptr ? dyr[i] * w[i] : dyr[i];
      sum_sq += xr[i] * xr[i], sum_dot += g * xr[i];
    }
    const float rstd = 1.0f / std::sqrt(sum_sq * inv_n + eps);
    const float coef = rstd * rstd * rstd * sum_dot * inv_n;  // rstd * (rstd^2 * mean(g*x))
    const V rv = cpu::splatv<V>(rstd), cv = cpu::splatv<V>(coef);
    const T* extra = dx_add != nullptr ? dx_add + r * n : nullptr;
    float* dxr = std::is_same_v<T, float> ? reinterpret_cast<float*>(dx != nullptr ? dx + r * n : nullptr) : x_row;
    for (i = 0; i + L <= n; i += L) {
      const V xv = cpu::loadv<V>(xr + i), d = cpu::loadv<V>(dyr + i);
      if (dw_acc != nullptr) cpu::storev(dw_acc + i, cpu::loadv<V>(dw_acc + i) + d * xv * rv);
      if (dx == nullptr) continue;
      const V g = w != nullptr ? d * cpu::loadv<V>(w + i) : d;
      V v = g * rv - xv * cv;
      if (extra != nullptr) {
        float e[L];
        for (int j = 0; j < L; ++j) e[j] = static_cast<float>(extra[i + j]);
        v += cpu::loadv<V>(e);
      }
      cpu::storev(dxr + i, v);
    }
    for (; i < n; ++i) {
      if (dw_acc != nullptr) dw_acc[i] += dyr[i] * xr[i] * rstd;
      if (dx == nullptr) continue;
      const float g = w != nullptr ? dyr[i] * w[i] : dyr[i];
      dxr[i] = g * rstd - xr[i] * coef + (extra != nullptr ? static_cast<float>(extra[i]) : 0.0f);
    }
    if constexpr (!std::is_same_v<T, float>)
      if (dx != nullptr) cpu::narrow(x_row, dx + r * n, n);
  }
}

#ifdef MY_MPS_OPS_X86_AVX2_COPIES
template <typename T>
__attribute__((target("avx2,fma"))) void forward_rows_f32_avx2(const T* x, const float* w, T* y, int64_t begin,
                                                               int64_t end, int64_t n, float eps, const T* residual,
                                                               T* residual_out, float* row) {
  forward_rows_f32<T, cpu::f32x8>(x, w, y, begin, end, n, eps, residual, residual_out, row);
}
template <typename T>
__attribute__((target("avx2,fma"))) void backward_rows_f32_avx2(const T* dy, const T* x, const float* w, T* dx,
                                                                float* dw_acc, int64_t begin, int64_t end, int64_t n,
                                                                float eps, const T* dx_add, float* x_row,
                                                                float* dy_row) {
  backward_rows_f32<T, cpu::f32x8>(dy, x, w, dx, dw_acc, begin, end, n, eps, dx_add, x_row, dy_row);
}
#endif

template <typename T>
void forward_f32_kernel(const T* x, const float* wp, T* y, int64_t rows, int64_t n, float eps, const T* residual,
                        T* residual_out) {
  at::parallel_for(0, rows, cpu::row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> row(std::is_same_v<T, float> && residual == nullptr ? 0 : n);
#ifdef MY_MPS_OPS_X86_AVX2_COPIES
    if (cpu::has_avx2_fma())
      return forward_rows_f32_avx2<T>(x, wp, y, begin, end, n, eps, residual, residual_out, row.data());
#endif
    forward_rows_f32<T>(x, wp, y, begin, end, n, eps, residual, residual_out, row.data());
  });
}

template <typename T>
void backward_f32_kernel(const T* dy, const T* x, const float* wp, T* dx, float* dw_partial, int64_t rows, int64_t n,
                         int64_t chunks, float eps, const T* dx_add) {
  // Scratch: the widened x and dy rows of narrow types.
  cpu::parallel_row_chunks(rows, chunks, 2 * n, [&](int64_t c, int64_t begin, int64_t end, float* scratch) {
    float* dw_acc = dw_partial ? dw_partial + c * n : nullptr;
#ifdef MY_MPS_OPS_X86_AVX2_COPIES
    if (cpu::has_avx2_fma())
      return backward_rows_f32_avx2<T>(dy, x, wp, dx, dw_acc, begin, end, n, eps, dx_add, scratch, scratch + n);
#endif
    backward_rows_f32<T>(dy, x, wp, dx, dw_acc, begin, end, n, eps, dx_add, scratch, scratch + n);
  });
}

// With `residual`, first h = x + residual (rounded to T, as PyTorch's add) is
// written to residual_out, and h is normalised. float64 (gradcheck) runs plain
// loops.
template <typename T>
void forward_cpu_kernel(const T* x, const acc_t<T>* w, T* y, int64_t rows, int64_t n, acc_t<T> eps,
                        const T* residual = nullptr, T* residual_out = nullptr) {
  if constexpr (!std::is_same_v<T, double>) {
    forward_f32_kernel<T>(x, w, y, rows, n, eps, residual, residual_out);
  } else {
    at::parallel_for(0, rows, cpu::row_grain(n), [&](int64_t begin, int64_t end) {
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
}

// grad_input = rstd * (g - x * rstd^2 * mean(g * x)) with g = grad_out * w;
// grad_weight = sum over rows of grad_out * x * rstd, accumulated per chunk of
// rows in acc_t<T> (deterministic: fixed chunking, no atomics), then summed.
template <typename T>
void backward_cpu_kernel(const T* dy, const T* x, const acc_t<T>* w, T* dx, acc_t<T>* dw_partial, int64_t rows, int64_t n,
                         int64_t chunks, acc_t<T> eps, const T* dx_add = nullptr) {
  if constexpr (!std::is_same_v<T, double>) {
    backward_f32_kernel<T>(dy, x, w, dx, dw_partial, rows, n, chunks, eps, dx_add);
  } else {
    const double inv_n = 1.0 / static_cast<double>(n);
    at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      for (int64_t c = chunk_begin; c < chunk_end; ++c) {
        double* dw_acc = dw_partial ? dw_partial + c * n : nullptr;
        for (int64_t r = rows * c / chunks; r < rows * (c + 1) / chunks; ++r) {
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
              dx[r * n + i] = g * rstd - xr[i] * coef + (dx_add != nullptr ? dx_add[r * n + i] : 0.0);
            }
          }
        }
      }
    });
  }
}

// ------------------------------------------------------------ Metal path
// Shared by the MPS backend and the emulator (cpu tensors under
// my_mps_ops.testing.metal_emulation()); see shaders/rms_norm.metal.

constexpr const char* kLibrary = "rms_norm";
constexpr int64_t kReadsPerThread = 4;  // N_READS in the shader

Tensor forward_metal(const Tensor& input, const OptTensor& weight, double eps) {
  const Tensor x = input.contiguous();
  Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.size(-1);
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  if (rows == 0) return out;
  TORCH_CHECK(n <= UINT32_MAX, kOp, ": the last dimension is too large for the Metal kernel: ", n);
  const Tensor w = param_for_metal(weight, x);

  auto& executor = metal::executor_for(x.device());
  const metal::PipelineInfo single = executor.pipeline_info(kLibrary, std::string("rms_norm_forward_") +
                                                                         metal_type_name(x.scalar_type()));
  // One threadgroup per row; rows longer than one pass of the largest
  // threadgroup take the looped kernel, which reads x twice from memory.
  const bool fits = n <= int64_t(single.max_threads_per_threadgroup) * kReadsPerThread;
  const std::string kernel = std::string(fits ? "rms_norm_forward_" : "rms_norm_forward_looped_") +
                             metal_type_name(x.scalar_type());
  const metal::PipelineInfo info = fits ? single : executor.pipeline_info(kLibrary, kernel);
  const uint32_t threads =
      row_threadgroup_size(n, kReadsPerThread, info.max_threads_per_threadgroup, info.thread_execution_width);
  metal::Launch launch(kLibrary, kernel);
  launch.buffer(x)
      .buffer(w)
      .buffer(out)
      .scalar<float>(static_cast<float>(eps))
      .scalar<uint32_t>(static_cast<uint32_t>(n))
      .scalar<uint32_t>(weight.has_value() ? 1u : 0u)
      .dispatch_threadgroups({uint64_t(rows), 1, 1}, {threads, 1, 1});
  executor.run(launch);
  return out;
}

// dx_add (fused_add_rms_norm's grad_residual_out) is added to grad_input.
std::tuple<Tensor, Tensor> backward_metal(const Tensor& grad_out, const Tensor& input, const OptTensor& weight,
                                          double eps, std::array<bool, 2> output_mask,
                                          const OptTensor& dx_add = std::nullopt) {
  const Tensor x = input.contiguous();
  const Tensor extra = dx_add.has_value() ? dx_add->contiguous() : x;  // bound but unread without dx_add
  const Tensor dy = grad_out.contiguous();
  const bool want_dx = output_mask[0];
  const bool want_dw = output_mask[1] && weight.has_value();
  Tensor dx = want_dx ? at::empty_like(x, at::MemoryFormat::Contiguous) : no_grad_output(x);
  Tensor dw = want_dw ? at::empty_like(*weight, at::MemoryFormat::Contiguous) : no_grad_output(x);
  const int64_t n = x.size(-1);
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  if (want_dw && (rows == 0 || n == 0)) dw.zero_();
  if (rows == 0 || (!want_dx && !want_dw)) return {dx, dw};
  TORCH_CHECK(n <= UINT32_MAX && rows <= UINT32_MAX, kBackwardOp, ": input is too large for the Metal kernel");
  const Tensor w = param_for_metal(weight, x);
  const char* type = metal_type_name(x.scalar_type());
  auto& executor = metal::executor_for(x.device());

  // Pass 1, one threadgroup per row: grad_input (when wanted) and the row's
  // rstd, which the grad_weight passes reuse.
  Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  {
    const std::string kernel = std::string("rms_norm_backward_input_") + type;
    const metal::PipelineInfo info = executor.pipeline_info(kLibrary, kernel);
    const uint32_t threads =
        row_threadgroup_size(n, kReadsPerThread, info.max_threads_per_threadgroup, info.thread_execution_width);
    metal::Launch launch(kLibrary, kernel);
    launch.buffer(dy)
        .buffer(x)
        .buffer(w)
        .buffer(want_dx ? dx : x)  // bound but unwritten without want_dx
        .buffer(rstd)
        .scalar<float>(static_cast<float>(eps))
        .scalar<uint32_t>(static_cast<uint32_t>(n))
        .scalar<uint32_t>((weight.has_value() ? 1u : 0u) | (want_dx ? 2u : 0u) | (dx_add.has_value() ? 4u : 0u))
        .buffer(extra)
        .dispatch_threadgroups({uint64_t(rows), 1, 1}, {threads, 1, 1});
    executor.run(launch);
  }
  if (!want_dw) return {dx, dw};

  // Pass 2: grad_weight without float atomics. Each thread sums one column
  // over a chunk of rows into float partials; pass 3 sums the chunks.
  const int64_t chunks = std::min<int64_t>(rows, 64);
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  Tensor partial = at::empty({chunks, n}, x.options().dtype(at::kFloat));
  {
    const std::string kernel = std::string("rms_norm_backward_weight_partial_") + type;
    const metal::PipelineInfo info = executor.pipeline_info(kLibrary, kernel);
    const uint32_t group_x = static_cast<uint32_t>(std::min<int64_t>(
        info.max_threads_per_threadgroup, std::max<int64_t>(info.thread_execution_width, n)));
    metal::Launch launch(kLibrary, kernel);
    launch.buffer(dy)
        .buffer(x)
        .buffer(rstd)
        .buffer(partial)
        .scalar<uint32_t>(static_cast<uint32_t>(n))
        .scalar<uint32_t>(static_cast<uint32_t>(rows))
        .scalar<uint32_t>(static_cast<uint32_t>(rows_per_chunk))
        .dispatch_threads({uint64_t(n), uint64_t(chunks), 1}, {std::min<uint32_t>(group_x, uint32_t(n)), 1, 1});
    executor.run(launch);
  }
  {
    // Written in grad_weight's dtype: the weight's, float32 for a float32 weight of a narrow input.
    const std::string kernel = std::string("rms_norm_backward_weight_reduce_") + metal_type_name(dw.scalar_type());
    const metal::PipelineInfo info = executor.pipeline_info(kLibrary, kernel);
    const uint32_t group_x = static_cast<uint32_t>(std::min<int64_t>(info.max_threads_per_threadgroup, n));
    metal::Launch launch(kLibrary, kernel);
    launch.buffer(partial)
        .buffer(dw)
        .scalar<uint32_t>(static_cast<uint32_t>(n))
        .scalar<uint32_t>(static_cast<uint32_t>(chunks))
        .dispatch_threads({uint64_t(n), 1, 1}, {group_x, 1, 1});
    executor.run(launch);
  }
  return {dx, dw};
}

// -------------------------------------------------------- per-device kernels

Tensor rms_norm_cpu(const Tensor& input, const OptTensor& weight, double eps) {
  check_inputs(kOp, input, weight, eps);
  if (metal::metal_emulation_enabled()) return forward_metal(input, weight, eps);
  const Tensor x = input.contiguous();
  Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.size(-1);
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  if (rows == 0) return out;
  const Tensor w = param_for_cpu(weight, x);
  MY_MPS_OPS_DISPATCH_CPU_TYPES(x.scalar_type(), "rms_norm_cpu", [&] {
    forward_cpu_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), w.defined() ? w.const_data_ptr<acc_t<scalar_t>>() : nullptr,
                                 out.mutable_data_ptr<scalar_t>(), rows, n, static_cast<acc_t<scalar_t>>(eps));
  });
  return out;
}

std::tuple<Tensor, Tensor> backward_cpu(const Tensor& grad_out, const Tensor& input, const OptTensor& weight,
                                        double eps, std::array<bool, 2> output_mask, const OptTensor& dx_add) {
  if (metal::metal_emulation_enabled()) return backward_metal(grad_out, input, weight, eps, output_mask, dx_add);
  const Tensor extra = dx_add.has_value() ? dx_add->contiguous() : Tensor();
  const Tensor x = input.contiguous();
  const Tensor dy = grad_out.contiguous();
  const bool want_dx = output_mask[0];
  const bool want_dw = output_mask[1] && weight.has_value();
  Tensor dx = want_dx ? at::empty_like(x, at::MemoryFormat::Contiguous) : no_grad_output(x);
  const int64_t n = x.size(-1);
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(rows, at::get_num_threads()));
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor dw_partial = want_dw ? at::zeros({chunks, n}, x.options().dtype(acc_dtype)) : Tensor();
  if (rows > 0 && (want_dx || want_dw)) {
    const Tensor w = param_for_cpu(weight, x);
    MY_MPS_OPS_DISPATCH_CPU_TYPES(x.scalar_type(), "rms_norm_backward_cpu", [&] {
      backward_cpu_kernel<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                    w.defined() ? w.const_data_ptr<acc_t<scalar_t>>() : nullptr,
                                    want_dx ? dx.mutable_data_ptr<scalar_t>() : nullptr,
                                    want_dw ? dw_partial.mutable_data_ptr<acc_t<scalar_t>>() : nullptr, rows, n,
                                    chunks, static_cast<acc_t<scalar_t>>(eps),
                                    extra.defined() ? extra.const_data_ptr<scalar_t>() : nullptr);
    });
  }
  Tensor dw = want_dw ? dw_partial.sum(0).to(weight->scalar_type()) : no_grad_output(x);
  return {dx, dw};
}

std::tuple<Tensor, Tensor> rms_norm_backward_cpu(const Tensor& grad_out, const Tensor& input,
                                                 const OptTensor& weight, double eps,
                                                 std::array<bool, 2> output_mask) {
  check_backward_inputs(grad_out, input, weight, eps);
  return backward_cpu(grad_out, input, weight, eps, output_mask, std::nullopt);
}

Tensor rms_norm_mps(const Tensor& input, const OptTensor& weight, double eps) {
  check_inputs(kOp, input, weight, eps);
  return forward_metal(input, weight, eps);
}

std::tuple<Tensor, Tensor> rms_norm_backward_mps(const Tensor& grad_out, const Tensor& input,
                                                 const OptTensor& weight, double eps,
                                                 std::array<bool, 2> output_mask) {
  check_backward_inputs(grad_out, input, weight, eps);
  return backward_metal(grad_out, input, weight, eps, output_mask);
}

// Shapes only; works with symbolic sizes under torch.compile.
Tensor rms_norm_meta(const Tensor& input, const OptTensor& weight, double eps) {
  check_inputs(kOp, input, weight, eps);
  return at::empty_like(input, at::MemoryFormat::Contiguous);
}

std::tuple<Tensor, Tensor> rms_norm_backward_meta(const Tensor& grad_out, const Tensor& input,
                                                  const OptTensor& weight, double eps,
                                                  std::array<bool, 2> output_mask) {
  check_backward_inputs(grad_out, input, weight, eps);
  Tensor dx = output_mask[0] ? at::empty_like(input, at::MemoryFormat::Contiguous) : no_grad_output(input);
  Tensor dw = output_mask[1] && weight.has_value() ? at::empty_like(*weight, at::MemoryFormat::Contiguous)
                                                    : no_grad_output(input);
  return {dx, dw};
}

// ------------------------------------------------------------------ autograd

class RMSNormFunction : public torch::autograd::Function<RMSNormFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                        double eps) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("my_mps_ops::rms_norm", "")
                         .typed<Tensor(const Tensor&, const OptTensor&, double)>();
    Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = op.call(input, weight, eps);
    }
    ctx->save_for_backward({input, weight.value_or(Tensor())});
    ctx->saved_data["eps"] = eps;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("my_mps_ops::rms_norm_backward", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, double,
                                                           std::array<bool, 2>)>();
    const auto saved = ctx->get_saved_variables();
    const Tensor& input = saved[0];
    const OptTensor weight = saved[1].defined() ? OptTensor(saved[1]) : std::nullopt;
    const std::array<bool, 2> mask{ctx->needs_input_grad(0), weight.has_value() && ctx->needs_input_grad(1)};
    if (!grad_outputs[0].defined() || (!mask[0] && !mask[1])) return {Tensor(), Tensor(), Tensor()};
    auto [grad_input, grad_weight] = op.call(grad_outputs[0], input, weight, ctx->saved_data["eps"].toDouble(), mask);
    return {mask[0] ? grad_input : Tensor(), mask[1] ? grad_weight : Tensor(), Tensor()};
  }
};

Tensor rms_norm_autograd(const Tensor& input, const OptTensor& weight, double eps) {
  return RMSNormFunction::apply(input, weight, eps);
}

// ------------------------------------------------- fused_add_rms_norm
// residual_out = x + residual; out = rms_norm(residual_out). One pass over the
// inputs for the add and the statistics; the backward adds grad_residual_out
// to the normalisation's grad_input in the same pass (grad_x = grad_residual).

constexpr const char* kFusedOp = "my_mps_ops.fused_add_rms_norm";
constexpr const char* kFusedBackwardOp = "my_mps_ops.fused_add_rms_norm_backward";

void check_fused_inputs(const Tensor& x, const Tensor& residual, const OptTensor& weight, double eps) {
  check_inputs(kFusedOp, x, weight, eps);
  TORCH_CHECK(residual.sym_sizes() == x.sym_sizes(), kFusedOp, ": residual must have the shape of x ", x.sym_sizes(),
              ", got ", residual.sym_sizes());
  check_same_dtype(residual, x, kFusedOp, "residual", "x");
  check_same_device(residual, x, kFusedOp, "residual", "x");
}

std::tuple<Tensor, Tensor> fused_add_forward_metal(const Tensor& input, const Tensor& residual,
                                                   const OptTensor& weight, double eps) {
  const Tensor x = input.contiguous(), r = residual.contiguous();
  Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  Tensor h = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.size(-1);
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  if (rows == 0) return {out, h};
  TORCH_CHECK(n <= UINT32_MAX, kFusedOp, ": the last dimension is too large for the Metal kernel: ", n);
  const Tensor w = param_for_metal(weight, x);
  auto& executor = metal::executor_for(x.device());
  const std::string kernel = std::string("fused_add_rms_norm_forward_") + metal_type_name(x.scalar_type());
  const metal::PipelineInfo info = executor.pipeline_info(kLibrary, kernel);
  const uint32_t threads =
      row_threadgroup_size(n, kReadsPerThread, info.max_threads_per_threadgroup, info.thread_execution_width);
  metal::Launch launch(kLibrary, kernel);
  launch.buffer(x)
      .buffer(r)
      .buffer(w)
      .buffer(out)
      .buffer(h)
      .scalar<float>(static_cast<float>(eps))
      .scalar<uint32_t>(static_cast<uint32_t>(n))
      .scalar<uint32_t>(weight.has_value() ? 1u : 0u)
      .dispatch_threadgroups({uint64_t(rows), 1, 1}, {threads, 1, 1});
  executor.run(launch);
  return {out, h};
}

std::tuple<Tensor, Tensor> fused_add_rms_norm_cpu(const Tensor& input, const Tensor& residual,
                                                  const OptTensor& weight, double eps) {
  check_fused_inputs(input, residual, weight, eps);
  if (metal::metal_emulation_enabled()) return fused_add_forward_metal(input, residual, weight, eps);
  const Tensor x = input.contiguous(), r = residual.contiguous();
  Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  Tensor h = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.size(-1);
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  if (rows == 0) return {out, h};
  const Tensor w = param_for_cpu(weight, x);
  MY_MPS_OPS_DISPATCH_CPU_TYPES(x.scalar_type(), "fused_add_rms_norm_cpu", [&] {
    forward_cpu_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), w.defined() ? w.const_data_ptr<acc_t<scalar_t>>() : nullptr,
                                 out.mutable_data_ptr<scalar_t>(), rows, n, static_cast<acc_t<scalar_t>>(eps),
                                 r.const_data_ptr<scalar_t>(), h.mutable_data_ptr<scalar_t>());
  });
  return {out, h};
}

std::tuple<Tensor, Tensor> fused_add_rms_norm_mps(const Tensor& input, const Tensor& residual,
                                                  const OptTensor& weight, double eps) {
  check_fused_inputs(input, residual, weight, eps);
  return fused_add_forward_metal(input, residual, weight, eps);
}

std::tuple<Tensor, Tensor> fused_add_rms_norm_meta(const Tensor& input, const Tensor& residual,
                                                   const OptTensor& weight, double eps) {
  check_fused_inputs(input, residual, weight, eps);
  return {at::empty_like(input, at::MemoryFormat::Contiguous), at::empty_like(input, at::MemoryFormat::Contiguous)};
}

void check_fused_backward_inputs(const Tensor& grad_out, const OptTensor& grad_residual_out,
                                 const Tensor& residual_out, const OptTensor& weight, double eps) {
  check_backward_inputs(grad_out, residual_out, weight, eps);
  if (grad_residual_out.has_value()) {
    TORCH_CHECK(grad_residual_out->sym_sizes() == residual_out.sym_sizes(), kFusedBackwardOp,
                ": grad_residual_out must have the shape of residual_out ", residual_out.sym_sizes(), ", got ",
                grad_residual_out->sym_sizes());
    check_same_dtype(*grad_residual_out, residual_out, kFusedBackwardOp, "grad_residual_out", "residual_out");
    check_same_device(*grad_residual_out, residual_out, kFusedBackwardOp, "grad_residual_out", "residual_out");
  }
}

std::tuple<Tensor, Tensor> fused_add_rms_norm_backward_cpu(const Tensor& grad_out, const OptTensor& grad_residual_out,
                                                           const Tensor& residual_out, const OptTensor& weight,
                                                           double eps, std::array<bool, 2> output_mask) {
  check_fused_backward_inputs(grad_out, grad_residual_out, residual_out, weight, eps);
  return backward_cpu(grad_out, residual_out, weight, eps, output_mask, grad_residual_out);
}

std::tuple<Tensor, Tensor> fused_add_rms_norm_backward_mps(const Tensor& grad_out, const OptTensor& grad_residual_out,
                                                           const Tensor& residual_out, const OptTensor& weight,
                                                           double eps, std::array<bool, 2> output_mask) {
  check_fused_backward_inputs(grad_out, grad_residual_out, residual_out, weight, eps);
  return backward_metal(grad_out, residual_out, weight, eps, output_mask, grad_residual_out);
}

std::tuple<Tensor, Tensor> fused_add_rms_norm_backward_meta(const Tensor& grad_out,
                                                            const OptTensor& grad_residual_out,
                                                            const Tensor& residual_out, const OptTensor& weight,
                                                            double eps, std::array<bool, 2> output_mask) {
  check_fused_backward_inputs(grad_out, grad_residual_out, residual_out, weight, eps);
  return rms_norm_backward_meta(grad_out, residual_out, weight, eps, output_mask);
}

class FusedAddRMSNormFunction : public torch::autograd::Function<FusedAddRMSNormFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& x,
                                                const Tensor& residual, const OptTensor& weight, double eps) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("my_mps_ops::fused_add_rms_norm", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, double)>();
    Tensor out, h;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, h) = op.call(x, residual, weight, eps);
    }
    ctx->save_for_backward({h, weight.value_or(Tensor())});
    ctx->saved_data["eps"] = eps;
    return {out, h};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("my_mps_ops::fused_add_rms_norm_backward", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, const Tensor&,
                                                           const OptTensor&, double, std::array<bool, 2>)>();
    const auto saved = ctx->get_saved_variables();
    const Tensor& h = saved[0];
    const OptTensor weight = saved[1].defined() ? OptTensor(saved[1]) : std::nullopt;
    const bool want_input = ctx->needs_input_grad(0) || ctx->needs_input_grad(1);
    const std::array<bool, 2> mask{want_input, weight.has_value() && ctx->needs_input_grad(2)};
    const Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(h);
    const OptTensor grad_h = grads[1].defined() ? OptTensor(grads[1]) : std::nullopt;
    auto [grad_input, grad_weight] = op.call(grad_out, grad_h, h, weight, ctx->saved_data["eps"].toDouble(), mask);
    return {ctx->needs_input_grad(0) ? grad_input : Tensor(), ctx->needs_input_grad(1) ? grad_input : Tensor(),
            mask[1] ? grad_weight : Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> fused_add_rms_norm_autograd(const Tensor& x, const Tensor& residual,
                                                       const OptTensor& weight, double eps) {
  auto outs = FusedAddRMSNormFunction::apply(x, residual, weight, eps);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(my_mps_ops, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_cpu);
  m.impl("fused_add_rms_norm_backward", &fused_add_rms_norm_backward_cpu);
}

TORCH_LIBRARY_IMPL(my_mps_ops, MPS, m) {
  m.impl("rms_norm", &rms_norm_mps);
  m.impl("rms_norm_backward", &rms_norm_backward_mps);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_mps);
  m.impl("fused_add_rms_norm_backward", &fused_add_rms_norm_backward_mps);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Meta, m) {
  m.impl("rms_norm", &rms_norm_meta);
  m.impl("rms_norm_backward", &rms_norm_backward_meta);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_meta);
  m.impl("fused_add_rms_norm_backward", &fused_add_rms_norm_backward_meta);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Autograd, m) {
  m.impl("rms_norm", &rms_norm_autograd);
  // The backward has no derivative of its own: double backward raises clearly.
  m.impl("rms_norm_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_autograd);
  m.impl("fused_add_rms_norm_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace my_mps_ops
