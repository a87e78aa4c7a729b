// LayerNorm over the last dimension, forward and backward.
// One threadgroup per row; statistics in float with two passes (mean, shifted
// by the row's first element, then the variance of x - mean) for accuracy;
// SIMD-group then threadgroup sums.
#include <metal_stdlib>
#include "norm.h"
#include "reduce.h"
using namespace metal;

// Row statistics (mean, rstd) of x[offset .. offset + n).
template <typename T>
inline float2 row_stats(device const T* x, size_t offset, uint n, float eps, uint tid, uint threads,
                        threadgroup float* partials, uint simd_lane, uint simd_group, uint simd_groups) {
  const uint stride = threads * kNormReadsPerThread;
  // The mean is the first element plus the mean of the deviations from it:
  // exact for a row of equal values (output exactly the bias), and closer for
  // rows whose spread is small next to their mean.
  const float shift = n > 0 ? float(x[offset]) : 0.0f;
  float sum = 0.0f;
  for (uint base = tid; base < n; base += stride) {
    for (uint k = 0; k < kNormReadsPerThread; ++k) {
      if (base + k * threads < n) sum += float(x[offset + base + k * threads]) - shift;
    }
  }
  const float mean = shift + threadgroup_sum(sum, partials, simd_lane, simd_group, simd_groups) / float(n);
  float sq = 0.0f;
  for (uint base = tid; base < n; base += stride) {
    for (uint k = 0; k < kNormReadsPerThread; ++k) {
      if (base + k * threads < n) {
        const float d = float(x[offset + base + k * threads]) - mean;
        sq += d * d;
      }
    }
  }
  const float var = threadgroup_sum(sq, partials, simd_lane, simd_group, simd_groups) / float(n);
  return float2(mean, rsqrt(var + eps));
}

template <typename T>
kernel void layer_norm_forward(device const T* x [[buffer(0)]], device const T* w [[buffer(1)]],
                               device const T* b [[buffer(2)]], device T* y [[buffer(3)]],
                               constant NormRowParams& p [[buffer(4)]],
                               uint row [[threadgroup_position_in_grid]],
                               uint tid [[thread_position_in_threadgroup]],
                               uint threads [[threads_per_threadgroup]],
                               uint simd_lane [[thread_index_in_simdgroup]],
                               uint simd_group [[simdgroup_index_in_threadgroup]],
                               uint simd_groups [[simdgroups_per_threadgroup]]) {
  threadgroup float partials[32];
  const uint n = p.cols;
  const size_t offset = size_t(row) * n;
  const float2 stats = row_stats(x, offset, n, p.eps, tid, threads, partials, simd_lane, simd_group, simd_groups);
  const bool has_weight = (p.flags & kNormHasWeight) != 0, has_bias = (p.flags & kNormHasBias) != 0;
  for (uint base = tid; base < n; base += threads * kNormReadsPerThread) {
    for (uint k = 0; k < kNormReadsPerThread; ++k) {
      const uint i = base + k * threads;
      if (i < n) {
        float v = (float(x[offset + i]) - stats.x) * stats.y;
        if (has_weight) v *= float(w[i]);
        if (has_bias) v += float(b[i]);
        y[offset + i] = T(v);
      }
    }
  }
}

