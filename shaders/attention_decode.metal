// flash_attention_decode: a few query rows per sequence against a long KV
// cache, split over the key length (split-K) so that one sequence fills the
// GPU, then a combine pass.
//
// attention_decode_partial: one threadgroup per (chunk of keys, kv head and
// block of kDecodeRows of its group's query rows, batch). The group's q
// heads share each read of K and V (GQA without repeating them). Per block
// of kDecodeKeys keys: the scores (a SIMD group per key, for every row),
// an online-softmax update (one thread per row), then the accumulators (one
// thread per (row, column), reading V rows coalesced). It leaves per row the
// chunk's max, sum of exponentials and unnormalised output, in float.
// Cache rows past seqlens[b] are never read.
//
// attention_decode_combine: one thread per output element, weighing each
// chunk by exp(its max - lse).
#include <metal_stdlib>
#include "attention_decode.h"
using namespace metal;

// Query i's visible keys [lo, hi) in a sequence of `len` valid rows.
inline uint2 decode_visible(constant AttentionDecodeShape& shape, uint len, uint i) {
  const int a = int(i) + int(len) - int(shape.q_len);
  const int hi = shape.causal != 0 ? clamp(a + 1, 0, int(len)) : int(len);
  const int lo = shape.window_left < 0 ? 0 : clamp(a - shape.window_left, 0, int(len));
  return uint2(uint(lo), uint(max(lo, hi)));
}

