// Launch building for quantized_linear's dequantize tiles
// (shaders/quantized.metal): one thread per element of the tile.
#include "metal/quantized.h"

#include <algorithm>

namespace my_mps_ops::metal {

void dequantize_rows(const char* op, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& biases,
                     const at::Tensor& out, int64_t row_begin, int64_t group_size, int64_t bits, uint32_t mode) {
  const int64_t rows = out.size(0), cols = out.size(1);
  if (rows == 0 || cols == 0) return;
  const shaders::DequantizeRowsParams p{checked_u32(row_begin, op, "row"), checked_u32(rows, op, "rows"),
                                        checked_u32(cols, op, "in_features"), checked_u32(group_size, op, "group_size"),
                                        checked_u32(bits, op, "bits"), mode};
  Executor& executor = executor_for(out.device());
  Launch launch("quantized", "quantized_dequantize_rows");
  // nf4/fp4 bytes are read as the uint32 words they fill (rows are a multiple
  // of 16 bytes: group sizes are multiples of 32). A view starting inside a
  // word (a storage offset not a multiple of 4 bytes) is copied to a fresh,
  // word-aligned buffer first.
  at::Tensor words = qweight;
  if (qweight.scalar_type() != at::kUInt32) {
    words = (qweight.storage_offset() % 4 == 0 ? qweight : qweight.clone()).view(at::kUInt32);
  }
  launch.buffer(words)
      .buffer(scales).buffer(biases).buffer(out).scalar(p);
  const PipelineInfo info = executor.pipeline_info(launch);
  const uint32_t width = std::min<uint32_t>(info.max_threads_per_threadgroup, 256);
  launch.dispatch_threads({uint64_t(cols), uint64_t(rows), 1}, {width, 1, 1});
  executor.run(launch);
}

}  // namespace my_mps_ops::metal
