// Flash attention: softmax(scale * q k^T [+ causal mask]) v without ever
// materialising the [L, S] score matrix, forward and backward.
//
// Layout: q [B, Hq, L, D], k [B, Hkv, S, D], v [B, Hkv, S, D], Hkv dividing Hq
// (grouped-query attention: q head h reads k/v head h / (Hq / Hkv)).
// Causal masking is aligned to the bottom right: query i sees key j iff
// j <= i + (S - L) (torch.nn.attention.bias.causal_lower_right; equal to
// is_causal=True of F.scaled_dot_product_attention when L == S). A query row
// that sees no key at all (L > S, causal) gets output 0 and log-sum-exp -inf,
// and contributes nothing to any gradient.
//
// The forward returns (out, lse): lse[b, h, i] = log(sum_j exp(scale * q_i.k_j))
// over visible keys, float32 (float64 for float64 inputs), which the backward
// uses to recompute the probabilities tile by tile (FlashAttention-2).
//
// One file for the op family: checks, CPU kernels, the Metal path
// (shaders/flash_attention.metal, encoded on MPS or run by the emulator), Meta
// kernels and the C++ autograd Function.
#include "metal/launch.h"
#include "op_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace my_mps_ops {
namespace {

using at::Tensor;

constexpr const char* kOp = "my_mps_ops.flash_attention";
constexpr const char* kBackwardOp = "my_mps_ops.flash_attention_backward";
constexpr int64_t kSupportedHeadDims[] = {32, 64, 80, 96, 128, 256};

bool supported_head_dim(const c10::SymInt& d) {
  for (int64_t s : kSupportedHeadDims) {
    if (d == s) return true;
  }
  return false;
}

void check_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                  const std::optional<double>& scale) {
  check_float_dtype(q, op, "q");
  check_same_dtype(k, q, op, "k", "q");
  check_same_dtype(v, q, op, "v", "q");
  check_same_device(k, q, op, "k", "q");
  check_same_device(v, q, op, "v", "q");
  TORCH_CHECK(q.dim() == 4, op, ": q must have 4 dimensions (batch, heads, seq, head_dim), got shape ",
              q.sym_sizes());
  TORCH_CHECK(k.dim() == 4, op, ": k must have 4 dimensions (batch, heads, seq, head_dim), got shape ",
              k.sym_sizes());
  TORCH_CHECK(v.dim() == 4, op, ": v must have 4 dimensions (batch, heads, seq, head_dim), got shape ",
              v.sym_sizes());
  TORCH_CHECK(supported_head_dim(q.sym_size(3)), op, ": q head_dim ", q.sym_size(3),
              " is not supported (supported: 32, 64, 80, 96, 128, 256)");
  TORCH_CHECK(k.sym_size(3) == q.sym_size(3), op, ": k head_dim must equal q head_dim (", q.sym_size(3), "), got ",
              k.sym_size(3));
  TORCH_CHECK(v.sym_size(3) == q.sym_size(3), op, ": v head_dim must equal q head_dim (", q.sym_size(3), "), got ",
              v.sym_size(3));
  TORCH_CHECK(k.sym_size(0) == q.sym_size(0) && v.sym_size(0) == q.sym_size(0), op,
              ": q, k and v must have the same batch size, got ", q.sym_size(0), ", ", k.sym_size(0), ", ",
              v.sym_size(0));
  TORCH_CHECK(v.sym_size(1) == k.sym_size(1), op, ": v must have as many heads as k (", k.sym_size(1), "), got ",
              v.sym_size(1));
  TORCH_CHECK(v.sym_size(2) == k.sym_size(2), op, ": v must have the sequence length of k (", k.sym_size(2),
              "), got ", v.sym_size(2));
  // Zero heads on both sides is an empty (valid) problem.
  const bool heads_divide =
      k.sym_size(1) == 0 ? q.sym_size(1) == 0 : q.sym_size(1) % k.sym_size(1) == 0;
  TORCH_CHECK(heads_divide, op,
              ": the number of k/v heads must divide the number of q heads (grouped-query attention), got q heads ",
              q.sym_size(1), " and k/v heads ", k.sym_size(1));
  if (scale.has_value()) {
    TORCH_CHECK(std::isfinite(*scale), op, ": scale must be finite, got ", *scale);
  }
}

at::ScalarType lse_dtype(const Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_backward_inputs(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                           const Tensor& out, const Tensor& lse, const std::optional<double>& scale) {
  check_inputs(kBackwardOp, q, k, v, scale);
  TORCH_CHECK(grad_out.sym_sizes() == q.sym_sizes(), kBackwardOp, ": grad_out must have the shape of q ",
              q.sym_sizes(), ", got ", grad_out.sym_sizes());
  TORCH_CHECK(out.sym_sizes() == q.sym_sizes(), kBackwardOp, ": out must have the shape of q ", q.sym_sizes(),
              ", got ", out.sym_sizes());
  check_same_dtype(grad_out, q, kBackwardOp, "grad_out", "q");
  check_same_dtype(out, q, kBackwardOp, "out", "q");
  check_same_device(grad_out, q, kBackwardOp, "grad_out", "q");
  check_same_device(out, q, kBackwardOp, "out", "q");
  check_same_device(lse, q, kBackwardOp, "lse", "q");
  TORCH_CHECK(lse.dim() == 3 && lse.sym_size(0) == q.sym_size(0) && lse.sym_size(1) == q.sym_size(1) &&
                  lse.sym_size(2) == q.sym_size(2),
              kBackwardOp, ": lse must have shape (batch, q heads, q seq) = [", q.sym_size(0), ", ", q.sym_size(1),
              ", ", q.sym_size(2), "], got ", lse.sym_sizes());
  TORCH_CHECK(lse.scalar_type() == lse_dtype(q), kBackwardOp, ": lse must be ", lse_dtype(q), " for ",
              q.scalar_type(), " inputs, got ", lse.scalar_type());
}

double resolve_scale(const std::optional<double>& scale, int64_t head_dim) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
}