template <typename T, uint D>
kernel void attention_decode_partial(
    device const T* q [[buffer(0)]],
    device const T* k [[buffer(1)]],
    device const T* v [[buffer(2)]],
    device const int* seqlens [[buffer(3)]],
    device float* part_max [[buffer(4)]],
    device float* part_sum [[buffer(5)]],
    device float* part_out [[buffer(6)]],
    constant AttentionDecodeShape& shape [[buffer(7)]],
    threadgroup float* q_tile [[threadgroup(0)]],
    threadgroup float* acc [[threadgroup(1)]],
    threadgroup float* scratch [[threadgroup(2)]],
    uint3 block [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr uint RB = kDecodeRows, BK = kDecodeKeys;
  static_assert(RB <= kDecodeSimdWidth, "a lane writes each row's score");
  const float neg_inf = -INFINITY;
  const uint threads = shape.threads, simdgroups = threads / kDecodeSimdWidth;
  const uint R = shape.group * shape.q_len;
  const uint row_blocks = (R + RB - 1) / RB;
  const uint split = block.x, kv_h = block.y / row_blocks, r0 = (block.y % row_blocks) * RB, b = block.z;
  const uint rows = min(RB, R - r0);
  const uint bh = b * shape.kv_heads + kv_h;
  const uint len = uint(clamp(seqlens[b], 0, int(shape.cache_len)));
  threadgroup float* scores = scratch;
  threadgroup float* row_max = scratch + RB * BK;
  threadgroup float* row_sum = row_max + RB;
  threadgroup float* correction = row_sum + RB;

  // The scaled query rows (zero past the group's rows), zeroed accumulators.
  device const T* q_rows = q + (size_t(bh) * R + r0) * D;
  for (uint e = tid; e < RB * D; e += threads) {
    q_tile[e] = e / D < rows ? float(q_rows[e]) * shape.scale : 0.0f;
    acc[e] = 0.0f;
  }
  for (uint r = tid; r < RB; r += threads) {
    row_max[r] = neg_inf;
    row_sum[r] = 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // This chunk's keys that some query of the sequence sees.
  const uint first = decode_visible(shape, len, 0).x, last = decode_visible(shape, len, shape.q_len - 1).y;
  const uint c0 = max(split * shape.chunk, first);
  const uint c1 = min(split * shape.chunk + shape.chunk, last);
  device const T* k_head = k + size_t(b) * shape.k_batch_stride + size_t(kv_h) * shape.k_head_stride;
  device const T* v_head = v + size_t(b) * shape.v_batch_stride + size_t(kv_h) * shape.v_head_stride;
  for (uint j0 = c0; j0 < c1; j0 += BK) {
    const uint keys = min(BK, c1 - j0);
    // Scores: a SIMD group per key, its lanes along head_dim (each K row read
    // once, coalesced, for all the block's rows), summed across the group.
    for (uint j = sg; j < BK; j += simdgroups) {
      float dots[RB];
      for (uint r = 0; r < RB; ++r) dots[r] = 0.0f;
      if (j < keys) {
        device const T* k_row = k_head + size_t(j0 + j) * D;
        for (uint c = lane; c < D; c += kDecodeSimdWidth) {
          const float kc = float(k_row[c]);
          for (uint r = 0; r < RB; ++r) dots[r] += q_tile[r * D + c] * kc;
        }
      }
      for (uint r = 0; r < RB; ++r) {
        const float dot = simd_sum(dots[r]);
        if (lane == r) {
          const uint2 seen = decode_visible(shape, len, (r0 + r) % shape.q_len);
          const uint key = j0 + j;
          const bool visible = r < rows && j < keys && key >= seen.x && key < seen.y;
          scores[r * BK + j] =
              !visible ? neg_inf : (shape.softcap > 0.0f ? shape.softcap * tanh(dot / shape.softcap) : dot);
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint r = tid; r < RB; r += threads) {
      float block_max = neg_inf;
      for (uint j = 0; j < BK; ++j) block_max = max(block_max, scores[r * BK + j]);
      const float old_max = row_max[r], new_max = max(old_max, block_max);
      // Nothing seen yet: no correction, every probability 0.
      const float corr = new_max == neg_inf ? 1.0f : exp(old_max - new_max);
      float sum = 0.0f;
      for (uint j = 0; j < BK; ++j) {
        const float s = scores[r * BK + j];
        const float p = s == neg_inf ? 0.0f : exp(s - new_max);
        scores[r * BK + j] = p;
        sum += p;
      }
      row_sum[r] = row_sum[r] * corr + sum;
      row_max[r] = new_max;
      correction[r] = corr;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint e = tid; e < rows * D; e += threads) {
      const uint r = e / D, c = e % D;
      float a = acc[e] * correction[r];
      for (uint j = 0; j < keys; ++j) {
        const float p = scores[r * BK + j];
        if (p != 0.0f) a += p * float(v_head[size_t(j0 + j) * D + c]);
      }
      acc[e] = a;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the scores are rewritten next
  }

  const size_t p0 = (size_t(bh) * shape.splits + split) * R + r0;
  for (uint e = tid; e < rows * D; e += threads) part_out[p0 * D + e] = acc[e];
  for (uint r = tid; r < rows; r += threads) {
    part_max[p0 + r] = row_max[r];
    part_sum[p0 + r] = row_sum[r];
  }
}

template <typename T, uint D>
kernel void attention_decode_combine(
    device const float* part_max [[buffer(0)]],
    device const float* part_sum [[buffer(1)]],
    device const float* part_out [[buffer(2)]],
    device const float* sinks [[buffer(3)]],
    device T* out [[buffer(4)]],
    device float* lse [[buffer(5)]],
    constant AttentionDecodeShape& shape [[buffer(6)]],
    uint gid [[thread_position_in_grid]]) {
  const float neg_inf = -INFINITY;
  const uint R = shape.group * shape.q_len;
  const uint row = gid / D, c = gid % D;
  if (row >= shape.batch * shape.kv_heads * R) {
    return;
  }
  const uint bh = row / R, r = row % R;
  const size_t p0 = size_t(bh) * shape.splits * R + r;
  float m = neg_inf;
  for (uint s = 0; s < shape.splits; ++s) m = max(m, part_max[p0 + s * R]);
  float total = 0.0f;
  if (m != neg_inf) {
    for (uint s = 0; s < shape.splits; ++s) {
      const float pm = part_max[p0 + s * R];
      if (pm != neg_inf) total += part_sum[p0 + s * R] * exp(pm - m);
    }
  }
  float row_lse = total > 0.0f ? m + log(total) : neg_inf;
  if (shape.has_sinks != 0) {
    const float sink = sinks[(bh % shape.kv_heads) * shape.group + r / shape.q_len];
    const float top = max(row_lse, sink);
    row_lse = top == neg_inf ? neg_inf : top + log(exp(row_lse - top) + exp(sink - top));
  }
  float o = 0.0f;
  if (total > 0.0f) {
    for (uint s = 0; s < shape.splits; ++s) {
      const float pm = part_max[p0 + s * R];
      if (pm != neg_inf) o += exp(pm - row_lse) * part_out[(p0 + s * R) * D + c];
    }
  }
  out[size_t(row) * D + c] = T(o);
  if (c == 0) {
    lse[row] = row_lse;
  }
}

#define INSTANTIATE_ATTENTION_DECODE(T, D)                             \
  MY_MPS_OPS_INSTANTIATE_KERNEL2(attention_decode_partial, T, D) \
  MY_MPS_OPS_INSTANTIATE_KERNEL2(attention_decode_combine, T, D)

#define INSTANTIATE_ATTENTION_DECODE_TYPE(T) \
  INSTANTIATE_ATTENTION_DECODE(T, 32)        \
  INSTANTIATE_ATTENTION_DECODE(T, 64)        \
  INSTANTIATE_ATTENTION_DECODE(T, 80)        \
  INSTANTIATE_ATTENTION_DECODE(T, 96)        \
  INSTANTIATE_ATTENTION_DECODE(T, 128)       \
  INSTANTIATE_ATTENTION_DECODE(T, 256)

INSTANTIATE_ATTENTION_DECODE_TYPE(float)
INSTANTIATE_ATTENTION_DECODE_TYPE(half)
INSTANTIATE_ATTENTION_DECODE_TYPE(bfloat)
