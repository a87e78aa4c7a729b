// RMSNorm over the last dimension, forward and backward, and
// fused_add_rms_norm's forward (its backward is rms_norm_backward_input with
// grad_residual_out added). One threadgroup per row; each thread reads
// kNormReadsPerThread elements per pass, a threadgroup's width apart (tid,
// tid + threads, ...: the lanes of a SIMD group read consecutive elements at
// each step, coalesced); float accumulation for every element type.
#include <metal_stdlib>
#include "norm.h"
#include "reduce.h"
using namespace metal;

// Rows that fit one pass (cols <= threads * kNormReadsPerThread) keep x in
// registers.
template <typename T>
kernel void rms_norm_forward(device const T* x [[buffer(0)]], device const T* w [[buffer(1)]],
                             device T* y [[buffer(2)]], constant NormRowParams& p [[buffer(3)]],
                             uint row [[threadgroup_position_in_grid]],
                             uint tid [[thread_position_in_threadgroup]],
                             uint threads [[threads_per_threadgroup]],
                             uint simd_lane [[thread_index_in_simdgroup]],
                             uint simd_group [[simdgroup_index_in_threadgroup]],
                             uint simd_groups [[simdgroups_per_threadgroup]]) {
  threadgroup float partials[32];
  const uint n = p.cols;
  const bool has_weight = (p.flags & kNormHasWeight) != 0;
  const device T* xr = x + size_t(row) * n;
  device T* yr = y + size_t(row) * n;
  const uint base = tid;

  float v[kNormReadsPerThread];
  float sum_sq = 0.0f;
  for (uint k = 0; k < kNormReadsPerThread; ++k) {
    v[k] = base + k * threads < n ? float(xr[base + k * threads]) : 0.0f;
    sum_sq += v[k] * v[k];
  }
  const float total = threadgroup_sum(sum_sq, partials, simd_lane, simd_group, simd_groups);
  const float rstd = rsqrt(total / float(n) + p.eps);
  for (uint k = 0; k < kNormReadsPerThread; ++k) {
    if (base + k * threads < n) {
      const float scale = has_weight ? float(w[base + k * threads]) : 1.0f;
      yr[base + k * threads] = T(v[k] * rstd * scale);
    }
  }
}

// Rows longer than one pass: accumulate over strided passes, then read x again.
template <typename T>
kernel void rms_norm_forward_looped(device const T* x [[buffer(0)]], device const T* w [[buffer(1)]],
                                    device T* y [[buffer(2)]], constant NormRowParams& p [[buffer(3)]],
                                    uint row [[threadgroup_position_in_grid]],
                                    uint tid [[thread_position_in_threadgroup]],
                                    uint threads [[threads_per_threadgroup]],
                                    uint simd_lane [[thread_index_in_simdgroup]],
                                    uint simd_group [[simdgroup_index_in_threadgroup]],
                                    uint simd_groups [[simdgroups_per_threadgroup]]) {
  threadgroup float partials[32];
  const uint n = p.cols;
  const bool has_weight = (p.flags & kNormHasWeight) != 0;
  const device T* xr = x + size_t(row) * n;
  device T* yr = y + size_t(row) * n;
  const uint stride = threads * kNormReadsPerThread;

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

// grad_input = rstd * (g - x * rstd^2 * mean(g * x)) with g = grad_out * w,
// plus grad_residual_out under kNormAddGradResidualOut; also stores the row's
// rstd for the grad_weight kernels. Without kNormWantGradInput only rstd is
// written.
template <typename T>
kernel void rms_norm_backward_input(device const T* grad_out [[buffer(0)]], device const T* x [[buffer(1)]],
                                    device const T* w [[buffer(2)]],
                                    device const T* grad_residual_out [[buffer(3)]],
                                    device T* grad_input [[buffer(4)]], device float* rstd_out [[buffer(5)]],
                                    constant NormRowParams& p [[buffer(6)]],
                                    uint row [[threadgroup_position_in_grid]],
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
  const size_t offset = size_t(row) * n;
  const uint stride = threads * kNormReadsPerThread;

  float2 acc = float2(0.0f);  // (sum x^2, sum g*x)
  for (uint base = tid; base < n; base += stride) {
    for (uint k = 0; k < kNormReadsPerThread; ++k) {
      const uint i = base + k * threads;
      if (i < n) {
        const float xv = float(x[offset + i]);
        const float g = float(grad_out[offset + i]) * (has_weight ? float(w[i]) : 1.0f);
        acc += float2(xv * xv, g * xv);
      }
    }
  }
  const float2 total = threadgroup_sum2(acc, partials, simd_lane, simd_group, simd_groups);
  const float rstd = rsqrt(total.x / float(n) + p.eps);
  if (tid == 0) {
    rstd_out[row] = rstd;
  }
  if (!want_grad_input) {
    return;
  }
  const float coef = rstd * rstd * rstd * total.y / float(n);
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

// residual_out = x + residual (rounded to T), y = rms_norm(residual_out).
// Each thread re-reads only the elements it wrote itself: no barrier needed.
template <typename T>
kernel void fused_add_rms_norm_forward(device const T* x [[buffer(0)]], device const T* residual [[buffer(1)]],
                                       device const T* w [[buffer(2)]], device T* y [[buffer(3)]],
                                       device T* residual_out [[buffer(4)]],
                                       constant NormRowParams& p [[buffer(5)]],
                                       uint row [[threadgroup_position_in_grid]],
                                       uint tid [[thread_position_in_threadgroup]],
                                       uint threads [[threads_per_threadgroup]],
                                       uint simd_lane [[thread_index_in_simdgroup]],
                                       uint simd_group [[simdgroup_index_in_threadgroup]],
                                       uint simd_groups [[simdgroups_per_threadgroup]]) {
  threadgroup float partials[32];
  const uint n = p.cols;
  const bool has_weight = (p.flags & kNormHasWeight) != 0;
  const size_t offset = size_t(row) * n;
  const uint stride = threads * kNormReadsPerThread;
  float sum_sq = 0.0f;
  for (uint base = tid; base < n; base += stride) {
    for (uint k = 0; k < kNormReadsPerThread; ++k) {
      const uint i = base + k * threads;
      if (i < n) {
        const T h = T(float(x[offset + i]) + float(residual[offset + i]));
        residual_out[offset + i] = h;
        sum_sq += float(h) * float(h);
      }
    }
  }
  const float total = threadgroup_sum(sum_sq, partials, simd_lane, simd_group, simd_groups);
  const float rstd = rsqrt(total / float(n) + p.eps);
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

// partial[chunk, col] = sum over the chunk's rows of grad_out * x * rstd.
// Non-uniform grid (cols, chunks): adjacent threads read adjacent columns.
template <typename T>
kernel void rms_norm_backward_weight_partial(device const T* grad_out [[buffer(0)]], device const T* x [[buffer(1)]],
                                             device const float* rstd [[buffer(2)]],
                                             device float* partial [[buffer(3)]],
                                             constant NormColumnParams& p [[buffer(4)]],
                                             uint2 pos [[thread_position_in_grid]]) {
  const uint col = pos.x;
  const uint chunk = pos.y;
  const uint row_end = min(p.rows, (chunk + 1) * p.rows_per_chunk);
  float acc = 0.0f;
  for (uint r = chunk * p.rows_per_chunk; r < row_end; ++r) {
    const size_t i = size_t(r) * p.cols + col;
    acc += float(grad_out[i]) * float(x[i]) * rstd[r];
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
