// The Metal emulator's host side: runs launches of emulator-compiled shader
// libraries on CPU tensors (see my_mps_ops/emulator/ for the translator).
#pragma once

#include "metal/launch.h"

#include <string>
#include <vector>

namespace my_mps_ops::metal {

// The executor used for cpu tensors (by the ops under metal_emulation(), and by
// my_mps_ops.emulator.compile_shader).
Executor& emulator_executor();

// Makes the compiled emulator library at `so_path` (built by the Python
// translator from the MSL source of `library`) available under `library`.
void emulator_register_library(const std::string& library, const std::string& so_path);

// What a loaded library's kernels declare (for my_mps_ops.emulator.compile_shader).
struct EmulatorParamInfo {
  std::string name, type, kind;  // kind: "buffer", "threadgroup" or "builtin"
  int index;
  uint32_t bytes;  // constant references: bytes read; else 0
};
struct EmulatorKernelInfo {
  std::string name;
  size_t static_threadgroup_memory_length;
  bool uses_sync;
  std::vector<EmulatorParamInfo> params;
};
std::vector<EmulatorKernelInfo> emulator_kernels(const std::string& library);

}  // namespace my_mps_ops::metal
