// Launches of shaders/glu.metal (built in metal/glu.cpp).
#pragma once

#include "ops/common.h"
#include "shaders/include/glu.h"

namespace my_mps_ops::metal {

// Inputs are row views (see ops/common.h) of rows x cols elements; outputs
// are contiguous and allocated. kernel_stem: "swiglu" or "geglu";
// approximate: shaders::kGeluErf or kGeluTanh (geglu only).
struct GluForwardTensors {
  at::Tensor gate, up, out;
  RowView gate_rows, up_rows;
};
struct GluBackwardTensors {
  at::Tensor grad_out, gate, up, grad_gate, grad_up;
  RowView grad_out_rows, gate_rows, up_rows;
};

void glu_forward(const char* op, const char* kernel_stem, uint32_t approximate, const GluForwardTensors& t);
void glu_backward(const char* op, const char* kernel_stem, uint32_t approximate, const GluBackwardTensors& t);

}  // namespace my_mps_ops::metal
