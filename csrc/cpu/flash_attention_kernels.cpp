// cpu copies: baseline avx2
// CPU loops of flash attention, forward and backward (FlashAttention-2):
// softmax(softcap(scale * q k^T) [+ causal / window mask], [+ sink]) v
// without ever materialising the [L, S] score matrix.
//
// Each task owns a tile of queries x keys at a time; the tile products are
// small row-major matrix multiplies on the copy's vectors (matmul_acc: Vec for
// float32, the double vector of the same width for float64), the scores'
// exponentials through vec::exp_poly_nonpositive (float32; libm's exp for
// float64).
// Per task memory: one key block's K^T, a score tile and an output
// accumulator, so memory stays linear in the sequence.
#include "cpu/dispatch.h"
#include "cpu/flash_attention.h"
#include "cpu/parallel.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

MY_MPS_OPS_CPU_KERNELS_BEGIN
#include "cpu/tile_matmul.h"
namespace {

constexpr int64_t kQueryBlock = 32;
constexpr int64_t kKeyBlock = 64;

// s[j] = exp(s[j] * scale - shift) for j < n, for arguments <= 0 (scores
// minus their row maximum or log-sum-exp): vec::exp_poly_nonpositive for
// float32, std::exp for float64 (gradcheck).
template <typename A>
void exp_shifted(A* s, int64_t n, A scale, A shift) {
  int64_t j = 0;
  if constexpr (std::is_same_v<A, float>) {
    constexpr int64_t L = vec::kLanes<Vec>;
    for (; j + L <= n; j += L)
      vec::storev(s + j, vec::exp_poly_nonpositive(vec::loadv<Vec>(s + j) * scale - shift));
    for (; j < n; ++j) s[j] = vec::exp_f32(s[j] * scale - shift);
  } else {
    for (; j < n; ++j) s[j] = std::exp(s[j] * scale - shift);
  }
}

// max_j s[j] * scale and sum_j s[j] over a score row: two vectors of
// independent lanes for float32 (a scalar max or sum is one long dependency
// chain).
template <typename A>
inline A max_scaled(const A* s, int64_t n, A scale) {
  int64_t j = 0;
  A m = -std::numeric_limits<A>::infinity();
  if constexpr (std::is_same_v<A, float>) {
    constexpr int64_t L = vec::kLanes<Vec>;
    if (n >= 2 * L) {
      Vec m0 = vec::loadv<Vec>(s) * scale, m1 = vec::loadv<Vec>(s + L) * scale;
      for (j = 2 * L; j + 2 * L <= n; j += 2 * L) {
        m0 = vec::maxv(vec::loadv<Vec>(s + j) * scale, m0);
        m1 = vec::maxv(vec::loadv<Vec>(s + j + L) * scale, m1);
      }
      m = vec::reduce_maxv(vec::maxv(m1, m0));
    }
  }
  for (; j < n; ++j) m = std::max(m, s[j] * scale);
  return m;
}

template <typename A>
inline A sum_of(const A* s, int64_t n) {
  int64_t j = 0;
  A sum = 0;
  if constexpr (std::is_same_v<A, float>) {
    constexpr int64_t L = vec::kLanes<Vec>;
    Vec s0{}, s1{};
    for (; j + 2 * L <= n; j += 2 * L) s0 += vec::loadv<Vec>(s + j), s1 += vec::loadv<Vec>(s + j + L);
    sum = vec::reduce_sumv(s0 + s1);
  }
  for (; j < n; ++j) sum += s[j];
  return sum;
}

// sum_i a[i] * b[i], in two vectors of lanes.
template <typename A>
inline A dot(const A* __restrict a, const A* __restrict b, int64_t n) {
  using V = VecOf<A>;
  constexpr int64_t L = vec::kLanes<V>;
  V acc0{}, acc1{};
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    acc0 += vec::loadv<V>(a + i) * vec::loadv<V>(b + i);
    acc1 += vec::loadv<V>(a + i + L) * vec::loadv<V>(b + i + L);
  }
  A sum = vec::reduce_sumv(acc0 + acc1);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// dst[c, r] = src[r, c] for r < rows, c < cols; dst has leading dimension ld_dst.
template <typename A>
void transpose_into(A* dst, int64_t ld_dst, const A* src, int64_t ld_src, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
}

// One sequence of the call (FlashAttentionDims): its first q and k/v row
// (head 0) and its lengths.
struct Seq {
  int64_t q0, q_len, k0, kv_len;
};
inline Seq seq_of(const FlashAttentionDims& d, int64_t b) {
  if (d.cu_q != nullptr) {
    return {d.cu_q[b], int64_t(d.cu_q[b + 1]) - d.cu_q[b], d.cu_k[b], int64_t(d.cu_k[b + 1]) - d.cu_k[b]};
  }
  return {b * d.q_heads * d.q_len, d.q_len, b * d.kv_heads * d.kv_len, d.kv_len};
}
inline int64_t q_head_stride(const FlashAttentionDims& d) { return d.cu_q != nullptr ? d.q_head_stride : d.q_len; }
inline int64_t kv_head_stride(const FlashAttentionDims& d) {
  return d.cu_k != nullptr ? d.kv_head_stride : d.kv_len;
}
// lse / delta element of query i of q head h.
inline int64_t lse_row(const FlashAttentionDims& d, const Seq& s, int64_t h, int64_t i) {
  return s.q0 + h * q_head_stride(d) + i;
}
// First element of query i of q head h, of key j of k/v head kv_h, and the
// distance between consecutive rows of one head (head_dim dense, heads *
// head_dim packed).
inline int64_t q_off(const FlashAttentionDims& d, const Seq& s, int64_t h, int64_t i) {
  if (d.cu_q != nullptr) return ((s.q0 + i) * d.q_heads + h) * d.head_dim;
  return (s.q0 + h * d.q_len + i) * d.head_dim;
}
inline int64_t kv_off(const FlashAttentionDims& d, const Seq& s, int64_t kv_h, int64_t j) {
  if (d.cu_k != nullptr) return ((s.k0 + j) * d.kv_heads + kv_h) * d.head_dim;
  return (s.k0 + kv_h * d.kv_len + j) * d.head_dim;
}
inline int64_t q_ld(const FlashAttentionDims& d) { return d.cu_q != nullptr ? d.q_heads * d.head_dim : d.head_dim; }
inline int64_t kv_ld(const FlashAttentionDims& d) {
  return d.cu_k != nullptr ? d.kv_heads * d.head_dim : d.head_dim;
}
// A rows x D block whose rows are ld apart, as contiguous rows: itself when
// ld == D, else copied into buf. The packed layout's rows are heads * D
// apart, a stride that maps a block's rows onto a few L1 sets; the matmuls
// read their operands many times, so they get a contiguous copy.
template <typename A>
const A* contiguous_rows(const A* src, int64_t ld, int64_t rows, int64_t D, std::vector<A>& buf) {
  if (ld == D) return src;
  buf.resize(rows * D);
  for (int64_t r = 0; r < rows; ++r) std::copy(src + r * ld, src + r * ld + D, buf.data() + r * D);
  return buf.data();
}

// rows x D block at p, ld apart: zeroed, or scaled.
template <typename A>
void fill_rows(A* p, int64_t ld, int64_t rows, int64_t D, A value) {
  for (int64_t r = 0; r < rows; ++r) std::fill(p + r * ld, p + r * ld + D, value);
}
template <typename A>
void scale_rows(A* p, int64_t ld, int64_t rows, int64_t D, A factor) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < D; ++c) p[r * ld + c] *= factor;
}

