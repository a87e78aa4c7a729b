// Rotary position embedding (RoPE) of rows of head_dim elements: NeoX
// (half-split) or GPT-J (interleaved) pairing, partial rotary (the first
// 2 * pairs elements rotate, the rest pass through), layouts (batch, seq,
// heads, dim) and (batch, heads, seq, dim), cos/sin [seq, pairs] shared by the
// batch or [batch, seq, pairs]. conj = 1 rotates by -angle (the backward).
// Grid (kRotaryThreadsPerRow, batch * seq): the threads of one position
// (b, s) read its cos/sin once and rotate that position's row of every head
// (rotary_qk: of q's heads, then k's), so the tables are read once per
// position, not once per head. Thread x takes pairs x, x + kRotaryThreadsPerRow,
// ... so that the lanes of a SIMD group read consecutive elements of a row.
#include <metal_stdlib>
#include "rotary.h"
using namespace metal;

// The start of head h's row at position (b, s).
inline size_t row_start(constant RotaryShape& p, uint b, uint s, uint h) {
  const uint row = p.seq_dim == 1 ? (b * p.seq + s) * p.heads + h : (b * p.heads + h) * p.seq + s;
  return size_t(row) * p.head_dim;
}

// Pair i of every head's row at position (b, s), rotated by (c, sn).
template <typename T>
inline void rotate_pair_of_heads(device const T* x, device T* out, constant RotaryShape& p, uint b, uint s, uint i,
                                 float c, float sn) {
  const uint i0 = p.interleaved != 0 ? 2 * i : i;
  const uint i1 = p.interleaved != 0 ? 2 * i + 1 : i + p.pairs;
  for (uint h = 0; h < p.heads; ++h) {
    const size_t base = row_start(p, b, s, h);
    const float x0 = float(x[base + i0]);
    const float x1 = float(x[base + i1]);
    out[base + i0] = T(x0 * c - x1 * sn);
    out[base + i1] = T(x1 * c + x0 * sn);
  }
}

// The elements past the rotated pairs, copied.
template <typename T>
inline void pass_through(device const T* x, device T* out, constant RotaryShape& p, uint b, uint s, uint lane) {
  for (uint h = 0; h < p.heads; ++h) {
    const size_t base = row_start(p, b, s, h);
    for (uint i = 2 * p.pairs + lane; i < p.head_dim; i += kRotaryThreadsPerRow) out[base + i] = x[base + i];
  }
}

template <typename T>
kernel void rotary(device const T* x [[buffer(0)]], device T* out [[buffer(1)]],
                   device const float* cos_t [[buffer(2)]], device const float* sin_t [[buffer(3)]],
                   constant RotaryShape& p [[buffer(4)]], uint2 pos [[thread_position_in_grid]]) {
  const uint lane = pos.x, b = pos.y / p.seq, s = pos.y % p.seq;
  const size_t cbase = size_t(b) * p.cos_batch_stride + size_t(s) * p.pairs;
  const float sign = p.conj != 0 ? -1.0f : 1.0f;
  for (uint i = lane; i < p.pairs; i += kRotaryThreadsPerRow) {
    rotate_pair_of_heads(x, out, p, b, s, i, cos_t[cbase + i], sign * sin_t[cbase + i]);
  }
  pass_through(x, out, p, b, s, lane);
}

// q's heads, then k's, at each position (q and k share batch, seq and the
// tables; they may differ in heads and layout strides).
template <typename T>
kernel void rotary_qk(device const T* q [[buffer(0)]], device T* q_out [[buffer(1)]],
                      device const T* k [[buffer(2)]], device T* k_out [[buffer(3)]],
                      device const float* cos_t [[buffer(4)]], device const float* sin_t [[buffer(5)]],
                      constant RotaryShape& pq [[buffer(6)]], constant RotaryShape& pk [[buffer(7)]],
                      uint2 pos [[thread_position_in_grid]]) {
  const uint lane = pos.x, b = pos.y / pq.seq, s = pos.y % pq.seq;
  const size_t cbase = size_t(b) * pq.cos_batch_stride + size_t(s) * pq.pairs;
  const float sign = pq.conj != 0 ? -1.0f : 1.0f;
  for (uint i = lane; i < pq.pairs; i += kRotaryThreadsPerRow) {
    const float c = cos_t[cbase + i], sn = sign * sin_t[cbase + i];
    rotate_pair_of_heads(q, q_out, pq, b, s, i, c, sn);
    rotate_pair_of_heads(k, k_out, pk, b, s, i, c, sn);
  }
  pass_through(q, q_out, pq, b, s, lane);
  pass_through(k, k_out, pk, b, s, lane);
}

#define INSTANTIATE_ROTARY(T)              \
  MY_MPS_OPS_INSTANTIATE_KERNEL(rotary, T) \
  MY_MPS_OPS_INSTANTIATE_KERNEL(rotary_qk, T)

INSTANTIATE_ROTARY(float)
INSTANTIATE_ROTARY(half)
INSTANTIATE_ROTARY(bfloat)
