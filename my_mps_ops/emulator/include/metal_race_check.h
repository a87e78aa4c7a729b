// The interface between the scheduler (metal_runtime.cpp) and the race check
// (metal_race_check.cpp), in kernel libraries built with MTL_EMU_RACE_CHECK.
#pragma once

#include "metal_emulator_abi.h"

#include <stddef.h>
#include <stdint.h>

namespace __mtl {
namespace race {

// One threadgroup array: a `threadgroup T name[N];` declaration or a
// [[threadgroup(n)]] parameter.
struct ThreadgroupRegion {
  unsigned char* base;
  size_t bytes;
  const char* name;
};

// Called by the scheduler on the OS thread that runs the threadgroup.
// A threadgroup starts: forget the previous group's threadgroup-memory accesses.
void begin_group(const mtl_emu_launch* launch, uint64_t group, const ThreadgroupRegion* regions, size_t count,
                 uint32_t simd_groups);
// The threadgroup has finished (reports a simdgroup race found in it).
void end_group();
// Every live thread of the group passed a threadgroup_barrier with these mem_flags.
void threadgroup_barrier_released(unsigned flags);
// The lanes of SIMD group `simd_group` passed a simdgroup_barrier with these mem_flags.
void simdgroup_barrier_released(uint32_t simd_group, unsigned flags);

// Provided by the scheduler.
// The GPU thread running on this OS thread, or null outside a kernel.
const mtl_emu_lane* current_lane_info();
// Records the error that ends the run (the first one wins), as the scheduler's own.
void report_error(const char* message);
bool run_failed();

}  // namespace race
}  // namespace __mtl
