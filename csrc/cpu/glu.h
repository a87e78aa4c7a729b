// CPU loops of the gated activations (cpu/glu_kernels.cpp): their entry
// points, one stub each, called by ops/glu.cpp.
#pragma once

#include "cpu/dispatch.h"

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace my_mps_ops::cpu {

enum class GluActivation : int32_t { SiLU, GeluErf, GeluTanh };

// Rows of `cols` elements; every input has its own row stride (in elements),
// outputs are contiguous. Pointers are to elements of `dtype`.
struct GluForwardArgs {
  const void* gate;
  int64_t gate_stride;
  const void* up;
  int64_t up_stride;
  void* out;
  int64_t rows, cols;
};
struct GluBackwardArgs {
  const void* grad_out;
  int64_t grad_out_stride;
  const void* gate;
  int64_t gate_stride;
  const void* up;
  int64_t up_stride;
  void* grad_gate;
  void* grad_up;
  int64_t rows, cols;
};

using GluForwardFn = void (*)(c10::ScalarType dtype, GluActivation act, const GluForwardArgs& args);
using GluBackwardFn = void (*)(c10::ScalarType dtype, GluActivation act, const GluBackwardArgs& args);

MY_MPS_OPS_CPU_STUB(glu_forward_stub, GluForwardFn);
MY_MPS_OPS_CPU_STUB(glu_backward_stub, GluBackwardFn);

}  // namespace my_mps_ops::cpu
