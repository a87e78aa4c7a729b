// CPU loop of linear_cross_entropy (cpu/linear_cross_entropy_kernels.cpp):
// the per-row pass over one chunk of logits, called by
// ops/linear_cross_entropy.cpp between the chunk's matmuls.
#pragma once

#include "cpu/dispatch.h"

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace my_mps_ops::cpu {

// `rows` rows of `classes` contiguous logits in the accumulation dtype
// (float32, or float64), read and, when `scale` is given, overwritten with
// the gradient of the rows' losses with respect to the (uncapped) logits.
struct LinearCrossEntropyRowsArgs {
  void* logits;
  const int64_t* target;
  void* loss;         // per row, accumulation dtype; 0 where the target is ignore_index
  void* lse;          // per row: log-sum-exp of the (capped) logits
  const void* scale;  // per row: d(reduced loss)/d(row loss); nullptr: forward only
  int64_t rows, classes, ignore_index;
  double label_smoothing;
  double softcap;  // logits become softcap * tanh(logits / softcap); 0: none
  double z_loss;   // adds z_loss * lse^2 to each counted row's loss
};

// Returns a row whose target is neither a class nor ignore_index, or -1.
using LinearCrossEntropyRowsFn = int64_t (*)(c10::ScalarType acc_dtype, const LinearCrossEntropyRowsArgs& args);

MY_MPS_OPS_CPU_STUB(linear_cross_entropy_rows_stub, LinearCrossEntropyRowsFn);

}  // namespace my_mps_ops::cpu
