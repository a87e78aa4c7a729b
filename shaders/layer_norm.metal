// LayerNorm over the last dimension, forward and backward.
// One threadgroup per row; statistics in float with two passes (mean, then
// the variance of x - mean) for accuracy; SIMD-group then threadgroup sums.
#include <metal_stdlib>
#include "reduce.h"
using namespace metal;

constant constexpr uint N_READS = 4;

// Row statistics (mean, rstd) of x[offset .. offset + n).
template <typename T>
inline float2 row_stats(device const T* x, size_t offset, uint n, float eps, uint tid, uint threads,
                        threadgroup float* partials, uint simd_lane, uint simd_group, uint simd_groups) {
  const uint stride = threads * N_READS;
  float sum = 0.0f;
  for (uint base = tid * N_READS; base < n; base += stride) {
    for (uint k = 0; k < N_READS; ++k) {
      if (base + k < n) sum += float(x[offset + base + k]);
    }
  }
  const float mean = threadgroup_sum(sum, partials, simd_lane, simd_group, simd_groups) / float(n);
  float sq = 0.0f;
  for (uint base = tid * N_READS; base < n; base += stride) {
    for (uint k = 0; k < N_READS; ++k) {
      if (base + k < n) {
        const float d = float(x[offset + base + k]) - mean;
        sq += d * d;
      }
    }
  }
  const float var = threadgroup_sum(sq, partials, simd_lane, simd_group, simd_groups) / float(n);
  return float2(mean, rsqrt(var + eps));
}

// flags: bit 0 has_weight, bit 1 has_bias (unused buffers are bound, unread).
template <typename T>
kernel void layer_norm_forward(
    device const T* x [[buffer(0)]],
    device const T* w [[buffer(1)]],
    device const T* b [[buffer(2)]],
    device T* y [[buffer(3)]],
    constant float& eps [[buffer(4)]],
    constant uint& n [[buffer(5)]],
    constant uint& flags [[buffer(6)]],
    uint row [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]],
    uint simd_lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint simd_groups [[simdgroups_per_threadgroup]]) {
  threadgroup float partials[32];
  const size_t offset = size_t(row) * n;
  const float2 stats = row_stats(x, offset, n, eps, tid, threads, partials, simd_lane, simd_group, simd_groups);
  const bool has_weight = (flags & 1u) != 0, has_bias = (flags & 2u) != 0;
  for (uint base = tid * N_READS; base < n; base += threads * N_READS) {
    for (uint k = 0; k < N_READS; ++k) {
      const uint i = base + k;
      if (i < n) {
        float v = (float(x[offset + i]) - stats.x) * stats.y;
        if (has_weight) v *= float(w[i]);
        if (has_bias) v += float(b[i]);
        y[offset + i] = T(v);
      }
    }
  }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w. Stores the
// row's (mean, rstd) for the weight/bias passes. flags: bit 0 has_weight,
// bit 1 write dx.
template <typename T>
kernel void layer_norm_backward_input(
    device const T* dy [[buffer(0)]],
    device const T* x [[buffer(1)]],
    device const T* w [[buffer(2)]],
    device T* dx [[buffer(3)]],
    device float2* stats_out [[buffer(4)]],
    constant float& eps [[buffer(5)]],
    constant uint& n [[buffer(6)]],
    constant uint& flags [[buffer(7)]],
    uint row [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]],
    uint simd_lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint simd_groups [[simdgroups_per_threadgroup]]) {
  threadgroup float partials[32];
  threadgroup float2 partials2[32];
  const size_t offset = size_t(row) * n;
  const float2 stats = row_stats(x, offset, n, eps, tid, threads, partials, simd_lane, simd_group, simd_groups);
  const bool has_weight = (flags & 1u) != 0, write_dx = (flags & 2u) != 0;
  if (tid == 0) {
    stats_out[row] = stats;
  }
  if (!write_dx) {
    return;
  }
  const uint stride = threads * N_READS;
  float2 acc = float2(0.0f);  // (sum g, sum g * xhat)
  for (uint base = tid * N_READS; base < n; base += stride) {
    for (uint k = 0; k < N_READS; ++k) {
      const uint i = base + k;
      if (i < n) {
        const float g = float(dy[offset + i]) * (has_weight ? float(w[i]) : 1.0f);
        const float xhat = (float(x[offset + i]) - stats.x) * stats.y;
        acc += float2(g, g * xhat);
      }
    }
  }
  const float2 sums = threadgroup_sum2(acc, partials2, simd_lane, simd_group, simd_groups) / float(n);
  for (uint base = tid * N_READS; base < n; base += stride) {
    for (uint k = 0; k < N_READS; ++k) {
      const uint i = base + k;
      if (i < n) {
        const float g = float(dy[offset + i]) * (has_weight ? float(w[i]) : 1.0f);
        const float xhat = (float(x[offset + i]) - stats.x) * stats.y;
        dx[offset + i] = T(stats.y * (g - sums.x - xhat * sums.y));
      }
    }
  }
}

