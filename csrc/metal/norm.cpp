// Launch building for the norms (shaders/rms_norm.metal and
// shaders/layer_norm.metal). Row kernels run a threadgroup per few rows; the
// parameter gradients then take one thread per (column, chunk of rows) for
// partial sums, and one per column to add the chunks up (no float atomics).
#include "metal/norm.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <string>

namespace my_mps_ops::metal {
namespace {

using shaders::kNormAddGradResidualOut;
using shaders::kNormHasBias;
using shaders::kNormHasWeight;
using shaders::kNormMaxRowsPerGroup;
using shaders::kNormMinRowGroups;
using shaders::kNormReadsPerThread;
using shaders::kNormWantGradBias;
using shaders::kNormWantGradInput;
using shaders::kNormWantGradWeight;
using shaders::NormColumnParams;
using shaders::NormRowParams;

constexpr const char* kRmsNormLibrary = "rms_norm";
constexpr const char* kLayerNormLibrary = "layer_norm";

// Chunks of rows whose parameter-gradient partial sums are kept apart.
constexpr int64_t kMaxGradChunks = 64;

std::string norm_kernel_name(const char* stem, at::ScalarType dtype) {
  return std::string(stem) + "_" + metal_type_name(dtype);
}

uint32_t flag_if(bool on, uint32_t bit) { return on ? bit : 0u; }

// The buffer bound for a tensor that may be absent: the kernel declares one,
// but its flags keep it from reading or writing an absent tensor's.
const at::Tensor& bound(const at::Tensor& t, const at::Tensor& stand_in) { return t.defined() ? t : stand_in; }

// Threads of a row kernel's threadgroup for rows of `cols` elements.
uint32_t row_threads(const PipelineInfo& info, int64_t cols) {
  return row_threadgroup_size(cols, kNormReadsPerThread, info.max_threads_per_threadgroup,
                              info.thread_execution_width);
}

// Threadgroups of row_threads, each over params.rows_per_group rows.
void run_per_row(Executor& executor, Launch& launch, const NormRows& shape, const NormRowParams& params) {
  const uint64_t groups = (uint64_t(shape.rows) + params.rows_per_group - 1) / params.rows_per_group;
  dispatch_row_threadgroups(launch, executor, groups, shape.cols, kNormReadsPerThread);
  executor.run(launch);
}

// One thread per column (and per chunk of rows, if chunks > 1).
void run_per_column(Executor& executor, Launch& launch, const NormRows& shape, int64_t chunks) {
  const PipelineInfo info = executor.pipeline_info(launch.library, launch.kernel);
  const uint64_t group_x = std::min<uint64_t>(info.max_threads_per_threadgroup, uint64_t(shape.cols));
  launch.dispatch_threads({uint64_t(shape.cols), uint64_t(chunks), 1}, {group_x, 1, 1});
  executor.run(launch);
}

// The shaders index rows with 32-bit numbers, hence the check of rows.
NormRowParams row_params(const char* op, const NormRows& shape, double eps, uint32_t flags) {
  const uint32_t rows = checked_u32(shape.rows, op, "rows");
  const uint32_t per_group = std::clamp<uint32_t>(rows / kNormMinRowGroups, 1, kNormMaxRowsPerGroup);
  return {static_cast<float>(eps), checked_u32(shape.cols, op, "row length"), flags, rows, per_group};
}

// The chunks of rows of the parameter-gradient kernels.
NormColumnParams column_params(const char* op, const NormRows& shape, uint32_t flags) {
  const int64_t chunks = std::min<int64_t>(shape.rows, kMaxGradChunks);
  return {checked_u32(shape.cols, op, "row length"), checked_u32(shape.rows, op, "rows"),
          static_cast<uint32_t>((shape.rows + chunks - 1) / chunks), static_cast<uint32_t>(chunks), flags};
}

// Whether rms_norm_forward (one pass: each thread keeps its
// kNormReadsPerThread elements in registers) covers a row of `cols`
// elements with the threads it is launched with; longer rows take
// rms_norm_forward_looped, which reads the row twice.
bool rms_norm_row_fits_one_pass(const PipelineInfo& one_pass, int64_t cols) {
  return int64_t(row_threads(one_pass, cols)) * kNormReadsPerThread >= cols;
}

}  // namespace

void rms_norm_forward(const char* op, const RmsNormForwardTensors& t, const NormRows& shape, double eps) {
  Executor& executor = executor_for(t.input.device());
  const at::ScalarType dtype = t.input.scalar_type();
  const bool fused = t.residual.defined();
  const NormRowParams params = row_params(op, shape, eps, flag_if(t.weight.defined(), kNormHasWeight));
  const at::Tensor& weight = bound(t.weight, t.input);
  if (fused) {
    Launch launch(kRmsNormLibrary, norm_kernel_name("fused_add_rms_norm_forward", dtype));
    launch.buffer(t.input).buffer(t.residual).buffer(weight).buffer(t.out).buffer(t.residual_out).scalar(params);
    return run_per_row(executor, launch, shape, params);
  }
  const std::string one_pass = norm_kernel_name("rms_norm_forward", dtype);
  const bool fits = rms_norm_row_fits_one_pass(executor.pipeline_info(kRmsNormLibrary, one_pass), shape.cols);
  Launch launch(kRmsNormLibrary, fits ? one_pass : norm_kernel_name("rms_norm_forward_looped", dtype));
  launch.buffer(t.input).buffer(weight).buffer(t.out).scalar(params);
  run_per_row(executor, launch, shape, params);
}

void rms_norm_backward(const char* op, const RmsNormBackwardTensors& t, const NormRows& shape, double eps) {
  Executor& executor = executor_for(t.input.device());
  const at::ScalarType dtype = t.input.scalar_type();
  // Grad input (when wanted) and each row's rstd, which the grad_weight kernels reuse.
  at::Tensor rstd = at::empty({shape.rows}, t.input.options().dtype(at::kFloat));
  {
    const uint32_t flags = flag_if(t.weight.defined(), kNormHasWeight) |
                           flag_if(t.grad_input.defined(), kNormWantGradInput) |
                           flag_if(t.grad_residual_out.defined(), kNormAddGradResidualOut);
    const NormRowParams params = row_params(op, shape, eps, flags);
    Launch launch(kRmsNormLibrary, norm_kernel_name("rms_norm_backward_input", dtype));
    launch.buffer(t.grad_out)
        .buffer(t.input)
        .buffer(bound(t.weight, t.input))
        .buffer(bound(t.grad_residual_out, t.input))
        .buffer(bound(t.grad_input, t.input))
        .buffer(rstd)
        .scalar(params);
    run_per_row(executor, launch, shape, params);
  }
  if (!t.grad_weight.defined()) return;

  const NormColumnParams columns = column_params(op, shape, kNormWantGradWeight);
  at::Tensor partial = at::empty({int64_t(columns.chunks), shape.cols}, t.input.options().dtype(at::kFloat));
  {
    Launch launch(kRmsNormLibrary, norm_kernel_name("rms_norm_backward_weight_partial", dtype));
    launch.buffer(t.grad_out).buffer(t.input).buffer(rstd).buffer(partial).scalar(columns);
    run_per_column(executor, launch, shape, columns.chunks);
  }
  {
    // Written in grad_weight's dtype: float32 for a float32 weight of a narrow input.
    Launch launch(kRmsNormLibrary, norm_kernel_name("rms_norm_backward_weight_reduce", t.grad_weight.scalar_type()));
    launch.buffer(partial).buffer(t.grad_weight).scalar(columns);
    run_per_column(executor, launch, shape, 1);
  }
}

void layer_norm_forward(const char* op, const LayerNormForwardTensors& t, const NormRows& shape, double eps) {
  Executor& executor = executor_for(t.input.device());
  const uint32_t flags = flag_if(t.weight.defined(), kNormHasWeight) | flag_if(t.bias.defined(), kNormHasBias);
  const NormRowParams params = row_params(op, shape, eps, flags);
  Launch launch(kLayerNormLibrary, norm_kernel_name("layer_norm_forward", t.input.scalar_type()));
  launch.buffer(t.input)
      .buffer(bound(t.weight, t.input))
      .buffer(bound(t.bias, t.input))
      .buffer(t.out)
      .scalar(params);
  run_per_row(executor, launch, shape, params);
}

void layer_norm_backward(const char* op, const LayerNormBackwardTensors& t, const NormRows& shape, double eps) {
  Executor& executor = executor_for(t.input.device());
  const at::ScalarType dtype = t.input.scalar_type();
  // Grad input (when wanted) and each row's (mean, rstd), which the parameter kernels reuse.
  at::Tensor stats = at::empty({shape.rows, 2}, t.input.options().dtype(at::kFloat));
  {
    const uint32_t flags =
        flag_if(t.weight.defined(), kNormHasWeight) | flag_if(t.grad_input.defined(), kNormWantGradInput);
    const NormRowParams params = row_params(op, shape, eps, flags);
    Launch launch(kLayerNormLibrary, norm_kernel_name("layer_norm_backward_input", dtype));
    launch.buffer(t.grad_out)
        .buffer(t.input)
        .buffer(bound(t.weight, t.input))
        .buffer(bound(t.grad_input, t.input))
        .buffer(stats)
        .scalar(params);
    run_per_row(executor, launch, shape, params);
  }
  const bool want_weight = t.grad_weight.defined(), want_bias = t.grad_bias.defined();
  if (!want_weight && !want_bias) return;

  const NormColumnParams columns = column_params(
      op, shape, flag_if(want_weight, kNormWantGradWeight) | flag_if(want_bias, kNormWantGradBias));
  at::Tensor partial = at::empty({2, int64_t(columns.chunks), shape.cols}, t.input.options().dtype(at::kFloat));
  {
    Launch launch(kLayerNormLibrary, norm_kernel_name("layer_norm_backward_params_partial", dtype));
    launch.buffer(t.grad_out).buffer(t.input).buffer(stats).buffer(partial).scalar(columns);
    run_per_column(executor, launch, shape, columns.chunks);
  }
  {
    // Written in the parameters' dtype (float32 for float32 parameters of a narrow input).
    const at::ScalarType grad_dtype = (want_weight ? t.grad_weight : t.grad_bias).scalar_type();
    Launch launch(kLayerNormLibrary, norm_kernel_name("layer_norm_backward_params_reduce", grad_dtype));
    launch.buffer(partial)
        .buffer(bound(t.grad_weight, partial))
        .buffer(bound(t.grad_bias, partial))
        .scalar(columns);
    run_per_column(executor, launch, shape, 1);
  }
}

}  // namespace my_mps_ops::metal
