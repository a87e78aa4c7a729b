// Launch of shaders/linear_cross_entropy.metal (built in
// metal/linear_cross_entropy.cpp): the row pass between a chunk's matmuls.
#pragma once

#include "metal/launch.h"
#include "shaders/include/linear_cross_entropy.h"

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace my_mps_ops::metal {

// logits [rows, classes] float32, contiguous (overwritten with the gradient
// when scale is defined); target [rows] int64; loss and lse [rows] float32
// views (written); scale [rows] float32 contiguous, or undefined.
struct LinearCrossEntropyRowsTensors {
  at::Tensor logits, target, loss, lse, scale;
};
struct LinearCrossEntropyRowsOptions {
  int64_t ignore_index;
  double label_smoothing, softcap, z_loss;
};

void linear_cross_entropy_rows(const char* op, const LinearCrossEntropyRowsTensors& t,
                               const LinearCrossEntropyRowsOptions& o);

}  // namespace my_mps_ops::metal
