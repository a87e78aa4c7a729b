// cpu copies: baseline avx2
// CPU loops of flash_attention_decode: a few new queries per sequence against
// a long, preallocated KV cache of which only the first seqlens[b] rows are
// valid.
//
// Split-K: the visible keys of each sequence are cut into `splits` chunks;
// a task owns one (batch, kv head, chunk) and every query row of the kv
// head's group of q heads (group * q_len rows), so each K/V row is read once
// for the whole group (GQA without repeating K/V). It walks its chunk in
// blocks of kKeyBlock keys with an online softmax and leaves a partial
// (max, sum, unnormalised output) per row; a second pass combines the
// chunks of each row. Rows of the cache past seqlens[b] are never read, so
// whatever they hold (NaN included) cannot reach the result.
#include "cpu/attention_decode.h"
#include "cpu/dispatch.h"
#include "cpu/parallel.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

MY_MPS_OPS_CPU_KERNELS_BEGIN
#include "cpu/tile_matmul.h"
// A named namespace: the unity build compiles every loop file of a copy in
// one translation unit, so helpers here must not collide with theirs.
namespace attention_decode_loops {

constexpr int64_t kKeyBlock = 64;
// A chunk shorter than this costs more in partials and combining than its
// parallelism gains.
constexpr int64_t kMinChunk = 256;
constexpr int64_t kDecodeTasks = 32;

// The lane sums of four vectors: out[u] = sum of a_u's lanes. With eight
// lanes (the AVX2 float32 copy) a shuffle tree gives all four in a few
// instructions; reduce_sumv is one dependent add per lane.
template <typename V, typename A>
__attribute__((always_inline)) inline void lane_sums4(V a0, V a1, V a2, V a3, A* out) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  if constexpr (std::is_same_v<V, vec::f32x8>) {
    const V t01 = __builtin_shufflevector(a0, a1, 0, 8, 2, 10, 4, 12, 6, 14) +
                  __builtin_shufflevector(a0, a1, 1, 9, 3, 11, 5, 13, 7, 15);
    const V t23 = __builtin_shufflevector(a2, a3, 0, 8, 2, 10, 4, 12, 6, 14) +
                  __builtin_shufflevector(a2, a3, 1, 9, 3, 11, 5, 13, 7, 15);
    // [a0, a1, a2, a3] sums of lanes 0-3, then of lanes 4-7
    const V u = __builtin_shufflevector(t01, t23, 0, 1, 8, 9, 4, 5, 12, 13) +
                __builtin_shufflevector(t01, t23, 2, 3, 10, 11, 6, 7, 14, 15);
    for (int i = 0; i < 4; ++i) out[i] = u[i] + u[i + 4];
    return;
  }
#endif
  out[0] = vec::reduce_sumv(a0);
  out[1] = vec::reduce_sumv(a1);
  out[2] = vec::reduce_sumv(a2);
  out[3] = vec::reduce_sumv(a3);
}

// s[r * lds + j] = q_r . k_j for R query rows and `keys` cache rows, products
// in vectors along head_dim: four rows at a time share each load of a key
// row (the group's q heads read K once); a leftover row takes four keys at a
// time, so that every lane reduction sums four vectors at once.
template <typename A>
void block_scores(A* s, int64_t lds, const A* q, int64_t R, const A* k, int64_t keys, int64_t D) {
  using V = VecOf<A>;
  constexpr int64_t L = vec::kLanes<V>;
  const int64_t Dv = D / L * L;
  const int64_t R4 = R / 4 * 4;
  for (int64_t j = 0; j < keys; ++j) {
    const A* kj = k + j * D;
    for (int64_t r = 0; r < R4; r += 4) {
      const A* q0 = q + r * D;
      V a0{}, a1{}, a2{}, a3{};
      for (int64_t p = 0; p < Dv; p += L) {
        const V kv = vec::loadv<V>(kj + p);
        a0 += vec::loadv<V>(q0 + p) * kv;
        a1 += vec::loadv<V>(q0 + D + p) * kv;
        a2 += vec::loadv<V>(q0 + 2 * D + p) * kv;
        a3 += vec::loadv<V>(q0 + 3 * D + p) * kv;
      }
      A t[4];
      lane_sums4(a0, a1, a2, a3, t);
      for (int64_t p = Dv; p < D; ++p)
        for (int u = 0; u < 4; ++u) t[u] += q0[u * D + p] * kj[p];
      for (int u = 0; u < 4; ++u) s[(r + u) * lds + j] = t[u];
    }
  }
  for (int64_t r = R4; r < R; ++r) {
    const A* qr = q + r * D;
    int64_t j = 0;
    for (; j + 4 <= keys; j += 4) {
      const A* k0 = k + j * D;
      V a0{}, a1{}, a2{}, a3{};
      for (int64_t p = 0; p < Dv; p += L) {
        const V qv = vec::loadv<V>(qr + p);
        a0 += vec::loadv<V>(k0 + p) * qv;
        a1 += vec::loadv<V>(k0 + D + p) * qv;
        a2 += vec::loadv<V>(k0 + 2 * D + p) * qv;
        a3 += vec::loadv<V>(k0 + 3 * D + p) * qv;
      }
      A t[4];
      lane_sums4(a0, a1, a2, a3, t);
      for (int64_t p = Dv; p < D; ++p)
        for (int u = 0; u < 4; ++u) t[u] += qr[p] * k0[u * D + p];
      for (int u = 0; u < 4; ++u) s[r * lds + j + u] = t[u];
    }
    for (; j < keys; ++j) {
      const A* kj = k + j * D;
      V a{};
      for (int64_t p = 0; p < Dv; p += L) a += vec::loadv<V>(qr + p) * vec::loadv<V>(kj + p);
      A t = vec::reduce_sumv(a);
      for (int64_t p = Dv; p < D; ++p) t += qr[p] * kj[p];
      s[r * lds + j] = t;
    }
  }
}

