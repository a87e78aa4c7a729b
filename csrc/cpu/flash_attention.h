// CPU loops of flash attention (cpu/flash_attention_kernels.cpp): their entry
// points, one stub each, called by ops/flash_attention.cpp.
#pragma once

#include "cpu/dispatch.h"

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace my_mps_ops::cpu {

// q is (batch, q_heads, q_len, head_dim), k and v (batch, kv_heads, kv_len,
// head_dim); q head h reads k/v head h / group.
struct FlashAttentionDims {
  int64_t batch, q_heads, kv_heads, group, q_len, kv_len, head_dim;
  bool causal;  // query i sees key j iff j <= i + kv_len - q_len
};

// Every pointer is a contiguous tensor of the call's dtype, float32 or
// float64 (the accumulation dtype the entry converts to); lse and delta are
// (batch, q_heads, q_len).
struct FlashAttentionForwardArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  void* lse;
  FlashAttentionDims dims;
  double scale;
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
};

using FlashAttentionForwardFn = void (*)(c10::ScalarType dtype, const FlashAttentionForwardArgs& args);
using FlashAttentionBackwardFn = void (*)(c10::ScalarType dtype, const FlashAttentionBackwardArgs& args);

MY_MPS_OPS_CPU_STUB(flash_attention_forward_stub, FlashAttentionForwardFn);
MY_MPS_OPS_CPU_STUB(flash_attention_backward_stub, FlashAttentionBackwardFn);

}  // namespace my_mps_ops::cpu
