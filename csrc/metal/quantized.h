// Launch of shaders/quantized.metal (built in metal/quantized.cpp).
#pragma once

#include "metal/launch.h"
#include "shaders/include/quantized.h"

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace my_mps_ops::metal {

// qweight: the packed codes as bytes the kernel reads as uint32 words (an
// nf4/fp4 row is cols / 2 bytes; the whole tensor's bytes are bound); scales
// and biases float32 [rows, groups] (biases: any float32 tensor for nf4/fp4);
// out float32 [row_end - row_begin, cols], contiguous.
void dequantize_rows(const char* op, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& biases,
                     const at::Tensor& out, int64_t row_begin, int64_t group_size, int64_t bits, uint32_t mode);

// The fused products for a few rows (at most shaders::kQuantMatvecMaxRows),
// float32, contiguous: out [rows, out_features] = x [rows, in_features] @ W^T
// (+ bias [out_features] when defined), and grad_x [rows, in_features] =
// grad_out [rows, out_features] @ W. Weight arguments as dequantize_rows.
void quantized_matvec(const char* op, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& biases,
                      const at::Tensor& x, const at::Tensor& bias, const at::Tensor& out, int64_t group_size,
                      int64_t bits, uint32_t mode);
void quantized_matvec_t(const char* op, const at::Tensor& qweight, const at::Tensor& scales,
                        const at::Tensor& biases, const at::Tensor& grad_out, const at::Tensor& grad_x,
                        int64_t group_size, int64_t bits, uint32_t mode);

}  // namespace my_mps_ops::metal