// s[j] = exp(s[j] - shift), arguments <= 0.
template <typename A>
void exp_shifted(A* s, int64_t n, A shift) {
  int64_t j = 0;
  if constexpr (std::is_same_v<A, float>) {
    constexpr int64_t L = vec::kLanes<Vec>;
    for (; j + L <= n; j += L) vec::storev(s + j, vec::exp_poly_nonpositive(vec::loadv<Vec>(s + j) - shift));
    for (; j < n; ++j) s[j] = vec::exp_f32(s[j] - shift);
  } else {
    for (; j < n; ++j) s[j] = std::exp(s[j] - shift);
  }
}

// s[j] = cap * tanh(s[j] * scale / cap), or s[j] * scale without a cap.
template <typename A>
void scale_scores(A* s, int64_t n, A scale, A cap) {
  int64_t j = 0;
  if (cap > A(0)) {
    const A inner = scale / cap;
    if constexpr (std::is_same_v<A, float>) {
      constexpr int64_t L = vec::kLanes<Vec>;
      for (; j + L <= n; j += L) {
        const Vec x = vec::loadv<Vec>(s + j) * inner;
        vec::storev(s + j, (1.0f - 2.0f / (vec::exp_poly(x + x) + 1.0f)) * cap);
      }
    }
    for (; j < n; ++j) s[j] = cap * std::tanh(s[j] * inner);
  } else {
    for (; j < n; ++j) s[j] *= scale;
  }
}

template <typename A>
inline A log_add_exp(A a, A b) {
  const A m = std::max(a, b);
  if (m == -std::numeric_limits<A>::infinity()) return m;
  return m + std::log(std::exp(a - m) + std::exp(b - m));
}

// The keys query i of a sequence of `len` valid rows sees: [lo, hi).
struct KeyRange {
  int64_t lo, hi;
};
inline KeyRange visible_keys(const AttentionDecodeDims& d, int64_t len, int64_t i) {
  const int64_t a = i + len - d.q_len;  // the query's own position
  const int64_t hi = d.causal ? std::clamp<int64_t>(a + 1, 0, len) : len;
  const int64_t lo = d.window_left < 0 ? 0 : std::clamp<int64_t>(a - d.window_left, 0, len);
  return {lo, std::max(lo, hi)};
}

