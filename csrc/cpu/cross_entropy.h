// CPU loops of cross_entropy (cpu/cross_entropy_kernels.cpp): their entry
// points, one stub each, called by ops/cross_entropy.cpp.
#pragma once

#include "cpu/dispatch.h"

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace my_mps_ops::cpu {

// Rows of `classes` contiguous logits of `dtype`, one int64 target per row.
// Per-row statistics (loss, lse, scale) are in the accumulation dtype:
// float32, or float64 for float64 logits.
struct CrossEntropyForwardArgs {
  const void* logits;
  const int64_t* target;
  void* loss;  // per row; 0 where the target is ignore_index
  void* lse;   // per row: log-sum-exp of the logits
  int64_t rows, classes, ignore_index;
  double label_smoothing;  // float64 logits use it as given, the others as float32
};
struct CrossEntropyBackwardArgs {
  const void* logits;
  const int64_t* target;
  const void* lse;    // per row, from the forward
  const void* scale;  // per row: the loss gradient with the reduction's factor
  void* grad_logits;  // contiguous, `dtype`
  int64_t rows, classes, ignore_index;
  double label_smoothing;  // float64 logits use it as given, the others as float32
};

// The forward returns a row whose target is neither a class nor
// ignore_index (its loss is NaN), or -1 when there is none.
using CrossEntropyForwardFn = int64_t (*)(c10::ScalarType dtype, const CrossEntropyForwardArgs& args);
using CrossEntropyBackwardFn = void (*)(c10::ScalarType dtype, const CrossEntropyBackwardArgs& args);

MY_MPS_OPS_CPU_STUB(cross_entropy_forward_stub, CrossEntropyForwardFn);
MY_MPS_OPS_CPU_STUB(cross_entropy_backward_stub, CrossEntropyBackwardFn);

}  // namespace my_mps_ops::cpu
