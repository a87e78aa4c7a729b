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

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>

namespace my_mps_ops::cpu {
namespace {

// A row's loss from its lse, target logit and sum of logits. Compiled
// baseline (outside the copy's target region) and never inlined, so that
// every copy rounds it the same way: inlined into the AVX2 copy it would be
// contracted to FMAs. Without smoothing the sum of z is left out, as
// F.cross_entropy leaves it: a masked (-inf) logit would make it 0 * -inf = NaN.
__attribute__((noinline)) float smoothed_loss(float lse, float z_target, float sum_z, int64_t classes,
                                              double smoothing_in) {
  const float smoothing = static_cast<float>(smoothing_in);
  if (smoothing == 0.0f) return lse - z_target;
  return lse - (1.0f - smoothing) * z_target - smoothing * sum_z / static_cast<float>(classes);
}
__attribute__((noinline)) double smoothed_loss(double lse, double z_target, double sum_z, int64_t classes,
                                               double smoothing) {
  if (smoothing == 0.0) return lse - z_target;
  return lse - (1.0 - smoothing) * z_target - smoothing * sum_z / static_cast<double>(classes);
}

}  // namespace
}  // namespace my_mps_ops::cpu

MY_MPS_OPS_CPU_KERNELS_BEGIN
namespace {

using vec::acc_t;

constexpr int64_t kClassBlock = 512;

// Max and sum of one in-cache block.
__attribute__((always_inline)) inline void block_max_sum(const float* x, int64_t len, float& max_out,
                                                         float& sum_out) {
  constexpr int64_t L = vec::kLanes<Vec>;
  Vec m0 = vec::splatv<Vec>(-std::numeric_limits<float>::infinity()), m1 = m0, s0 = {}, s1 = {};
  int64_t i = 0;
  for (; i + 2 * L <= len; i += 2 * L) {
    const Vec a = vec::loadv<Vec>(x + i), b = vec::loadv<Vec>(x + i + L);
    m0 = vec::maxv(m0, a), m1 = vec::maxv(m1, b);
    s0 += a, s1 += b;
  }
  float m = vec::reduce_maxv(vec::maxv(m0, m1)), sum = vec::reduce_sumv(s0 + s1);
  for (; i < len; ++i) m = std::max(m, x[i]), sum += x[i];
  max_out = m, sum_out = sum;
}
__attribute__((always_inline)) inline void block_max_sum(const double* x, int64_t len, double& max_out,
                                                         double& sum_out) {
  double m = -std::numeric_limits<double>::infinity(), sum = 0;
  for (int64_t i = 0; i < len; ++i) m = std::max(m, x[i]), sum += x[i];
  max_out = m, sum_out = sum;
}

// Sum of exp(x - m) over one in-cache block.
__attribute__((always_inline)) inline float block_exp_sum(const float* x, int64_t len, float m) {
  constexpr int64_t L = vec::kLanes<Vec>;
  const Vec mv = vec::splatv<Vec>(m);
  Vec e0 = {}, e1 = {};
  int64_t i = 0;
  for (; i + 2 * L <= len; i += 2 * L) {
    e0 += vec::exp_poly(vec::loadv<Vec>(x + i) - mv);
    e1 += vec::exp_poly(vec::loadv<Vec>(x + i + L) - mv);
  }
  float sum = vec::reduce_sumv(e0 + e1);
  for (; i < len; ++i) sum += vec::exp_f32(x[i] - m);
  return sum;
}
__attribute__((always_inline)) inline double block_exp_sum(const double* x, int64_t len, double m) {
  double sum = 0;
  for (int64_t i = 0; i < len; ++i) sum += std::exp(x[i] - m);
  return sum;
}

// Online log-sum-exp over one row, a block at a time (each block is read from
// memory once, then reduced in cache). Returns (lse, sum of z).
template <typename T>
__attribute__((always_inline)) inline std::pair<acc_t<T>, acc_t<T>> row_lse(const T* z, int64_t v) {
  using Acc = acc_t<T>;
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  Acc staged[kClassBlock];
  Acc m = kNegInf, s = 0, sum_z = 0;
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
    Acc block_max, block_sum;
    block_max_sum(block, len, block_max, block_sum);
    sum_z += block_sum;
    const Acc new_m = std::max(m, block_max);
    if (new_m == kNegInf) continue;
    const Acc bs = block_exp_sum(block, len, new_m);
    s = (m == kNegInf ? Acc(0) : s * std::exp(m - new_m)) + bs;
    m = new_m;
  }
  return {m + std::log(s), sum_z};
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
      const auto [lse, sum_z] = row_lse<T>(z, v);
      lse_out[r] = lse;
      const int64_t t = a.target[r];
      if (t == a.ignore_index) {
        loss[r] = Acc(0);
      } else if (t < 0 || t >= v) {
        bad_row.store(r);
        loss[r] = std::numeric_limits<Acc>::quiet_NaN();
      } else {
        loss[r] = cpu::smoothed_loss(lse, static_cast<Acc>(z[t]), sum_z, v, a.label_smoothing);
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
    const Acc g = scale[r], row_lse = lse[r], uniform = Acc(smoothing) / static_cast<Acc>(v);
    if constexpr (std::is_same_v<T, float>) {
      const Vec lse_v = vec::splatv<Vec>(row_lse);
      int64_t i = 0;
      if constexpr (kStream) {
        for (const int64_t head = std::min(v, vec::floats_to_align(gr, sizeof(Vec))); i < head; ++i)
          gr[i] = g * (vec::exp_f32(z[i] - row_lse) - uniform);
        for (; i + L <= v; i += L) vec::streamv(gr + i, g * (vec::exp_poly(vec::loadv<Vec>(z + i) - lse_v) - uniform));
      }
      for (; i + L <= v; i += L) vec::storev(gr + i, g * (vec::exp_poly(vec::loadv<Vec>(z + i) - lse_v) - uniform));
      for (; i < v; ++i) gr[i] = g * (vec::exp_f32(z[i] - row_lse) - uniform);
      if (t >= 0 && t < v) gr[t] -= g * (Acc(1) - smoothing);
      continue;
    }
    for (int64_t b = 0; b < v; b += kClassBlock) {
      const int64_t len = std::min(kClassBlock, v - b);
      if constexpr (std::is_same_v<Acc, float>) {
        vec::widen(z + b, block, len);
        const Vec lse_v = vec::splatv<Vec>(row_lse);
        int64_t i = 0;
        for (; i + L <= len; i += L)
          vec::storev(block + i, g * (vec::exp_poly(vec::loadv<Vec>(block + i) - lse_v) - uniform));
        for (; i < len; ++i) block[i] = g * (vec::exp_f32(block[i] - row_lse) - uniform);
        if (t >= b && t < b + len) block[t - b] -= g * (Acc(1) - smoothing);
        vec::narrow(block, gr + b, len);
      } else {
        for (int64_t i = 0; i < len; ++i) block[i] = g * (std::exp(static_cast<Acc>(z[b + i]) - row_lse) - uniform);
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
