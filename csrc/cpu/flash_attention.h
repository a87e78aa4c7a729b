// CPU loops of flash attention (cpu/flash_attention_kernels.cpp): their entry
// points, one stub each, called by ops/flash_attention.cpp.
#pragma once

#include "cpu/dispatch.h"

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace my_mps_ops::cpu {

// q is (batch, q_heads, q_len, head_dim), k and v (batch, kv_heads, kv_len,
// head_dim); q head h reads k/v head h / group.
// Query i, aligned bottom-right at a = i + kv_len - q_len, sees keys
// a - window_left .. a + window_right (-1: unbounded on that side; causal is
// window_right 0, folded in by the caller).
struct FlashAttentionDims {
  int64_t batch, q_heads, kv_heads, group, q_len, kv_len, head_dim;
  int64_t window_left, window_right;
};

// Every pointer is a contiguous tensor of the call's dtype, float32 or
// float64 (the accumulation dtype the entry converts to); lse and delta are
// (batch, q_heads, q_len); sinks is (q_heads,) or null. softcap > 0 caps
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
