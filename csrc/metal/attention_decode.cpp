// Launch building for flash_attention_decode (shaders/attention_decode.metal):
// the split-K partial kernel, then the combine kernel. The host cannot read
// cache_seqlens without waiting for the GPU, so the chunks cut the whole
// cache length; chunks past a sequence's length exit at once.
#include "metal/attention_decode.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <limits>
#include <string>

namespace my_mps_ops::metal {
namespace {

constexpr const char* kAttentionDecodeLibrary = "attention_decode";
// About this many partial threadgroups fill a large Apple GPU several times
// over; chunks never shorter than a key block nor more than kMaxSplits.
constexpr int64_t kTargetThreadgroups = 512;
constexpr int64_t kMaxSplits = 256;

std::string decode_kernel_name(const char* stem, const at::Tensor& q) {
  return std::string(stem) + "_" + metal_type_name(q.scalar_type()) + "_" + std::to_string(q.size(3));
}

}  // namespace

void attention_decode(const char* op, const AttentionDecodeTensors& t, const AttentionDecodeOptions& o) {
  using shaders::kDecodeKeys;
  using shaders::kDecodeRows;
  const int64_t batch = t.q.size(0), kv_heads = t.k_cache.size(1), group = t.q.size(1) / kv_heads;
  const int64_t q_len = t.q.size(2), d = t.q.size(3), cache_len = t.k_cache.size(2);
  const int64_t rows = group * q_len, row_blocks = (rows + kDecodeRows - 1) / kDecodeRows;
  const int64_t limit = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(t.q.numel() <= limit && t.k_cache.numel() <= limit && t.v_cache.numel() <= limit, op,
              ": inputs are too large for the Metal kernels (more than 2^31 elements)");

  const int64_t tiles = std::max<int64_t>(1, batch * kv_heads * row_blocks);
  const int64_t wanted = std::max<int64_t>(1, kTargetThreadgroups / tiles);
  int64_t chunk = std::max<int64_t>(kDecodeKeys, (cache_len + wanted - 1) / wanted);
  chunk = (chunk + kDecodeKeys - 1) / kDecodeKeys * kDecodeKeys;
  chunk = std::max(chunk, (cache_len + kMaxSplits - 1) / kMaxSplits);
  const int64_t splits = (cache_len + chunk - 1) / chunk;

  Executor& executor = executor_for(t.q.device());
  Launch partial(kAttentionDecodeLibrary, decode_kernel_name("attention_decode_partial", t.q));
  const PipelineInfo info = executor.pipeline_info(partial);
  // Threads: whole SIMD groups, up to 256 (8 SIMD groups over a block's 32
  // keys; 8 x 32 rows x columns per pass of the accumulators), as the pipeline allows.
  const uint32_t threads =
      std::min<uint32_t>(256, info.max_threads_per_threadgroup / shaders::kDecodeSimdWidth * shaders::kDecodeSimdWidth);
  TORCH_CHECK(threads >= shaders::kDecodeSimdWidth, op, ": Metal kernel '", partial.kernel,
              "' needs threadgroups of at least one SIMD group (", shaders::kDecodeSimdWidth,
              " threads) but its pipeline allows ", info.max_threads_per_threadgroup);

  const shaders::AttentionDecodeShape shape{
      checked_u32(batch, op, "batch"),
      checked_u32(kv_heads, op, "kv_heads"),
      checked_u32(group, op, "group"),
      checked_u32(q_len, op, "q_len"),
      checked_u32(cache_len, op, "cache_len"),
      checked_u32(t.k_cache.stride(0), op, "k_cache batch stride"),
      checked_u32(t.k_cache.stride(1), op, "k_cache head stride"),
      checked_u32(t.v_cache.stride(0), op, "v_cache batch stride"),
      checked_u32(t.v_cache.stride(1), op, "v_cache head stride"),
      static_cast<uint32_t>(splits),
      static_cast<uint32_t>(chunk),
      threads,
      o.causal ? 1u : 0u,
      o.window_left < 0 || o.window_left > limit ? -1 : static_cast<int32_t>(o.window_left),
      static_cast<float>(o.scale),
      static_cast<float>(o.softcap),
      o.has_sinks ? 1u : 0u};

  const auto f32 = t.q.options().dtype(at::kFloat);
  const at::Tensor part_max = at::empty({batch * kv_heads * splits * rows}, f32);
  const at::Tensor part_sum = at::empty({batch * kv_heads * splits * rows}, f32);
  const at::Tensor part_out = at::empty({batch * kv_heads * splits * rows * d}, f32);

  partial.buffer(t.q).buffer(t.k_cache).buffer(t.v_cache).buffer(t.seqlens);
  partial.buffer(part_max).buffer(part_sum).buffer(part_out).scalar(shape);
  partial.threadgroup_memory(shaders::decode_row_tile_floats(uint32_t(d)) * sizeof(float))
      .threadgroup_memory(shaders::decode_row_tile_floats(uint32_t(d)) * sizeof(float))
      .threadgroup_memory(shaders::kDecodeScratchFloats * sizeof(float));
  partial.dispatch_threadgroups({uint64_t(splits), uint64_t(kv_heads * row_blocks), uint64_t(batch)},
                                {threads, 1, 1});
  executor.run(partial);

  Launch combine(kAttentionDecodeLibrary, decode_kernel_name("attention_decode_combine", t.q));
  const PipelineInfo combine_info = executor.pipeline_info(combine);
  const uint64_t elements = uint64_t(t.out.numel());
  const uint64_t group_threads = std::min<uint64_t>(
      elements, std::max<uint32_t>(1, combine_info.max_threads_per_threadgroup / combine_info.thread_execution_width *
                                          combine_info.thread_execution_width));
  combine.buffer(part_max).buffer(part_sum).buffer(part_out).buffer(t.sinks).buffer(t.out).buffer(t.lse).scalar(shape);
  combine.dispatch_threads({elements, 1, 1}, {group_threads, 1, 1});
  executor.run(combine);
}

}  // namespace my_mps_ops::metal
