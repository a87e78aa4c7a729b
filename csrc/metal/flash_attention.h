// Launches of shaders/flash_attention.metal (built in metal/flash_attention.cpp).
#pragma once

#include "metal/launch.h"
#include "shaders/include/flash_attention.h"

namespace my_mps_ops::metal {

// Dense: q (batch, q_heads, q_len, head_dim), k and v (batch, kv_heads,
// kv_len, head_dim); lse and delta float32 (batch, q_heads, q_len).
// Packed sequences (cu_q and cu_k defined: int32 (batch + 1,) offsets on q's
// device): q (q_heads, total_q, head_dim), k and v (kv_heads, total_k,
// head_dim), lse and delta (q_heads, total_q), FlashAttentionOptions::max_q /
// max_k the longest lengths. kv_heads divides q_heads; every tensor
// contiguous, outputs allocated. At least one key and one query.
struct FlashAttentionForwardTensors {
  at::Tensor q, k, v;
  at::Tensor sinks;  // float32 (q_heads,); read only when FlashAttentionOptions::has_sinks
  at::Tensor out, lse;
  at::Tensor cu_q = {}, cu_k = {};
};
struct FlashAttentionBackwardTensors {
  at::Tensor grad_out, q, k, v, out, lse;
  at::Tensor delta;  // scratch: rowsum(grad_out * out)
  at::Tensor dq, dk, dv;
  at::Tensor cu_q = {}, cu_k = {};
};

// The window as the kernels take it (causal folded into window_right = 0;
// -1 unbounded), the resolved scale, softcap (0: off), whether lse includes
// a sink (the backward only needs lse).
struct FlashAttentionOptions {
  int64_t window_left, window_right;
  double scale, softcap;
  bool has_sinks;
  int64_t max_q = 0, max_k = 0;  // packed sequences only
};

void flash_attention_forward(const char* op, const FlashAttentionForwardTensors& t, const FlashAttentionOptions& o);
void flash_attention_backward(const char* op, const FlashAttentionBackwardTensors& t, const FlashAttentionOptions& o);

}  // namespace my_mps_ops::metal