template <typename A>
void decode(const AttentionDecodeArgs& args) {
  const AttentionDecodeDims& d = args.dims;
  const A* q = static_cast<const A*>(args.q);
  const A* k = static_cast<const A*>(args.k);
  const A* v = static_cast<const A*>(args.v);
  const A* sinks = static_cast<const A*>(args.sinks);
  A* out = static_cast<A*>(args.out);
  A* lse = static_cast<A*>(args.lse);
  const A scale = A(args.scale), softcap = A(args.softcap);
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  constexpr int64_t BK = kKeyBlock;
  const int64_t D = d.head_dim, R = d.group * d.q_len, heads = d.batch * d.kv_heads;

  // The keys any row of sequence b sees: from the first query's lo to the last one's hi.
  std::vector<KeyRange> span(d.batch);
  int64_t longest = 0;
  for (int64_t b = 0; b < d.batch; ++b) {
    span[b] = {visible_keys(d, args.seqlens[b], 0).lo, visible_keys(d, args.seqlens[b], d.q_len - 1).hi};
    longest = std::max(longest, span[b].hi - span[b].lo);
  }
  // About kDecodeTasks tasks (four per thread of an 8-thread CPU), no chunk
  // shorter than kMinChunk. Not from the thread count: the chunks decide the
  // order of the sums, and results must not depend on how many threads run.
  const int64_t wanted = (kDecodeTasks + heads - 1) / std::max<int64_t>(heads, 1);
  const int64_t splits = std::max<int64_t>(1, std::min(wanted, (longest + kMinChunk - 1) / kMinChunk));

  std::vector<A> part_max(heads * splits * R), part_sum(heads * splits * R), part_out(heads * splits * R * D);
  at::parallel_for(0, heads * splits, 1, [&](int64_t task_begin, int64_t task_end) {
    std::vector<A> scores(R * BK), acc(R * D), row_max(R), row_sum(R);
    std::vector<KeyRange> rows(R);
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t split = task % splits, bh = task / splits;
      const int64_t b = bh / d.kv_heads, kv_h = bh % d.kv_heads;
      const int64_t len = args.seqlens[b];
      const int64_t chunk = (span[b].hi - span[b].lo + splits - 1) / splits;
      const int64_t c0 = std::min(span[b].hi, span[b].lo + split * chunk);
      const int64_t c1 = std::min(span[b].hi, c0 + chunk);
      const A* qh = q + bh * R * D;  // the group's q heads are consecutive: R rows
      const A* kh = k + b * d.k_batch_stride + kv_h * d.k_head_stride;
      const A* vh = v + b * d.v_batch_stride + kv_h * d.v_head_stride;
      for (int64_t r = 0; r < R; ++r) rows[r] = visible_keys(d, len, r % d.q_len);
      std::fill(acc.begin(), acc.end(), A(0));
      std::fill(row_max.begin(), row_max.end(), kNegInf);
      std::fill(row_sum.begin(), row_sum.end(), A(0));
      for (int64_t j0 = c0; j0 < c1; j0 += BK) {
        const int64_t keys = std::min(c1, j0 + BK) - j0;
        block_scores(scores.data(), BK, qh, R, kh + j0 * D, keys, D);
        for (int64_t r = 0; r < R; ++r) {
          A* s = scores.data() + r * BK;
          const int64_t lo = std::clamp<int64_t>(rows[r].lo - j0, 0, keys);
          const int64_t hi = std::clamp<int64_t>(rows[r].hi - j0, lo, keys);
          if (hi > lo) {
            scale_scores(s + lo, hi - lo, scale, softcap);
            A block_max = kNegInf;
            for (int64_t j = lo; j < hi; ++j) block_max = std::max(block_max, s[j]);
            const A new_max = std::max(row_max[r], block_max);
            const A correction = std::exp(row_max[r] - new_max);  // 0 while row_max is -inf
            exp_shifted(s + lo, hi - lo, new_max);
            A block_sum = 0;
            for (int64_t j = lo; j < hi; ++j) block_sum += s[j];
            if (correction != A(1)) {
              A* acc_row = acc.data() + r * D;
              for (int64_t c = 0; c < D; ++c) acc_row[c] *= correction;
            }
            row_sum[r] = row_sum[r] * correction + block_sum;
            row_max[r] = new_max;
          }
          std::fill(s, s + lo, A(0));  // nothing visible here contributes
          std::fill(s + hi, s + keys, A(0));
        }
        matmul_acc(acc.data(), D, scores.data(), BK, vh + j0 * D, D, R, D, keys);
      }
      const int64_t p0 = task * R;  // == (bh * splits + split) * R
      std::copy(row_max.begin(), row_max.end(), part_max.begin() + p0);
      std::copy(row_sum.begin(), row_sum.end(), part_sum.begin() + p0);
      std::copy(acc.begin(), acc.end(), part_out.begin() + p0 * D);
    }
  });

  // Combine: row r of kv head bh is q head bh's group member r / q_len,
  // query r % q_len, which is also its index in out and lse.
  at::parallel_for(0, heads * R, cpu::row_grain(splits * D), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / R, r = row % R;
      const int64_t h = (bh % d.kv_heads) * d.group + r / d.q_len;
      A m = kNegInf;
      for (int64_t s = 0; s < splits; ++s) m = std::max(m, part_max[(bh * splits + s) * R + r]);
      A total = 0;
      if (m != kNegInf) {
        for (int64_t s = 0; s < splits; ++s) {
          const int64_t p = (bh * splits + s) * R + r;
          if (part_max[p] != kNegInf) total += part_sum[p] * std::exp(part_max[p] - m);
        }
      }
      A row_lse = total > A(0) ? m + std::log(total) : kNegInf;
      if (sinks != nullptr) row_lse = log_add_exp(row_lse, sinks[h]);
      A* out_row = out + row * D;
      std::fill(out_row, out_row + D, A(0));
      if (total > A(0)) {
        // Each chunk's output weighs exp(its max - lse): the sink, when
        // there is one, is in lse's denominator.
        for (int64_t s = 0; s < splits; ++s) {
          const int64_t p = (bh * splits + s) * R + r;
          if (part_max[p] == kNegInf) continue;
          const A w = std::exp(part_max[p] - row_lse);
          const A* po = part_out.data() + p * D;
          for (int64_t c = 0; c < D; ++c) out_row[c] += w * po[c];
        }
      }
      lse[row] = row_lse;
    }
  });
}

}  // namespace attention_decode_loops

void attention_decode(c10::ScalarType dtype, const AttentionDecodeArgs& args) {
  switch (dtype) {
    case c10::ScalarType::Float: return attention_decode_loops::decode<float>(args);
    case c10::ScalarType::Double: return attention_decode_loops::decode<double>(args);
    default: TORCH_CHECK(false, "flash_attention_decode: no CPU kernel for dtype ", dtype);
  }
}

MY_MPS_OPS_CPU_KERNELS_END

MY_MPS_OPS_REGISTER_CPU_KERNEL(my_mps_ops::cpu::attention_decode_stub, attention_decode);
