// Rotary position embedding: the launch parameters shared by
// shaders/rotary.metal and its launch building (csrc/metal/rotary.cpp).
#pragma once

#include "common.h"

MY_MPS_OPS_SHADER_NAMESPACE_BEGIN

// Threads per row of the rotary kernels (a row's pairs are split among them).
MY_MPS_OPS_CONSTANT uint32_t kRotaryThreadsPerRow = 32;

// One tensor's rows of head_dim elements, in layout (batch, seq, heads,
// head_dim) when seq_dim is 1 or (batch, heads, seq, head_dim) when it is 2.
// The first 2 * pairs elements of a row rotate; cos/sin rows hold `pairs`
// float32 values.
struct RotaryShape {
  uint32_t batch, seq, heads, head_dim;
  uint32_t pairs;
  uint32_t cos_batch_stride;  // 0 when cos/sin are shared by the batch
  uint32_t seq_dim;
  uint32_t interleaved;  // 1: GPT-J pairs (2i, 2i + 1); 0: NeoX pairs (i, i + pairs)
  uint32_t conj;         // 1: rotate by -angle (the backward)
};

MY_MPS_OPS_SHADER_NAMESPACE_END
