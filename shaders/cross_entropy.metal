// Cross-entropy over rows of logits [N, V] with integer targets, with label
// smoothing and ignore_index. One threadgroup per row.
//
// Forward: one pass over the row keeping an online log-sum-exp per thread
// (running max m, sum s of exp(z - m), and the sum of z - m for smoothing);
// threads combine their states by SIMD group, then across the threadgroup.
// Writes the row's loss and its log-sum-exp, which the backward reuses. The
// loss is formed as F.cross_entropy rounds it, (m - z_t) + log(s): a row whose
// logits all equal one huge value (finfo.min masking) keeps its log(V).
// Backward: grad = scale[row] * (softmax - (1 - eps) [j == t] - eps / V),
// written in the logits' type with no [N, V] float intermediate.
#include <metal_stdlib>
#include "cross_entropy.h"
#include "reduce.h"
using namespace metal;

struct LseState {
  float m;  // running max
  float s;  // sum of exp(z - m)
  float d;  // sum of (z - m); -inf once a logit is -inf
  float n;  // logits seen (exact in float below 2^24 classes)
};

// d of `a` rebased to the max m >= a.m.
inline float rebased_d(LseState a, float m) {
  if (a.n == 0.0f) {
    return 0.0f;
  }
  return a.m == -INFINITY ? -INFINITY : a.d + a.n * (a.m - m);
}

inline LseState lse_combine(LseState a, LseState b) {
  const float m = max(a.m, b.m);
  const float d = rebased_d(a, m) + rebased_d(b, m);
  if (m == -INFINITY) {
    return LseState{m, 0.0f, d, a.n + b.n};
  }
  return LseState{m, a.s * precise::exp(a.m - m) + b.s * precise::exp(b.m - m), d, a.n + b.n};
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
  threadgroup float shared_d[32];
  threadgroup float shared_n[32];
  const uint v = p.classes;
  const size_t offset = size_t(row) * v;
  LseState st{-INFINITY, 0.0f, 0.0f, 0.0f};
  for (uint base = tid; base < v; base += threads * kCrossEntropyReadsPerThread) {
    for (uint k = 0; k < kCrossEntropyReadsPerThread; ++k) {
      if (base + k * threads < v) {
        const float z = float(logits[offset + base + k * threads]);
        st = lse_combine(st, LseState{z, 1.0f, 0.0f, 1.0f});
      }
    }
  }
  // Combine within the SIMD group, then across SIMD groups.
  float m = simd_max(st.m);
  float s = simd_sum(m == -INFINITY ? 0.0f : st.s * precise::exp(st.m - m));
  float d = simd_sum(rebased_d(st, m));
  float n = simd_sum(st.n);
  if (simd_lane == 0) {
    shared_m[simd_group] = m;
    shared_s[simd_group] = s;
    shared_d[simd_group] = d;
    shared_n[simd_group] = n;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  LseState g{-INFINITY, 0.0f, 0.0f, 0.0f};
  if (simd_lane < simd_groups) {
    g = LseState{shared_m[simd_lane], shared_s[simd_lane], shared_d[simd_lane], shared_n[simd_lane]};
  }
  m = simd_max(g.m);
  s = simd_sum(m == -INFINITY ? 0.0f : g.s * precise::exp(g.m - m));
  d = simd_sum(rebased_d(g, m));
  if (tid == 0) {
    const float log_s = precise::log(s);
    lse_out[row] = m + log_s;
    const long t = target[row];
    if (t == p.ignore_index) {
      loss[row] = 0.0f;
    } else if (t < 0 || t >= long(v)) {
      loss[row] = NAN;  // out-of-range target: no host sync to raise on the GPU
    } else {
      const float zt = float(logits[offset + uint(t)]);
      // Without smoothing the sum of z - m is left out, as F.cross_entropy
      // does: a masked (-inf) logit would make it 0 * -inf = NaN.
      loss[row] = p.label_smoothing == 0.0f
                      ? (m - zt) + log_s
                      : log_s - (1.0f - p.label_smoothing) * (zt - m) - p.label_smoothing * d / float(v);
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
    uint threads [[threads_per_threadgroup]],
    uint simd_lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint simd_groups [[simdgroups_per_threadgroup]]) {
  threadgroup float partials_m[32];
  threadgroup float partials_s[32];
  threadgroup long row_target;
  threadgroup float row_values[2];  // scale, lse
  const uint v = p.classes;
  const float smoothing = p.label_smoothing;
  const size_t offset = size_t(row) * v;
  // The row's target, scale and lse, read once and handed to every thread.
  if (tid == 0) {
    row_target = target[row];
    row_values[0] = row_target == p.ignore_index ? 0.0f : scale[row];
    row_values[1] = lse[row];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const long t = row_target;
  const bool ignored = t == p.ignore_index;
  const float g = row_values[0];
  const float uniform = smoothing / float(v);
  // softmax = exp((z - shift) - log_s): the forward's lse as the shift while
  // it is exact enough, else the row's m and s recomputed (shared header).
  // The branch depends on the row only, so the barriers inside are uniform.
  float shift = row_values[1];
  float log_s = 0.0f;
  if (!ignored && !(abs(shift) < kCrossEntropyExactLseBound)) {
    float local_m = -INFINITY;
    for (uint j = tid; j < v; j += threads) {
      local_m = max(local_m, float(logits[offset + j]));
    }
    const float m = threadgroup_max(local_m, partials_m, simd_lane, simd_group, simd_groups);
    float local_s = 0.0f;
    if (m != -INFINITY) {
      for (uint j = tid; j < v; j += threads) {
        local_s += precise::exp(float(logits[offset + j]) - m);
      }
    }
    shift = m;
    log_s = precise::log(threadgroup_sum(local_s, partials_s, simd_lane, simd_group, simd_groups));
  }
  for (uint base = tid; base < v; base += threads * kCrossEntropyReadsPerThread) {
    for (uint k = 0; k < kCrossEntropyReadsPerThread; ++k) {
      const uint j = base + k * threads;
      if (j < v) {
        float d = precise::exp((float(logits[offset + j]) - shift) - log_s) - uniform;
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