// Tasks over (sequence, head, block of `block` rows of the sequence's q or k
// side), blocks fastest: with sequences of different lengths only the blocks
// that exist are tasks, so the parallel split stays even.
struct SeqBlocks {
  std::vector<int64_t> base;    // base[b]: the first task of sequence b; base[batch]: the count
  std::vector<int64_t> blocks;  // blocks per head of sequence b
  SeqBlocks(const FlashAttentionDims& d, int64_t heads, int64_t block, bool keys) {
    base.assign(d.batch + 1, 0);
    blocks.assign(d.batch, 0);
    for (int64_t b = 0; b < d.batch; ++b) {
      const Seq s = seq_of(d, b);
      blocks[b] = ((keys ? s.kv_len : s.q_len) + block - 1) / block;
      base[b + 1] = base[b] + heads * blocks[b];
    }
  }
  int64_t tasks() const { return base.back(); }
  // (sequence, head, block) of a task.
  void locate(int64_t task, int64_t& b, int64_t& h, int64_t& blk) const {
    b = std::upper_bound(base.begin(), base.end(), task) - base.begin() - 1;
    const int64_t r = task - base[b];
    h = r / blocks[b];
    blk = r % blocks[b];
  }
};

// Runs body(task) for task in [0, tasks) over the threads, handing tasks out
// one at a time: their costs differ (a causal block sees more keys the later
// it is, a long sequence's blocks more than a short one's), and a static
// split into one contiguous range per thread left one thread with the long
// sequences. Each task writes only its own outputs, so results do not depend
// on which thread runs what. make_state() gives each thread its scratch.
template <typename MakeState, typename Body>
void for_each_task(int64_t tasks, const MakeState& make_state, const Body& body) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t task = next.fetch_add(1); task < tasks; task = next.fetch_add(1)) body(task, state);
  });
}

