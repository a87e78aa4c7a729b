// Launch building for quantized_linear's kernels (shaders/quantized.metal):
// the dequantize tiles (one thread per element of the tile) and the fused
// products for a few rows (one SIMD group per kQuantMatvecOutRows output
// features forward, one thread per kQuantMatvecTCols columns of grad_x).
#include "metal/quantized.h"

#include <algorithm>

namespace my_mps_ops::metal {
namespace {

// nf4/fp4 bytes are read as the uint32 words they fill (rows are a multiple
// of 16 bytes: group sizes are multiples of 32).
// nf4/fp4 bytes are read as the uint32 words they fill (rows are a multiple
// of 16 bytes: group sizes are multiples of 32). A view starting inside a
// word (a storage offset not a multiple of 4 bytes) is copied to a fresh,
// word-aligned buffer first.
at::Tensor as_words(const at::Tensor& qweight) {
  if (qweight.scalar_type() == at::kUInt32) return qweight;
  return (qweight.storage_offset() % 4 == 0 ? qweight : qweight.clone()).view(at::kUInt32);
}

// Threads per threadgroup: whole SIMD groups, at most 256, as the pipeline allows.
uint32_t group_width(const PipelineInfo& info) {
  const uint32_t simd = std::max<uint32_t>(info.thread_execution_width, 1);
  const uint32_t cap = std::min<uint32_t>(info.max_threads_per_threadgroup, 256);
  return std::max<uint32_t>(simd, cap / simd * simd);
}

shaders::QuantMatvecParams matvec_params(const char* op, int64_t rows, const at::Tensor& scales, int64_t in_features,
                                         int64_t group_size, int64_t bits, uint32_t mode, bool has_bias) {
  TORCH_CHECK(rows >= 1 && rows <= int64_t(shaders::kQuantMatvecMaxRows), op, ": the fused product takes 1 to ",
              shaders::kQuantMatvecMaxRows, " rows, got ", rows);
  return shaders::QuantMatvecParams{checked_u32(rows, op, "rows"), checked_u32(scales.size(0), op, "out_features"),
                                    checked_u32(in_features, op, "in_features"),
                                    checked_u32(group_size, op, "group_size"), checked_u32(bits, op, "bits"), mode,
                                    has_bias ? 1u : 0u};
}

}  // namespace

void dequantize_rows(const char* op, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& biases,
                     const at::Tensor& out, int64_t row_begin, int64_t group_size, int64_t bits, uint32_t mode) {
  const int64_t rows = out.size(0), cols = out.size(1);
  if (rows == 0 || cols == 0) return;
  const shaders::DequantizeRowsParams p{checked_u32(row_begin, op, "row"), checked_u32(rows, op, "rows"),
                                        checked_u32(cols, op, "in_features"), checked_u32(group_size, op, "group_size"),
                                        checked_u32(bits, op, "bits"), mode};
  Executor& executor = executor_for(out.device());
  Launch launch("quantized", "quantized_dequantize_rows");
  launch.buffer(as_words(qweight)).buffer(scales).buffer(biases).buffer(out).scalar(p);
  const PipelineInfo info = executor.pipeline_info(launch);
  const uint32_t width = std::min<uint32_t>(info.max_threads_per_threadgroup, 256);
  launch.dispatch_threads({uint64_t(cols), uint64_t(rows), 1}, {width, 1, 1});
  executor.run(launch);
}

void quantized_matvec(const char* op, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& biases,
                      const at::Tensor& x, const at::Tensor& bias, const at::Tensor& out, int64_t group_size,
                      int64_t bits, uint32_t mode) {
  const shaders::QuantMatvecParams p =
      matvec_params(op, x.size(0), scales, x.size(1), group_size, bits, mode, bias.defined());
  Executor& executor = executor_for(out.device());
  Launch launch("quantized", "quantized_matvec");
  // Without a bias, any float32 buffer is bound in its place (never read).
  launch.buffer(as_words(qweight)).buffer(scales).buffer(biases).buffer(x).buffer(bias.defined() ? bias : scales)
      .buffer(out).scalar(p);
  const uint64_t simdgroups = (uint64_t(p.out_features) + shaders::kQuantMatvecOutRows - 1) /
                              shaders::kQuantMatvecOutRows;
  launch.dispatch_threads({simdgroups * shaders::kQuantMatvecSimdWidth, 1, 1},
                          {group_width(executor.pipeline_info(launch)), 1, 1});
  executor.run(launch);
}

void quantized_matvec_t(const char* op, const at::Tensor& qweight, const at::Tensor& scales,
                        const at::Tensor& biases, const at::Tensor& grad_out, const at::Tensor& grad_x,
                        int64_t group_size, int64_t bits, uint32_t mode) {
  const shaders::QuantMatvecParams p =
      matvec_params(op, grad_out.size(0), scales, grad_x.size(1), group_size, bits, mode, false);
  Executor& executor = executor_for(grad_x.device());
  Launch launch("quantized", "quantized_matvec_t");
  launch.buffer(as_words(qweight)).buffer(scales).buffer(biases).buffer(grad_out).buffer(grad_x).scalar(p);
  const uint64_t threads = (uint64_t(p.in_features) + shaders::kQuantMatvecTCols - 1) / shaders::kQuantMatvecTCols;
  launch.dispatch_threads({threads, 1, 1}, {group_width(executor.pipeline_info(launch)), 1, 1});
  executor.run(launch);
}

}  // namespace my_mps_ops::metal
