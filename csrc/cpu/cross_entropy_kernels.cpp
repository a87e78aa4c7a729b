// cpu copies: baseline avx2
// CPU loops of cross_entropy: the forward reads each row once (blocks of the
// row are reduced while in cache, with a running log-sum-exp) and keeps the
// row's loss and lse; the backward writes grad = scale * (softmax - smoothed
// one-hot) in the logits' dtype directly, with no [N, V] float32 intermediate.
//
// float32 blocks run on the copy's Vec with two accumulators each (lane
// arrays with a max do not auto-vectorise) and vec::exp_poly; float64
// (gradcheck) stays scalar with libm's exp. float16 / bfloat16 are widened
// into float32 blocks.
#include "cpu/cross_entropy.h"
#include "cpu/dispatch.h"
#include "cpu/parallel.h"
#include "shaders/include/cross_entropy.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>

namespace my_mps_ops::cpu {
namespace {

// A row's loss from its max m, log of the sum of exp(z - m), target logit and
// sum of (z - m), in the order F.cross_entropy rounds it: z - m first, so a
// row whose logits all equal one huge value (finfo.min masking) keeps its
// log(V), which m + log_s would round away. Compiled baseline (outside the
// copy's target region) and never inlined, so that every copy rounds it the
// same way: inlined into the AVX2 copy it would be contracted to FMAs.
// Without smoothing the sum is left out, as F.cross_entropy leaves it: a
// masked (-inf) logit would make it 0 * -inf = NaN.
template <typename Acc>
__attribute__((noinline)) Acc smoothed_loss(Acc m, Acc log_s, Acc z_target, Acc sum_d, int64_t classes,
                                            double smoothing_in) {
  const Acc smoothing = static_cast<Acc>(smoothing_in);
  if (smoothing == Acc(0)) return (m - z_target) + log_s;
  return log_s - (Acc(1) - smoothing) * (z_target - m) - smoothing * sum_d / static_cast<Acc>(classes);
}

}  // namespace
}  // namespace my_mps_ops::cpu

MY_MPS_OPS_CPU_KERNELS_BEGIN
namespace {

using shaders::kCrossEntropyExactLseBound;
using vec::acc_t;

constexpr int64_t kClassBlock = 512;

// Max of one in-cache block.
__attribute__((always_inline)) inline float block_max(const float* x, int64_t len) {
  constexpr int64_t L = vec::kLanes<Vec>;
  Vec m0 = vec::splatv<Vec>(-std::numeric_limits<float>::infinity()), m1 = m0;
  int64_t i = 0;
  for (; i + 2 * L <= len; i += 2 * L) {
    m0 = vec::maxv(m0, vec::loadv<Vec>(x + i)), m1 = vec::maxv(m1, vec::loadv<Vec>(x + i + L));
  }
  float m = vec::reduce_maxv(vec::maxv(m0, m1));
  for (; i < len; ++i) m = std::max(m, x[i]);
  return m;
}
__attribute__((always_inline)) inline double block_max(const double* x, int64_t len) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < len; ++i) m = std::max(m, x[i]);
  return m;
}

// Sums of exp(x - m) and of (x - m) over one in-cache block.
__attribute__((always_inline)) inline std::pair<float, float> block_exp_sum(const float* x, int64_t len, float m) {
  constexpr int64_t L = vec::kLanes<Vec>;
  const Vec mv = vec::splatv<Vec>(m);
  Vec e0 = {}, e1 = {}, d0 = {}, d1 = {};
  int64_t i = 0;
  for (; i + 2 * L <= len; i += 2 * L) {
    const Vec a = vec::loadv<Vec>(x + i) - mv, b = vec::loadv<Vec>(x + i + L) - mv;
    e0 += vec::exp_poly(a), e1 += vec::exp_poly(b);
    d0 += a, d1 += b;
  }
  float sum = vec::reduce_sumv(e0 + e1), sum_d = vec::reduce_sumv(d0 + d1);
  for (; i < len; ++i) sum += vec::exp_f32(x[i] - m), sum_d += x[i] - m;
  return {sum, sum_d};
}
__attribute__((always_inline)) inline std::pair<double, double> block_exp_sum(const double* x, int64_t len,
                                                                              double m) {
  double sum = 0, sum_d = 0;
  for (int64_t i = 0; i < len; ++i) sum += std::exp(x[i] - m), sum_d += x[i] - m;
  return {sum, sum_d};
}

