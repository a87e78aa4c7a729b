// cpu copies: baseline avx2
// CPU loops of quantized_linear. Affine codes are a little-endian bit stream
// in uint32 words (a code of 3, 5 or 6 bits may straddle two words); nf4/fp4
// codes are nibble pairs, the first high.
//
// Tiles (many rows of x): rows of the weight expanded to float32 for
// PyTorch's matmul. Fused products (a few rows): a weight row is expanded
// 1024 codes at a time into an L1 buffer, q for affine or code[q] for
// nf4/fp4, and the group's scale is applied once per group instead of once
// per weight:
//   sum_k (s q_k + b) x_k = s sum_k q_k x_k + b sum_k x_k,
// with sum_k x_k per group of x taken once for all weight rows.
#include "cpu/dispatch.h"
#include "cpu/parallel.h"
#include "cpu/quantized.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

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

// 3, 5 and 6 bits, a value at a time.
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

// ------------------------------------------------ code expansion

// The two values of each byte of nf4/fp4 codes, the high nibble first: one
// 8-byte copy per byte instead of two lookups and shifts, where no vector
// table shuffle is compiled (unpack_codebook).
struct CodePairs {
  float value[256][2];
};
constexpr CodePairs make_code_pairs(const float* code) {
  CodePairs p{};
  for (int b = 0; b < 256; ++b) {
    p.value[b][0] = code[b >> 4];
    p.value[b][1] = code[b & 0xF];
  }
  return p;
}
constexpr CodePairs kNf4Pairs = make_code_pairs(kNf4);
constexpr CodePairs kFp4Pairs = make_code_pairs(kFp4);

// Codes of n consecutive values (n a multiple of 32) of a power-of-two width,
// starting at words[0], a vector at a time: a word broadcast to every lane
// and shifted by the lane's position.
template <int kBits>
void unpack_pow2(const uint32_t* words, float* buf, int64_t n) {
  using V = Vec;
  using IV = typename vec::IntLanes<V>::type;
  constexpr int kL = int(vec::kLanes<V>);
  constexpr int kPerWord = 32 / kBits;
  constexpr int32_t kMask = (1 << kBits) - 1;
  if constexpr (kL <= kPerWord) {
    IV shifts[kPerWord / kL];
    for (int h = 0; h < kPerWord / kL; ++h)
      for (int i = 0; i < kL; ++i) shifts[h][i] = (h * kL + i) * kBits;
    for (int64_t w = 0; w < n / kPerWord; ++w) {
      const IV word = IV{} + int32_t(words[w]);
      for (int h = 0; h < kPerWord / kL; ++h)
        vec::storev(buf + w * kPerWord + h * kL, __builtin_convertvector((word >> shifts[h]) & kMask, V));
    }
  } else {
    constexpr int kWords = kL / kPerWord;  // words per vector
    IV shifts;
    for (int i = 0; i < kL; ++i) shifts[i] = (i % kPerWord) * kBits;
    for (int64_t v = 0; v < n / kL; ++v) {
      IV word;
      for (int i = 0; i < kL; ++i) word[i] = int32_t(words[v * kWords + i / kPerWord]);
      vec::storev(buf + v * kL, __builtin_convertvector((word >> shifts) & kMask, V));
    }
  }
}

// 3, 5 and 6 bits: a code may straddle two words.
void unpack_any(const uint32_t* words, float* buf, int64_t n, int32_t bits) {
  const uint32_t mask = (1u << bits) - 1u;
  for (int64_t k = 0; k < n; ++k) {
    const uint64_t bit = uint64_t(k) * uint64_t(bits);
    const uint64_t word = bit >> 5, shift = bit & 31;
    uint64_t v = words[word] >> shift;
    if (shift + bits > 32) v |= uint64_t(words[word + 1]) << (32 - shift);
    buf[k] = float(uint32_t(v) & mask);
  }
}