// Sizes shared by the kernels; inputs are made contiguous first.
struct Dims {
  int64_t batch, q_heads, kv_heads, group, q_len, kv_len, head_dim;
  int64_t causal_offset;  // S - L: query i sees key j iff j <= i + causal_offset
};

Dims dims_of(const Tensor& q, const Tensor& k) {
  Dims d;
  d.batch = q.size(0);
  d.q_heads = q.size(1);
  d.kv_heads = k.size(1);
  d.group = d.kv_heads > 0 ? d.q_heads / d.kv_heads : 1;
  d.q_len = q.size(2);
  d.kv_len = k.size(2);
  d.head_dim = q.size(3);
  d.causal_offset = d.kv_len - d.q_len;
  return d;
}

// ---------------------------------------------------------------- CPU kernels
// The kernels work on contiguous float32 (float64 for float64) copies of the
// inputs, none for contiguous float32/float64: O(B * H * seq * D) extra
// memory, linear in the sequence.
// Each task owns a tile of queries x keys at a time; the tile products are
// small row-major matrix multiplies on 16-byte vectors (matmul_acc), so no
// [L, S] tensor ever exists.

constexpr int64_t kCpuQueryBlock = 32;
constexpr int64_t kCpuKeyBlock = 64;

// The tile products and exponentials run on GCC/Clang vector-extension types:
// 16 bytes everywhere (SSE2 on x86-64, NEON on arm64), and on x86-64 CPUs with
// AVX2+FMA a second compilation of the same code on 32-byte vectors, chosen at
// run time (the extension is built for baseline x86-64).
// (vector_size is ignored on a dependent type, hence one typedef per type.)
typedef float Float4 __attribute__((vector_size(16)));
typedef double Double2 __attribute__((vector_size(16)));
typedef int32_t Int4 __attribute__((vector_size(16)));
typedef float Float8 __attribute__((vector_size(32)));
typedef double Double4 __attribute__((vector_size(32)));
typedef int32_t Int8 __attribute__((vector_size(32)));

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MY_MPS_OPS_FLASH_AVX2 1
#define MY_MPS_OPS_TARGET_AVX2 __attribute__((target("avx2,fma")))
// 32-byte vectors only ever live inside the AVX2 functions (always inlined).
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define MY_MPS_OPS_ALWAYS_INLINE inline __attribute__((always_inline))

template <typename V, typename A>
MY_MPS_OPS_ALWAYS_INLINE V load_vec(const A* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename A>
MY_MPS_OPS_ALWAYS_INLINE void store_vec(A* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// C[0:R, 0:2L] += A[0:R, 0:k] * B[0:k, 0:2L] with L lanes per vector V: the
// 2R accumulators stay in registers over the whole k loop.
template <typename A, typename V, int R>
MY_MPS_OPS_ALWAYS_INLINE void matmul_acc_tile(A* C, int64_t ldc, const A* Am, int64_t lda, const A* B, int64_t ldb,
                                              int64_t k) {
  constexpr int64_t L = sizeof(V) / sizeof(A);
  V c[R][2];
  for (int r = 0; r < R; ++r) {
    c[r][0] = load_vec<V>(C + r * ldc);
    c[r][1] = load_vec<V>(C + r * ldc + L);
  }
  for (int64_t p = 0; p < k; ++p) {
    const V b0 = load_vec<V>(B + p * ldb), b1 = load_vec<V>(B + p * ldb + L);
    for (int r = 0; r < R; ++r) {
      const A a = Am[r * lda + p];
      c[r][0] += a * b0;
      c[r][1] += a * b1;
    }
  }
  for (int r = 0; r < R; ++r) {
    store_vec(C + r * ldc, c[r][0]);
    store_vec(C + r * ldc + L, c[r][1]);
  }
}

// C[m, n] += A[m, k] * B[k, n], row-major with leading dimensions lda, ldb, ldc:
// strips of two vectors of columns, four rows at a time, then the leftovers.
template <typename A, typename V>
MY_MPS_OPS_ALWAYS_INLINE void matmul_acc_impl(A* C, int64_t ldc, const A* Am, int64_t lda, const A* B, int64_t ldb,
                                              int64_t m, int64_t n, int64_t k) {
  constexpr int64_t W = 2 * sizeof(V) / sizeof(A);
  int64_t j0 = 0;
  for (; j0 + W <= n; j0 += W) {
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) matmul_acc_tile<A, V, 4>(C + i * ldc + j0, ldc, Am + i * lda, lda, B + j0, ldb, k);
    for (; i < m; ++i) matmul_acc_tile<A, V, 1>(C + i * ldc + j0, ldc, Am + i * lda, lda, B + j0, ldb, k);
  }
  if (j0 == n) return;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t p = 0; p < k; ++p) {
      const A a0 = Am[i * lda + p];
      for (int64_t j = j0; j < n; ++j) C[i * ldc + j] += a0 * B[p * ldb + j];
    }
  }
}

