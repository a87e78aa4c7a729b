// Flash attention: the launch parameters and the tiling shared by
// shaders/flash_attention.metal and its launch building
// (csrc/metal/flash_attention.cpp), which sizes the grid and the
// [[threadgroup(n)]] buffers from the same functions the kernels index with.
#pragma once

#include "common.h"

MY_MPS_OPS_SHADER_NAMESPACE_BEGIN

// Threads of a simdgroup, and the rows (queries, or keys in the dK/dV
// kernel) each simdgroup owns: one 8 x 8 simdgroup matrix tall.
MY_MPS_OPS_CONSTANT uint32_t kFlashSimdWidth = 32;
MY_MPS_OPS_CONSTANT uint32_t kFlashSimdRows = 8;

// Simdgroups per threadgroup for head_dim d: 4, or 2 above 128 so that the
// tiles stay within 32 KB of threadgroup memory. A pipeline that allows fewer
// threads per threadgroup (a GPU may, for a kernel with high register use)
// runs a specialisation with fewer: the kernels read their simdgroup count
// from the function constant [[function_constant(kFlashSimdgroupsConstant)]]
// (a uint, 1 .. flash_simdgroups(d)), and use flash_simdgroups(d) when the
// pipeline leaves it undefined.
constexpr uint32_t flash_simdgroups(uint32_t d) { return d > 128 ? 2 : 4; }
MY_MPS_OPS_CONSTANT uint32_t kFlashSimdgroupsConstant = 0;
// Rows of a threadgroup of `simdgroups` simdgroups, and its threads.
constexpr uint32_t flash_block_rows(uint32_t simdgroups) { return kFlashSimdRows * simdgroups; }
constexpr uint32_t flash_block_threads(uint32_t simdgroups) { return kFlashSimdWidth * simdgroups; }

// Threadgroup memory of each kernel, in floats, for `simdgroups` simdgroups.
// Forward: [[threadgroup(0)]] holds one tile of flash_block_rows rows of a
// head (the scaled queries, then each K tile, then each V tile);
// [[threadgroup(1)]] holds per simdgroup an 8 x flash_block_rows score block
// and an 8 x 8 diagonal.
constexpr uint32_t flash_forward_tile_floats(uint32_t d, uint32_t simdgroups) {
  return flash_block_rows(simdgroups) * d;
}
constexpr uint32_t flash_forward_scratch_floats(uint32_t simdgroups) {
  return kFlashSimdRows * flash_block_rows(simdgroups) + kFlashSimdRows * kFlashSimdRows;
}
// dK/dV: [[threadgroup(0)]] holds Q and dO tiles of 8 queries, then their 8
// lse and 8 delta; dQ: K and V tiles of 8 keys. [[threadgroup(1)]] holds per
// simdgroup two 8 x 8 blocks in both.
constexpr uint32_t flash_backward_kv_stage_floats(uint32_t d) { return 2 * kFlashSimdRows * d + 2 * kFlashSimdRows; }
constexpr uint32_t flash_backward_q_stage_floats(uint32_t d) { return 2 * kFlashSimdRows * d; }
MY_MPS_OPS_CONSTANT uint32_t kFlashBackwardScratchFloats = 2 * kFlashSimdRows * kFlashSimdRows;

// The problem of the forward and of the dK/dV and dQ kernels: contiguous
// rows of d elements; q head h reads k/v head h / group. Dense (varlen 0): q is
// (batch, q_heads, q_len, d), k and v (batch, q_heads / group, kv_len, d).
// Packed sequences (varlen 1): q is (q_heads, q_head_stride = total_q, d), k
// and v (kv_heads, kv_head_stride = total_k, d), and sequence b owns rows
// cu_q[b] .. cu_q[b + 1] of each q head and cu_k[b] .. cu_k[b + 1] of each
// k/v head; q_len and kv_len are then the longest lengths (they size the grid:
// blocks past a sequence's end return at once). Either way row i of q head h
// of sequence b is seq_start + h * q_head_stride + i (dense: seq_start =
// b * q_heads * q_len, q_head_stride = q_len), and lse / delta follow q's
// rows. Grids: (ceil(q_len / flash_block_rows(s)), q_heads, batch) for the
// forward and dQ, (ceil(kv_len / flash_block_rows(s)), q_heads / group, batch)
// for dK/dV, for s simdgroups.
// Query i, aligned bottom-right at a = i + kv_len - q_len, sees keys
// a - window_left .. a + window_right (-1: unbounded on that side; causal is
// window_right 0). softcap > 0: scaled scores s -> softcap * tanh(s / softcap).
// has_sinks: the forward's sinks buffer holds a logit per q head that joins
// each row's softmax denominator (and lse).
struct FlashAttentionShape {
  uint32_t q_heads;
  uint32_t group;
  uint32_t q_len;
  uint32_t kv_len;
  int32_t window_left;
  int32_t window_right;
  float scale;
  float softcap;
  uint32_t has_sinks;
  uint32_t varlen;
  uint32_t q_head_stride;
  uint32_t kv_head_stride;
};

// delta[row] = sum of grad_out * out over a row of head_dim, for `rows` rows;
// one SIMD group (32 threads) per row.
struct FlashAttentionDeltaShape {
  uint32_t rows;
  uint32_t head_dim;
};

MY_MPS_OPS_SHADER_NAMESPACE_END
