// CPU loop of rotary_embedding (cpu/rotary_kernels.cpp): its entry point,
// called by ops/rotary.cpp for the forward and the backward.
#pragma once

#include "cpu/dispatch.h"

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace my_mps_ops::cpu {

// Rows of head_dim contiguous elements of `dtype`, in layout (batch, seq,
// heads, head_dim) when seq_dim is 1 or (batch, heads, seq, head_dim) when it
// is 2. The first 2 * pairs elements of a row rotate by the angle of its
// batch and position (by minus it when conj: the backward), the rest are
// copied. cos/sin are rows of `pairs` values, one per position, per batch
// when cos_batch_stride is not 0: float32, float64 for float64 x.
struct RotaryArgs {
  const void* x;
  void* out;
  const void* cos;
  const void* sin;
  int64_t batch, seq, heads, head_dim, pairs;
  int64_t cos_batch_stride;
  int64_t seq_dim;
  bool interleaved;  // GPT-J pairs (2i, 2i + 1); else NeoX pairs (i, i + pairs)
  bool conj;
};

using RotaryFn = void (*)(c10::ScalarType dtype, const RotaryArgs& args);

MY_MPS_OPS_CPU_STUB(rotary_stub, RotaryFn);

}  // namespace my_mps_ops::cpu
