// quantized_linear's kernels: rows of a quantized weight expanded to float32
// for the tile matmuls (many rows of x), and the fused products for a few
// rows of x, which expand codes in registers and never write a float weight.
// Affine codes are a little-endian bit stream in uint32 words (a code of 3, 5
// or 6 bits may straddle two words); nf4/fp4 codes are nibble pairs, the
// first high, scaled by the block's absmax.
#include <metal_stdlib>
#include "quantized.h"
using namespace metal;

// bitsandbytes' code tables (my_mps_ops/quantization.py), index = nibble.
constant float kNf4Code[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                               -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                               0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,
                               0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
                               0.7229568362236023f, 1.0f};
constant float kFp4Code[16] = {0.0f, 0.0052083333f, 0.6666666667f, 1.0f, 0.3333333333f, 0.5f, 0.1666666667f,
                               0.25f, 0.0f, -0.0052083333f, -0.6666666667f, -1.0f, -0.3333333333f, -0.5f,
                               -0.1666666667f, -0.25f};

// Weight (row, k) of a [*, cols] quantized weight, expanded.
inline float dequantized_value(device const uint* words, device const float* scales, device const float* biases,
                               uint row, uint k, uint cols, uint group_size, uint bits, uint mode) {
  const uint group = row * (cols / group_size) + k / group_size;
  if (mode == kQuantAffine) {
    const ulong bit = (ulong(row) * cols + k) * bits;
    const ulong word = bit >> 5;
    const uint shift = uint(bit & 31);
    ulong v = ulong(words[word]) >> shift;
    if (shift + bits > 32) {
      v |= ulong(words[word + 1]) << (32 - shift);
    }
    const uint code = uint(v) & ((1u << bits) - 1u);
    return float(code) * scales[group] + biases[group];
  }
  // Two codes per byte, the first high: byte k / 2 of the row's bytes.
  const ulong byte_index = (ulong(row) * cols + k) / 2;
  const uint word = words[byte_index / 4];
  const uint byte = (word >> ((byte_index % 4) * 8)) & 0xFFu;
  const uint nibble = (k % 2 == 0) ? (byte >> 4) : (byte & 0xFu);
  return (mode == kQuantNF4 ? kNf4Code[nibble] : kFp4Code[nibble]) * scales[group];
}

// Weights (row, k .. k + 8) expanded into w (k a multiple of 8: the eight
// share a group). 4-bit affine and nf4/fp4 read them from one word.
inline void dequantized_eight(device const uint* words, device const float* scales, device const float* biases,
                              uint row, uint k, uint cols, uint group_size, uint bits, uint mode, thread float* w) {
  const uint group = row * (cols / group_size) + k / group_size;
  const ulong first = ulong(row) * cols + k;
  if (mode == kQuantAffine && bits == 4) {
    const uint word = words[first / 8];
    const float s = scales[group], b = biases[group];
    for (uint i = 0; i < 8; ++i) {
      w[i] = float((word >> (4 * i)) & 0xFu) * s + b;
    }
  } else if (mode != kQuantAffine) {
    const uint word = words[first / 8];  // 8 nibbles = 4 bytes, word-aligned
    const float s = scales[group];
    for (uint j = 0; j < 4; ++j) {
      const uint byte = (word >> (8 * j)) & 0xFFu;
      w[2 * j] = (mode == kQuantNF4 ? kNf4Code[byte >> 4] : kFp4Code[byte >> 4]) * s;
      w[2 * j + 1] = (mode == kQuantNF4 ? kNf4Code[byte & 0xFu] : kFp4Code[byte & 0xFu]) * s;
    }
  } else {
    for (uint i = 0; i < 8; ++i) {
      w[i] = dequantized_value(words, scales, biases, row, k + i, cols, group_size, bits, mode);
    }
  }
}

kernel void quantized_dequantize_rows(
    device const uint* words [[buffer(0)]],
    device const float* scales [[buffer(1)]],
    device const float* biases [[buffer(2)]],
    device float* out [[buffer(3)]],
    constant DequantizeRowsParams& p [[buffer(4)]],
    uint2 position [[thread_position_in_grid]]) {
  const uint k = position.x;
  const uint r = position.y;
  if (k >= p.cols || r >= p.rows) {
    return;
  }
  out[size_t(r) * p.cols + k] =
      dequantized_value(words, scales, biases, p.row_begin + r, k, p.cols, p.group_size, p.bits, p.mode);
}

