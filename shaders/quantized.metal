// Rows of a quantized weight expanded to float32 for quantized_linear's tile
// matmuls, one thread per element. Affine codes are a little-endian bit
// stream in uint32 words (a code of 3, 5 or 6 bits may straddle two words);
// nf4/fp4 codes are nibble pairs, the first high, scaled by the block's absmax.
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
  const uint row = p.row_begin + r;
  const uint group = row * (p.cols / p.group_size) + k / p.group_size;
  float value;
  if (p.mode == kQuantAffine) {
    const ulong bit = (ulong(row) * p.cols + k) * p.bits;
    const ulong word = bit >> 5;
    const uint shift = uint(bit & 31);
    ulong v = ulong(words[word]) >> shift;
    if (shift + p.bits > 32) {
      v |= ulong(words[word + 1]) << (32 - shift);
    }
    const uint code = uint(v) & ((1u << p.bits) - 1u);
    value = float(code) * scales[group] + biases[group];
  } else {
    // Two codes per byte, the first high: byte k / 2 of the row's bytes.
    const ulong byte_index = (ulong(row) * p.cols + k) / 2;
    const uint word = words[byte_index / 4];
    const uint byte = (word >> ((byte_index % 4) * 8)) & 0xFFu;
    const uint nibble = (k % 2 == 0) ? (byte >> 4) : (byte & 0xFu);
    value = (p.mode == kQuantNF4 ? kNf4Code[nibble] : kFp4Code[nibble]) * scales[group];
  }
  out[size_t(r) * p.cols + k] = value;
}
