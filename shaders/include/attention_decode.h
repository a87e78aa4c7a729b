// flash_attention_decode: the launch parameters shared by
// shaders/attention_decode.metal and its launch building
// (csrc/metal/attention_decode.cpp), which sizes the [[threadgroup(n)]]
// buffers from the same functions the kernels index with.
#pragma once

#include "common.h"

MY_MPS_OPS_SHADER_NAMESPACE_BEGIN

// A partial threadgroup owns up to kDecodeRows query rows of one kv head's
// group (group * q_len rows in all) and walks its chunk of keys
// kDecodeKeys at a time.
MY_MPS_OPS_CONSTANT uint32_t kDecodeRows = 8;
MY_MPS_OPS_CONSTANT uint32_t kDecodeKeys = 32;
// Threadgroups are whole SIMD groups of this many threads.
MY_MPS_OPS_CONSTANT uint32_t kDecodeSimdWidth = 32;

// Threadgroup memory, in floats: [[threadgroup(0)]] the scaled query rows,
// [[threadgroup(1)]] their output accumulators (both kDecodeRows x d),
// [[threadgroup(2)]] a score block and per row its max, sum and correction.
constexpr uint32_t decode_row_tile_floats(uint32_t d) { return kDecodeRows * d; }
MY_MPS_OPS_CONSTANT uint32_t kDecodeScratchFloats = kDecodeRows * kDecodeKeys + 3 * kDecodeRows;

// q is (batch, q_heads, q_len, d) contiguous; the caches' rows of d are
// contiguous, kv head (b, h) starting at b * batch_stride + h * head_stride
// elements. Partials are indexed ((b * kv_heads + h) * splits + split) *
// rows + r with rows = group * q_len; row r of kv head h is q head
// h * group + r / q_len, query r % q_len. Split s covers cache rows
// [s * chunk, (s + 1) * chunk). Query i of sequence b (seqlens[b] valid rows,
// clamped to cache_len) is at a = i + seqlens[b] - q_len and sees keys
// <= a when causal (else < seqlens[b]) and >= a - window_left (-1:
// unbounded). softcap > 0 caps the scaled scores; has_sinks: the combine's
// sinks buffer holds a logit per q head in each row's denominator.
// Grids: partial (splits, kv_heads * ceil(rows / kDecodeRows), batch)
// threadgroups of `threads` threads (a multiple of kDecodeSimdWidth); combine one thread per output element.
struct AttentionDecodeShape {
  uint32_t batch;
  uint32_t kv_heads;
  uint32_t group;
  uint32_t q_len;
  uint32_t cache_len;
  uint32_t k_batch_stride;
  uint32_t k_head_stride;
  uint32_t v_batch_stride;
  uint32_t v_head_stride;
  uint32_t splits;
  uint32_t chunk;
  uint32_t threads;
  uint32_t causal;
  int32_t window_left;
  float scale;
  float softcap;
  uint32_t has_sinks;
};

MY_MPS_OPS_SHADER_NAMESPACE_END
