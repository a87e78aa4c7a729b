// RMSNorm over the last dimension, forward and backward, and
// fused_add_rms_norm's forward (its backward is rms_norm_backward_input with
// grad_residual_out added). Each threadgroup normalises a few consecutive rows
// (NormRowParams); each thread reads kNormReadsPerThread elements per pass, a
// threadgroup's width apart (tid, tid + threads, ...: the lanes of a SIMD
// group read consecutive elements at each step, coalesced); float
// accumulation for every element type. A row that fits one pass is read once
// and kept in registers, and the weight's slice is read once per threadgroup.
#include <metal_stdlib>
#include "norm.h"
#include "reduce.h"
using namespace metal;

// Rows that fit one pass (cols <= threads * kNormReadsPerThread; the host
// picks rms_norm_forward_looped otherwise).
template <typename T>
kernel void rms_norm_forward(device const T* x [[buffer(0)]], device const T* w [[buffer(1)]],
                             device T* y [[buffer(2)]], constant NormRowParams& p [[buffer(3)]],
                             uint group [[threadgroup_position_in_grid]],
                             uint tid [[thread_position_in_threadgroup]],
                             uint threads [[threads_per_threadgroup]],
                             uint simd_lane [[thread_index_in_simdgroup]],
                             uint simd_group [[simdgroup_index_in_threadgroup]],
                             uint simd_groups [[simdgroups_per_threadgroup]]) {
  threadgroup float partials[32];
  const uint n = p.cols;
  float wv[kNormReadsPerThread];
  norm_load_param_slice((p.flags & kNormHasWeight) != 0, w, n, tid, threads, 1.0f, wv);
  const uint2 rows = norm_group_rows(p, group);
  for (uint row = rows.x; row < rows.y; ++row) {
    const size_t offset = size_t(row) * n;
    float v[kNormReadsPerThread];
    norm_load_slice(x + offset, n, tid, threads, v);
    float sum_sq = 0.0f;
    for (uint k = 0; k < kNormReadsPerThread; ++k) sum_sq += v[k] * v[k];
    const float total = threadgroup_sum(sum_sq, partials, simd_lane, simd_group, simd_groups);
    const float rstd = rsqrt(total / float(n) + p.eps);
    for (uint k = 0; k < kNormReadsPerThread; ++k) {
      const uint i = tid + k * threads;
      if (i < n) y[offset + i] = T(v[k] * rstd * wv[k]);
    }
  }
}

// Rows longer than one pass: accumulate over strided passes, then read x again.
template <typename T>
kernel void rms_norm_forward_looped(device const T* x [[buffer(0)]], device const T* w [[buffer(1)]],
                                    device T* y [[buffer(2)]], constant NormRowParams& p [[buffer(3)]],
                                    uint group [[threadgroup_position_in_grid]],
                                    uint tid [[thread_position_in_threadgroup]],
                                    uint threads [[threads_per_threadgroup]],
                                    uint simd_lane [[thread_index_in_simdgroup]],
                                    uint simd_group [[simdgroup_index_in_threadgroup]],
                                    uint simd_groups [[simdgroups_per_threadgroup]]) {
  threadgroup float partials[32];
  const uint n = p.cols;
  const bool has_weight = (p.flags & kNormHasWeight) != 0;
  const uint stride = threads * kNormReadsPerThread;
  const uint2 rows = norm_group_rows(p, group);
  for (uint row = rows.x; row < rows.y; ++row) {
    const device T* xr = x + size_t(row) * n;
    device T* yr = y + size_t(row) * n;
    float sum_sq = 0.0f;
    for (uint base = tid; base < n; base += stride) {
      for (uint k = 0; k < kNormReadsPerThread; ++k) {
        if (base + k * threads < n) {
          const float v = float(xr[base + k * threads]);
          sum_sq += v * v;
        }
      }
    }
    const float total = threadgroup_sum(sum_sq, partials, simd_lane, simd_group, simd_groups);
    const float rstd = rsqrt(total / float(n) + p.eps);
    for (uint base = tid; base < n; base += stride) {
      for (uint k = 0; k < kNormReadsPerThread; ++k) {
        if (base + k * threads < n) {
          const float scale = has_weight ? float(w[base + k * threads]) : 1.0f;
          yr[base + k * threads] = T(float(xr[base + k * threads]) * rstd * scale);
        }
      }
    }
  }
}

