// RMSNorm over the last dimension, forward and backward.
// One threadgroup per row; each thread reads N_READS consecutive elements per
// pass; float accumulation for every element type.
#include <metal_stdlib>
#include "reduce.h"
using namespace metal;

constant constexpr uint N_READS = 4;

// has_weight: 0 or 1 (w is bound but unread when 0).
// Rows that fit one pass (n <= threads * N_READS) keep x in registers.
template <typename T>
kernel void rms_norm_forward(
    device const T* x [[buffer(0)]],
    device const T* w [[buffer(1)]],
    device T* y [[buffer(2)]],
    constant float& eps [[buffer(3)]],
    constant uint& n [[buffer(4)]],
    constant uint& has_weight [[buffer(5)]],
    uint row [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint simd_lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint simd_groups [[simdgroups_per_threadgroup]]) {
  threadgroup float partials[32];
  const device T* xr = x + size_t(row) * n;
  device T* yr = y + size_t(row) * n;
  const uint base = tid * N_READS;

  float v[N_READS];
  float sum_sq = 0.0f;
  for (uint k = 0; k < N_READS; ++k) {
    v[k] = base + k < n ? float(xr[base + k]) : 0.0f;
    sum_sq += v[k] * v[k];
  }
  const float total = threadgroup_sum(sum_sq, partials, simd_lane, simd_group, simd_groups);
  const float rstd = rsqrt(total / float(n) + eps);
  for (uint k = 0; k < N_READS; ++k) {
    if (base + k < n) {
      const float scale = has_weight != 0 ? float(w[base + k]) : 1.0f;
      yr[base + k] = T(v[k] * rstd * scale);
    }
  }
}

// Rows longer than one pass: accumulate over strided passes, then read x again.
template <typename T>
kernel void rms_norm_forward_looped(
    device const T* x [[buffer(0)]],
    device const T* w [[buffer(1)]],
    device T* y [[buffer(2)]],
    constant float& eps [[buffer(3)]],
    constant uint& n [[buffer(4)]],
    constant uint& has_weight [[buffer(5)]],
    uint row [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]],
    uint simd_lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint simd_groups [[simdgroups_per_threadgroup]]) {
  threadgroup float partials[32];
  const device T* xr = x + size_t(row) * n;
  device T* yr = y + size_t(row) * n;
  const uint stride = threads * N_READS;

  float sum_sq = 0.0f;
  for (uint base = tid * N_READS; base < n; base += stride) {
    for (uint k = 0; k < N_READS; ++k) {
      if (base + k < n) {
        const float v = float(xr[base + k]);
        sum_sq += v * v;
      }
    }
  }
  const float total = threadgroup_sum(sum_sq, partials, simd_lane, simd_group, simd_groups);
  const float rstd = rsqrt(total / float(n) + eps);
  for (uint base = tid * N_READS; base < n; base += stride) {
    for (uint k = 0; k < N_READS; ++k) {
      if (base + k < n) {
        const float scale = has_weight != 0 ? float(w[base + k]) : 1.0f;
        yr[base + k] = T(float(xr[base + k]) * rstd * scale);
      }
    }
  }
}

// grad_input = rstd * (g - x * rstd^2 * mean(g * x)), g = dy * w; also stores
// the row's rstd for the grad_weight passes. flags: bit 0 has_weight, bit 1
// write dx (dx is bound but unwritten otherwise), bit 2 add dx_add to dx
// (fused_add_rms_norm's grad of residual_out).
template <typename T>
kernel void rms_norm_backward_input(
    device const T* dy [[buffer(0)]],
    device const T* x [[buffer(1)]],
    device const T* w [[buffer(2)]],
    device T* dx [[buffer(3)]],
    device float* rstd_out [[buffer(4)]],
    constant float& eps [[buffer(5)]],
    constant uint& n [[buffer(6)]],
    constant uint& flags [[buffer(7)]],
    device const T* dx_add [[buffer(8)]],
    uint row [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]],
    uint simd_lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint simd_groups [[simdgroups_per_threadgroup]]) {
  threadgroup float2 partials[32];
  const bool has_weight = (flags & 1u) != 0;
  const bool write_dx = (flags & 2u) != 0;
  const bool add_dx = (flags & 4u) != 0;
  const size_t offset = size_t(row) * n;
  const uint stride = threads * N_READS;

  float2 acc = float2(0.0f);  // (sum x^2, sum g*x)
  for (uint base = tid * N_READS; base < n; base += stride) {
    for (uint k = 0; k < N_READS; ++k) {
      const uint i = base + k;
      if (i < n) {
        const float xv = float(x[offset + i]);
        const float g = float(dy[offset + i]) * (has_weight ? float(w[i]) : 1.0f);
        acc += float2(xv * xv, g * xv);
      }
    }
  }
  const float2 total = threadgroup_sum2(acc, partials, simd_lane, simd_group, simd_groups);
  const float rstd = rsqrt(total.x / float(n) + eps);
  if (tid == 0) {
    rstd_out[row] = rstd;
  }
  if (!write_dx) {
    return;
  }
  const float coef = rstd * rstd * rstd * total.y / float(n);
  for (uint base = tid * N_READS; base < n; base += stride) {
    for (uint k = 0; k < N_READS; ++k) {
      const uint i = base + k;
      if (i < n) {
        const float g = float(dy[offset + i]) * (has_weight ? float(w[i]) : 1.0f);
        const float extra = add_dx ? float(dx_add[offset + i]) : 0.0f;
        dx[offset + i] = T(g * rstd - float(x[offset + i]) * coef + extra);
      }
    }
  }
}