// Every key block of every (sequence, k/v head) [len, D] slab transposed to a
// [D, BK] tile (the layout matmul_acc reads as B; one tile per block keeps its
// rows BK apart, where a whole-slab [D, len] transpose puts them len apart and
// makes them collide in the L1 sets): made once per call rather than once per
// (query block, key block) of every task. The tiles of (b, kv_h) start at
// tile (kb.base[b] + kv_h * kb.blocks[b]).
template <typename A>
std::vector<A> transposed_key_blocks(const A* x, const FlashAttentionDims& d, const SeqBlocks& kb) {
  constexpr int64_t BK = kKeyBlock;
  const int64_t D = d.head_dim;
  std::vector<A> xt(kb.tasks() * D * BK);
  at::parallel_for(0, kb.tasks(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int64_t b, kv_h, blk;
      kb.locate(t, b, kv_h, blk);
      const Seq s = seq_of(d, b);
      const int64_t j0 = blk * BK;
      transpose_into(xt.data() + t * D * BK, BK, x + kv_off(d, s, kv_h, j0), kv_ld(d), std::min(s.kv_len, j0 + BK) - j0,
                     D);
    }
  });
  return xt;
}

// Keys visible to query row i of sequence s: [key_begin(i), key_end(i)),
// empty when key_end <= key_begin. Both only grow with i, so a block of
// queries sees [key_begin(first), key_end(last)) and key blocks outside it
// are skipped.
inline int64_t key_begin(const FlashAttentionDims& d, const Seq& s, int64_t i) {
  if (d.window_left < 0) return 0;
  return std::clamp<int64_t>(i + s.kv_len - s.q_len - d.window_left, 0, s.kv_len);
}
inline int64_t key_end(const FlashAttentionDims& d, const Seq& s, int64_t i) {
  if (d.window_right < 0) return s.kv_len;
  return std::clamp<int64_t>(i + s.kv_len - s.q_len + d.window_right + 1, 0, s.kv_len);
}
// Queries that see some key of [j0, j1): [query_begin(j0), query_end(j1)).
inline int64_t query_begin(const FlashAttentionDims& d, const Seq& s, int64_t j0) {
  if (d.window_right < 0) return 0;
  return std::clamp<int64_t>(j0 - d.window_right - (s.kv_len - s.q_len), 0, s.q_len);
}
inline int64_t query_end(const FlashAttentionDims& d, const Seq& s, int64_t j1) {
  if (d.window_left < 0) return s.q_len;
  return std::clamp<int64_t>(j1 + d.window_left - (s.kv_len - s.q_len), 0, s.q_len);
}

