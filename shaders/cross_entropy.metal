// Cross-entropy over rows of logits [N, V] with integer targets, with label
// smoothing and ignore_index. One threadgroup per row.
//
// Forward: one pass over the row keeping an online log-sum-exp per thread
// (running max m and sum s of exp(z - m)) and the sum of z (for smoothing);
// threads combine (m, s) pairs by SIMD group, then across the threadgroup.
// Writes the row's loss and its log-sum-exp, which the backward reuses.
// Backward: grad = scale[row] * (exp(z - lse) - (1 - eps) [j == t] - eps / V),
// written in the logits' type with no [N, V] float intermediate.
#include <metal_stdlib>
#include "cross_entropy.h"
using namespace metal;

struct LseState {
  float m;  // running max
  float s;  // sum of exp(z - m)
};

inline LseState lse_combine(LseState a, LseState b) {
  const float m = max(a.m, b.m);
  if (m == -INFINITY) {
    return LseState{m, 0.0f};
  }
  return LseState{m, a.s * precise::exp(a.m - m) + b.s * precise::exp(b.m - m)};
}

template <typename T>
kernel void cross_entropy_forward(
    device const T* logits [[buffer(0)]],
    device const long* target [[buffer(1)]],
    device float* loss [[buffer(2)]],
    device float* lse_out [[buffer(3)]],
    constant CrossEntropyParams& p [[buffer(4)]],
    uint row [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]],
    uint simd_lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint simd_groups [[simdgroups_per_threadgroup]]) {
  threadgroup float shared_m[32];
  threadgroup float shared_s[32];
  threadgroup float shared_sum[32];
  const uint v = p.classes;
  const size_t offset = size_t(row) * v;
  LseState st{-INFINITY, 0.0f};
  float sum_z = 0.0f;
  for (uint base = tid * kCrossEntropyReadsPerThread; base < v; base += threads * kCrossEntropyReadsPerThread) {
    for (uint k = 0; k < kCrossEntropyReadsPerThread; ++k) {
      if (base + k < v) {
        const float z = float(logits[offset + base + k]);
        st = lse_combine(st, LseState{z, 1.0f});
        sum_z += z;
      }
    }
  }
  // Combine within the SIMD group, then across SIMD groups.
  float m = simd_max(st.m);
  float s = simd_sum(m == -INFINITY ? 0.0f : st.s * precise::exp(st.m - m));
  sum_z = simd_sum(sum_z);
  if (simd_lane == 0) {
    shared_m[simd_group] = m;
    shared_s[simd_group] = s;
    shared_sum[simd_group] = sum_z;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float gm = simd_lane < simd_groups ? shared_m[simd_lane] : -INFINITY;
  const float gs = simd_lane < simd_groups ? shared_s[simd_lane] : 0.0f;
  const float gz = simd_lane < simd_groups ? shared_sum[simd_lane] : 0.0f;
  m = simd_max(gm);
  s = simd_sum(m == -INFINITY ? 0.0f : gs * precise::exp(gm - m));
  sum_z = simd_sum(gz);
  if (tid == 0) {
    const float lse = m + precise::log(s);
    lse_out[row] = lse;
    const long t = target[row];
    if (t == p.ignore_index) {
      loss[row] = 0.0f;
    } else if (t < 0 || t >= long(v)) {
      loss[row] = NAN;  // out-of-range target: no host sync to raise on the GPU
    } else {
      const float zt = float(logits[offset + uint(t)]);
      // Without smoothing the sum of z is left out, as F.cross_entropy does:
      // a masked (-inf) logit would make it 0 * -inf = NaN.
      loss[row] = p.label_smoothing == 0.0f
                      ? lse - zt
                      : lse - (1.0f - p.label_smoothing) * zt - p.label_smoothing * sum_z / float(v);
    }
  }
}

template <typename T>
kernel void cross_entropy_backward(
    device const T* logits [[buffer(0)]],
    device const long* target [[buffer(1)]],
    device const float* lse [[buffer(2)]],
    device const float* scale [[buffer(3)]],
    device T* grad [[buffer(4)]],
    constant CrossEntropyParams& p [[buffer(5)]],
    uint row [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]]) {
  const uint v = p.classes;
  const float smoothing = p.label_smoothing;
  const size_t offset = size_t(row) * v;
  const long t = target[row];
  const bool ignored = t == p.ignore_index;
  const float g = ignored ? 0.0f : scale[row];
  const float r_lse = lse[row];
  const float uniform = smoothing / float(v);
  for (uint base = tid * kCrossEntropyReadsPerThread; base < v; base += threads * kCrossEntropyReadsPerThread) {
    for (uint k = 0; k < kCrossEntropyReadsPerThread; ++k) {
      const uint j = base + k;
      if (j < v) {
        float d = precise::exp(float(logits[offset + j]) - r_lse) - uniform;
        if (long(j) == t) d -= 1.0f - smoothing;
        grad[offset + j] = T(ignored ? 0.0f : g * d);
      }
    }
  }
}

#define INSTANTIATE_CROSS_ENTROPY(T)                      \
  MY_MPS_OPS_INSTANTIATE_KERNEL(cross_entropy_forward, T) \
  MY_MPS_OPS_INSTANTIATE_KERNEL(cross_entropy_backward, T)

INSTANTIATE_CROSS_ENTROPY(float)
INSTANTIATE_CROSS_ENTROPY(half)
INSTANTIATE_CROSS_ENTROPY(bfloat)
