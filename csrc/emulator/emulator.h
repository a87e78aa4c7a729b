// The Metal emulator's host side: runs launches of emulator-compiled shader
// libraries on CPU tensors (see my_mps_ops/emulator/ for the translator).
#pragma once

#include "metal_launch.h"

#include <string>

namespace my_mps_ops::metal {

// The executor used for cpu tensors (by the ops under metal_emulation(), and by
// my_mps_ops.emulator.compile_shader).
Executor& emulator_executor();

// Makes the compiled emulator library at `so_path` (built by the Python
// translator from the MSL source of `library`) available under `library`.
void emulator_register_library(const std::string& library, const std::string& so_path);

}  // namespace my_mps_ops::metal