// nf4/fp4: n values (n / 2 bytes) looked up in `code`.
void unpack_codebook(const uint8_t* bytes, float* buf, int64_t n, const float* code) {
#if defined(__GNUC__) && !defined(__clang__)
  if constexpr (vec::kLanes<Vec> == 8) {
    // Eight nibbles of a word, the high one of each byte first, looked up in
    // the 16-entry table held in two vectors (a two-table shuffle: vpermps).
    using V = vec::f32x8;
    using IV = vec::i32x8;
    const V low = vec::loadv<V>(code), high = vec::loadv<V>(code + 8);
    const IV shifts = {4, 0, 12, 8, 20, 16, 28, 24};
    for (int64_t w = 0; w < n / 8; ++w) {
      uint32_t word;
      std::memcpy(&word, bytes + 4 * w, sizeof(word));
      const IV index = ((IV{} + int32_t(word)) >> shifts) & 0xF;
      vec::storev(buf + 8 * w, __builtin_shuffle(low, high, index));
    }
    return;
  }
#endif
  const auto& pairs = code == kNf4 ? kNf4Pairs : kFp4Pairs;
  for (int64_t i = 0; i < n / 2; ++i) std::memcpy(buf + 2 * i, pairs.value[bytes[i]], 2 * sizeof(float));
}

// Values [c0, c0 + n) of weight row `row` as codes (c0 and n multiples of
// the group size, itself a multiple of 32: the range starts on a word).
void unpack_codes(const QuantMatvecArgs& a, int64_t row, int64_t c0, int64_t n, float* buf) {
  if (a.mode == QuantMode::Affine) {
    const auto* words =
        static_cast<const uint32_t*>(a.qweight) + (row * a.in_features + c0) * a.bits / 32;
    switch (a.bits) {
      case 2: unpack_pow2<2>(words, buf, n); break;
      case 4: unpack_pow2<4>(words, buf, n); break;
      case 8: unpack_pow2<8>(words, buf, n); break;
      default: unpack_any(words, buf, n, a.bits);
    }
  } else {
    const auto* bytes = static_cast<const uint8_t*>(a.qweight) + (row * a.in_features + c0) / 2;
    unpack_codebook(bytes, buf, n, a.mode == QuantMode::NF4 ? kNf4 : kFp4);
  }
}

// Columns expanded at a time: whole groups, about 1024 values.
int64_t chunk_cols(const QuantMatvecArgs& a, int64_t target) {
  return std::min(a.in_features, a.group_size * std::max<int64_t>(1, target / a.group_size));
}

// ------------------------------------------------ tiles (many rows)

void dequantize_rows(const DequantizeRowsArgs& a) {
  const int64_t rows = a.row_end - a.row_begin, groups = a.cols / a.group_size;
  at::parallel_for(0, rows, cpu::row_grain(a.cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t row = a.row_begin + r;
      float* out = a.out + r * a.cols;
      const float* scales = a.scales + row * groups;
      const float* biases = a.biases + row * groups;
      if (a.mode == QuantMode::Affine && a.bits != 2 && a.bits != 4 && a.bits != 8) {
        const auto* words = static_cast<const uint32_t*>(a.qweight) + row * (a.cols * a.bits / 32);
        affine_row(words, scales, biases, out, a.cols, a.group_size, a.bits);
        continue;
      }
      // The codes by the vector expansion of the fused products, then each
      // group's scale (and bias) in place.
      if (a.mode == QuantMode::Affine) {
        const auto* words = static_cast<const uint32_t*>(a.qweight) + row * (a.cols * a.bits / 32);
        switch (a.bits) {
          case 2: unpack_pow2<2>(words, out, a.cols); break;
          case 4: unpack_pow2<4>(words, out, a.cols); break;
          default: unpack_pow2<8>(words, out, a.cols);
        }
      } else {
        unpack_codebook(static_cast<const uint8_t*>(a.qweight) + row * (a.cols / 2), out, a.cols,
                        a.mode == QuantMode::NF4 ? kNf4 : kFp4);
      }
      for (int64_t g = 0; g < groups; ++g) {
        float* o = out + g * a.group_size;
        const float scale = scales[g];
        if (a.mode == QuantMode::Affine) {
          const float bias = biases[g];
          for (int64_t k = 0; k < a.group_size; ++k) o[k] = o[k] * scale + bias;
        } else {
          for (int64_t k = 0; k < a.group_size; ++k) o[k] *= scale;
        }
      }
    }
  });
}

