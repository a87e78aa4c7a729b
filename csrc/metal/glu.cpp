// Launch building for the gated activations (shaders/glu.metal): one thread
// per kGluColumnsPerThread columns of a row (a grid width apart), on a 2-D
// grid of rows x column groups.
#include "metal/glu.h"

#include <algorithm>
#include <string>

namespace my_mps_ops::metal {
namespace {

constexpr const char* kGluLibrary = "glu";
using shaders::GluShape;
using shaders::kGluColumnsPerThread;

// Grid (ceil(cols / kGluColumnsPerThread), rows); threadgroups of up to 256
// threads (fewer if the pipeline allows fewer), widest along the row.
void dispatch_rows(Launch& launch, Executor& executor, uint64_t rows, uint64_t cols) {
  const PipelineInfo info = executor.pipeline_info(launch.library, launch.kernel);
  const uint64_t limit = std::min<uint64_t>(info.max_threads_per_threadgroup, 256);
  const uint64_t threads_x = (cols + kGluColumnsPerThread - 1) / kGluColumnsPerThread;
  const uint64_t group_x = std::min(limit, threads_x);
  const uint64_t group_y = std::min<uint64_t>(rows, std::max<uint64_t>(1, limit / group_x));
  launch.dispatch_threads({threads_x, rows, 1}, {group_x, group_y, 1});
}

std::string glu_kernel_name(const char* stem, const char* direction, const at::Tensor& t) {
  return std::string(stem) + direction + metal_type_name(t.scalar_type());
}

}  // namespace

void glu_forward(const char* op, const char* kernel_stem, uint32_t approximate, const GluForwardTensors& t) {
  const GluShape shape{checked_u32(t.gate_rows.rows, op, "rows"), checked_u32(t.gate_rows.cols, op, "row length"),
                       checked_u32(t.gate_rows.row_stride, op, "gate row stride"),
                       checked_u32(t.up_rows.row_stride, op, "up row stride"), 0, approximate};
  Executor& executor = executor_for(t.gate.device());
  Launch launch(kGluLibrary, glu_kernel_name(kernel_stem, "_forward_", t.gate));
  launch.buffer(t.gate).buffer(t.up).buffer(t.out).scalar(shape);
  dispatch_rows(launch, executor, shape.rows, shape.cols);
  executor.run(launch);
}

void glu_backward(const char* op, const char* kernel_stem, uint32_t approximate, const GluBackwardTensors& t) {
  const GluShape shape{checked_u32(t.gate_rows.rows, op, "rows"), checked_u32(t.gate_rows.cols, op, "row length"),
                       checked_u32(t.gate_rows.row_stride, op, "gate row stride"),
                       checked_u32(t.up_rows.row_stride, op, "up row stride"),
                       checked_u32(t.grad_out_rows.row_stride, op, "grad_out row stride"), approximate};
  Executor& executor = executor_for(t.gate.device());
  Launch launch(kGluLibrary, glu_kernel_name(kernel_stem, "_backward_", t.gate));
  launch.buffer(t.grad_out).buffer(t.gate).buffer(t.up).buffer(t.grad_gate).buffer(t.grad_up).scalar(shape);
  dispatch_rows(launch, executor, shape.rows, shape.cols);
  executor.run(launch);
}

}  // namespace my_mps_ops::metal
