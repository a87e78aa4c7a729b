// Launch building for flash attention (shaders/flash_attention.metal): the
// forward, then for the backward the delta rows, the dK/dV kernel and the dQ
// kernel. Threadgroups of s simdgroups own flash_block_rows(s) rows (queries,
// or keys for dK/dV), s = flash_simdgroups(head_dim) unless the pipeline
// allows fewer threads (choose_simdgroups); their threadgroup memory is sized
// by the shared header.
#include "metal/flash_attention.h"

#include <ATen/ops/zeros.h>

#include <algorithm>
#include <limits>
#include <string>
#include <utility>

namespace my_mps_ops::metal {
namespace {

constexpr const char* kFlashAttentionLibrary = "flash_attention";
using shaders::FlashAttentionDeltaShape;
using shaders::FlashAttentionShape;

std::string flash_attention_kernel_name(const char* stem, const at::Tensor& q) {
  return std::string(stem) + "_" + metal_type_name(q.scalar_type()) + "_" + std::to_string(q.size(-1));
}

uint64_t ceil_div(int64_t a, int64_t b) { return static_cast<uint64_t>((a + b - 1) / b); }

// The kernels index elements with 32-bit row counts times head_dim.
void check_sizes(const char* op, const at::Tensor& q, const at::Tensor& k) {
  const int64_t limit = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(q.numel() <= limit && k.numel() <= limit, op,
              ": inputs are too large for the Metal kernels (more than 2^31 elements)");
}

// A window wider than the keys is unbounded: clamped so it fits the kernels' int32.
int32_t window_bound(int64_t w, int64_t kv_len, int64_t q_len) {
  return w < 0 || w > kv_len + q_len ? -1 : static_cast<int32_t>(w);
}

// The grid's extent: sequences, their longest q and k/v lengths, heads.
struct Extent {
  int64_t batch, q_heads, kv_heads, q_len, kv_len;
};
Extent extent_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_q, const FlashAttentionOptions& o) {
  if (cu_q.defined()) return {cu_q.numel() - 1, q.size(0), k.size(0), o.max_q, o.max_k};
  return {q.size(0), q.size(1), k.size(1), q.size(2), k.size(2)};
}

FlashAttentionShape shape_of(const at::Tensor& q, const Extent& e, bool varlen, const at::Tensor& k,
                             const FlashAttentionOptions& o) {
  const uint32_t q_heads = static_cast<uint32_t>(e.q_heads);
  const uint32_t kv_heads = static_cast<uint32_t>(e.kv_heads);
  return FlashAttentionShape{q_heads,
                             kv_heads > 0 ? q_heads / kv_heads : 1u,
                             static_cast<uint32_t>(e.q_len),
                             static_cast<uint32_t>(e.kv_len),
                             window_bound(o.window_left, e.kv_len, e.q_len),
                             window_bound(o.window_right, e.kv_len, e.q_len),
                             static_cast<float>(o.scale),
                             static_cast<float>(o.softcap),
                             o.has_sinks ? 1u : 0u,
                             varlen ? 1u : 0u,
                             static_cast<uint32_t>(varlen ? q.size(1) : e.q_len),
                             static_cast<uint32_t>(varlen ? k.size(1) : e.kv_len)};
}

// The offsets the kernels read: a placeholder for dense inputs (never read).
std::pair<at::Tensor, at::Tensor> offsets_of(const at::Tensor& cu_q, const at::Tensor& cu_k, const at::Tensor& q) {
  if (cu_q.defined()) return {cu_q, cu_k};
  const at::Tensor none = at::zeros({1}, q.options().dtype(at::kInt));
  return {none, none};
}

// How many simdgroups a threadgroup of `launch` has, the launch specialised
// for it: flash_simdgroups(head_dim) when the kernel's pipeline allows that
// many threads, else as many as the pipeline allows, the launch carrying the
// count as the kernels' function constant (flash_attention.h). A GPU may
// allow fewer threads for a kernel with high register use; the specialised
// pipeline is asked again, since its limit may differ.
uint32_t choose_simdgroups(Launch& launch, Executor& executor, uint32_t head_dim) {
  uint32_t simdgroups = shaders::flash_simdgroups(head_dim);
  PipelineInfo info = executor.pipeline_info(launch);
  while (info.max_threads_per_threadgroup < shaders::flash_block_threads(simdgroups)) {
    const uint32_t allowed = info.max_threads_per_threadgroup / shaders::kFlashSimdWidth;
    TORCH_CHECK(allowed >= 1, "my_mps_ops.flash_attention: Metal kernel '", launch.kernel,
                "' needs threadgroups of at least one simdgroup (", shaders::kFlashSimdWidth,
                " threads) but its pipeline allows ", info.max_threads_per_threadgroup, " on this GPU");
    simdgroups = std::min(allowed, simdgroups - 1);
    launch.constants.clear();
    launch.constant(shaders::kFlashSimdgroupsConstant, simdgroups);
    info = executor.pipeline_info(launch);
  }
  return simdgroups;
}

// A grid of (ceil(rows / rows per threadgroup), heads, batch) threadgroups of
// `simdgroups` simdgroups.
void dispatch_row_blocks(Launch& launch, int64_t rows, int64_t heads, int64_t batch, uint32_t simdgroups) {
  launch.dispatch_threadgroups(
      {ceil_div(rows, shaders::flash_block_rows(simdgroups)), uint64_t(heads), uint64_t(batch)},
      {shaders::flash_block_threads(simdgroups), 1, 1});
}

}  // namespace