// out[m, n] = x[m, :] . W[n, :] (+ bias[n]) for rows m < p.rows: one SIMD
// group per kQuantMatvecOutRows output features; its lanes take 8
// consecutive weights at a time, 256 apart (so a SIMD group reads 128
// consecutive bytes of 4-bit codes per step), expand them in registers, and
// simd_sum adds the lanes' sums.
kernel void quantized_matvec(
    device const uint* words [[buffer(0)]],
    device const float* scales [[buffer(1)]],
    device const float* biases [[buffer(2)]],
    device const float* x [[buffer(3)]],
    device const float* bias [[buffer(4)]],
    device float* out [[buffer(5)]],
    constant QuantMatvecParams& p [[buffer(6)]],
    uint gid [[thread_position_in_grid]],
    uint lane [[thread_index_in_simdgroup]]) {
  const uint n0 = (gid / kQuantMatvecSimdWidth) * kQuantMatvecOutRows;
  if (n0 >= p.out_features) {
    return;  // whole SIMD groups: the grid is a multiple of 32 threads
  }
  float acc[kQuantMatvecOutRows][kQuantMatvecMaxRows];
  for (uint r = 0; r < kQuantMatvecOutRows; ++r) {
    for (uint m = 0; m < kQuantMatvecMaxRows; ++m) {
      acc[r][m] = 0.0f;
    }
  }
  const uint step = kQuantMatvecSimdWidth * kQuantMatvecLaneValues;
  for (uint k = lane * kQuantMatvecLaneValues; k < p.in_features; k += step) {
    // This lane's 8 values of every row of x, read once for all the SIMD
    // group's output features. 16-byte loads (rows of x start 128-byte
    // aligned: in_features is a multiple of 32), so a SIMD group's loads
    // touch half the segments that single floats 32 bytes apart would.
    float4 x_lo[kQuantMatvecMaxRows], x_hi[kQuantMatvecMaxRows];
    for (uint m = 0; m < p.rows; ++m) {
      device const float4* xm = reinterpret_cast<device const float4*>(x + size_t(m) * p.in_features + k);
      x_lo[m] = xm[0];
      x_hi[m] = xm[1];
    }
    for (uint r = 0; r < kQuantMatvecOutRows && n0 + r < p.out_features; ++r) {
      float w[kQuantMatvecLaneValues];
      dequantized_eight(words, scales, biases, n0 + r, k, p.in_features, p.group_size, p.bits, p.mode, w);
      for (uint m = 0; m < p.rows; ++m) {
        acc[r][m] += dot(float4(w[0], w[1], w[2], w[3]), x_lo[m]) + dot(float4(w[4], w[5], w[6], w[7]), x_hi[m]);
      }
    }
  }
  for (uint r = 0; r < kQuantMatvecOutRows && n0 + r < p.out_features; ++r) {
    for (uint m = 0; m < p.rows; ++m) {
      const float total = simd_sum(acc[r][m]);
      if (lane == 0) {
        out[size_t(m) * p.out_features + n0 + r] = total + (p.has_bias != 0 ? bias[n0 + r] : 0.0f);
      }
    }
  }
}

// grad_x[m, k .. k + kQuantMatvecTCols) = grad_out[m, :] . W[:, k ..] for
// rows m < p.rows: one thread per kQuantMatvecTCols columns, summing over
// every weight row in order (no partial sums to combine: the result does not
// depend on the launch shape).
kernel void quantized_matvec_t(
    device const uint* words [[buffer(0)]],
    device const float* scales [[buffer(1)]],
    device const float* biases [[buffer(2)]],
    device const float* grad_out [[buffer(3)]],
    device float* grad_x [[buffer(4)]],
    constant QuantMatvecParams& p [[buffer(5)]],
    uint gid [[thread_position_in_grid]]) {
  const uint k0 = gid * kQuantMatvecTCols;
  if (k0 >= p.in_features) {
    return;
  }
  float acc[kQuantMatvecTCols][kQuantMatvecMaxRows];
  for (uint c = 0; c < kQuantMatvecTCols; ++c) {
    for (uint m = 0; m < kQuantMatvecMaxRows; ++m) {
      acc[c][m] = 0.0f;
    }
  }
  for (uint n = 0; n < p.out_features; ++n) {
    float w[kQuantMatvecTCols];
    for (uint c = 0; c < kQuantMatvecTCols; ++c) {
      w[c] = dequantized_value(words, scales, biases, n, k0 + c, p.in_features, p.group_size, p.bits, p.mode);
    }
    for (uint m = 0; m < p.rows; ++m) {
      const float g = grad_out[size_t(m) * p.out_features + n];
      for (uint c = 0; c < kQuantMatvecTCols; ++c) {
        acc[c][m] += g * w[c];
      }
    }
  }
  for (uint m = 0; m < p.rows; ++m) {
    // One 16-byte store per thread: a SIMD group writes 512 consecutive bytes.
    *reinterpret_cast<device float4*>(grad_x + size_t(m) * p.in_features + k0) =
        float4(acc[0][m], acc[1][m], acc[2][m], acc[3][m]);
  }
}