// A row's statistics: its max m, the sum s of exp(z - m) and the sum of
// (z - m) (for smoothing; -inf when a logit is -inf).
template <typename Acc>
struct RowStats {
  Acc m, s, sum_d;
};

// Online log-sum-exp over one row, a block at a time (each block is read from
// memory once, then reduced in cache).
template <typename T>
__attribute__((always_inline)) inline RowStats<acc_t<T>> row_stats(const T* z, int64_t v) {
  using Acc = acc_t<T>;
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  Acc staged[kClassBlock];
  Acc m = kNegInf, s = 0, sum_d = 0;
  for (int64_t b = 0; b < v; b += kClassBlock) {
    const int64_t len = std::min(kClassBlock, v - b);
    // Narrow types are widened into a staging block; wide ones are read in
    // place (a copy here would compile to rep movs and cost more than the math).
    const Acc* block = staged;
    if constexpr (std::is_same_v<T, Acc>) {
      block = z + b;
    } else {
      vec::widen(z + b, staged, len);
    }
    const Acc new_m = std::max(m, block_max(block, len));
    if (new_m == kNegInf) {  // every logit so far is -inf
      sum_d = kNegInf;
      continue;
    }
    // The earlier blocks' (z - m) rebased to the new max; -inf stays -inf.
    if (b > 0 && new_m != m) sum_d = m == kNegInf ? kNegInf : sum_d + static_cast<Acc>(b) * (m - new_m);
    const auto [bs, bd] = block_exp_sum(block, len, new_m);
    s = (m == kNegInf ? Acc(0) : s * std::exp(m - new_m)) + bs;
    sum_d += bd;
    m = new_m;
  }
  return {m, s, sum_d};
}

template <typename T>
int64_t forward_rows(const CrossEntropyForwardArgs& a) {
  using Acc = acc_t<T>;
  const auto* logits = static_cast<const T*>(a.logits);
  auto* loss = static_cast<Acc*>(a.loss);
  auto* lse_out = static_cast<Acc*>(a.lse);
  const int64_t v = a.classes;
  std::atomic<int64_t> bad_row{-1};
  at::parallel_for(0, a.rows, cpu::row_grain(v), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* z = logits + r * v;
      const RowStats<Acc> st = row_stats<T>(z, v);
      const Acc log_s = std::log(st.s);
      lse_out[r] = st.m + log_s;
      const int64_t t = a.target[r];
      if (t == a.ignore_index) {
        loss[r] = Acc(0);
      } else if (t < 0 || t >= v) {
        bad_row.store(r);
        loss[r] = std::numeric_limits<Acc>::quiet_NaN();
      } else {
        loss[r] = cpu::smoothed_loss<Acc>(st.m, log_s, static_cast<Acc>(z[t]), st.sum_d, v, a.label_smoothing);
      }
    }
  });
  return bad_row.load();
}