// partial[0, chunk, col] = sum dy * xhat, partial[1, chunk, col] = sum dy over
// the chunk's rows. Non-uniform grid (n, chunks).
template <typename T>
kernel void layer_norm_backward_params_partial(
    device const T* dy [[buffer(0)]],
    device const T* x [[buffer(1)]],
    device const float2* stats [[buffer(2)]],
    device float* partial [[buffer(3)]],
    constant uint& n [[buffer(4)]],
    constant uint& rows [[buffer(5)]],
    constant uint& rows_per_chunk [[buffer(6)]],
    constant uint& chunks [[buffer(7)]],
    uint2 pos [[thread_position_in_grid]]) {
  const uint col = pos.x, chunk = pos.y;
  const uint row_end = min(rows, (chunk + 1) * rows_per_chunk);
  float dw = 0.0f, db = 0.0f;
  for (uint r = chunk * rows_per_chunk; r < row_end; ++r) {
    const size_t i = size_t(r) * n + col;
    const float g = float(dy[i]);
    dw += g * (float(x[i]) - stats[r].x) * stats[r].y;
    db += g;
  }
  partial[size_t(chunk) * n + col] = dw;
  partial[size_t(chunks + chunk) * n + col] = db;
}

template <typename T>
kernel void layer_norm_backward_params_reduce(
    device const float* partial [[buffer(0)]],
    device T* dw [[buffer(1)]],
    device T* db [[buffer(2)]],
    constant uint& n [[buffer(3)]],
    constant uint& chunks [[buffer(4)]],
    constant uint& flags [[buffer(5)]],
    uint col [[thread_position_in_grid]]) {
  float w_acc = 0.0f, b_acc = 0.0f;
  for (uint c = 0; c < chunks; ++c) {
    w_acc += partial[size_t(c) * n + col];
    b_acc += partial[size_t(chunks + c) * n + col];
  }
  if ((flags & 1u) != 0) dw[col] = T(w_acc);
  if ((flags & 2u) != 0) db[col] = T(b_acc);
}

#define INSTANTIATE_LAYER_NORM(T)                                                                       \
  template [[host_name("layer_norm_forward_" #T)]] kernel void layer_norm_forward<T>(                  \
      device const T*, device const T*, device const T*, device T*, constant float&, constant uint&,   \
      constant uint&, uint, uint, uint, uint, uint, uint);                                             \
  template [[host_name("layer_norm_backward_input_" #T)]] kernel void layer_norm_backward_input<T>(    \
      device const T*, device const T*, device const T*, device T*, device float2*, constant float&,   \
      constant uint&, constant uint&, uint, uint, uint, uint, uint, uint);                             \
  template [[host_name("layer_norm_backward_params_partial_" #T)]] kernel void                          \
  layer_norm_backward_params_partial<T>(device const T*, device const T*, device const float2*,        \
                                        device float*, constant uint&, constant uint&, constant uint&, \
                                        constant uint&, uint2);                                        \
  template [[host_name("layer_norm_backward_params_reduce_" #T)]] kernel void                           \
  layer_norm_backward_params_reduce<T>(device const float*, device T*, device T*, constant uint&,      \
                                       constant uint&, constant uint&, uint);

INSTANTIATE_LAYER_NORM(float)
INSTANTIATE_LAYER_NORM(half)
INSTANTIATE_LAYER_NORM(bfloat)