// tanh(x) = 1 - 2 / (exp(2x) + 1) on float32 vectors, saturating to +-1
// (exp_poly clamps its argument); absolute error ~1e-7, which a capped score
// carries times the cap.
__attribute__((always_inline)) inline Vec tanh_vec(Vec x) {
  return 1.0f - 2.0f / (vec::exp_poly(x + x) + 1.0f);
}

// s[j] = cap * tanh(s[j] * scale / cap): the capped, scaled scores.
template <typename A>
void softcap_scores(A* s, int64_t n, A scale, A cap) {
  const A inner = scale / cap;
  int64_t j = 0;
  if constexpr (std::is_same_v<A, float>) {
    constexpr int64_t L = vec::kLanes<Vec>;
    for (; j + L <= n; j += L) vec::storev(s + j, tanh_vec(vec::loadv<Vec>(s + j) * inner) * cap);
  }
  for (; j < n; ++j) s[j] = cap * std::tanh(s[j] * inner);
}

// The backward's capped row: for raw scores p[j] (q.k) and dO.v products
// ds[j], p[j] = exp(cap * t - lse) and ds[j] = p[j] * (ds[j] - delta) *
// (1 - t^2), t = tanh(scale * q.k / cap).
template <typename A>
void capped_probabilities(A* p, A* ds, int64_t n, A scale, A cap, A lse, A delta) {
  const A inner = scale / cap;
  int64_t j = 0;
  if constexpr (std::is_same_v<A, float>) {
    constexpr int64_t L = vec::kLanes<Vec>;
    for (; j + L <= n; j += L) {
      const Vec t = tanh_vec(vec::loadv<Vec>(p + j) * inner);
      const Vec pj = vec::exp_poly_nonpositive(t * cap - lse);  // capped scores <= lse
      vec::storev(p + j, pj);
      vec::storev(ds + j, pj * (vec::loadv<Vec>(ds + j) - delta) * (1.0f - t * t));
    }
  }
  for (; j < n; ++j) {
    const A t = std::tanh(p[j] * inner);
    p[j] = std::exp(cap * t - lse);
    ds[j] = p[j] * (ds[j] - delta) * (A(1) - t * t);
  }
}

// log(exp(a) + exp(b)), either may be -inf.
template <typename A>
inline A log_add_exp(A a, A b) {
  const A m = std::max(a, b);
  if (m == -std::numeric_limits<A>::infinity()) return m;
  return m + std::log(std::exp(a - m) + std::exp(b - m));
}

