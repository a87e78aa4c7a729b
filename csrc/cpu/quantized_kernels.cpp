// cpu copies: baseline avx2
// CPU loop of quantized_linear: rows of a quantized weight expanded to
// float32, a group at a time (its scale and bias read once). Affine codes are
// a little-endian bit stream in uint32 words (a code of 3, 5 or 6 bits may
// straddle two words); nf4/fp4 codes are nibble pairs, the first high.
#include "cpu/dispatch.h"
#include "cpu/parallel.h"
#include "cpu/quantized.h"

#include <cstdint>

MY_MPS_OPS_CPU_KERNELS_BEGIN
// Named: the unity build puts every loop file of a copy in one translation unit.
namespace quantized_loop {

// bitsandbytes' code tables (my_mps_ops/quantization.py), index = nibble.
constexpr float kNf4[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                            -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                            0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,
                            0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
                            0.7229568362236023f, 1.0f};
constexpr float kFp4[16] = {0.0f, 0.0052083333f, 0.6666666667f, 1.0f, 0.3333333333f, 0.5f, 0.1666666667f, 0.25f,
                            0.0f, -0.0052083333f, -0.6666666667f, -1.0f, -0.3333333333f, -0.5f, -0.1666666667f,
                            -0.25f};

void affine_row(const uint32_t* words, const float* scales, const float* biases, float* out, int64_t cols,
                int64_t group_size, int32_t bits) {
  const uint32_t mask = bits == 32 ? ~0u : ((1u << bits) - 1u);
  for (int64_t g = 0; g < cols / group_size; ++g) {
    const float scale = scales[g], bias = biases[g];
    for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k) {
      const uint64_t bit = uint64_t(k) * uint64_t(bits);
      const uint64_t word = bit >> 5, shift = bit & 31;
      uint64_t v = words[word] >> shift;
      if (shift + bits > 32) v |= uint64_t(words[word + 1]) << (32 - shift);
      out[k] = float(uint32_t(v) & mask) * scale + bias;
    }
  }
}

// Power-of-two widths never straddle a word: one word gives 32 / bits codes.
template <int kBits>
void affine_row_aligned(const uint32_t* words, const float* scales, const float* biases, float* out, int64_t cols,
                        int64_t group_size) {
  constexpr int kPerWord = 32 / kBits;
  constexpr uint32_t kMask = (1u << kBits) - 1u;
  for (int64_t g = 0; g < cols / group_size; ++g) {
    const float scale = scales[g], bias = biases[g];
    const uint32_t* w = words + g * group_size / kPerWord;
    float* o = out + g * group_size;
    for (int64_t i = 0; i < group_size / kPerWord; ++i) {
      const uint32_t word = w[i];
      for (int j = 0; j < kPerWord; ++j) o[i * kPerWord + j] = float((word >> (j * kBits)) & kMask) * scale + bias;
    }
  }
}

void codebook_row(const uint8_t* bytes, const float* absmax, float* out, int64_t cols, int64_t group_size,
                  const float* code) {
  for (int64_t g = 0; g < cols / group_size; ++g) {
    const float a = absmax[g];
    for (int64_t k = g * group_size; k < (g + 1) * group_size; k += 2) {
      const uint8_t b = bytes[k / 2];
      out[k] = code[b >> 4] * a;
      out[k + 1] = code[b & 0xF] * a;
    }
  }
}

void dequantize_rows(const DequantizeRowsArgs& a) {
  const int64_t rows = a.row_end - a.row_begin, groups = a.cols / a.group_size;
  at::parallel_for(0, rows, cpu::row_grain(a.cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t row = a.row_begin + r;
      float* out = a.out + r * a.cols;
      const float* scales = a.scales + row * groups;
      if (a.mode == QuantMode::Affine) {
        const auto* words = static_cast<const uint32_t*>(a.qweight) + row * (a.cols * a.bits / 32);
        const float* biases = a.biases + row * groups;
        switch (a.bits) {
          case 2: affine_row_aligned<2>(words, scales, biases, out, a.cols, a.group_size); break;
          case 4: affine_row_aligned<4>(words, scales, biases, out, a.cols, a.group_size); break;
          case 8: affine_row_aligned<8>(words, scales, biases, out, a.cols, a.group_size); break;
          default: affine_row(words, scales, biases, out, a.cols, a.group_size, a.bits);
        }
      } else {
        const auto* bytes = static_cast<const uint8_t*>(a.qweight) + row * (a.cols / 2);
        codebook_row(bytes, scales, out, a.cols, a.group_size, a.mode == QuantMode::NF4 ? kNf4 : kFp4);
      }
    }
  });
}

}  // namespace quantized_loop

void dequantize_rows(const DequantizeRowsArgs& args) { quantized_loop::dequantize_rows(args); }

MY_MPS_OPS_CPU_KERNELS_END

MY_MPS_OPS_REGISTER_CPU_KERNEL(my_mps_ops::cpu::dequantize_rows_stub, dequantize_rows);