// grad_input = rstd * (g - x * rstd^2 * mean(g * x)) with g = grad_out * w,
// plus grad_residual_out under kNormAddGradResidualOut; also stores the row's
// rstd for the grad_weight kernels. Without kNormWantGradInput only rstd is
// written. A row that fits one pass keeps x and g in registers.
template <typename T>
kernel void rms_norm_backward_input(device const T* grad_out [[buffer(0)]], device const T* x [[buffer(1)]],
                                    device const T* w [[buffer(2)]],
                                    device const T* grad_residual_out [[buffer(3)]],
                                    device T* grad_input [[buffer(4)]], device float* rstd_out [[buffer(5)]],
                                    constant NormRowParams& p [[buffer(6)]],
                                    uint group [[threadgroup_position_in_grid]],
                                    uint tid [[thread_position_in_threadgroup]],
                                    uint threads [[threads_per_threadgroup]],
                                    uint simd_lane [[thread_index_in_simdgroup]],
                                    uint simd_group [[simdgroup_index_in_threadgroup]],
                                    uint simd_groups [[simdgroups_per_threadgroup]]) {
  threadgroup float2 partials[32];
  const uint n = p.cols;
  const bool has_weight = (p.flags & kNormHasWeight) != 0;
  const bool want_grad_input = (p.flags & kNormWantGradInput) != 0;
  const bool add_grad_residual_out = (p.flags & kNormAddGradResidualOut) != 0;
  const uint stride = threads * kNormReadsPerThread;
  const bool one_pass = n <= stride;
  float wv[kNormReadsPerThread];
  if (one_pass) norm_load_param_slice(has_weight, w, n, tid, threads, 1.0f, wv);
  const uint2 rows = norm_group_rows(p, group);
  for (uint row = rows.x; row < rows.y; ++row) {
    const size_t offset = size_t(row) * n;
    float xv[kNormReadsPerThread], gv[kNormReadsPerThread];
    float2 acc = float2(0.0f);  // (sum x^2, sum g*x)
    if (one_pass) {
      norm_load_slice(x + offset, n, tid, threads, xv);
      norm_load_slice(grad_out + offset, n, tid, threads, gv);
      for (uint k = 0; k < kNormReadsPerThread; ++k) {
        gv[k] *= wv[k];
        acc += float2(xv[k] * xv[k], gv[k] * xv[k]);
      }
    } else {
      for (uint base = tid; base < n; base += stride) {
        for (uint k = 0; k < kNormReadsPerThread; ++k) {
          const uint i = base + k * threads;
          if (i < n) {
            const float xi = float(x[offset + i]);
            const float g = float(grad_out[offset + i]) * (has_weight ? float(w[i]) : 1.0f);
            acc += float2(xi * xi, g * xi);
          }
        }
      }
    }
    const float2 total = threadgroup_sum2(acc, partials, simd_lane, simd_group, simd_groups);
    const float rstd = rsqrt(total.x / float(n) + p.eps);
    if (tid == 0) {
      rstd_out[row] = rstd;
    }
    if (!want_grad_input) {
      continue;
    }
    const float coef = rstd * rstd * rstd * total.y / float(n);
    if (one_pass) {
      for (uint k = 0; k < kNormReadsPerThread; ++k) {
        const uint i = tid + k * threads;
        if (i < n) {
          grad_input[offset + i] = T(gv[k] * rstd - xv[k] * coef +
                                     (add_grad_residual_out ? float(grad_residual_out[offset + i]) : 0.0f));
        }
      }
      continue;
    }
    for (uint base = tid; base < n; base += stride) {
      for (uint k = 0; k < kNormReadsPerThread; ++k) {
        const uint i = base + k * threads;
        if (i < n) {
          const float g = float(grad_out[offset + i]) * (has_weight ? float(w[i]) : 1.0f);
          grad_input[offset + i] =
              T(g * rstd - float(x[offset + i]) * coef +
                (add_grad_residual_out ? float(grad_residual_out[offset + i]) : 0.0f));
        }
      }
    }
  }
}