// Gradient rows [begin, end). float32 goes straight from the logits to the
// gradient (with streaming stores from the first aligned element when
// kStream); float16 / bfloat16 through a float32 block; float64 with libm.
template <typename T, bool kStream = false>
__attribute__((always_inline)) inline void backward_row_range(const CrossEntropyBackwardArgs& a, int64_t begin,
                                                              int64_t end) {
  using Acc = acc_t<T>;
  constexpr int64_t L = vec::kLanes<Vec>;
  const auto* logits = static_cast<const T*>(a.logits);
  const auto* lse = static_cast<const Acc*>(a.lse);
  const auto* scale = static_cast<const Acc*>(a.scale);
  auto* grad = static_cast<T*>(a.grad_logits);
  const int64_t v = a.classes;
  const Acc smoothing = static_cast<Acc>(a.label_smoothing);
  Acc block[kClassBlock];
  for (int64_t r = begin; r < end; ++r) {
    const T* z = logits + r * v;
    T* gr = grad + r * v;
    const int64_t t = a.target[r];
    if (t == a.ignore_index) {
      for (int64_t i = 0; i < v; ++i) gr[i] = T(0);
      continue;
    }
    const Acc g = scale[r], uniform = Acc(smoothing) / static_cast<Acc>(v);
    // softmax = exp((z - shift) - log_s). The forward's lse serves as the
    // shift (log_s = 0) unless it is so large that rounding m + log s to it
    // lost digits of log s: then the row's m and s are recomputed.
    Acc shift = lse[r], log_s = 0;
    if (!(std::abs(shift) < static_cast<Acc>(kCrossEntropyExactLseBound))) {
      const RowStats<Acc> st = row_stats<T>(z, v);
      shift = st.m, log_s = std::log(st.s);
    }
    if constexpr (std::is_same_v<T, float>) {
      const Vec shift_v = vec::splatv<Vec>(shift), log_s_v = vec::splatv<Vec>(log_s);
      int64_t i = 0;
      if constexpr (kStream) {
        for (const int64_t head = std::min(v, vec::floats_to_align(gr, sizeof(Vec))); i < head; ++i)
          gr[i] = g * (vec::exp_f32((z[i] - shift) - log_s) - uniform);
        for (; i + L <= v; i += L)
          vec::streamv(gr + i, g * (vec::exp_poly((vec::loadv<Vec>(z + i) - shift_v) - log_s_v) - uniform));
      }
      for (; i + L <= v; i += L)
        vec::storev(gr + i, g * (vec::exp_poly((vec::loadv<Vec>(z + i) - shift_v) - log_s_v) - uniform));
      for (; i < v; ++i) gr[i] = g * (vec::exp_f32((z[i] - shift) - log_s) - uniform);
      if (t >= 0 && t < v) gr[t] -= g * (Acc(1) - smoothing);
      continue;
    }
    for (int64_t b = 0; b < v; b += kClassBlock) {
      const int64_t len = std::min(kClassBlock, v - b);
      if constexpr (std::is_same_v<Acc, float>) {
        vec::widen(z + b, block, len);
        const Vec shift_v = vec::splatv<Vec>(shift), log_s_v = vec::splatv<Vec>(log_s);
        int64_t i = 0;
        for (; i + L <= len; i += L)
          vec::storev(block + i, g * (vec::exp_poly((vec::loadv<Vec>(block + i) - shift_v) - log_s_v) - uniform));
        for (; i < len; ++i) block[i] = g * (vec::exp_f32((block[i] - shift) - log_s) - uniform);
        if (t >= b && t < b + len) block[t - b] -= g * (Acc(1) - smoothing);
        vec::narrow(block, gr + b, len);
      } else {
        for (int64_t i = 0; i < len; ++i)
          block[i] = g * (std::exp((static_cast<Acc>(z[b + i]) - shift) - log_s) - uniform);
        if (t >= b && t < b + len) block[t - b] -= g * (Acc(1) - smoothing);
        for (int64_t i = 0; i < len; ++i) gr[b + i] = static_cast<T>(block[i]);
      }
    }
  }
}

// A task whose gradient rows add up to vec::kStreamMinBytes or more writes
// them with streaming stores (float32 rows).
template <typename T>
void backward_rows(const CrossEntropyBackwardArgs& a) {
  at::parallel_for(0, a.rows, cpu::row_grain(a.classes), [&](int64_t begin, int64_t end) {
    if constexpr (vec::kCanStream) {
      if (int64_t(sizeof(T)) * a.classes * (end - begin) >= vec::kStreamMinBytes) {
        backward_row_range<T, true>(a, begin, end);
        return vec::stream_fence();
      }
    }
    backward_row_range<T>(a, begin, end);
  });
}

}  // namespace

int64_t cross_entropy_forward(c10::ScalarType dtype, const CrossEntropyForwardArgs& args) {
  int64_t bad_row = -1;
  cpu::visit_float_dtype(dtype, "cross_entropy", [&](auto type_tag) {
    bad_row = forward_rows<decltype(type_tag)>(args);
  });
  return bad_row;
}

void cross_entropy_backward(c10::ScalarType dtype, const CrossEntropyBackwardArgs& args) {
  cpu::visit_float_dtype(dtype, "cross_entropy_backward",
                         [&](auto type_tag) { backward_rows<decltype(type_tag)>(args); });
}

MY_MPS_OPS_CPU_KERNELS_END

MY_MPS_OPS_REGISTER_CPU_KERNEL(my_mps_ops::cpu::cross_entropy_forward_stub, cross_entropy_forward);
MY_MPS_OPS_REGISTER_CPU_KERNEL(my_mps_ops::cpu::cross_entropy_backward_stub, cross_entropy_backward);