// exp(x) for x <= 0, lane-wise: a Cody-Waite range reduction x = n ln2 + r,
// |r| <= ln2 / 2 (n rounded with the 1.5 * 2^23 trick), a degree-7 Taylor
// polynomial (relative error ~1e-7), and 2^n built in the exponent bits.
// Arguments below -87 give ~1.6e-38 instead of 0.
template <typename V, typename IV>
MY_MPS_OPS_ALWAYS_INLINE V exp_nonpositive(V x) {
  const V lowest = V{} - 87.0f;
  const IV below = x < lowest;
  x = (V)(((IV)x & ~below) | ((IV)lowest & below));
  const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const V r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  V p = V{} + 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const IV two_to_n = (__builtin_convertvector(n, IV) + 127) << 23;
  return p * (V)two_to_n;
}

template <typename V, typename IV>
MY_MPS_OPS_ALWAYS_INLINE void exp_shifted_impl(float* s, int64_t n, float scale, float shift) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  int64_t j = 0;
  for (; j + L <= n; j += L) store_vec(s + j, exp_nonpositive<V, IV>(load_vec<V>(s + j) * scale - shift));
  for (; j < n; ++j) s[j] = std::exp(s[j] * scale - shift);
}

template <typename A>
struct VectorsOf;
template <>
struct VectorsOf<float> {
  using Narrow = Float4;
  using Wide = Float8;
};
template <>
struct VectorsOf<double> {
  using Narrow = Double2;
  using Wide = Double4;
};

#ifdef MY_MPS_OPS_FLASH_AVX2
template <typename A>
MY_MPS_OPS_TARGET_AVX2 void matmul_acc_avx2(A* C, int64_t ldc, const A* Am, int64_t lda, const A* B, int64_t ldb,
                                            int64_t m, int64_t n, int64_t k) {
  matmul_acc_impl<A, typename VectorsOf<A>::Wide>(C, ldc, Am, lda, B, ldb, m, n, k);
}
MY_MPS_OPS_TARGET_AVX2 void exp_shifted_avx2(float* s, int64_t n, float scale, float shift) {
  exp_shifted_impl<Float8, Int8>(s, n, scale, shift);
}
#endif

template <typename A>
void matmul_acc(A* C, int64_t ldc, const A* Am, int64_t lda, const A* B, int64_t ldb, int64_t m, int64_t n,
                int64_t k) {
#ifdef MY_MPS_OPS_FLASH_AVX2
  if (cpu::has_avx2_fma()) return matmul_acc_avx2<A>(C, ldc, Am, lda, B, ldb, m, n, k);
#endif
  matmul_acc_impl<A, typename VectorsOf<A>::Narrow>(C, ldc, Am, lda, B, ldb, m, n, k);
}

// s[j] = exp(s[j] * scale - shift) for j < n, for arguments <= 0 (scores minus
// their row maximum or log-sum-exp): the vector exponential for float32,
// std::exp for float64 (gradcheck).
template <typename A>
void exp_shifted(A* s, int64_t n, A scale, A shift) {
  for (int64_t j = 0; j < n; ++j) s[j] = std::exp(s[j] * scale - shift);
}

template <>
void exp_shifted<float>(float* s, int64_t n, float scale, float shift) {
#ifdef MY_MPS_OPS_FLASH_AVX2
  if (cpu::has_avx2_fma()) return exp_shifted_avx2(s, n, scale, shift);
#endif
  exp_shifted_impl<Float4, Int4>(s, n, scale, shift);
}

// dst[c, r] = src[r, c] for r < rows, c < cols; dst has leading dimension ld_dst.
template <typename A>
void transpose_into(A* dst, int64_t ld_dst, const A* src, int64_t ld_src, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
}

// Every key block of every (batch, k/v head) [len, D] slab transposed to a
// [D, BK] tile (the layout matmul_acc reads as B; one tile per block keeps its
// rows BK apart, where a whole-slab [D, len] transpose puts them len apart and
// makes them collide in the L1 sets): made once per call rather than once per
// (query block, key block) of every task.
template <typename A>
std::vector<A> transposed_key_blocks(const A* x, int64_t slabs, int64_t len, int64_t D) {
  constexpr int64_t BK = kCpuKeyBlock;
  const int64_t blocks = (len + BK - 1) / BK;
  std::vector<A> xt(slabs * blocks * D * BK);
  at::parallel_for(0, slabs * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = t / blocks, j0 = (t % blocks) * BK;
      transpose_into(xt.data() + t * D * BK, BK, x + (s * len + j0) * D, D, std::min(len, j0 + BK) - j0, D);
    }
  });
  return xt;
}

// max_j s[j] * scale and sum_j s[j] over a score row: eight independent lanes
// for float32 (a scalar max or sum is one long dependency chain), as two
// cpu::f32x4, which the baseline build keeps in registers.
template <typename A>
inline A max_scaled(const A* s, int64_t n, A scale) {
  using V = cpu::f32x4;
  int64_t j = 0;
  A m = -std::numeric_limits<A>::infinity();
  if constexpr (std::is_same_v<A, float>) {
    if (n >= 8) {
      V m0 = cpu::loadv<V>(s) * scale, m1 = cpu::loadv<V>(s + 4) * scale;
      for (j = 8; j + 8 <= n; j += 8) {
        m0 = cpu::maxv(cpu::loadv<V>(s + j) * scale, m0);
        m1 = cpu::maxv(cpu::loadv<V>(s + j + 4) * scale, m1);
      }
      m = cpu::reduce_maxv(cpu::maxv(m1, m0));
    }
  }
  for (; j < n; ++j) m = std::max(m, s[j] * scale);
  return m;
}
template <typename A>
inline A sum_of(const A* s, int64_t n) {
  using V = cpu::f32x4;
  int64_t j = 0;
  A sum = 0;
  if constexpr (std::is_same_v<A, float>) {
    V s0{}, s1{};
    for (; j + 8 <= n; j += 8) s0 += cpu::loadv<V>(s + j), s1 += cpu::loadv<V>(s + j + 4);
    sum = cpu::reduce_sumv(s0 + s1);
  }
  for (; j < n; ++j) sum += s[j];
  return sum;
}

