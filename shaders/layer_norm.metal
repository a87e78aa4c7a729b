// LayerNorm over the last dimension, forward and backward.
// Each threadgroup normalises a few consecutive rows (NormRowParams);
// statistics in float with two passes (mean, shifted by the row's first
// element, then the variance of x - mean) for accuracy; SIMD-group then
// threadgroup sums. A row that fits one pass (cols <= threads *
// kNormReadsPerThread) is read once and kept in registers for both passes and
// the output, and the weight and bias slices are read once per threadgroup.
#include <metal_stdlib>
#include "norm.h"
#include "reduce.h"
using namespace metal;

// The mean is the first element plus the mean of the deviations from it:
// exact for a row of equal values (output exactly the bias), and closer for
// rows whose spread is small next to their mean.

// Row statistics (mean, rstd) of x[offset .. offset + n), read from memory
// twice (rows longer than one pass).
template <typename T>
inline float2 row_stats(device const T* x, size_t offset, uint n, float eps, uint tid, uint threads,
                        threadgroup float* partials, uint simd_lane, uint simd_group, uint simd_groups) {
  const uint stride = threads * kNormReadsPerThread;
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

// The same statistics of a row that fits one pass, from the slice `v` each
// thread holds. Thread 0 holds the row's first element and hands it to the
// others through `first`, which the sums' barriers keep from being rewritten
// before every thread has read it.
inline float2 row_stats_one_pass(thread const float* v, uint n, float eps, uint tid, uint threads,
                                 threadgroup float* first, threadgroup float* partials, uint simd_lane,
                                 uint simd_group, uint simd_groups) {
  if (tid == 0) {
    *first = v[0];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float shift = *first;
  float sum = 0.0f;
  for (uint k = 0; k < kNormReadsPerThread; ++k) {
    if (tid + k * threads < n) sum += v[k] - shift;
  }
  const float mean = shift + threadgroup_sum(sum, partials, simd_lane, simd_group, simd_groups) / float(n);
  float sq = 0.0f;
  for (uint k = 0; k < kNormReadsPerThread; ++k) {
    if (tid + k * threads < n) sq += (v[k] - mean) * (v[k] - mean);
  }
  const float var = threadgroup_sum(sq, partials, simd_lane, simd_group, simd_groups) / float(n);
  return float2(mean, rsqrt(var + eps));
}

template <typename T>
kernel void layer_norm_forward(device const T* x [[buffer(0)]], device const T* w [[buffer(1)]],
                               device const T* b [[buffer(2)]], device T* y [[buffer(3)]],
                               constant NormRowParams& p [[buffer(4)]],
                               uint group [[threadgroup_position_in_grid]],
                               uint tid [[thread_position_in_threadgroup]],
                               uint threads [[threads_per_threadgroup]],
                               uint simd_lane [[thread_index_in_simdgroup]],
                               uint simd_group [[simdgroup_index_in_threadgroup]],
                               uint simd_groups [[simdgroups_per_threadgroup]]) {
  threadgroup float partials[32];
  threadgroup float first;
  const uint n = p.cols;
  const bool has_weight = (p.flags & kNormHasWeight) != 0, has_bias = (p.flags & kNormHasBias) != 0;
  const uint stride = threads * kNormReadsPerThread;
  const bool one_pass = n <= stride;
  float wv[kNormReadsPerThread], bv[kNormReadsPerThread];
  if (one_pass) {
    norm_load_param_slice(has_weight, w, n, tid, threads, 1.0f, wv);
    norm_load_param_slice(has_bias, b, n, tid, threads, 0.0f, bv);
  }
  const uint2 rows = norm_group_rows(p, group);
  for (uint row = rows.x; row < rows.y; ++row) {
    const size_t offset = size_t(row) * n;
    if (one_pass) {
      float v[kNormReadsPerThread];
      norm_load_slice(x + offset, n, tid, threads, v);
      const float2 stats =
          row_stats_one_pass(v, n, p.eps, tid, threads, &first, partials, simd_lane, simd_group, simd_groups);
      for (uint k = 0; k < kNormReadsPerThread; ++k) {
        const uint i = tid + k * threads;
        if (i < n) {
          float out = (v[k] - stats.x) * stats.y;
          if (has_weight) out *= wv[k];
          if (has_bias) out += bv[k];
          y[offset + i] = T(out);
        }
      }
      continue;
    }
    const float2 stats = row_stats(x, offset, n, p.eps, tid, threads, partials, simd_lane, simd_group, simd_groups);
    for (uint base = tid; base < n; base += stride) {
      for (uint k = 0; k < kNormReadsPerThread; ++k) {
        const uint i = base + k * threads;
        if (i < n) {
          float out = (float(x[offset + i]) - stats.x) * stats.y;
          if (has_weight) out *= float(w[i]);
          if (has_bias) out += float(b[i]);
          y[offset + i] = T(out);
        }
      }
    }
  }
}

// grad_input = rstd * (g - mean(g) - xhat * mean(g * xhat)) with
// g = grad_out * w. Stores the row's (mean, rstd) for the weight and bias
// kernels. Without kNormWantGradInput only the statistics are written. A row
// that fits one pass keeps x and g in registers.
template <typename T>
kernel void layer_norm_backward_input(device const T* grad_out [[buffer(0)]], device const T* x [[buffer(1)]],
                                      device const T* w [[buffer(2)]], device T* grad_input [[buffer(3)]],
                                      device float2* stats_out [[buffer(4)]],
                                      constant NormRowParams& p [[buffer(5)]],
                                      uint group [[threadgroup_position_in_grid]],
                                      uint tid [[thread_position_in_threadgroup]],
                                      uint threads [[threads_per_threadgroup]],
                                      uint simd_lane [[thread_index_in_simdgroup]],
                                      uint simd_group [[simdgroup_index_in_threadgroup]],
                                      uint simd_groups [[simdgroups_per_threadgroup]]) {
  threadgroup float partials[32];
  threadgroup float2 partials2[32];
  threadgroup float first;
  const uint n = p.cols;
  const bool has_weight = (p.flags & kNormHasWeight) != 0;
  const bool want_grad_input = (p.flags & kNormWantGradInput) != 0;
  const uint stride = threads * kNormReadsPerThread;
  const bool one_pass = n <= stride;
  float wv[kNormReadsPerThread];
  if (one_pass && want_grad_input) norm_load_param_slice(has_weight, w, n, tid, threads, 1.0f, wv);
  const uint2 rows = norm_group_rows(p, group);
  for (uint row = rows.x; row < rows.y; ++row) {
    const size_t offset = size_t(row) * n;
    float xv[kNormReadsPerThread];
    float2 stats;
    if (one_pass) {
      norm_load_slice(x + offset, n, tid, threads, xv);
      stats = row_stats_one_pass(xv, n, p.eps, tid, threads, &first, partials, simd_lane, simd_group, simd_groups);
    } else {
      stats = row_stats(x, offset, n, p.eps, tid, threads, partials, simd_lane, simd_group, simd_groups);
    }
    if (tid == 0) {
      stats_out[row] = stats;
    }
    if (!want_grad_input) {
      continue;
    }
    if (one_pass) {
      float gv[kNormReadsPerThread];
      norm_load_slice(grad_out + offset, n, tid, threads, gv);
      float2 acc = float2(0.0f);  // (sum g, sum g * xhat)
      for (uint k = 0; k < kNormReadsPerThread; ++k) {
        gv[k] *= wv[k];
        xv[k] = (xv[k] - stats.x) * stats.y;  // xhat from here on
        acc += float2(gv[k], gv[k] * xv[k]);
      }
      const float2 sums = threadgroup_sum2(acc, partials2, simd_lane, simd_group, simd_groups) / float(n);
      for (uint k = 0; k < kNormReadsPerThread; ++k) {
        const uint i = tid + k * threads;
        if (i < n) grad_input[offset + i] = T(stats.y * (gv[k] - sums.x - xv[k] * sums.y));
      }
      continue;
    }
    float2 acc = float2(0.0f);
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
}

// partial[0, chunk, col] = sum of grad_out * xhat and partial[1, chunk, col] =
// sum of grad_out over the chunk's rows. Non-uniform grid (cols, chunks). The
// threadgroup stages the rows' (mean, rstd) in threadgroup memory, read from
// device memory once instead of once per column.
template <typename T>
kernel void layer_norm_backward_params_partial(device const T* grad_out [[buffer(0)]],
                                               device const T* x [[buffer(1)]],
                                               device const float2* stats [[buffer(2)]],
                                               device float* partial [[buffer(3)]],
                                               constant NormColumnParams& p [[buffer(4)]],
                                               uint2 pos [[thread_position_in_grid]],
                                               uint lid [[thread_index_in_threadgroup]],
                                               uint2 group_size [[threads_per_threadgroup]]) {
  threadgroup float2 staged[kNormStagedRows];
  const uint col = pos.x, chunk = pos.y;
  const uint row_begin = chunk * p.rows_per_chunk;
  const uint row_end = min(p.rows, row_begin + p.rows_per_chunk);
  float dw = 0.0f, db = 0.0f;
  for (uint tile = row_begin; tile < row_end; tile += kNormStagedRows) {
    const uint tile_rows = min(kNormStagedRows, row_end - tile);
    for (uint r = lid; r < tile_rows; r += group_size.x * group_size.y) staged[r] = stats[tile + r];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint r = 0; r < tile_rows; ++r) {
      const size_t i = size_t(tile + r) * p.cols + col;
      const float g = float(grad_out[i]);
      dw += g * (float(x[i]) - staged[r].x) * staged[r].y;
      db += g;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // staged is rewritten next
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
