// linear_cross_entropy's row pass over one chunk of float32 logits that the
// host has just computed with a matmul: one threadgroup per row. Softcap in
// place, the row's max, sum of exp(z - m) and sum of z - m, its loss and lse,
// and, when asked, d loss / d logits written over the row:
//   loss = (1 - eps) (lse - z_t) + eps (lse - mean z) + z_loss lse^2
//   d loss / d z_j = g (p_j (1 + 2 z_loss lse) - eps / V - (1 - eps) [j == t])
// times 1 - (z_j / c)^2 for capped logits z = c tanh(x / c). Each thread
// reads and writes only its own logits, so the in-place passes need no
// barrier between them, except around the target's logit, which every thread
// reads; the row's reductions go through reduce.h.
#include <metal_stdlib>
#include "linear_cross_entropy.h"
#include "reduce.h"
using namespace metal;

kernel void linear_cross_entropy_rows(
    device float* logits [[buffer(0)]],
    device const long* target [[buffer(1)]],
    device float* loss [[buffer(2)]],
    device float* lse_out [[buffer(3)]],
    device const float* scale [[buffer(4)]],
    constant LinearCrossEntropyParams& p [[buffer(5)]],
    uint row [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]],
    uint simd_lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint simd_groups [[simdgroups_per_threadgroup]]) {
  threadgroup float partials_m[32];
  threadgroup float2 partials_sums[32];
  const uint v = p.classes;
  device float* z = logits + size_t(row) * v;
  const uint step = threads * kLinearCrossEntropyReadsPerThread;
  float local_m = -INFINITY;
  for (uint base = tid * kLinearCrossEntropyReadsPerThread; base < v; base += step) {
    for (uint k = 0; k < kLinearCrossEntropyReadsPerThread && base + k < v; ++k) {
      float x = z[base + k];
      if (p.softcap > 0.0f) {
        x = p.softcap * precise::tanh(x / p.softcap);
        z[base + k] = x;
      }
      local_m = max(local_m, x);
    }
  }
  const float m = threadgroup_max(local_m, partials_m, simd_lane, simd_group, simd_groups);
  float2 local_sums = float2(0.0f);  // (sum of exp(z - m), sum of z - m)
  for (uint base = tid * kLinearCrossEntropyReadsPerThread; base < v; base += step) {
    for (uint k = 0; k < kLinearCrossEntropyReadsPerThread && base + k < v; ++k) {
      const float d = z[base + k] - m;
      local_sums += float2(precise::exp(d), d);
    }
  }
  const float2 sums = threadgroup_sum2(local_sums, partials_sums, simd_lane, simd_group, simd_groups);
  const float log_s = precise::log(sums.x);
  const float lse = m + log_s;
  const long t = target[row];
  const bool ignored = t == p.ignore_index;
  const bool valid = !ignored && t >= 0 && t < long(v);
  // z_t was capped by the thread that owns it: order that write before every
  // thread's read, and every read before the owner overwrites it below.
  threadgroup_barrier(mem_flags::mem_device);
  const float z_t = valid ? z[uint(t)] : 0.0f;
  threadgroup_barrier(mem_flags::mem_device);
  if (tid == 0) {
    lse_out[row] = lse;
    if (ignored) {
      loss[row] = 0.0f;
    } else if (!valid) {
      loss[row] = NAN;  // out-of-range target: no host sync to raise on the GPU
    } else {
      // Formed from z - m first, as F.cross_entropy rounds it.
      const float nll = (m - z_t) + log_s;
      const float eps = p.label_smoothing;
      const float ce = eps == 0.0f ? nll : (1.0f - eps) * nll + eps * (log_s - sums.y / float(v));
      loss[row] = ce + p.z_loss * lse * lse;
    }
  }
  if (p.write_gradient == 0) {
    return;
  }
  const float g = valid ? scale[row] : 0.0f;
  const float coef = g * (1.0f + 2.0f * p.z_loss * lse);
  const float uniform = g * p.label_smoothing / float(v);
  const float target_term = g * (1.0f - p.label_smoothing);
  for (uint base = tid * kLinearCrossEntropyReadsPerThread; base < v; base += step) {
    for (uint k = 0; k < kLinearCrossEntropyReadsPerThread && base + k < v; ++k) {
      const uint j = base + k;
      const float x = z[j];
      float d = coef * precise::exp((x - m) - log_s) - uniform;
      if (long(j) == t) {
        d -= target_term;
      }
      if (p.softcap > 0.0f) {
        const float c = x / p.softcap;
        d *= 1.0f - c * c;
      }
      z[j] = valid ? d : 0.0f;
    }
  }
}