// Forward: one task per (sequence, q head, block of kQueryBlock queries);
// each walks key blocks with an online softmax.
template <typename A>
void forward_kernel(const A* q, const A* k, const A* v, const A* sinks, A* out, A* lse, const FlashAttentionDims& d,
                    A scale, A softcap) {
  const int64_t D = d.head_dim;
  constexpr int64_t BQ = kQueryBlock, BK = kKeyBlock;
  const SeqBlocks qbs(d, d.q_heads, BQ, false), kbs(d, d.kv_heads, BK, true);
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const std::vector<A> k_tiles = transposed_key_blocks(k, d, kbs);
  struct Scratch {
    std::vector<A> scores, acc, row_max, row_sum, q_buf, v_buf;
  };
  const auto scratch = [&] { return Scratch{std::vector<A>(BQ * BK), std::vector<A>(BQ * D), std::vector<A>(BQ),
                                            std::vector<A>(BQ), {}, {}}; };
  for_each_task(qbs.tasks(), scratch, [&](int64_t task, Scratch& st) {
    auto& [scores, acc, row_max, row_sum, q_buf, v_buf] = st;
    {
      int64_t b, h, qb;
      qbs.locate(task, b, h, qb);
      const Seq sq = seq_of(d, b);
      const int64_t kv_h = h / d.group;
      const A* k_t = k_tiles.data() + (kbs.base[b] + kv_h * kbs.blocks[b]) * D * BK;  // this head's [D, BK] tiles
      const A* vh = v + kv_off(d, sq, kv_h, 0);
      const int64_t ldq = q_ld(d), ldkv = kv_ld(d);
      const int64_t i0 = qb * BQ, rows = std::min(sq.q_len, i0 + BQ) - i0;
      const A* q_block = contiguous_rows(q + q_off(d, sq, h, i0), ldq, rows, D, q_buf);
      std::fill(acc.begin(), acc.end(), A(0));
      std::fill(row_max.begin(), row_max.end(), kNegInf);
      std::fill(row_sum.begin(), row_sum.end(), A(0));
      // Key blocks (aligned, to index k_tiles) from the first row's first key
      // to the last row's last.
      const int64_t first_key = key_begin(d, sq, i0) / BK * BK, last_key = key_end(d, sq, i0 + rows - 1);
      for (int64_t j0 = first_key; j0 < last_key; j0 += BK) {
        const int64_t keys = std::min(last_key, j0 + BK) - j0;
        std::fill(scores.begin(), scores.end(), A(0));
        matmul_acc(scores.data(), BK, q_block, D, k_t + (j0 / BK) * D * BK, BK, rows, keys, D);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t lo = std::clamp<int64_t>(key_begin(d, sq, i0 + r) - j0, 0, keys);
          const int64_t hi = std::clamp<int64_t>(key_end(d, sq, i0 + r) - j0, 0, keys);
          A* s = scores.data() + r * BK;
          if (hi <= lo) {  // nothing visible in this block: contributes nothing
            std::fill(s, s + keys, A(0));
            continue;
          }
          A row_scale = scale;
          if (softcap > A(0)) {
            softcap_scores(s + lo, hi - lo, scale, softcap);
            row_scale = A(1);
          }
          const A block_max = max_scaled(s + lo, hi - lo, row_scale);
          const A new_max = std::max(row_max[r], block_max);
          const A correction = std::exp(row_max[r] - new_max);  // 0 while row_max is -inf
          exp_shifted(s + lo, hi - lo, row_scale, new_max);
          const A block_sum = sum_of(s + lo, hi - lo);
          std::fill(s, s + lo, A(0));
          std::fill(s + hi, s + keys, A(0));
          A* acc_row = acc.data() + r * D;
          for (int64_t c = 0; c < D; ++c) acc_row[c] *= correction;
          row_sum[r] = row_sum[r] * correction + block_sum;
          row_max[r] = new_max;
        }
        matmul_acc(acc.data(), D, scores.data(), BK, contiguous_rows(vh + j0 * ldkv, ldkv, keys, D, v_buf), D, rows, D,
                   keys);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = lse_row(d, sq, h, i0 + r);
        A* out_row = out + q_off(d, sq, h, i0 + r);
        const A* acc_row = acc.data() + r * D;
        A inv = row_sum[r] > A(0) ? A(1) / row_sum[r] : A(0);
        A row_lse = row_sum[r] > A(0) ? row_max[r] + std::log(row_sum[r]) : kNegInf;
        if (sinks != nullptr) {  // the sink joins the denominator, adds no value
          const A total = log_add_exp(row_lse, sinks[h]);
          if (row_sum[r] > A(0)) inv = std::exp(row_max[r] - total);
          row_lse = total;
        }
        for (int64_t c = 0; c < D; ++c) out_row[c] = acc_row[c] * inv;
        lse[row] = row_lse;
      }
    }
  });
}