// residual_out = x + residual (rounded to T), out = rms_norm(residual_out).
// Each thread re-reads only the elements it wrote itself: no barrier needed.
template <typename T>
kernel void fused_add_rms_norm_forward(
    device const T* x [[buffer(0)]],
    device const T* residual [[buffer(1)]],
    device const T* w [[buffer(2)]],
    device T* y [[buffer(3)]],
    device T* residual_out [[buffer(4)]],
    constant float& eps [[buffer(5)]],
    constant uint& n [[buffer(6)]],
    constant uint& has_weight [[buffer(7)]],
    uint row [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]],
    uint simd_lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint simd_groups [[simdgroups_per_threadgroup]]) {
  threadgroup float partials[32];
  const size_t offset = size_t(row) * n;
  const uint stride = threads * N_READS;
  float sum_sq = 0.0f;
  for (uint base = tid * N_READS; base < n; base += stride) {
    for (uint k = 0; k < N_READS; ++k) {
      const uint i = base + k;
      if (i < n) {
        const T h = T(float(x[offset + i]) + float(residual[offset + i]));
        residual_out[offset + i] = h;
        sum_sq += float(h) * float(h);
      }
    }
  }
  const float total = threadgroup_sum(sum_sq, partials, simd_lane, simd_group, simd_groups);
  const float rstd = rsqrt(total / float(n) + eps);
  for (uint base = tid * N_READS; base < n; base += stride) {
    for (uint k = 0; k < N_READS; ++k) {
      const uint i = base + k;
      if (i < n) {
        const float scale = has_weight != 0 ? float(w[i]) : 1.0f;
        y[offset + i] = T(float(residual_out[offset + i]) * rstd * scale);
      }
    }
  }
}

// partial[chunk, col] = sum over the chunk's rows of dy * x * rstd.
// Non-uniform grid (n, chunks): adjacent threads read adjacent columns.
template <typename T>
kernel void rms_norm_backward_weight_partial(
    device const T* dy [[buffer(0)]],
    device const T* x [[buffer(1)]],
    device const float* rstd [[buffer(2)]],
    device float* partial [[buffer(3)]],
    constant uint& n [[buffer(4)]],
    constant uint& rows [[buffer(5)]],
    constant uint& rows_per_chunk [[buffer(6)]],
    uint2 pos [[thread_position_in_grid]]) {
  const uint col = pos.x;
  const uint chunk = pos.y;
  const uint row_end = min(rows, (chunk + 1) * rows_per_chunk);
  float acc = 0.0f;
  for (uint r = chunk * rows_per_chunk; r < row_end; ++r) {
    const size_t i = size_t(r) * n + col;
    acc += float(dy[i]) * float(x[i]) * rstd[r];
  }
  partial[size_t(chunk) * n + col] = acc;
}

// dw[col] = sum over chunks of partial[chunk, col].
template <typename T>
kernel void rms_norm_backward_weight_reduce(
    device const float* partial [[buffer(0)]],
    device T* dw [[buffer(1)]],
    constant uint& n [[buffer(2)]],
    constant uint& chunks [[buffer(3)]],
    uint col [[thread_position_in_grid]]) {
  float acc = 0.0f;
  for (uint c = 0; c < chunks; ++c) {
    acc += partial[size_t(c) * n + col];
  }
  dw[col] = T(acc);
}

#define INSTANTIATE_RMS_NORM(T)                                                                      \
  template [[host_name("rms_norm_forward_" #T)]] kernel void rms_norm_forward<T>(                   \
      device const T*, device const T*, device T*, constant float&, constant uint&, constant uint&, \
      uint, uint, uint, uint, uint);                                                                 \
  template [[host_name("rms_norm_forward_looped_" #T)]] kernel void rms_norm_forward_looped<T>(     \
      device const T*, device const T*, device T*, constant float&, constant uint&, constant uint&, \
      uint, uint, uint, uint, uint, uint);                                                           \
  template [[host_name("rms_norm_backward_input_" #T)]] kernel void rms_norm_backward_input<T>(     \
      device const T*, device const T*, device const T*, device T*, device float*, constant float&, \
      constant uint&, constant uint&, device const T*, uint, uint, uint, uint, uint, uint);          \
  template [[host_name("fused_add_rms_norm_forward_" #T)]] kernel void fused_add_rms_norm_forward<T>( \
      device const T*, device const T*, device const T*, device T*, device T*, constant float&,     \
      constant uint&, constant uint&, uint, uint, uint, uint, uint, uint);                           \
  template [[host_name("rms_norm_backward_weight_partial_" #T)]] kernel void                         \
  rms_norm_backward_weight_partial<T>(device const T*, device const T*, device const float*,        \
                                      device float*, constant uint&, constant uint&, constant uint&, \
                                      uint2);                                                        \
  template [[host_name("rms_norm_backward_weight_reduce_" #T)]] kernel void                          \
  rms_norm_backward_weight_reduce<T>(device const float*, device T*, constant uint&, constant uint&, \
                                     uint);

INSTANTIATE_RMS_NORM(float)
INSTANTIATE_RMS_NORM(half)
INSTANTIATE_RMS_NORM(bfloat)
