// Launch building for flash attention (shaders/flash_attention.metal): the
// forward, then for the backward the delta rows, the dK/dV kernel and the dQ
// kernel. Threadgroups own flash_rows(head_dim) rows (queries, or keys for
// dK/dV) and their threadgroup memory is sized by the shared header.
#include "metal/flash_attention.h"

#include <algorithm>
#include <limits>
#include <string>

namespace my_mps_ops::metal {
namespace {

constexpr const char* kFlashAttentionLibrary = "flash_attention";
using shaders::FlashAttentionDeltaShape;
using shaders::FlashAttentionShape;

std::string flash_attention_kernel_name(const char* stem, const at::Tensor& q) {
  return std::string(stem) + "_" + metal_type_name(q.scalar_type()) + "_" + std::to_string(q.size(3));
}

uint64_t ceil_div(int64_t a, int64_t b) { return static_cast<uint64_t>((a + b - 1) / b); }

// The kernels index elements with 32-bit row counts times head_dim.
void check_sizes(const char* op, const at::Tensor& q, const at::Tensor& k) {
  const int64_t limit = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(q.numel() <= limit && k.numel() <= limit, op,
              ": inputs are too large for the Metal kernels (more than 2^31 elements)");
}

FlashAttentionShape shape_of(const at::Tensor& q, const at::Tensor& k, bool causal, double scale) {
  const uint32_t q_heads = static_cast<uint32_t>(q.size(1));
  const uint32_t kv_heads = static_cast<uint32_t>(k.size(1));
  return FlashAttentionShape{q_heads, kv_heads > 0 ? q_heads / kv_heads : 1u, static_cast<uint32_t>(q.size(2)),
                             static_cast<uint32_t>(k.size(2)), causal ? 1u : 0u, static_cast<float>(scale)};
}

// A grid of (ceil(rows / flash_rows(d)), heads, batch) threadgroups of
// flash_threads(d) threads. The tiles are built around that many simdgroups,
// so a pipeline that allows fewer threads (high register use) cannot run the
// kernel: say so, naming the kernel, rather than launching an invalid grid.
void dispatch_row_blocks(Launch& launch, Executor& executor, int64_t rows, int64_t heads, int64_t batch,
                         uint32_t head_dim) {
  const uint32_t threads = shaders::flash_threads(head_dim);
  const PipelineInfo info = executor.pipeline_info(launch.library, launch.kernel);
  TORCH_CHECK(info.max_threads_per_threadgroup >= threads, "my_mps_ops.flash_attention: Metal kernel '",
              launch.kernel, "' needs threadgroups of ", threads, " threads but its pipeline allows ",
              info.max_threads_per_threadgroup, " on this GPU");
  launch.dispatch_threadgroups({ceil_div(rows, shaders::flash_rows(head_dim)), uint64_t(heads), uint64_t(batch)},
                               {threads, 1, 1});
}

}  // namespace

void flash_attention_forward(const char* op, const FlashAttentionForwardTensors& t, bool causal, double scale) {
  check_sizes(op, t.q, t.k);
  const uint32_t d = static_cast<uint32_t>(t.q.size(3));
  const FlashAttentionShape shape = shape_of(t.q, t.k, causal, scale);
  Executor& executor = executor_for(t.q.device());
  Launch launch(kFlashAttentionLibrary, flash_attention_kernel_name("flash_attention_forward", t.q));
  launch.buffer(t.q).buffer(t.k).buffer(t.v).buffer(t.out).buffer(t.lse).scalar(shape);
  launch.threadgroup_memory(shaders::flash_forward_tile_floats(d) * sizeof(float))
      .threadgroup_memory(shaders::flash_simdgroups(d) * shaders::flash_forward_scratch_floats(d) * sizeof(float));
  dispatch_row_blocks(launch, executor, t.q.size(2), t.q.size(1), t.q.size(0), d);
  executor.run(launch);
}

void flash_attention_backward(const char* op, const FlashAttentionBackwardTensors& t, bool causal, double scale) {
  check_sizes(op, t.q, t.k);
  const uint32_t d = static_cast<uint32_t>(t.q.size(3));
  const FlashAttentionShape shape = shape_of(t.q, t.k, causal, scale);
  const size_t scratch_bytes = shaders::flash_simdgroups(d) * shaders::kFlashBackwardScratchFloats * sizeof(float);
  Executor& executor = executor_for(t.q.device());

  // delta[row] = rowsum(grad_out * out), one thread per row.
  {
    const std::string kernel = std::string("flash_attention_backward_delta_") + metal_type_name(t.q.scalar_type());
    const PipelineInfo info = executor.pipeline_info(kFlashAttentionLibrary, kernel);
    const FlashAttentionDeltaShape delta_shape{static_cast<uint32_t>(t.delta.numel()), d};
    Launch launch(kFlashAttentionLibrary, kernel);
    launch.buffer(t.grad_out).buffer(t.out).buffer(t.delta).scalar(delta_shape);
    launch.dispatch_threads({delta_shape.rows, 1, 1},
                            {std::min<uint64_t>(delta_shape.rows, info.max_threads_per_threadgroup), 1, 1});
    executor.run(launch);
  }
  // dK, dV: one threadgroup per (block of keys, k/v head, batch).
  {
    Launch launch(kFlashAttentionLibrary, flash_attention_kernel_name("flash_attention_backward_kv", t.q));
    launch.buffer(t.grad_out).buffer(t.q).buffer(t.k).buffer(t.v).buffer(t.lse).buffer(t.delta);
    launch.buffer(t.dk).buffer(t.dv).scalar(shape);
    launch.threadgroup_memory(shaders::flash_backward_kv_stage_floats(d) * sizeof(float))
        .threadgroup_memory(scratch_bytes);
    dispatch_row_blocks(launch, executor, t.k.size(2), t.k.size(1), t.k.size(0), d);
    executor.run(launch);
  }
  // dQ: one threadgroup per (block of queries, q head, batch).
  {
    Launch launch(kFlashAttentionLibrary, flash_attention_kernel_name("flash_attention_backward_q", t.q));
    launch.buffer(t.grad_out).buffer(t.q).buffer(t.k).buffer(t.v).buffer(t.lse).buffer(t.delta);
    launch.buffer(t.dq).scalar(shape);
    launch.threadgroup_memory(shaders::flash_backward_q_stage_floats(d) * sizeof(float))
        .threadgroup_memory(scratch_bytes);
    dispatch_row_blocks(launch, executor, t.q.size(2), t.q.size(1), t.q.size(0), d);
    executor.run(launch);
  }
}

}  // namespace my_mps_ops::metal
