// metal_emulation() is per thread, and autograd may run a backward on another
// thread, or after the block has ended: each autograd Function records whether
// its forward ran under metal_emulation(), and its backward runs the same way.
#pragma once

#include "metal/launch.h"

#include <torch/csrc/autograd/custom_function.h>

namespace my_mps_ops {

inline void save_metal_emulation(torch::autograd::AutogradContext* ctx) {
  ctx->saved_data["metal_emulation"] = metal::metal_emulation_enabled();
}

class BackwardEmulationScope {
 public:
  explicit BackwardEmulationScope(torch::autograd::AutogradContext* ctx) : scope_(forward_setting(ctx)) {}

 private:
  static bool forward_setting(torch::autograd::AutogradContext* ctx) {
    const auto it = ctx->saved_data.find("metal_emulation");
    return it != ctx->saved_data.end() ? it->second.toBool() : metal::metal_emulation_enabled();
  }
  metal::MetalEmulationScope scope_;
};

}  // namespace my_mps_ops
