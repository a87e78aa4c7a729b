// Launches of shaders/attention_decode.metal (built in metal/attention_decode.cpp).
#pragma once

#include "metal/launch.h"
#include "shaders/include/attention_decode.h"

namespace my_mps_ops::metal {

// q (batch, q_heads, q_len, head_dim) contiguous; k_cache / v_cache (batch,
// kv_heads, cache_len, head_dim) with rows of head_dim contiguous (any head
// and batch strides); seqlens int32 (batch,); sinks float32 (q_heads,), read
// only when has_sinks; out like q, lse float32 (batch, q_heads, q_len). At
// least one query and one cache row.
struct AttentionDecodeTensors {
  at::Tensor q, k_cache, v_cache, seqlens, sinks, out, lse;
};
struct AttentionDecodeOptions {
  bool causal;
  int64_t window_left;  // -1: unbounded
  double scale, softcap;
  bool has_sinks;
};

void attention_decode(const char* op, const AttentionDecodeTensors& t, const AttentionDecodeOptions& o);

}  // namespace my_mps_ops::metal
