// Launches of shaders/rotary.metal (built in metal/rotary.cpp).
#pragma once

#include "metal/launch.h"
#include "shaders/include/rotary.h"

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace my_mps_ops::metal {

// x is 4-D, (batch, seq, heads, head_dim) when seq_dim is 1 or (batch,
// heads, seq, head_dim) when it is 2, contiguous; out is allocated like it.
// head_dim and the number of rows launched (of q and k together for
// rotary_qk) are not 0.
struct RotaryTensors {
  at::Tensor x, out;
};
// cos / sin: float32, contiguous, [seq, pairs] or [batch, seq, pairs].
// conj rotates by minus the angle (the backward).
struct RotaryOptions {
  at::Tensor cos, sin;
  bool interleaved;
  int64_t seq_dim;
  bool conj;
};

void rotary(const char* op, const RotaryTensors& x, const RotaryOptions& o);
// q and k (k may have fewer heads) in one launch.
void rotary_qk(const char* op, const RotaryTensors& q, const RotaryTensors& k, const RotaryOptions& o);

}  // namespace my_mps_ops::metal
