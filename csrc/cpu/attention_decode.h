// CPU loops of flash_attention_decode (cpu/attention_decode_kernels.cpp):
// the entry point, one stub, called by ops/attention_decode.cpp.
#pragma once

#include "cpu/dispatch.h"

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace my_mps_ops::cpu {

// q is (batch, q_heads, q_len, head_dim), contiguous; the caches hold
// (batch, kv_heads, cache_len, head_dim) with rows of head_dim contiguous
// and the given strides between heads and batches (a preallocated cache is
// read in place). Sequence b's keys are 0 .. seqlens[b] - 1, and query i is
// aligned at a = i + seqlens[b] - q_len: it sees keys up to a (causal, else
// every valid key) and from a - window_left (-1: unbounded).
struct AttentionDecodeDims {
  int64_t batch, q_heads, kv_heads, group, q_len, head_dim;
  int64_t cache_len;
  int64_t k_batch_stride, k_head_stride, v_batch_stride, v_head_stride;
  bool causal;
  int64_t window_left;
};

// q, caches, sinks, out, lse: the call's accumulation dtype (float32 or
// float64); seqlens int64 (batch,), each in [0, cache_len]; sinks (q_heads,)
// or null; lse (batch, q_heads, q_len).
struct AttentionDecodeArgs {
  const void* q;
  const void* k;
  const void* v;
  const int64_t* seqlens;
  const void* sinks;
  void* out;
  void* lse;
  AttentionDecodeDims dims;
  double scale;
  double softcap;
};

using AttentionDecodeFn = void (*)(c10::ScalarType dtype, const AttentionDecodeArgs& args);

MY_MPS_OPS_CPU_STUB(attention_decode_stub, AttentionDecodeFn);

}  // namespace my_mps_ops::cpu