// ------------------------------------------------ fused products, few rows

// Per-group sums of the rows of x [rows, in_features] (affine only).
std::vector<float> group_sums(const QuantMatvecArgs& a) {
  const auto* in = static_cast<const float*>(a.in);
  const int64_t groups = a.in_features / a.group_size;
  std::vector<float> sums(a.mode == QuantMode::Affine ? a.rows * groups : 0);
  for (int64_t i = 0; i < int64_t(sums.size()); ++i) {
    const float* x = in + (i / groups) * a.in_features + (i % groups) * a.group_size;
    float s = 0;
    for (int64_t k = 0; k < a.group_size; ++k) s += x[k];
    sums[i] = s;
  }
  return sums;
}

// out[m, n] for weight rows [n_begin, n_end), kM rows of float32 x.
template <int kM>
void matvec_f32(const QuantMatvecArgs& a, const float* xsum, int64_t n_begin, int64_t n_end, float* buf) {
  using V = Vec;
  constexpr int64_t kL = vec::kLanes<V>;
  // Independent partial sums per row of x: a chain of dependent FMAs would
  // wait out each one's latency when there are few rows.
  constexpr int kParts = kM == 1 ? 4 : kM == 2 ? 2 : 1;
  const auto* x = static_cast<const float*>(a.in);
  const auto* bias = static_cast<const float*>(a.bias);
  auto* out = static_cast<float*>(a.out);
  const int64_t cols = a.in_features, gs = a.group_size, groups = cols / gs, chunk = chunk_cols(a, 1024);
  const bool affine = a.mode == QuantMode::Affine;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const float* scales = a.scales + n * groups;
    const float* biases = a.biases + n * groups;
    V total[kM] = {};
    float offset[kM] = {};
    for (int64_t c0 = 0; c0 < cols; c0 += chunk) {
      const int64_t cn = std::min(chunk, cols - c0);
      unpack_codes(a, n, c0, cn, buf);
      for (int64_t k0 = 0; k0 < cn; k0 += gs) {
        V part[kM][kParts] = {};
        for (int64_t k = k0; k < k0 + gs; k += kParts * kL) {
          for (int j = 0; j < kParts; ++j) {
            const V w = vec::loadv<V>(buf + k + j * kL);
            for (int m = 0; m < kM; ++m) part[m][j] += w * vec::loadv<V>(x + m * cols + c0 + k + j * kL);
          }
        }
        const int64_t g = (c0 + k0) / gs;
        for (int m = 0; m < kM; ++m) {
          V p = part[m][0];
          for (int j = 1; j < kParts; ++j) p += part[m][j];
          total[m] += p * scales[g];
          if (affine) offset[m] += biases[g] * xsum[m * groups + g];
        }
      }
    }
    for (int m = 0; m < kM; ++m)
      out[m * a.out_features + n] = vec::reduce_sumv(total[m]) + offset[m] + (bias ? bias[n] : 0.0f);
  }
}

// Weight rows added to grad_x's accumulators per pass over them.
constexpr int kTRows = 4;