template <typename A>
inline A dot(const A* __restrict a, const A* __restrict b, int64_t n) {
  using Vec = at::vec::Vectorized<A>;
  constexpr int64_t kW = Vec::size();
  Vec acc0(A(0)), acc1(A(0));
  int64_t i = 0;
  for (; i + 2 * kW <= n; i += 2 * kW) {
    acc0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(a + i + kW), Vec::loadu(b + i + kW), acc1);
  }
  A sum = at::vec::vec_reduce_all<A>(std::plus<Vec>(), acc0 + acc1);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// Keys visible to query row i: [0, visible_keys(i)).
inline int64_t visible_keys(const Dims& d, bool causal, int64_t i) {
  if (!causal) return d.kv_len;
  return std::clamp<int64_t>(i + d.causal_offset + 1, 0, d.kv_len);
}

// Forward: one task per (batch, q head, block of kCpuQueryBlock queries);
// each walks key blocks with an online softmax. Per task memory: K^T of one
// key block, the score tile and the output accumulator [query block, D].
template <typename A>
void forward_cpu_kernel(const A* q, const A* k, const A* v, A* out, A* lse, const Dims& d, bool causal, A scale) {
  const int64_t D = d.head_dim;
  constexpr int64_t BQ = kCpuQueryBlock, BK = kCpuKeyBlock;
  const int64_t q_blocks = (d.q_len + BQ - 1) / BQ;
  const int64_t tasks = d.batch * d.q_heads * q_blocks;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const std::vector<A> k_tiles = transposed_key_blocks(k, d.batch * d.kv_heads, d.kv_len, D);
  const int64_t k_blocks = (d.kv_len + BK - 1) / BK;
  at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    std::vector<A> scores(BQ * BK), acc(BQ * D), row_max(BQ), row_sum(BQ);
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t qb = task % q_blocks;
      const int64_t bh = task / q_blocks;  // b * q_heads + h
      const int64_t b = bh / d.q_heads, h = bh % d.q_heads;
      const int64_t kv_bh = b * d.kv_heads + h / d.group;
      const A* k_t = k_tiles.data() + kv_bh * k_blocks * D * BK;  // this head's [D, BK] tiles
      const A* vh = v + kv_bh * d.kv_len * D;
      const int64_t i0 = qb * BQ, rows = std::min(d.q_len, i0 + BQ) - i0;
      const A* q_block = q + (bh * d.q_len + i0) * D;
      std::fill(acc.begin(), acc.end(), A(0));
      std::fill(row_max.begin(), row_max.end(), kNegInf);
      std::fill(row_sum.begin(), row_sum.end(), A(0));
      const int64_t key_end = visible_keys(d, causal, i0 + rows - 1);  // the block's last row sees the most
      for (int64_t j0 = 0; j0 < key_end; j0 += BK) {
        const int64_t keys = std::min(key_end, j0 + BK) - j0;
        std::fill(scores.begin(), scores.end(), A(0));
        matmul_acc(scores.data(), BK, q_block, D, k_t + (j0 / BK) * D * BK, BK, rows, keys, D);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row_keys = std::min(keys, visible_keys(d, causal, i0 + r) - j0);
          A* s = scores.data() + r * BK;
          if (row_keys <= 0) {  // nothing visible in this block: contributes nothing
            std::fill(s, s + keys, A(0));
            continue;
          }
          const A block_max = max_scaled(s, row_keys, scale);
          const A new_max = std::max(row_max[r], block_max);
          const A correction = std::exp(row_max[r] - new_max);  // 0 while row_max is -inf
          exp_shifted(s, row_keys, scale, new_max);
          const A block_sum = sum_of(s, row_keys);
          std::fill(s + row_keys, s + keys, A(0));
          A* acc_row = acc.data() + r * D;
          for (int64_t c = 0; c < D; ++c) acc_row[c] *= correction;
          row_sum[r] = row_sum[r] * correction + block_sum;
          row_max[r] = new_max;
        }
        matmul_acc(acc.data(), D, scores.data(), BK, vh + j0 * D, D, rows, D, keys);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = bh * d.q_len + i0 + r;
        A* out_row = out + row * D;
        const A* acc_row = acc.data() + r * D;
        const A inv = row_sum[r] > A(0) ? A(1) / row_sum[r] : A(0);
        for (int64_t c = 0; c < D; ++c) out_row[c] = acc_row[c] * inv;
        lse[row] = row_sum[r] > A(0) ? row_max[r] + std::log(row_sum[r]) : kNegInf;
      }
    }
  });
}

// delta[row] = sum_c grad_out[row, c] * out[row, c] (FlashAttention-2's D).
template <typename A>
void row_dot_cpu(const A* grad_out, const A* out, A* delta, int64_t rows, int64_t D) {
  at::parallel_for(0, rows, cpu::row_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) delta[r] = dot(grad_out + r * D, out + r * D, D);
  });
}