// delta = sum_c grad_out[., c] * out[., c] per query row (FlashAttention-2's
// D): `rows` contiguous rows of D, delta in the same order, or packed rows
// (t, h) of `heads` heads with delta at h * (rows / heads) + t.
template <typename A>
void row_dot(const A* grad_out, const A* out, A* delta, int64_t rows, int64_t D, int64_t packed_heads) {
  at::parallel_for(0, rows, cpu::row_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t at = packed_heads > 0 ? (r % packed_heads) * (rows / packed_heads) + r / packed_heads : r;
      delta[at] = dot(grad_out + r * D, out + r * D, D);
    }
  });
}

// One tile of the backward: for queries [i0, i0 + rows) and keys [j0, j0 + keys)
// (k_t, v_t: the keys' K^T and V^T, [D, BK]), fills p = exp(s - lse) with
// s = softcap(scale * q.k) and ds = p * (dO.v - delta) * ds/d(scale q.k)
// (1 - tanh^2 under softcap, else 1), both [rows, BK], zero where masked.
template <typename A>
void backward_tile(const A* q_block, const A* go_block, int64_t ldq, const A* k_t, const A* v_t, const A* lse, const A* delta,
                   int64_t i0, int64_t rows, int64_t j0, int64_t keys, const FlashAttentionDims& d, const Seq& sq,
                   A scale, A softcap, A* p, A* ds) {
  const int64_t D = d.head_dim;
  constexpr int64_t BK = kKeyBlock;
  std::fill(p, p + rows * BK, A(0));
  std::fill(ds, ds + rows * BK, A(0));
  matmul_acc(p, BK, q_block, ldq, k_t, BK, rows, keys, D);
  matmul_acc(ds, BK, go_block, ldq, v_t, BK, rows, keys, D);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t lo = std::clamp<int64_t>(key_begin(d, sq, i0 + r) - j0, 0, keys);
    const int64_t hi = std::max(lo, std::clamp<int64_t>(key_end(d, sq, i0 + r) - j0, 0, keys));
    A* pr = p + r * BK;
    A* dsr = ds + r * BK;
    if (softcap > A(0)) {
      capped_probabilities(pr + lo, dsr + lo, hi - lo, scale, softcap, lse[r], delta[r]);
    } else {
      exp_shifted(pr + lo, hi - lo, scale, lse[r]);
      for (int64_t j = lo; j < hi; ++j) dsr[j] = pr[j] * (dsr[j] - delta[r]);
    }
    std::fill(pr, pr + lo, A(0));
    std::fill(dsr, dsr + lo, A(0));
    std::fill(pr + hi, pr + keys, A(0));
    std::fill(dsr + hi, dsr + keys, A(0));
  }
}