// grad_x[m, c0 .. c0 + cn) for kM rows of float32 grad_out: every weight row's
// contribution, kTRows weight rows at a time so that each pass over the
// accumulators adds that many expanded rows.
template <int kM>
void matvec_t_f32(const QuantMatvecArgs& a, int64_t c0, int64_t cn, float* buf, float* acc, float* offsets) {
  using V = Vec;
  constexpr int64_t kL = vec::kLanes<V>;
  constexpr int kRows = kTRows;
  const auto* g = static_cast<const float*>(a.in);
  auto* out = static_cast<float*>(a.out);
  const int64_t rows = a.out_features, gs = a.group_size, groups = a.in_features / gs, g0 = c0 / gs,
                block_groups = cn / gs;
  const bool affine = a.mode == QuantMode::Affine;
  std::fill(acc, acc + kM * cn, 0.0f);
  std::fill(offsets, offsets + kM * block_groups, 0.0f);
  std::fill(buf, buf + kRows * cn, 0.0f);  // rows past the end add 0 * these
  for (int64_t n0 = 0; n0 < rows; n0 += kRows) {
    const int count = int(std::min<int64_t>(kRows, rows - n0));
    for (int r = 0; r < count; ++r) unpack_codes(a, n0 + r, c0, cn, buf + r * cn);
    for (int m = 0; m < kM; ++m) {
      const float* gm = g + m * rows + n0;
      for (int64_t gi = 0; gi < block_groups; ++gi) {
        V coef[kRows];
        for (int r = 0; r < kRows; ++r)
          coef[r] = vec::splatv<V>(r < count ? gm[r] * a.scales[(n0 + r) * groups + g0 + gi] : 0.0f);
        if (affine)
          for (int r = 0; r < count; ++r) offsets[m * block_groups + gi] += gm[r] * a.biases[(n0 + r) * groups + g0 + gi];
        float* dst = acc + m * cn + gi * gs;
        const float* w = buf + gi * gs;
        for (int64_t k = 0; k < gs; k += kL) {
          V s = vec::loadv<V>(dst + k);
          for (int r = 0; r < kRows; ++r) s += coef[r] * vec::loadv<V>(w + r * cn + k);
          vec::storev(dst + k, s);
        }
      }
    }
  }
  for (int m = 0; m < kM; ++m)
    for (int64_t k = 0; k < cn; ++k) out[m * a.in_features + c0 + k] = acc[m * cn + k] + offsets[m * block_groups + k / gs];
}

// float64 rows (gradcheck, float64 models): the weight expanded in float32
// as the tiles expand it (code * scale + bias in float32), products
// and sums in float64, scalar, one weight row at a time.
MY_MPS_OPS_NO_FP_CONTRACT_BEGIN
void expand_group(const QuantMatvecArgs& a, int64_t row, int64_t group, float* values) {
  const float s = a.scales[row * (a.in_features / a.group_size) + group];
  const float b = a.mode == QuantMode::Affine ? a.biases[row * (a.in_features / a.group_size) + group] : 0.0f;
  for (int64_t k = 0; k < a.group_size; ++k) values[k] = a.mode == QuantMode::Affine ? values[k] * s + b : values[k] * s;
}

__attribute__((noinline)) void matvec_f64(const QuantMatvecArgs& a, int64_t n_begin, int64_t n_end, float* buf) {
  const auto* x = static_cast<const double*>(a.in);
  const auto* bias = static_cast<const double*>(a.bias);
  auto* out = static_cast<double*>(a.out);
  const int64_t cols = a.in_features, gs = a.group_size, chunk = chunk_cols(a, 1024);
  for (int64_t n = n_begin; n < n_end; ++n) {
    double total[kQuantMatvecMaxRows] = {};
    for (int64_t c0 = 0; c0 < cols; c0 += chunk) {
      const int64_t cn = std::min(chunk, cols - c0);
      unpack_codes(a, n, c0, cn, buf);
      for (int64_t k0 = 0; k0 < cn; k0 += gs) expand_group(a, n, (c0 + k0) / gs, buf + k0);
      for (int64_t m = 0; m < a.rows; ++m)
        for (int64_t k = 0; k < cn; ++k) total[m] += double(buf[k]) * x[m * cols + c0 + k];
    }
    for (int64_t m = 0; m < a.rows; ++m) out[m * a.out_features + n] = total[m] + (bias ? bias[n] : 0.0);
  }
}

__attribute__((noinline)) void matvec_t_f64(const QuantMatvecArgs& a, int64_t c0, int64_t cn, float* buf, double* acc) {
  const auto* g = static_cast<const double*>(a.in);
  auto* out = static_cast<double*>(a.out);
  const int64_t rows = a.out_features, gs = a.group_size;
  std::fill(acc, acc + a.rows * cn, 0.0);
  for (int64_t n = 0; n < rows; ++n) {
    unpack_codes(a, n, c0, cn, buf);
    for (int64_t k0 = 0; k0 < cn; k0 += gs) expand_group(a, n, (c0 + k0) / gs, buf + k0);
    for (int64_t m = 0; m < a.rows; ++m) {
      const double gmn = g[m * rows + n];
      for (int64_t k = 0; k < cn; ++k) acc[m * cn + k] += gmn * double(buf[k]);
    }
  }
  for (int64_t m = 0; m < a.rows; ++m)
    for (int64_t k = 0; k < cn; ++k) out[m * a.in_features + c0 + k] = acc[m * cn + k];
}
MY_MPS_OPS_NO_FP_CONTRACT_END

