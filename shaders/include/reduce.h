// Threadgroup reductions shared by the shader families: a SIMD-group
// reduction, then one partial per SIMD group through threadgroup memory.
#pragma once

#include <metal_stdlib>
using namespace metal;

// Sum of `value` over every thread of the threadgroup, returned to all of them.
// `partials` must hold one float per SIMD group (32 covers 1024 threads). Every
// thread of the group must call it (it has barriers); it may be called again
// with the same `partials` straight away.
inline float threadgroup_sum(float value, threadgroup float* partials, uint simd_lane, uint simd_group,
                             uint simd_groups) {
  value = simd_sum(value);
  if (simd_lane == 0) {
    partials[simd_group] = value;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  // Every SIMD group reduces the partials itself: no second broadcast round.
  float total = simd_sum(simd_lane < simd_groups ? partials[simd_lane] : 0.0f);
  threadgroup_barrier(mem_flags::mem_threadgroup);  // partials may be reused next
  return total;
}

// Max of `value` over every thread of the threadgroup, returned to all of
// them; the same contract as threadgroup_sum.
inline float threadgroup_max(float value, threadgroup float* partials, uint simd_lane, uint simd_group,
                             uint simd_groups) {
  value = simd_max(value);
  if (simd_lane == 0) {
    partials[simd_group] = value;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float total = simd_max(simd_lane < simd_groups ? partials[simd_lane] : -INFINITY);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return total;
}

// Two sums at once (one barrier pair for both).
inline float2 threadgroup_sum2(float2 value, threadgroup float2* partials, uint simd_lane, uint simd_group,
                               uint simd_groups) {
  value = float2(simd_sum(value.x), simd_sum(value.y));
  if (simd_lane == 0) {
    partials[simd_group] = value;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float2 mine = simd_lane < simd_groups ? partials[simd_lane] : float2(0.0f);
  float2 total = float2(simd_sum(mine.x), simd_sum(mine.y));
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return total;
}