// dK, dV: one task per (sequence, k/v head, block of keys), accumulating over
// every query of every q head sharing that k/v head: dV += P^T dO,
// dK += scale * dS^T Q. No atomics, no [L, S].
template <typename A>
void backward_kv_kernel(const A* grad_out, const A* q, const A* k, const A* v, const A* lse, const A* delta, A* dk,
                        A* dv, const FlashAttentionDims& d, A scale, A softcap) {
  const int64_t D = d.head_dim;
  constexpr int64_t BQ = kQueryBlock, BK = kKeyBlock;
  const SeqBlocks kbs(d, d.kv_heads, BK, true);
  struct Scratch {
    std::vector<A> k_t, v_t, p, ds, p_t, ds_t, q_buf, go_buf;
  };
  const auto scratch = [&] {
    return Scratch{std::vector<A>(D * BK),  std::vector<A>(D * BK),  std::vector<A>(BQ * BK), std::vector<A>(BQ * BK),
                   std::vector<A>(BK * BQ), std::vector<A>(BK * BQ), {},                       {}};
  };
  for_each_task(kbs.tasks(), scratch, [&](int64_t task, Scratch& st) {
    auto& [k_t, v_t, p, ds, p_t, ds_t, q_buf, go_buf] = st;
    {
      int64_t b, kv_h, kb;
      kbs.locate(task, b, kv_h, kb);
      const Seq sq = seq_of(d, b);
      const int64_t j0 = kb * BK, keys = std::min(sq.kv_len, j0 + BK) - j0;
      const int64_t kv0 = kv_off(d, sq, kv_h, j0), ldq = q_ld(d), ldkv = kv_ld(d);
      transpose_into(k_t.data(), BK, k + kv0, ldkv, keys, D);
      transpose_into(v_t.data(), BK, v + kv0, ldkv, keys, D);
      A* dk_block = dk + kv0;
      A* dv_block = dv + kv0;
      fill_rows(dk_block, ldkv, keys, D, A(0));
      fill_rows(dv_block, ldkv, keys, D, A(0));
      // Only the queries that see some key of the block.
      const int64_t i_begin = query_begin(d, sq, j0), i_end = query_end(d, sq, j0 + keys);
      for (int64_t h = kv_h * d.group; h < (kv_h + 1) * d.group; ++h) {
        for (int64_t i0 = i_begin; i0 < i_end; i0 += BQ) {
          const int64_t rows = std::min(i_end, i0 + BQ) - i0;
          const int64_t row0 = lse_row(d, sq, h, i0), q0 = q_off(d, sq, h, i0);
          const A* q_block = contiguous_rows(q + q0, ldq, rows, D, q_buf);
          const A* go_block = contiguous_rows(grad_out + q0, ldq, rows, D, go_buf);
          backward_tile(q_block, go_block, D, k_t.data(), v_t.data(), lse + row0, delta + row0, i0, rows, j0, keys, d,
                        sq, scale, softcap, p.data(), ds.data());
          transpose_into(p_t.data(), BQ, p.data(), BK, rows, keys);
          transpose_into(ds_t.data(), BQ, ds.data(), BK, rows, keys);
          matmul_acc(dv_block, ldkv, p_t.data(), BQ, go_block, D, keys, D, rows);
          matmul_acc(dk_block, ldkv, ds_t.data(), BQ, q_block, D, keys, D, rows);
        }
      }
      scale_rows(dk_block, ldkv, keys, D, scale);
    }
  });
}

// dQ: one task per (sequence, q head, block of queries), walking visible key
// blocks: dQ += scale * dS K.
template <typename A>
void backward_q_kernel(const A* grad_out, const A* q, const A* k, const A* v, const A* lse, const A* delta, A* dq,
                       const FlashAttentionDims& d, A scale, A softcap) {
  const int64_t D = d.head_dim;
  constexpr int64_t BQ = kQueryBlock, BK = kKeyBlock;
  const SeqBlocks qbs(d, d.q_heads, BQ, false), kbs(d, d.kv_heads, BK, true);
  const std::vector<A> k_tiles = transposed_key_blocks(k, d, kbs);
  const std::vector<A> v_tiles = transposed_key_blocks(v, d, kbs);
  struct Scratch {
    std::vector<A> p, ds, q_buf, go_buf, k_buf;
  };
  const auto scratch = [&] { return Scratch{std::vector<A>(BQ * BK), std::vector<A>(BQ * BK), {}, {}, {}}; };
  for_each_task(qbs.tasks(), scratch, [&](int64_t task, Scratch& st) {
    auto& [p, ds, q_buf, go_buf, k_buf] = st;
    {
      int64_t b, h, qb;
      qbs.locate(task, b, h, qb);
      const Seq sq = seq_of(d, b);
      const int64_t kv_h = h / d.group;
      const int64_t i0 = qb * BQ, rows = std::min(sq.q_len, i0 + BQ) - i0;
      const int64_t row0 = lse_row(d, sq, h, i0), q0 = q_off(d, sq, h, i0), ldq = q_ld(d), ldkv = kv_ld(d);
      A* dq_block = dq + q0;
      fill_rows(dq_block, ldq, rows, D, A(0));
      const A* q_block = contiguous_rows(q + q0, ldq, rows, D, q_buf);
      const A* go_block = contiguous_rows(grad_out + q0, ldq, rows, D, go_buf);
      const int64_t first_key = key_begin(d, sq, i0) / BK * BK, last_key = key_end(d, sq, i0 + rows - 1);
      for (int64_t j0 = first_key; j0 < last_key; j0 += BK) {
        const int64_t keys = std::min(last_key, j0 + BK) - j0;
        const A* k_block = contiguous_rows(k + kv_off(d, sq, kv_h, j0), ldkv, keys, D, k_buf);
        const int64_t tile = (kbs.base[b] + kv_h * kbs.blocks[b] + j0 / BK) * D * BK;
        backward_tile(q_block, go_block, D, k_tiles.data() + tile, v_tiles.data() + tile, lse + row0, delta + row0, i0,
                      rows, j0, keys, d, sq, scale, softcap, p.data(), ds.data());
        matmul_acc(dq_block, ldq, ds.data(), BK, k_block, D, rows, D, keys);
      }
      scale_rows(dq_block, ldq, rows, D, scale);
    }
  });
}