// One tile of the backward: for queries [i0, i0 + rows) and keys [j0, j0 + keys)
// (k_t, v_t: the keys' K^T and V^T, [D, BK]), fills p = exp(scale * q.k - lse)
// and ds = p * (dO.v - delta), both [rows, BK], zero where masked.
template <typename A>
void backward_tile(const A* q_block, const A* go_block, const A* k_t, const A* v_t, const A* lse, const A* delta,
                   int64_t i0, int64_t rows, int64_t j0, int64_t keys, const Dims& d, bool causal, A scale, A* p,
                   A* ds) {
  const int64_t D = d.head_dim;
  constexpr int64_t BK = kCpuKeyBlock;
  std::fill(p, p + rows * BK, A(0));
  std::fill(ds, ds + rows * BK, A(0));
  matmul_acc(p, BK, q_block, D, k_t, BK, rows, keys, D);
  matmul_acc(ds, BK, go_block, D, v_t, BK, rows, keys, D);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row_keys = std::clamp<int64_t>(visible_keys(d, causal, i0 + r) - j0, 0, keys);
    A* pr = p + r * BK;
    A* dsr = ds + r * BK;
    exp_shifted(pr, row_keys, scale, lse[r]);
    for (int64_t j = 0; j < row_keys; ++j) dsr[j] = pr[j] * (dsr[j] - delta[r]);
    std::fill(pr + row_keys, pr + keys, A(0));
    std::fill(dsr + row_keys, dsr + keys, A(0));
  }
}

// dK, dV: one task per (batch, k/v head, block of keys), accumulating over
// every query of every q head sharing that k/v head: dV += P^T dO,
// dK += scale * dS^T Q. No atomics, no [L, S].
template <typename A>
void backward_kv_cpu_kernel(const A* grad_out, const A* q, const A* k, const A* v, const A* lse, const A* delta,
                            A* dk, A* dv, const Dims& d, bool causal, A scale) {
  const int64_t D = d.head_dim;
  constexpr int64_t BQ = kCpuQueryBlock, BK = kCpuKeyBlock;
  const int64_t k_blocks = (d.kv_len + BK - 1) / BK;
  const int64_t tasks = d.batch * d.kv_heads * k_blocks;
  at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    std::vector<A> k_t(D * BK), v_t(D * BK), p(BQ * BK), ds(BQ * BK), p_t(BK * BQ), ds_t(BK * BQ);
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t kb = task % k_blocks;
      const int64_t kv_bh = task / k_blocks;
      const int64_t b = kv_bh / d.kv_heads, kv_h = kv_bh % d.kv_heads;
      const int64_t j0 = kb * BK, keys = std::min(d.kv_len, j0 + BK) - j0;
      const int64_t kv_row0 = kv_bh * d.kv_len + j0;
      transpose_into(k_t.data(), BK, k + kv_row0 * D, D, keys, D);
      transpose_into(v_t.data(), BK, v + kv_row0 * D, D, keys, D);
      A* dk_block = dk + kv_row0 * D;
      A* dv_block = dv + kv_row0 * D;
      std::fill(dk_block, dk_block + keys * D, A(0));
      std::fill(dv_block, dv_block + keys * D, A(0));
      // First query that sees key j0: i + offset >= j0.
      const int64_t i_begin = causal ? std::clamp<int64_t>(j0 - d.causal_offset, 0, d.q_len) : 0;
      for (int64_t h = kv_h * d.group; h < (kv_h + 1) * d.group; ++h) {
        const int64_t bh = b * d.q_heads + h;
        for (int64_t i0 = i_begin; i0 < d.q_len; i0 += BQ) {
          const int64_t rows = std::min(d.q_len, i0 + BQ) - i0;
          const int64_t row0 = bh * d.q_len + i0;
          backward_tile(q + row0 * D, grad_out + row0 * D, k_t.data(), v_t.data(), lse + row0, delta + row0, i0,
                        rows, j0, keys, d, causal, scale, p.data(), ds.data());
          transpose_into(p_t.data(), BQ, p.data(), BK, rows, keys);
          transpose_into(ds_t.data(), BQ, ds.data(), BK, rows, keys);
          matmul_acc(dv_block, D, p_t.data(), BQ, grad_out + row0 * D, D, keys, D, rows);
          matmul_acc(dk_block, D, ds_t.data(), BQ, q + row0 * D, D, keys, D, rows);
        }
      }
      for (int64_t e = 0; e < keys * D; ++e) dk_block[e] *= scale;
    }
  });
}

