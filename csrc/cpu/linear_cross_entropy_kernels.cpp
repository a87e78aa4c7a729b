// cpu copies: baseline avx2
// CPU loop of linear_cross_entropy: one pass set per row of a chunk of
// logits the ops file has just computed with a matmul (so the row is in
// cache): softcap in place, max, sum of exp(z - m) and of z - m, the row's
// loss and lse, and, for a gradient, d loss / d logits written over the row
// for the chunk's next two matmuls.
//
// With p = softmax(z), t the target, eps the smoothing, V the classes:
//   loss = (1 - eps) (lse - z_t) + eps (lse - mean z) + z_loss lse^2
//   d loss / d z_j = p_j (1 + 2 z_loss lse) - eps / V - (1 - eps) [j == t]
// times softcap's derivative 1 - (z_j / c)^2 for capped logits z = c tanh(x / c).
#include "cpu/linear_cross_entropy.h"
#include "cpu/dispatch.h"
#include "cpu/parallel.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

MY_MPS_OPS_CPU_KERNELS_BEGIN
// Named: the unity build puts every loop file of a copy in one translation unit.
namespace linear_cross_entropy_loop {

constexpr int64_t L = vec::kLanes<Vec>;

// z = c tanh(z / c) = c (1 - 2 / (exp(2 z / c) + 1)), saturating to +-c.
void softcap_row(float* z, int64_t v, float c) {
  const float two_over_c = 2.0f / c;
  int64_t i = 0;
  for (; i + L <= v; i += L) {
    const Vec e = vec::exp_poly(vec::loadv<Vec>(z + i) * two_over_c);
    vec::storev(z + i, c - (2.0f * c) / (e + 1.0f));
  }
  for (; i < v; ++i) z[i] = c * std::tanh(z[i] / c);
}
void softcap_row(double* z, int64_t v, double c) {
  for (int64_t i = 0; i < v; ++i) z[i] = c * std::tanh(z[i] / c);
}

float row_max(const float* z, int64_t v) {
  Vec m0 = vec::splatv<Vec>(-std::numeric_limits<float>::infinity()), m1 = m0;
  int64_t i = 0;
  for (; i + 2 * L <= v; i += 2 * L)
    m0 = vec::maxv(m0, vec::loadv<Vec>(z + i)), m1 = vec::maxv(m1, vec::loadv<Vec>(z + i + L));
  float m = vec::reduce_maxv(vec::maxv(m0, m1));
  for (; i < v; ++i) m = std::max(m, z[i]);
  return m;
}
double row_max(const double* z, int64_t v) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < v; ++i) m = std::max(m, z[i]);
  return m;
}

// (sum of exp(z - m), sum of z - m)
void row_sums(const float* z, int64_t v, float m, float& sum_exp, float& sum_d) {
  const Vec mv = vec::splatv<Vec>(m);
  Vec e0 = {}, e1 = {}, d0 = {}, d1 = {};
  int64_t i = 0;
  for (; i + 2 * L <= v; i += 2 * L) {
    const Vec a = vec::loadv<Vec>(z + i) - mv, b = vec::loadv<Vec>(z + i + L) - mv;
    e0 += vec::exp_poly_nonpositive(a), e1 += vec::exp_poly_nonpositive(b);
    d0 += a, d1 += b;
  }
  sum_exp = vec::reduce_sumv(e0 + e1), sum_d = vec::reduce_sumv(d0 + d1);
  for (; i < v; ++i) sum_exp += vec::exp_f32(z[i] - m), sum_d += z[i] - m;
}
void row_sums(const double* z, int64_t v, double m, double& sum_exp, double& sum_d) {
  sum_exp = 0, sum_d = 0;
  for (int64_t i = 0; i < v; ++i) sum_exp += std::exp(z[i] - m), sum_d += z[i] - m;
}

