// Launches of shaders/cross_entropy.metal (built in metal/cross_entropy.cpp).
#pragma once

#include "metal/launch.h"
#include "shaders/include/cross_entropy.h"

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace my_mps_ops::metal {

// logits [rows, classes] with rows, classes > 0, and target [rows] (int64)
// are contiguous; outputs are allocated: loss and lse [rows] float32, and
// grad_logits like logits. lse is the forward's; scale [rows] float32 is the
// loss gradient with the reduction's factor.
struct CrossEntropyForwardTensors {
  at::Tensor logits, target, loss, lse;
};
struct CrossEntropyBackwardTensors {
  at::Tensor logits, target, lse, scale, grad_logits;
};

void cross_entropy_forward(const char* op, const CrossEntropyForwardTensors& t, int64_t ignore_index,
                           double label_smoothing);
void cross_entropy_backward(const char* op, const CrossEntropyBackwardTensors& t, int64_t ignore_index,
                            double label_smoothing);

}  // namespace my_mps_ops::metal