// dQ: one task per (batch, q head, block of queries), walking visible key
// blocks: dQ += scale * dS K.
template <typename A>
void backward_q_cpu_kernel(const A* grad_out, const A* q, const A* k, const A* v, const A* lse, const A* delta,
                           A* dq, const Dims& d, bool causal, A scale) {
  const int64_t D = d.head_dim;
  constexpr int64_t BQ = kCpuQueryBlock, BK = kCpuKeyBlock;
  const int64_t q_blocks = (d.q_len + BQ - 1) / BQ;
  const int64_t tasks = d.batch * d.q_heads * q_blocks;
  const int64_t k_blocks = (d.kv_len + BK - 1) / BK;
  const std::vector<A> k_tiles = transposed_key_blocks(k, d.batch * d.kv_heads, d.kv_len, D);
  const std::vector<A> v_tiles = transposed_key_blocks(v, d.batch * d.kv_heads, d.kv_len, D);
  at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    std::vector<A> p(BQ * BK), ds(BQ * BK);
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t qb = task % q_blocks;
      const int64_t bh = task / q_blocks;
      const int64_t b = bh / d.q_heads, h = bh % d.q_heads;
      const int64_t kv_bh = b * d.kv_heads + h / d.group;
      const int64_t i0 = qb * BQ, rows = std::min(d.q_len, i0 + BQ) - i0;
      const int64_t row0 = bh * d.q_len + i0;
      A* dq_block = dq + row0 * D;
      std::fill(dq_block, dq_block + rows * D, A(0));
      const int64_t key_end = visible_keys(d, causal, i0 + rows - 1);
      for (int64_t j0 = 0; j0 < key_end; j0 += BK) {
        const int64_t keys = std::min(key_end, j0 + BK) - j0;
        const A* k_block = k + (kv_bh * d.kv_len + j0) * D;
        const int64_t tile = (kv_bh * k_blocks + j0 / BK) * D * BK;
        backward_tile(q + row0 * D, grad_out + row0 * D, k_tiles.data() + tile, v_tiles.data() + tile, lse + row0,
                      delta + row0, i0, rows, j0, keys, d, causal, scale, p.data(), ds.data());
        matmul_acc(dq_block, D, ds.data(), BK, k_block, D, rows, D, keys);
      }
      for (int64_t e = 0; e < rows * D; ++e) dq_block[e] *= scale;
    }
  });
}

Tensor to_acc(const Tensor& t) {
  const auto acc = t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return t.to(acc).contiguous();
}

