// linear_cross_entropy's row pass over one chunk of float32 logits that the
// host has just computed with a matmul: one threadgroup per row. Softcap in
// place, the row's max, sum of exp(z - m) and sum of z - m, its loss and lse,
// and, when asked, d loss / d logits written over the row:
//   loss = (1 - eps) (lse - z_t) + eps (lse - mean z) + z_loss lse^2
//   d loss / d z_j = g (p_j (1 + 2 z_loss lse) - eps / V - (1 - eps) [j == t])
// times 1 - (z_j / c)^2 for capped logits z = c tanh(x / c). A row is read
// twice at most: once for its statistics (an online max: each thread keeps
// its running max, sum of exp and sum of differences, rescaled when the max
// grows, and the threads' are combined at the end), once more to write the
// gradient. Each thread reads and writes only its own logits (t, t + threads,
// ...: a SIMD group's lanes take consecutive logits), so the in-place passes
// need no barrier between them, except around the target's logit, which
// every thread reads; the row's reductions go through reduce.h.
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
  threadgroup long row_target;
  threadgroup float row_values[2];  // z_t, scale
  const uint v = p.classes;
  device float* z = logits + size_t(row) * v;
  const uint step = threads * kLinearCrossEntropyReadsPerThread;
  // Running statistics of this thread's logits: max, sum of exp(z - max),
  // sum of (z - max), count.
  float local_m = -INFINITY, local_s = 0.0f, local_d = 0.0f;
  uint local_n = 0;
  for (uint base = tid; base < v; base += step) {
    for (uint k = 0; k < kLinearCrossEntropyReadsPerThread; ++k) {
      const uint j = base + k * threads;
      if (j >= v) break;
      float x = z[j];
      if (p.softcap > 0.0f) {
        x = p.softcap * precise::tanh(x / p.softcap);
        z[j] = x;
      }
      if (local_n == 0) {
        local_m = x;
        local_s = 1.0f;
        local_d = 0.0f;
      } else if (x > local_m) {
        local_s = local_s * precise::exp(local_m - x) + 1.0f;
        local_d += float(local_n) * (local_m - x);
        local_m = x;
      } else {
        local_s += precise::exp(x - local_m);
        local_d += x - local_m;
      }
      ++local_n;
    }
  }
  const float m = threadgroup_max(local_m, partials_m, simd_lane, simd_group, simd_groups);
  // This thread's sums taken relative to the row's max (nothing if it has no logits).
  const float2 local_sums = local_n == 0 ? float2(0.0f)
                                         : float2(local_s * precise::exp(local_m - m),
                                                  local_d + float(local_n) * (local_m - m));
  const float2 sums = threadgroup_sum2(local_sums, partials_sums, simd_lane, simd_group, simd_groups);
  const float log_s = precise::log(sums.x);
  const float lse = m + log_s;
  // The row's target, its logit and scale, read once and handed to every
  // thread. z_t was capped by the thread that owns it: the first barrier
  // orders that write before thread 0 reads it, the second that read before
  // the owner overwrites it below.
  threadgroup_barrier(mem_flags::mem_device);
  if (tid == 0) {
    const long t0 = target[row];
    const bool valid0 = t0 != p.ignore_index && t0 >= 0 && t0 < long(v);
    row_target = t0;
    row_values[0] = valid0 ? z[uint(t0)] : 0.0f;
    row_values[1] = valid0 && p.write_gradient != 0 ? scale[row] : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);
  const long t = row_target;
  const bool ignored = t == p.ignore_index;
  const bool valid = !ignored && t >= 0 && t < long(v);
  const float z_t = row_values[0];
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
  const float g = row_values[1];
  const float coef = g * (1.0f + 2.0f * p.z_loss * lse);
  const float uniform = g * p.label_smoothing / float(v);
  const float target_term = g * (1.0f - p.label_smoothing);
  for (uint base = tid; base < v; base += step) {
    for (uint k = 0; k < kLinearCrossEntropyReadsPerThread; ++k) {
      const uint j = base + k * threads;
      if (j >= v) break;
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
