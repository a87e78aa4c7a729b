// Launches of shaders/flash_attention.metal (built in metal/flash_attention.cpp).
#pragma once

#include "metal/launch.h"
#include "shaders/include/flash_attention.h"

namespace my_mps_ops::metal {

// q (batch, q_heads, q_len, head_dim), k and v (batch, kv_heads, kv_len,
// head_dim), kv_heads dividing q_heads; every tensor contiguous, outputs
// allocated; lse and delta float32 (batch, q_heads, q_len). At least one key
// (kv_len > 0) and one query.
struct FlashAttentionForwardTensors {
  at::Tensor q, k, v, out, lse;
};
struct FlashAttentionBackwardTensors {
  at::Tensor grad_out, q, k, v, out, lse;
  at::Tensor delta;  // scratch: rowsum(grad_out * out)
  at::Tensor dq, dk, dv;
};

void flash_attention_forward(const char* op, const FlashAttentionForwardTensors& t, bool causal, double scale);
void flash_attention_backward(const char* op, const FlashAttentionBackwardTensors& t, bool causal, double scale);

}  // namespace my_mps_ops::metal