// Overwrites the row with coef * p_j - uniform, times 1 - (z_j / c)^2 when capped.
void gradient_row(float* z, int64_t v, float m, float log_s, float coef, float uniform, float c) {
  const Vec mv = vec::splatv<Vec>(m), lv = vec::splatv<Vec>(log_s);
  const float inv_c = c > 0.0f ? 1.0f / c : 0.0f;
  int64_t i = 0;
  for (; i + L <= v; i += L) {
    const Vec zi = vec::loadv<Vec>(z + i);
    Vec d = coef * vec::exp_poly_nonpositive((zi - mv) - lv) - uniform;
    if (c > 0.0f) {
      const Vec t = zi * inv_c;
      d = d * (1.0f - t * t);
    }
    vec::storev(z + i, d);
  }
  for (; i < v; ++i) {
    const float t = z[i] * inv_c;
    const float d = coef * vec::exp_f32((z[i] - m) - log_s) - uniform;
    z[i] = c > 0.0f ? d * (1.0f - t * t) : d;
  }
}
void gradient_row(double* z, int64_t v, double m, double log_s, double coef, double uniform, double c) {
  for (int64_t i = 0; i < v; ++i) {
    const double d = coef * std::exp((z[i] - m) - log_s) - uniform;
    z[i] = c > 0 ? d * (1.0 - (z[i] / c) * (z[i] / c)) : d;
  }
}

template <typename Acc>
int64_t rows_pass(const LinearCrossEntropyRowsArgs& a) {
  auto* logits = static_cast<Acc*>(a.logits);
  auto* loss = static_cast<Acc*>(a.loss);
  auto* lse_out = static_cast<Acc*>(a.lse);
  const auto* scale = static_cast<const Acc*>(a.scale);
  const int64_t v = a.classes;
  const Acc smoothing = static_cast<Acc>(a.label_smoothing), c = static_cast<Acc>(a.softcap),
            z_loss = static_cast<Acc>(a.z_loss);
  std::atomic<int64_t> bad_row{-1};
  at::parallel_for(0, a.rows, cpu::row_grain(v), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      Acc* z = logits + r * v;
      const int64_t t = a.target[r];
      if (c > 0) softcap_row(z, v, c);
      const Acc m = row_max(z, v);
      Acc s, sum_d;
      row_sums(z, v, m, s, sum_d);
      const Acc log_s = std::log(s), lse = m + log_s;
      lse_out[r] = lse;
      if (t == a.ignore_index) {
        loss[r] = Acc(0);
        if (scale != nullptr) std::fill(z, z + v, Acc(0));
        continue;
      }
      if (t < 0 || t >= v) {
        bad_row.store(r);
        loss[r] = std::numeric_limits<Acc>::quiet_NaN();
        continue;
      }
      const Acc z_t = z[t];
      // Formed from z - m first, as F.cross_entropy rounds it.
      const Acc nll = (m - z_t) + log_s;
      const Acc row_loss = smoothing == Acc(0) ? nll : (Acc(1) - smoothing) * nll + smoothing * (log_s - sum_d / v);
      loss[r] = row_loss + z_loss * lse * lse;
      if (scale == nullptr) continue;
      const Acc g = scale[r];
      gradient_row(z, v, m, log_s, g * (Acc(1) + 2 * z_loss * lse), g * smoothing / v, c);
      const Acc cap_t = c > 0 ? Acc(1) - (z_t / c) * (z_t / c) : Acc(1);
      z[t] -= g * (Acc(1) - smoothing) * cap_t;
    }
  });
  return bad_row.load();
}

}  // namespace linear_cross_entropy_loop

int64_t linear_cross_entropy_rows(c10::ScalarType acc_dtype, const LinearCrossEntropyRowsArgs& args) {
  TORCH_CHECK(acc_dtype == c10::ScalarType::Float || acc_dtype == c10::ScalarType::Double,
              "linear_cross_entropy: the row pass runs on float32 or float64 logits");
  using linear_cross_entropy_loop::rows_pass;
  return acc_dtype == c10::ScalarType::Double ? rows_pass<double>(args) : rows_pass<float>(args);
}

MY_MPS_OPS_CPU_KERNELS_END

MY_MPS_OPS_REGISTER_CPU_KERNEL(my_mps_ops::cpu::linear_cross_entropy_rows_stub, linear_cross_entropy_rows);
