// The Metal emulator's host side (the my_mps_ops._emulator module): runs
// metal::Launch descriptions on cpu tensors with kernel libraries built by
// my_mps_ops/emulator/build.py.
#pragma once

#include "metal/launch.h"

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace my_mps_ops::emulator {

// The executor for cpu tensors: registered with _C as executor_for(cpu) when
// my_mps_ops.emulator is imported; also runs compile_shader's launches.
metal::Executor& executor();

// How one run may be stopped. timeout_seconds > 0: the run stops with an error
// after that long; 0: MY_MPS_OPS_EMULATOR_TIMEOUT (seconds) if set, else never.
// A SIGINT (Ctrl-C) during a run always stops it, and raises Interrupted.
struct RunOptions {
  double timeout_seconds = 0;
};
struct Interrupted : std::runtime_error {
  using std::runtime_error::runtime_error;
};
void run(const metal::Launch& launch, const RunOptions& options);

// How many launches the calling thread has run (tests tell which path an op took).
uint64_t runs_on_this_thread();

// The counters (JSON, one per launch, in launch order) of the launches run
// from profile libraries (my_mps_ops.emulator.profile()) since the last call.
std::vector<std::string> take_profile_records();

// Makes the compiled emulator library at `so_path` (built by the Python
// translator from the MSL source of `library`) available under `library`.
void register_library(const std::string& library, const std::string& so_path);

// Launches with function constants (metal::Launch::constants) run a library
// compiled with those values, registered under specialised_library_key()
// ("flash_attention{0:uint=2}"); the first such launch (or pipeline_info)
// asks the resolver to build it: resolve(library, key, constants) returns the
// path of the compiled library, which is then registered under `key`.
// my_mps_ops.testing sets it (and re-registers the specialised libraries it
// built when the race check is switched, as it does the plain ones).
using LibraryResolver = std::function<std::string(const std::string& library, const std::string& key,
                                                  const std::vector<metal::FunctionConstant>& constants)>;
void set_library_resolver(LibraryResolver resolve);
std::string specialised_library_key(const std::string& library,
                                    const std::vector<metal::FunctionConstant>& constants);

// What a loaded library's kernels declare (for my_mps_ops.emulator.compile_shader).
struct ParamInfo {
  std::string name, type, kind;  // kind: "buffer", "threadgroup" or "builtin"
  int index;
  uint32_t bytes;  // constant references: bytes read; else 0
};
struct KernelInfo {
  std::string name;
  size_t static_threadgroup_memory_length;
  std::vector<ParamInfo> params;
};
std::vector<KernelInfo> kernels(const std::string& library);

// The maxTotalThreadsPerThreadgroup every pipeline reports and enforces
// (1024 by default); tests lower it to check that launches follow it.
void set_pipeline_thread_limit(uint32_t threads);
uint32_t pipeline_thread_limit();

}  // namespace my_mps_ops::emulator