std::tuple<Tensor, Tensor> forward_cpu(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale) {
  const Dims d = dims_of(q, k);
  const Tensor qa = to_acc(q), ka = to_acc(k), va = to_acc(v);
  Tensor out_acc = at::empty(q.sizes(), qa.options());
  Tensor lse = at::empty({d.batch, d.q_heads, d.q_len}, qa.options());
  if (out_acc.numel() > 0) {
    AT_DISPATCH_SWITCH(qa.scalar_type(), "flash_attention_cpu",
                       AT_DISPATCH_CASE(at::kFloat, [&] {
                         forward_cpu_kernel<float>(qa.const_data_ptr<float>(), ka.const_data_ptr<float>(),
                                                   va.const_data_ptr<float>(), out_acc.mutable_data_ptr<float>(),
                                                   lse.mutable_data_ptr<float>(), d, causal, float(scale));
                       }) AT_DISPATCH_CASE(at::kDouble, [&] {
                         forward_cpu_kernel<double>(qa.const_data_ptr<double>(), ka.const_data_ptr<double>(),
                                                    va.const_data_ptr<double>(), out_acc.mutable_data_ptr<double>(),
                                                    lse.mutable_data_ptr<double>(), d, causal, scale);
                       }));
  }
  Tensor out = out_acc.scalar_type() == q.scalar_type() ? out_acc : out_acc.to(q.scalar_type());
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> backward_cpu(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                                const Tensor& v, const Tensor& out, const Tensor& lse, bool causal,
                                                double scale) {
  const Dims d = dims_of(q, k);
  const Tensor ga = to_acc(grad_out), qa = to_acc(q), ka = to_acc(k), va = to_acc(v), oa = to_acc(out);
  const Tensor lse_c = lse.contiguous();
  Tensor dq = at::empty(q.sizes(), qa.options());
  Tensor dk = at::empty(k.sizes(), ka.options());
  Tensor dv = at::empty(v.sizes(), va.options());
  Tensor delta = at::empty({d.batch, d.q_heads, d.q_len}, qa.options());
  const auto run = [&](auto zero) {
    using A = decltype(zero);
    row_dot_cpu<A>(ga.const_data_ptr<A>(), oa.const_data_ptr<A>(), delta.mutable_data_ptr<A>(), delta.numel(),
                   d.head_dim);
    backward_kv_cpu_kernel<A>(ga.const_data_ptr<A>(), qa.const_data_ptr<A>(), ka.const_data_ptr<A>(),
                              va.const_data_ptr<A>(), lse_c.const_data_ptr<A>(), delta.const_data_ptr<A>(),
                              dk.mutable_data_ptr<A>(), dv.mutable_data_ptr<A>(), d, causal, A(scale));
    backward_q_cpu_kernel<A>(ga.const_data_ptr<A>(), qa.const_data_ptr<A>(), ka.const_data_ptr<A>(),
                             va.const_data_ptr<A>(), lse_c.const_data_ptr<A>(), delta.const_data_ptr<A>(),
                             dq.mutable_data_ptr<A>(), d, causal, A(scale));
  };
  if (q.numel() > 0 || k.numel() > 0) {
    if (qa.scalar_type() == at::kDouble) {
      run(double(0));
    } else {
      run(float(0));
    }
  }
  const auto dt = q.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
}

// ------------------------------------------------------------ Metal path
// Shared by the MPS backend and the emulator (cpu tensors under
// my_mps_ops.testing.metal_emulation()); see shaders/flash_attention.metal
// for the tiling. The numbers here must match the shader's constants.

constexpr const char* kLibrary = "flash_attention";
constexpr uint64_t kSimdWidth = 32;

// Simdgroups per threadgroup of the forward and dQ kernels (8 query rows
// each) and of the dK/dV kernel (8 keys each): 4, or 2 for head_dim 256 to
// stay within 32 KB of threadgroup memory.
uint64_t simdgroups_for(int64_t head_dim) { return head_dim > 128 ? 2 : 4; }

std::string kernel_name(const char* stem, const Tensor& q) {
  return std::string(stem) + "_" + metal_type_name(q.scalar_type()) + "_" + std::to_string(q.size(3));
}

uint64_t ceil_div(int64_t a, int64_t b) { return static_cast<uint64_t>((a + b - 1) / b); }

// The scalars every kernel takes, in this order after its buffers.
void add_shape_scalars(metal::Launch& launch, const Dims& d, bool causal, double scale) {
  launch.scalar<uint32_t>(static_cast<uint32_t>(d.q_heads))
      .scalar<uint32_t>(static_cast<uint32_t>(d.group))
      .scalar<uint32_t>(static_cast<uint32_t>(d.q_len))
      .scalar<uint32_t>(static_cast<uint32_t>(d.kv_len))
      .scalar<uint32_t>(causal ? 1u : 0u)
      .scalar<float>(static_cast<float>(scale));
}

void check_metal_sizes(const char* op, const Dims& d) {
  const int64_t limit = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(d.batch * d.q_heads * d.q_len * d.head_dim <= limit &&
                  d.batch * d.kv_heads * d.kv_len * d.head_dim <= limit,
              op, ": inputs are too large for the Metal kernels (more than 2^31 elements)");
}

std::tuple<Tensor, Tensor> forward_metal(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, bool causal,
                                         double scale) {
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const Dims d = dims_of(q, k);
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = at::empty({d.batch, d.q_heads, d.q_len}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (d.kv_len == 0) {  // no key at all: defined as zeros / -inf, nothing to launch
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  check_metal_sizes(kOp, d);
  const uint64_t simdgroups = simdgroups_for(d.head_dim);
  const uint64_t tile = 8 * simdgroups;  // query rows and key rows per tile
  auto& executor = metal::executor_for(q.device());
  metal::Launch launch(kLibrary, kernel_name("flash_attention_forward", q));
  launch.buffer(q).buffer(k).buffer(v).buffer(out).buffer(lse);
  add_shape_scalars(launch, d, causal, scale);
  // [[threadgroup(0)]]: the staged Q, then K and V tiles (tile x D floats);
  // [[threadgroup(1)]]: per simdgroup an 8 x tile score block and an 8 x 8 diagonal.
  launch.threadgroup_memory(tile * d.head_dim * sizeof(float))
      .threadgroup_memory(simdgroups * (8 * tile + 64) * sizeof(float))
      .dispatch_threadgroups({ceil_div(d.q_len, tile), uint64_t(d.q_heads), uint64_t(d.batch)},
                             {simdgroups * kSimdWidth, 1, 1});
  executor.run(launch);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> backward_metal(const Tensor& grad_out_in, const Tensor& q_in, const Tensor& k_in,
                                                  const Tensor& v_in, const Tensor& out_in, const Tensor& lse_in,
                                                  bool causal, double scale) {
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  const Dims d = dims_of(q, k);
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  check_metal_sizes(kBackwardOp, d);
  auto& executor = metal::executor_for(q.device());
  const uint64_t D = static_cast<uint64_t>(d.head_dim);
  const uint64_t simdgroups = simdgroups_for(d.head_dim);

  // delta[row] = rowsum(grad_out * out), one thread per row.
  Tensor delta = at::empty({d.batch, d.q_heads, d.q_len}, q.options().dtype(at::kFloat));
  {
    const std::string kernel = std::string("flash_attention_backward_delta_") + metal_type_name(q.scalar_type());
    const metal::PipelineInfo info = executor.pipeline_info(kLibrary, kernel);
    const uint64_t rows = static_cast<uint64_t>(delta.numel());
    metal::Launch launch(kLibrary, kernel);
    launch.buffer(grad_out)
        .buffer(out)
        .buffer(delta)
        .scalar<uint32_t>(static_cast<uint32_t>(rows))
        .scalar<uint32_t>(static_cast<uint32_t>(D))
        .dispatch_threads({rows, 1, 1}, {std::min<uint64_t>(rows, info.max_threads_per_threadgroup), 1, 1});
    executor.run(launch);
  }
  // dK, dV: one threadgroup per (block of 8 * simdgroups keys, k/v head, batch).
  {
    metal::Launch launch(kLibrary, kernel_name("flash_attention_backward_kv", q));
    launch.buffer(grad_out).buffer(q).buffer(k).buffer(v).buffer(lse).buffer(delta).buffer(dk).buffer(dv);
    add_shape_scalars(launch, d, causal, scale);
    // [[threadgroup(0)]]: Q and dO tiles of 8 queries (2 x 8 x D floats) plus
    // their lse and delta; [[threadgroup(1)]]: per simdgroup two 8 x 8 blocks.
    launch.threadgroup_memory((2 * 8 * D + 16) * sizeof(float))
        .threadgroup_memory(simdgroups * 128 * sizeof(float))
        .dispatch_threadgroups({ceil_div(d.kv_len, 8 * simdgroups), uint64_t(d.kv_heads), uint64_t(d.batch)},
                               {simdgroups * kSimdWidth, 1, 1});
    executor.run(launch);
  }
  // dQ: one threadgroup per (block of 8 * simdgroups queries, q head, batch).
  {
    metal::Launch launch(kLibrary, kernel_name("flash_attention_backward_q", q));
    launch.buffer(grad_out).buffer(q).buffer(k).buffer(v).buffer(lse).buffer(delta).buffer(dq);
    add_shape_scalars(launch, d, causal, scale);
    // [[threadgroup(0)]]: K and V tiles of 8 keys (2 x 8 x D floats);
    // [[threadgroup(1)]]: per simdgroup two 8 x 8 blocks.
    launch.threadgroup_memory(2 * 8 * D * sizeof(float))
        .threadgroup_memory(simdgroups * 128 * sizeof(float))
        .dispatch_threadgroups({ceil_div(d.q_len, 8 * simdgroups), uint64_t(d.q_heads), uint64_t(d.batch)},
                               {simdgroups * kSimdWidth, 1, 1});
    executor.run(launch);
  }
  return {dq, dk, dv};
}

// -------------------------------------------------------- per-device kernels

std::tuple<Tensor, Tensor> flash_attention_cpu(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                               std::optional<double> scale) {
  check_inputs(kOp, q, k, v, scale);
  const double s = resolve_scale(scale, q.size(3));
  // float64 has no Metal kernels: it always takes the native path (gradcheck).
  if (metal::metal_emulation_enabled() && q.scalar_type() != at::kDouble) return forward_metal(q, k, v, causal, s);
  return forward_cpu(q, k, v, causal, s);
}

std::tuple<Tensor, Tensor, Tensor> flash_attention_backward_cpu(const Tensor& grad_out, const Tensor& q,
                                                                const Tensor& k, const Tensor& v, const Tensor& out,
                                                                const Tensor& lse, bool causal,
                                                                std::optional<double> scale) {
  check_backward_inputs(grad_out, q, k, v, out, lse, scale);
  const double s = resolve_scale(scale, q.size(3));
  if (metal::metal_emulation_enabled() && q.scalar_type() != at::kDouble) {
    return backward_metal(grad_out, q, k, v, out, lse, causal, s);
  }
  return backward_cpu(grad_out, q, k, v, out, lse, causal, s);
}

std::tuple<Tensor, Tensor> flash_attention_mps(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                               std::optional<double> scale) {
  check_inputs(kOp, q, k, v, scale);
  return forward_metal(q, k, v, causal, resolve_scale(scale, q.size(3)));
}

std::tuple<Tensor, Tensor, Tensor> flash_attention_backward_mps(const Tensor& grad_out, const Tensor& q,
                                                                const Tensor& k, const Tensor& v, const Tensor& out,
                                                                const Tensor& lse, bool causal,
                                                                std::optional<double> scale) {
  check_backward_inputs(grad_out, q, k, v, out, lse, scale);
  return backward_metal(grad_out, q, k, v, out, lse, causal, resolve_scale(scale, q.size(3)));
}

// Shapes only; works with symbolic sizes under torch.compile.
std::tuple<Tensor, Tensor> flash_attention_meta(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                                std::optional<double> scale) {
  check_inputs(kOp, q, k, v, scale);
  Tensor out = at::empty_symint(q.sym_sizes(), q.options());
  Tensor lse = at::empty_symint({q.sym_size(0), q.sym_size(1), q.sym_size(2)}, q.options().dtype(lse_dtype(q)));
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> flash_attention_backward_meta(const Tensor& grad_out, const Tensor& q,
                                                                 const Tensor& k, const Tensor& v, const Tensor& out,
                                                                 const Tensor& lse, bool causal,
                                                                 std::optional<double> scale) {
  check_backward_inputs(grad_out, q, k, v, out, lse, scale);
  return {at::empty_symint(q.sym_sizes(), q.options()), at::empty_symint(k.sym_sizes(), k.options()),
          at::empty_symint(v.sym_sizes(), v.options())};
}

// ------------------------------------------------------------------ autograd

class FlashAttentionFunction : public torch::autograd::Function<FlashAttentionFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& q,
                                                const Tensor& k, const Tensor& v, bool causal,
                                                std::optional<double> scale) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("my_mps_ops::flash_attention", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, bool,
                                                           std::optional<double>)>();
    Tensor out, lse;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, lse) = op.call(q, k, v, causal, scale);
    }
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale.has_value() ? c10::IValue(*scale) : c10::IValue();
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("my_mps_ops::flash_attention_backward", "")
                         .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                   const Tensor&, const Tensor&, const Tensor&, bool,
                                                                   std::optional<double>)>();
    const bool any = ctx->needs_input_grad(0) || ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    if (!grad_outputs[0].defined() || !any) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    const auto saved = ctx->get_saved_variables();
    const c10::IValue& scale_value = ctx->saved_data["scale"];
    const std::optional<double> scale =
        scale_value.isNone() ? std::nullopt : std::optional<double>(scale_value.toDouble());
    auto [dq, dk, dv] = op.call(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                                ctx->saved_data["causal"].toBool(), scale);
    return {ctx->needs_input_grad(0) ? dq : Tensor(), ctx->needs_input_grad(1) ? dk : Tensor(),
            ctx->needs_input_grad(2) ? dv : Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> flash_attention_autograd(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                                    std::optional<double> scale) {
  auto outputs = FlashAttentionFunction::apply(q, k, v, causal, scale);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(my_mps_ops, CPU, m) {
  m.impl("flash_attention", &flash_attention_cpu);
  m.impl("flash_attention_backward", &flash_attention_backward_cpu);
}

TORCH_LIBRARY_IMPL(my_mps_ops, MPS, m) {
  m.impl("flash_attention", &flash_attention_mps);
  m.impl("flash_attention_backward", &flash_attention_backward_mps);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Meta, m) {
  m.impl("flash_attention", &flash_attention_meta);
  m.impl("flash_attention_backward", &flash_attention_backward_meta);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Autograd, m) {
  m.impl("flash_attention", &flash_attention_autograd);
  // The backward has no derivative of its own: double backward raises clearly.
  m.impl("flash_attention_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace my_mps_ops
