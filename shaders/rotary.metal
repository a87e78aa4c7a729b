// Rotary position embedding (RoPE) of rows of head_dim elements: NeoX
// (half-split) or GPT-J (interleaved) pairing, partial rotary (the first
// 2 * pairs elements rotate, the rest pass through), layouts (batch, seq,
// heads, dim) and (batch, heads, seq, dim), cos/sin [seq, pairs] shared by the
// batch or [batch, seq, pairs]. conj = 1 rotates by -angle (the backward).
// kRotaryThreadsPerRow threads per row (grid: that many x rows), thread x
// taking pairs x, x + kRotaryThreadsPerRow, ... so that the lanes of a SIMD
// group read consecutive elements of a row (one thread per row read 32 rows a
// row apart per step: 3% coalescing by the emulator's profile()); rotary_qk
// handles q's rows then k's in one launch.
#include <metal_stdlib>
#include "rotary.h"
using namespace metal;

template <typename T>
inline void rotate_row(device const T* x, device T* out, device const float* cos_t, device const float* sin_t,
                       constant RotaryShape& p, uint row, uint lane) {
  uint b, s;
  if (p.seq_dim == 1) {
    s = (row / p.heads) % p.seq;
    b = row / (p.heads * p.seq);
  } else {
    s = row % p.seq;
    b = row / (p.seq * p.heads);
  }
  const size_t base = size_t(row) * p.head_dim;
  const size_t cbase = size_t(b) * p.cos_batch_stride + size_t(s) * p.pairs;
  const float sign = p.conj != 0 ? -1.0f : 1.0f;
  for (uint i = lane; i < p.pairs; i += kRotaryThreadsPerRow) {
    const float c = cos_t[cbase + i];
    const float sn = sign * sin_t[cbase + i];
    const uint i0 = p.interleaved != 0 ? 2 * i : i;
    const uint i1 = p.interleaved != 0 ? 2 * i + 1 : i + p.pairs;
    const float x0 = float(x[base + i0]);
    const float x1 = float(x[base + i1]);
    out[base + i0] = T(x0 * c - x1 * sn);
    out[base + i1] = T(x1 * c + x0 * sn);
  }
  for (uint i = 2 * p.pairs + lane; i < p.head_dim; i += kRotaryThreadsPerRow) {
    out[base + i] = x[base + i];
  }
}

template <typename T>
kernel void rotary(device const T* x [[buffer(0)]], device T* out [[buffer(1)]],
                   device const float* cos_t [[buffer(2)]], device const float* sin_t [[buffer(3)]],
                   constant RotaryShape& p [[buffer(4)]], uint2 pos [[thread_position_in_grid]]) {
  rotate_row(x, out, cos_t, sin_t, p, pos.y, pos.x);
}

// Rows [0, q_rows) of q, then the rows of k (same shape but for heads).
template <typename T>
kernel void rotary_qk(device const T* q [[buffer(0)]], device T* q_out [[buffer(1)]],
                      device const T* k [[buffer(2)]], device T* k_out [[buffer(3)]],
                      device const float* cos_t [[buffer(4)]], device const float* sin_t [[buffer(5)]],
                      constant RotaryShape& pq [[buffer(6)]], constant RotaryShape& pk [[buffer(7)]],
                      constant uint& q_rows [[buffer(8)]], uint2 pos [[thread_position_in_grid]]) {
  const uint row = pos.y;
  if (row < q_rows) {
    rotate_row(q, q_out, cos_t, sin_t, pq, row, pos.x);
  } else {
    rotate_row(k, k_out, cos_t, sin_t, pk, row - q_rows, pos.x);
  }
}

#define INSTANTIATE_ROTARY(T)              \
  MY_MPS_OPS_INSTANTIATE_KERNEL(rotary, T) \
  MY_MPS_OPS_INSTANTIATE_KERNEL(rotary_qk, T)

INSTANTIATE_ROTARY(float)
INSTANTIATE_ROTARY(half)
INSTANTIATE_ROTARY(bfloat)
