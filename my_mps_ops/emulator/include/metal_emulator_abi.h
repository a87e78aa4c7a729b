// The boundary between the emulator's host (my_mps_ops/emulator/host/, the
// my_mps_ops._emulator module) and a kernel library compiled from translated
// MSL (a .so built by my_mps_ops/emulator/build.py). Plain C structs: both
// sides are built by different compiler invocations.
#pragma once

#include <stddef.h>
#include <stdint.h>

#define MTL_EMU_ABI_VERSION 2
#define MTL_EMU_MAX_BINDINGS 31  // Metal's buffer / threadgroup argument table size

enum mtl_emu_param_kind {
  MTL_EMU_PARAM_BUFFER = 0,       // device/constant pointer or constant reference: [[buffer(n)]]
  MTL_EMU_PARAM_THREADGROUP = 1,  // threadgroup pointer: [[threadgroup(n)]], sized at launch
  MTL_EMU_PARAM_BUILTIN = 2,      // [[thread_position_in_grid]] and friends
};

enum mtl_emu_builtin {
  MTL_EMU_THREAD_POSITION_IN_GRID = 0,
  MTL_EMU_THREADGROUP_POSITION_IN_GRID,
  MTL_EMU_THREAD_POSITION_IN_THREADGROUP,
  MTL_EMU_THREAD_INDEX_IN_THREADGROUP,
  MTL_EMU_THREADS_PER_THREADGROUP,
  MTL_EMU_THREADGROUPS_PER_GRID,
  MTL_EMU_THREADS_PER_GRID,
  MTL_EMU_THREAD_INDEX_IN_SIMDGROUP,
  MTL_EMU_SIMDGROUP_INDEX_IN_THREADGROUP,
  MTL_EMU_THREADS_PER_SIMDGROUP,
  MTL_EMU_SIMDGROUPS_PER_THREADGROUP,
  MTL_EMU_QUADGROUP_INDEX_IN_THREADGROUP,
  MTL_EMU_THREAD_INDEX_IN_QUADGROUP,
  MTL_EMU_THREADS_PER_QUADGROUP,
  MTL_EMU_QUADGROUPS_PER_THREADGROUP,
  MTL_EMU_BUILTIN_COUNT
};

struct mtl_emu_param {
  int32_t kind;     // mtl_emu_param_kind
  int32_t index;    // buffer / threadgroup index, or mtl_emu_builtin
  uint32_t bytes;   // constant references: the size the kernel reads; 0 for pointers
  const char* name; // parameter name in the source
  const char* type; // parameter type as written in the source
};

struct mtl_emu_launch;
struct mtl_emu_lane;

struct mtl_emu_kernel {
  const char* host_name;
  int32_t num_params;
  const struct mtl_emu_param* params;
  int32_t uses_sync;  // barriers or SIMD-group functions: threads run as fibers
  // Static threadgroup memory: fills offsets[i] for the kernel's i-th
  // `threadgroup` declaration (when offsets != NULL) and returns the total bytes.
  size_t (*threadgroup_layout)(size_t* offsets);
  void (*invoke)(const struct mtl_emu_launch* launch, const struct mtl_emu_lane* lane);
};

struct mtl_emu_launch {
  const struct mtl_emu_kernel* kernel;
  void* buffers[MTL_EMU_MAX_BINDINGS];   // [[buffer(n)]] -> address (already offset)
  size_t buffer_lengths[MTL_EMU_MAX_BINDINGS];  // bytes bound from buffers[n] on (a tensor view's extent)
  size_t threadgroup_lengths[MTL_EMU_MAX_BINDINGS];  // [[threadgroup(n)]] -> bytes
  uint64_t grid[3];   // threads (uniform == 0) or threadgroups (uniform == 1)
  uint64_t group[3];  // threads per threadgroup
  int32_t uniform;
  int32_t strict_barriers;  // threads that returned before a barrier: error (1) or warning (0)
};

// Per-thread values the invoke function turns into builtins.
struct mtl_emu_lane {
  uint32_t thread_in_group[3];
  uint32_t group_pos[3];
  uint32_t group_size[3];   // this threadgroup's real size (edge groups may be smaller)
  uint32_t groups[3];
  uint32_t grid_threads[3];
  uint32_t index_in_group;
  uint32_t simd_lane;
  uint32_t simd_group;
  uint32_t simd_groups;
};

struct mtl_emu_error {
  int32_t failed;
  char message[2048];
  uint64_t warnings;           // e.g. reads of inactive SIMD lanes, early-return barriers (lenient)
  char first_warning[512];
};

// Exported by every kernel library.
typedef const struct mtl_emu_kernel* (*mtl_emu_kernels_fn)(int32_t* count, int32_t* abi_version);
// Runs threadgroups [first, last) (linear group ids) on the calling OS thread.
typedef void (*mtl_emu_run_fn)(const struct mtl_emu_launch* launch, uint64_t first, uint64_t last,
                               struct mtl_emu_error* error);
// The thread being run on this OS thread (for fault reports); 0 if none.
typedef int (*mtl_emu_current_fn)(uint32_t thread_in_grid[3], uint32_t group_pos[3]);

// Exported by libraries built with the race check only (absent otherwise): the
// host calls begin before the first mtl_emu_run of a launch and end after the
// last, so that device-memory accesses of the launch's threadgroups are checked
// against each other. lengths[i]: bytes bound from launch->buffers[i] on (0: none).
typedef void (*mtl_emu_race_begin_fn)(const struct mtl_emu_launch* launch, const size_t* lengths);
typedef void (*mtl_emu_race_end_fn)(const struct mtl_emu_launch* launch);

// Exported by libraries built with the profile counters only (emulator/profile.py,
// include/metal_profile.cpp): after mtl_emu_race_end, the launch's counters as a
// JSON object (valid until the next launch of the library).
typedef const char* (*mtl_emu_profile_result_fn)(const struct mtl_emu_launch* launch);

// Exported by every kernel library: the host calls it with each launch before
// its first mtl_emu_run (launches of a library do not overlap).
typedef void (*mtl_emu_bind_fn)(const struct mtl_emu_launch* launch);

// Exported by every kernel library: makes the running launch stop (reason 1:
// interrupted, 2: timed out) at its next loop iteration, synchronisation point
// or threadgroup; 0 clears it before a launch. Async-signal-safe.
typedef void (*mtl_emu_cancel_fn)(int32_t reason);