// grad_input = rstd * (g - mean(g) - xhat * mean(g * xhat)) with
// g = grad_out * w. Stores the row's (mean, rstd) for the weight and bias
// kernels. Without kNormWantGradInput only the statistics are written.
template <typename T>
kernel void layer_norm_backward_input(device const T* grad_out [[buffer(0)]], device const T* x [[buffer(1)]],
                                      device const T* w [[buffer(2)]], device T* grad_input [[buffer(3)]],
                                      device float2* stats_out [[buffer(4)]],
                                      constant NormRowParams& p [[buffer(5)]],
                                      uint row [[threadgroup_position_in_grid]],
                                      uint tid [[thread_position_in_threadgroup]],
                                      uint threads [[threads_per_threadgroup]],
                                      uint simd_lane [[thread_index_in_simdgroup]],
                                      uint simd_group [[simdgroup_index_in_threadgroup]],
                                      uint simd_groups [[simdgroups_per_threadgroup]]) {
  threadgroup float partials[32];
  threadgroup float2 partials2[32];
  const uint n = p.cols;
  const size_t offset = size_t(row) * n;
  const float2 stats = row_stats(x, offset, n, p.eps, tid, threads, partials, simd_lane, simd_group, simd_groups);
  const bool has_weight = (p.flags & kNormHasWeight) != 0;
  if (tid == 0) {
    stats_out[row] = stats;
  }
  if ((p.flags & kNormWantGradInput) == 0) {
    return;
  }
  const uint stride = threads * kNormReadsPerThread;
  float2 acc = float2(0.0f);  // (sum g, sum g * xhat)
  for (uint base = tid; base < n; base += stride) {
    for (uint k = 0; k < kNormReadsPerThread; ++k) {
      const uint i = base + k * threads;
      if (i < n) {
        const float g = float(grad_out[offset + i]) * (has_weight ? float(w[i]) : 1.0f);
        const float xhat = (float(x[offset + i]) - stats.x) * stats.y;
        acc += float2(g, g * xhat);
      }
    }
  }
  const float2 sums = threadgroup_sum2(acc, partials2, simd_lane, simd_group, simd_groups) / float(n);
  for (uint base = tid; base < n; base += stride) {
    for (uint k = 0; k < kNormReadsPerThread; ++k) {
      const uint i = base + k * threads;
      if (i < n) {
        const float g = float(grad_out[offset + i]) * (has_weight ? float(w[i]) : 1.0f);
        const float xhat = (float(x[offset + i]) - stats.x) * stats.y;
        grad_input[offset + i] = T(stats.y * (g - sums.x - xhat * sums.y));
      }
    }
  }
}

// partial[0, chunk, col] = sum of grad_out * xhat and partial[1, chunk, col] =
// sum of grad_out over the chunk's rows. Non-uniform grid (cols, chunks).
template <typename T>
kernel void layer_norm_backward_params_partial(device const T* grad_out [[buffer(0)]],
                                               device const T* x [[buffer(1)]],
                                               device const float2* stats [[buffer(2)]],
                                               device float* partial [[buffer(3)]],
                                               constant NormColumnParams& p [[buffer(4)]],
                                               uint2 pos [[thread_position_in_grid]]) {
  const uint col = pos.x, chunk = pos.y;
  const uint row_end = min(p.rows, (chunk + 1) * p.rows_per_chunk);
  float dw = 0.0f, db = 0.0f;
  for (uint r = chunk * p.rows_per_chunk; r < row_end; ++r) {
    const size_t i = size_t(r) * p.cols + col;
    const float g = float(grad_out[i]);
    dw += g * (float(x[i]) - stats[r].x) * stats[r].y;
    db += g;
  }
  partial[size_t(chunk) * p.cols + col] = dw;
  partial[size_t(p.chunks + chunk) * p.cols + col] = db;
}

// grad_weight[col] and grad_bias[col]: sums over chunks of the partials,
// each written under kNormWantGradWeight / kNormWantGradBias.
template <typename T>
kernel void layer_norm_backward_params_reduce(device const float* partial [[buffer(0)]],
                                              device T* grad_weight [[buffer(1)]], device T* grad_bias [[buffer(2)]],
                                              constant NormColumnParams& p [[buffer(3)]],
                                              uint col [[thread_position_in_grid]]) {
  float w_acc = 0.0f, b_acc = 0.0f;
  for (uint c = 0; c < p.chunks; ++c) {
    w_acc += partial[size_t(c) * p.cols + col];
    b_acc += partial[size_t(p.chunks + c) * p.cols + col];
  }
  if ((p.flags & kNormWantGradWeight) != 0) grad_weight[col] = T(w_acc);
  if ((p.flags & kNormWantGradBias) != 0) grad_bias[col] = T(b_acc);
}

#define INSTANTIATE_LAYER_NORM(T)                                         \
  MY_MPS_OPS_INSTANTIATE_KERNEL(layer_norm_forward, T)                   \
  MY_MPS_OPS_INSTANTIATE_KERNEL(layer_norm_backward_input, T)            \
  MY_MPS_OPS_INSTANTIATE_KERNEL(layer_norm_backward_params_partial, T)   \
  MY_MPS_OPS_INSTANTIATE_KERNEL(layer_norm_backward_params_reduce, T)

INSTANTIATE_LAYER_NORM(float)
INSTANTIATE_LAYER_NORM(half)
INSTANTIATE_LAYER_NORM(bfloat)
