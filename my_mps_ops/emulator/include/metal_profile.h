// Hooks of the emulator's performance counters (metal_profile.cpp), in kernel
// libraries built with MTL_EMU_PROFILE (my_mps_ops.emulator.profile()). Such a
// library is also built with MTL_EMU_RACE_CHECK: the scheduler's race-check
// events (metal_race_check.h) and the compiler's thread-sanitizer calls on
// every memory access are received by metal_profile.cpp instead of the race
// check, which counts them rather than checking them.
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace __mtl {
namespace profile {
// Called by the scheduler: a threadgroup barrier released `threads` waiting threads.
void barrier_released(uint32_t threads);
// The lanes of one SIMD group waiting at one call were released together:
// a SIMD-group function (barrier == false) or a simdgroup_barrier.
// `internal`: the emulator's own exchange (simdgroup_matrix fragments), not counted.
void simd_released(uint32_t lanes, bool barrier, bool internal);
}  // namespace profile

// Called by the Metal standard library headers, once per lane.
void profile_mma(unsigned long flops);   // a simdgroup_multiply_accumulate (the whole 8x8xK product)
void profile_transcendental();           // a scalar exp/log/sin/... evaluated
}  // namespace __mtl