// residual_out = x + residual (rounded to T), y = rms_norm(residual_out).
// A row that fits one pass keeps residual_out in registers; a longer one is
// re-read, each thread only the elements it wrote itself: no barrier needed.
template <typename T>
kernel void fused_add_rms_norm_forward(device const T* x [[buffer(0)]], device const T* residual [[buffer(1)]],
                                       device const T* w [[buffer(2)]], device T* y [[buffer(3)]],
                                       device T* residual_out [[buffer(4)]],
                                       constant NormRowParams& p [[buffer(5)]],
                                       uint group [[threadgroup_position_in_grid]],
                                       uint tid [[thread_position_in_threadgroup]],
                                       uint threads [[threads_per_threadgroup]],
                                       uint simd_lane [[thread_index_in_simdgroup]],
                                       uint simd_group [[simdgroup_index_in_threadgroup]],
                                       uint simd_groups [[simdgroups_per_threadgroup]]) {
  threadgroup float partials[32];
  const uint n = p.cols;
  const bool has_weight = (p.flags & kNormHasWeight) != 0;
  const uint stride = threads * kNormReadsPerThread;
  const bool one_pass = n <= stride;
  float wv[kNormReadsPerThread];
  if (one_pass) norm_load_param_slice(has_weight, w, n, tid, threads, 1.0f, wv);
  const uint2 rows = norm_group_rows(p, group);
  for (uint row = rows.x; row < rows.y; ++row) {
    const size_t offset = size_t(row) * n;
    float hv[kNormReadsPerThread];
    float sum_sq = 0.0f;
    for (uint base = tid, pass = 0; base < n; base += stride, ++pass) {
      for (uint k = 0; k < kNormReadsPerThread; ++k) {
        const uint i = base + k * threads;
        if (i < n) {
          const T h = T(float(x[offset + i]) + float(residual[offset + i]));
          residual_out[offset + i] = h;
          sum_sq += float(h) * float(h);
          if (pass == 0) hv[k] = float(h);
        }
      }
    }
    const float total = threadgroup_sum(sum_sq, partials, simd_lane, simd_group, simd_groups);
    const float rstd = rsqrt(total / float(n) + p.eps);
    if (one_pass) {
      for (uint k = 0; k < kNormReadsPerThread; ++k) {
        const uint i = tid + k * threads;
        if (i < n) y[offset + i] = T(hv[k] * rstd * wv[k]);
      }
      continue;
    }
    for (uint base = tid; base < n; base += stride) {
      for (uint k = 0; k < kNormReadsPerThread; ++k) {
        const uint i = base + k * threads;
        if (i < n) {
          const float scale = has_weight ? float(w[i]) : 1.0f;
          y[offset + i] = T(float(residual_out[offset + i]) * rstd * scale);
        }
      }
    }
  }
}

// partial[chunk, col] = sum over the chunk's rows of grad_out * x * rstd.
// Non-uniform grid (cols, chunks): adjacent threads read adjacent columns.
// The threadgroup stages the rows' rstd in threadgroup memory, read from
// device memory once instead of once per column.
template <typename T>
kernel void rms_norm_backward_weight_partial(device const T* grad_out [[buffer(0)]], device const T* x [[buffer(1)]],
                                             device const float* rstd [[buffer(2)]],
                                             device float* partial [[buffer(3)]],
                                             constant NormColumnParams& p [[buffer(4)]],
                                             uint2 pos [[thread_position_in_grid]],
                                             uint lid [[thread_index_in_threadgroup]],
                                             uint2 group_size [[threads_per_threadgroup]]) {
  threadgroup float staged[kNormStagedRows];
  const uint col = pos.x;
  const uint chunk = pos.y;
  const uint row_begin = chunk * p.rows_per_chunk;
  const uint row_end = min(p.rows, row_begin + p.rows_per_chunk);
  float acc = 0.0f;
  for (uint tile = row_begin; tile < row_end; tile += kNormStagedRows) {
    const uint tile_rows = min(kNormStagedRows, row_end - tile);
    for (uint r = lid; r < tile_rows; r += group_size.x * group_size.y) staged[r] = rstd[tile + r];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint r = 0; r < tile_rows; ++r) {
      const size_t i = size_t(tile + r) * p.cols + col;
      acc += float(grad_out[i]) * float(x[i]) * staged[r];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // staged is rewritten next
  }
  partial[size_t(chunk) * p.cols + col] = acc;
}

// grad_weight[col] = sum over chunks of partial[chunk, col].
template <typename T>
kernel void rms_norm_backward_weight_reduce(device const float* partial [[buffer(0)]],
                                            device T* grad_weight [[buffer(1)]],
                                            constant NormColumnParams& p [[buffer(2)]],
                                            uint col [[thread_position_in_grid]]) {
  float acc = 0.0f;
  for (uint c = 0; c < p.chunks; ++c) {
    acc += partial[size_t(c) * p.cols + col];
  }
  grad_weight[col] = T(acc);
}

#define INSTANTIATE_RMS_NORM(T)                                         \
  MY_MPS_OPS_INSTANTIATE_KERNEL(rms_norm_forward, T)                   \
  MY_MPS_OPS_INSTANTIATE_KERNEL(rms_norm_forward_looped, T)            \
  MY_MPS_OPS_INSTANTIATE_KERNEL(rms_norm_backward_input, T)            \
  MY_MPS_OPS_INSTANTIATE_KERNEL(fused_add_rms_norm_forward, T)         \
  MY_MPS_OPS_INSTANTIATE_KERNEL(rms_norm_backward_weight_partial, T)   \
  MY_MPS_OPS_INSTANTIATE_KERNEL(rms_norm_backward_weight_reduce, T)

INSTANTIATE_RMS_NORM(float)
INSTANTIATE_RMS_NORM(half)
INSTANTIATE_RMS_NORM(bfloat)