// Weights expanded per parallel task at least (~0.1 ms): waking a second
// thread for less costs more than it saves.
constexpr int64_t kTaskValues = int64_t(1) << 20;

template <template <int> class F, typename... Args>
void with_rows(int64_t rows, Args&&... args) {
  switch (rows) {
    case 1: return F<1>::run(args...);
    case 2: return F<2>::run(args...);
    case 3: return F<3>::run(args...);
    case 4: return F<4>::run(args...);
    case 5: return F<5>::run(args...);
    case 6: return F<6>::run(args...);
    case 7: return F<7>::run(args...);
    default: return F<8>::run(args...);
  }
}
template <int kM>
struct MatvecF32 {
  static void run(const QuantMatvecArgs& a, const float* xsum, int64_t b, int64_t e, float* buf) {
    matvec_f32<kM>(a, xsum, b, e, buf);
  }
};
template <int kM>
struct MatvecTF32 {
  static void run(const QuantMatvecArgs& a, int64_t c0, int64_t cn, float* buf, float* acc, float* offsets) {
    matvec_t_f32<kM>(a, c0, cn, buf, acc, offsets);
  }
};

void quantized_matvec(const QuantMatvecArgs& a) {
  const int64_t chunk = chunk_cols(a, 1024);
  const int64_t grain = std::max<int64_t>(1, kTaskValues / a.in_features);
  if (a.is_double) {
    at::parallel_for(0, a.out_features, grain, [&](int64_t b, int64_t e) {
      std::vector<float> buf(chunk);
      matvec_f64(a, b, e, buf.data());
    });
  } else {
    const std::vector<float> xsum = group_sums(a);
    at::parallel_for(0, a.out_features, grain, [&](int64_t b, int64_t e) {
      std::vector<float> buf(chunk);
      with_rows<MatvecF32>(a.rows, a, xsum.data(), b, e, buf.data());
    });
  }
}

void quantized_matvec_t(const QuantMatvecArgs& a) {
  // Blocks of columns of grad_x, each summed over every weight row by one
  // task: no partial sums to combine.
  const int64_t block = chunk_cols(a, 256);
  const int64_t blocks = (a.in_features + block - 1) / block;
  const int64_t block_groups = block / a.group_size;
  const int64_t grain = std::max<int64_t>(1, kTaskValues / (block * std::max<int64_t>(a.out_features, 1)));
  at::parallel_for(0, blocks, grain, [&](int64_t b, int64_t e) {
    std::vector<float> buf(kTRows * block);
    if (a.is_double) {
      std::vector<double> acc(a.rows * block);
      for (int64_t i = b; i < e; ++i)
        matvec_t_f64(a, i * block, std::min(block, a.in_features - i * block), buf.data(), acc.data());
    } else {
      std::vector<float> acc(a.rows * block), offsets(a.rows * block_groups);
      for (int64_t i = b; i < e; ++i)
        with_rows<MatvecTF32>(a.rows, a, i * block, std::min(block, a.in_features - i * block), buf.data(),
                              acc.data(), offsets.data());
    }
  });
}

}  // namespace quantized_loop

void dequantize_rows(const DequantizeRowsArgs& args) { quantized_loop::dequantize_rows(args); }
void quantized_matvec(const QuantMatvecArgs& args) { quantized_loop::quantized_matvec(args); }
void quantized_matvec_t(const QuantMatvecArgs& args) { quantized_loop::quantized_matvec_t(args); }

MY_MPS_OPS_CPU_KERNELS_END

MY_MPS_OPS_REGISTER_CPU_KERNEL(my_mps_ops::cpu::dequantize_rows_stub, dequantize_rows);
MY_MPS_OPS_REGISTER_CPU_KERNEL(my_mps_ops::cpu::quantized_matvec_stub, quantized_matvec);
MY_MPS_OPS_REGISTER_CPU_KERNEL(my_mps_ops::cpu::quantized_matvec_t_stub, quantized_matvec_t);