template <typename A>
void forward(const FlashAttentionForwardArgs& a) {
  forward_kernel<A>(static_cast<const A*>(a.q), static_cast<const A*>(a.k), static_cast<const A*>(a.v),
                    static_cast<const A*>(a.sinks), static_cast<A*>(a.out), static_cast<A*>(a.lse), a.dims,
                    A(a.scale), A(a.softcap));
}

template <typename A>
void backward(const FlashAttentionBackwardArgs& a) {
  const auto* grad_out = static_cast<const A*>(a.grad_out);
  const auto* q = static_cast<const A*>(a.q);
  const auto* k = static_cast<const A*>(a.k);
  const auto* v = static_cast<const A*>(a.v);
  const auto* lse = static_cast<const A*>(a.lse);
  auto* delta = static_cast<A*>(a.delta);
  const FlashAttentionDims& d = a.dims;
  const int64_t q_rows = d.cu_q != nullptr ? d.q_heads * d.q_head_stride : d.batch * d.q_heads * d.q_len;
  row_dot<A>(grad_out, static_cast<const A*>(a.out), delta, q_rows, d.head_dim, d.cu_q != nullptr ? d.q_heads : 0);
  backward_kv_kernel<A>(grad_out, q, k, v, lse, delta, static_cast<A*>(a.dk), static_cast<A*>(a.dv), d, A(a.scale),
                        A(a.softcap));
  backward_q_kernel<A>(grad_out, q, k, v, lse, delta, static_cast<A*>(a.dq), d, A(a.scale), A(a.softcap));
}

// The kernels run in the accumulation dtype only: float32 or float64.
template <typename F>
void visit_acc_dtype(c10::ScalarType dtype, const char* what, const F& fn) {
  switch (dtype) {
    case c10::ScalarType::Float: return fn(float{});
    case c10::ScalarType::Double: return fn(double{});
    default: TORCH_CHECK(false, what, ": no CPU kernel for dtype ", dtype);
  }
}

}  // namespace

void flash_attention_forward(c10::ScalarType dtype, const FlashAttentionForwardArgs& args) {
  visit_acc_dtype(dtype, "flash_attention", [&](auto type_tag) { forward<decltype(type_tag)>(args); });
}

void flash_attention_backward(c10::ScalarType dtype, const FlashAttentionBackwardArgs& args) {
  visit_acc_dtype(dtype, "flash_attention_backward", [&](auto type_tag) { backward<decltype(type_tag)>(args); });
}

MY_MPS_OPS_CPU_KERNELS_END

MY_MPS_OPS_REGISTER_CPU_KERNEL(my_mps_ops::cpu::flash_attention_forward_stub, flash_attention_forward);
MY_MPS_OPS_REGISTER_CPU_KERNEL(my_mps_ops::cpu::flash_attention_backward_stub, flash_attention_backward);
