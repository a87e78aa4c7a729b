// CPU loops of flash attention (cpu/flash_attention_kernels.cpp): their entry
// points, one stub each, called by ops/flash_attention.cpp.
#pragma once

#include "cpu/dispatch.h"

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace my_mps_ops::cpu {

// q head h reads k/v head h / group. Dense: q is (batch, q_heads, q_len,
// head_dim), k and v (batch, kv_heads, kv_len, head_dim), lse and delta
// (batch, q_heads, q_len). Packed variable-length (cu_q and cu_k set, host
// int32 arrays of batch + 1 offsets; FlashAttention's varlen layout): q is
// (total_q, q_heads, head_dim), k and v (total_k, kv_heads, head_dim), lse
// and delta (q_heads, q_head_stride = total_q); sequence b owns q rows
// cu_q[b] .. cu_q[b + 1] and k/v rows cu_k[b] .. cu_k[b + 1]; q_len and
// kv_len are then only upper bounds. The kernels read both in place: a head's
// rows are head_dim or heads * head_dim apart.
// Query i of a sequence, aligned bottom-right at a = i + its kv_len - its
// q_len, sees keys a - window_left .. a + window_right (-1: unbounded on that
// side; causal is window_right 0, folded in by the caller).
struct FlashAttentionDims {
  int64_t batch, q_heads, kv_heads, group, q_len, kv_len, head_dim;
  int64_t window_left, window_right;
  const int32_t* cu_q = nullptr;
  const int32_t* cu_k = nullptr;
  int64_t q_head_stride = 0, kv_head_stride = 0;  // packed only: total_q, total_k
};

// Every pointer is a contiguous tensor of the call's dtype, float32 or
// float64 (the accumulation dtype the entry converts to); lse and delta have
// one element per q row; sinks is (q_heads,) or null. softcap > 0 caps
// the scaled scores at softcap * tanh(s / softcap).
struct FlashAttentionForwardArgs {
  const void* q;
  const void* k;
  const void* v;
  const void* sinks;
  void* out;
  void* lse;
  FlashAttentionDims dims;
  double scale;
  double softcap;
};
struct FlashAttentionBackwardArgs {
  const void* grad_out;
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* lse;
  void* delta;  // scratch: rowsum(grad_out * out)
  void* dq;
  void* dk;
  void* dv;
  FlashAttentionDims dims;
  double scale;
  double softcap;
};

using FlashAttentionForwardFn = void (*)(c10::ScalarType dtype, const FlashAttentionForwardArgs& args);
using FlashAttentionBackwardFn = void (*)(c10::ScalarType dtype, const FlashAttentionBackwardArgs& args);

MY_MPS_OPS_CPU_STUB(flash_attention_forward_stub, FlashAttentionForwardFn);
MY_MPS_OPS_CPU_STUB(flash_attention_backward_stub, FlashAttentionBackwardFn);

}  // namespace my_mps_ops::cpu