void flash_attention_forward(const char* op, const FlashAttentionForwardTensors& t, const FlashAttentionOptions& o) {
  check_sizes(op, t.q, t.k);
  const uint32_t d = static_cast<uint32_t>(t.q.size(-1));
  const Extent e = extent_of(t.q, t.k, t.cu_q, o);
  const FlashAttentionShape shape = shape_of(t.q, e, t.cu_q.defined(), t.k, o);
  const auto [cu_q, cu_k] = offsets_of(t.cu_q, t.cu_k, t.q);
  Executor& executor = executor_for(t.q.device());
  Launch launch(kFlashAttentionLibrary, flash_attention_kernel_name("flash_attention_forward", t.q));
  const uint32_t simdgroups = choose_simdgroups(launch, executor, d);
  launch.buffer(t.q).buffer(t.k).buffer(t.v).buffer(t.sinks).buffer(t.out).buffer(t.lse).scalar(shape);
  launch.buffer(cu_q).buffer(cu_k);
  launch.threadgroup_memory(shaders::flash_forward_tile_floats(d, simdgroups) * sizeof(float))
      .threadgroup_memory(simdgroups * shaders::flash_forward_scratch_floats(simdgroups) * sizeof(float));
  dispatch_row_blocks(launch, e.q_len, e.q_heads, e.batch, simdgroups);
  executor.run(launch);
}

void flash_attention_backward(const char* op, const FlashAttentionBackwardTensors& t, const FlashAttentionOptions& o) {
  check_sizes(op, t.q, t.k);
  const uint32_t d = static_cast<uint32_t>(t.q.size(-1));
  const Extent e = extent_of(t.q, t.k, t.cu_q, o);
  const FlashAttentionShape shape = shape_of(t.q, e, t.cu_q.defined(), t.k, o);
  const auto [cu_q, cu_k] = offsets_of(t.cu_q, t.cu_k, t.q);
  Executor& executor = executor_for(t.q.device());

  // delta[row] = rowsum(grad_out * out), one SIMD group (32 threads) per row.
  {
    const std::string kernel = std::string("flash_attention_backward_delta_") + metal_type_name(t.q.scalar_type());
    const PipelineInfo info = executor.pipeline_info(kFlashAttentionLibrary, kernel);
    const FlashAttentionDeltaShape delta_shape{static_cast<uint32_t>(t.delta.numel()), d};
    Launch launch(kFlashAttentionLibrary, kernel);
    launch.buffer(t.grad_out).buffer(t.out).buffer(t.delta).scalar(delta_shape);
    const uint64_t threads = uint64_t(delta_shape.rows) * 32;
    const uint64_t group = std::min<uint64_t>(threads, info.max_threads_per_threadgroup / 32 * 32);
    launch.dispatch_threads({threads, 1, 1}, {group, 1, 1});
    executor.run(launch);
  }
  // dK, dV: one threadgroup per (block of keys, k/v head, batch).
  {
    Launch launch(kFlashAttentionLibrary, flash_attention_kernel_name("flash_attention_backward_kv", t.q));
    const uint32_t simdgroups = choose_simdgroups(launch, executor, d);
    launch.buffer(t.grad_out).buffer(t.q).buffer(t.k).buffer(t.v).buffer(t.lse).buffer(t.delta);
    launch.buffer(t.dk).buffer(t.dv).scalar(shape).buffer(cu_q).buffer(cu_k);
    launch.threadgroup_memory(shaders::flash_backward_kv_stage_floats(d) * sizeof(float))
        .threadgroup_memory(simdgroups * shaders::kFlashBackwardScratchFloats * sizeof(float));
    dispatch_row_blocks(launch, e.kv_len, e.kv_heads, e.batch, simdgroups);
    executor.run(launch);
  }
  // dQ: one threadgroup per (block of queries, q head, batch).
  {
    Launch launch(kFlashAttentionLibrary, flash_attention_kernel_name("flash_attention_backward_q", t.q));
    const uint32_t simdgroups = choose_simdgroups(launch, executor, d);
    launch.buffer(t.grad_out).buffer(t.q).buffer(t.k).buffer(t.v).buffer(t.lse).buffer(t.delta);
    launch.buffer(t.dq).scalar(shape).buffer(cu_q).buffer(cu_k);
    launch.threadgroup_memory(shaders::flash_backward_q_stage_floats(d) * sizeof(float))
        .threadgroup_memory(simdgroups * shaders::kFlashBackwardScratchFloats * sizeof(float));
    dispatch_row_blocks(launch, e.q_len, e.q_heads, e.batch, simdgroups);
    executor.run(launch);
  }
}

}  // namespace my_mps_ops::metal
