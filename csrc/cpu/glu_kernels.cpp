// cpu copies: baseline avx2 avx512
// CPU loops of the gated activations: swiglu = silu(gate) * up and geglu =
// gelu(gate) * up, forward and backward (which recomputes the activation).
//
// Blocks of kGluBlock elements are widened to float32 (float64 stays float64),
// then each activation runs on the copy's float32 vectors. The float32 path
// uses vec::exp_poly and the erf of Abramowitz & Stegun 7.1.26 (as the
// shader, constants in shaders/include/glu.h): libm calls run one element at
// a time. AVX-512 pays here (about a quarter less time per element in cache
// than AVX2, which is what is left above memory bandwidth in the backward).
#include "cpu/dispatch.h"
#include "cpu/glu.h"
#include "cpu/parallel.h"
#include "shaders/include/glu.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

MY_MPS_OPS_CPU_KERNELS_BEGIN
namespace {

using shaders::kErfA1;
using shaders::kErfA2;
using shaders::kErfA3;
using shaders::kErfA4;
using shaders::kErfA5;
using shaders::kErfP;
using shaders::kInvSqrt2Pi;
using shaders::kSqrt2OverPi;
using shaders::kSqrtHalf;
using shaders::kTanhCoef;

constexpr int64_t kGrain = 32768;
constexpr int64_t kGluBlock = 256;

// act(x) and act'(x) for float64 (gradcheck): libm's exp and erf.
template <GluActivation A>
inline void activation_f64(double x, double& value, double& grad) {
  if constexpr (A == GluActivation::SiLU) {
    const double s = 1.0 / (1.0 + std::exp(-x));
    value = x * s;
    grad = s * (1.0 + x * (1.0 - s));
  } else if constexpr (A == GluActivation::GeluErf) {
    const double cdf = 0.5 * (1.0 + std::erf(x * kSqrtHalf));
    value = x * cdf;
    grad = cdf + x * kInvSqrt2Pi * std::exp(-0.5 * x * x);
  } else {
    const double u = kSqrt2OverPi * (x + kTanhCoef * x * x * x);
    const double e = std::exp(-2.0 * u);
    const double sig = 1.0 / (1.0 + e);
    const double one_minus = x < 0.0 ? 1.0 - sig : e * sig;
    value = x * sig;
    grad = sig + 2.0 * x * sig * one_minus * kSqrt2OverPi * (1.0 + 3.0 * kTanhCoef * x * x);
  }
}

// act(x) and act'(x) on float32 lanes: V is the copy's Vec, or float for the
// tails (the same arithmetic, one lane).
template <GluActivation A, typename V>
__attribute__((always_inline)) inline void activation(V x, V& value, V& grad) {
  using vec::exp_poly;
  if constexpr (A == GluActivation::SiLU) {
    const V s = 1.0f / (1.0f + exp_poly(-x));
    value = x * s;
    grad = s * (1.0f + x * (1.0f - s));
  } else if constexpr (A == GluActivation::GeluErf) {
    // erf with the sign applied last.
    const V h = x * float(kSqrtHalf);
    const V a = h < 0.0f ? -h : h;
    const V t = 1.0f / (1.0f + kErfP * a);
    const V poly = t * (kErfA1 + t * (kErfA2 + t * (kErfA3 + t * (kErfA4 + t * kErfA5))));
    const V e = 1.0f - poly * exp_poly(-a * a);
    const V cdf = 0.5f * (1.0f + (h < 0.0f ? -e : e));
    value = x * cdf;
    grad = cdf + x * float(kInvSqrt2Pi) * exp_poly(-0.5f * x * x);
  } else {
    // 0.5 * (1 + tanh(u)) = sigmoid(2u) = s: written this way the negative
    // tail keeps its digits (1 + tanh(u) cancels to nothing there), and
    // 0.5 * (1 - tanh(u)^2) = 2 s (1 - s), with 1 - s = e * s where e <= 1.
    const V u = float(kSqrt2OverPi) * (x + float(kTanhCoef) * x * x * x);
    const V e = exp_poly(-2.0f * u);
    const V sig = 1.0f / (1.0f + e);
    const V one_minus = x < 0.0f ? 1.0f - sig : e * sig;
    value = x * sig;
    grad = sig + 2.0f * x * sig * one_minus * float(kSqrt2OverPi) * (1.0f + float(3 * kTanhCoef) * x * x);
  }
}

// float32 rows; out may alias gate and the gradients may alias gate / up
// (the narrow-type path reuses its blocks): each element is read before it is
// written.
template <GluActivation A, bool kStream = false>
__attribute__((always_inline)) inline void forward_f32(const float* gate, const float* up, float* out, int64_t len) {
  constexpr int64_t L = vec::kLanes<Vec>;
  int64_t i = 0;
  for (; i + L <= len; i += L) {
    Vec v, d;
    activation<A>(vec::loadv<Vec>(gate + i), v, d);
    vec::store_maybe_streaming<kStream>(out + i, v * vec::loadv<Vec>(up + i));
  }
  for (; i < len; ++i) {
    float v, d;
    activation<A>(gate[i], v, d);
    out[i] = v * up[i];
  }
}

template <GluActivation A, bool kStream = false>
__attribute__((always_inline)) inline void backward_f32(const float* dy, const float* gate, const float* up,
                                                        float* dgate, float* dup, int64_t len) {
  constexpr int64_t L = vec::kLanes<Vec>;
  int64_t i = 0;
  for (; i + L <= len; i += L) {
    Vec v, d;
    activation<A>(vec::loadv<Vec>(gate + i), v, d);
    const Vec y = vec::loadv<Vec>(dy + i), u = vec::loadv<Vec>(up + i);
    vec::store_maybe_streaming<kStream>(dgate + i, y * u * d);
    vec::store_maybe_streaming<kStream>(dup + i, y * v);
  }
  for (; i < len; ++i) {
    float v, d;
    activation<A>(gate[i], v, d);
    const float y = dy[i], u = up[i];
    dgate[i] = y * u * d;
    dup[i] = y * v;
  }
}

// One block of at most kGluBlock elements: float32 is read and written in place;
// float16/bfloat16 are widened into float32 blocks in cache; float64 runs the
// libm form.
template <GluActivation A, typename T>
inline void forward_block(const T* gate, const T* up, T* out, int64_t len) {
  if constexpr (std::is_same_v<T, float>) {
    forward_f32<A>(gate, up, out, len);
  } else if constexpr (std::is_same_v<T, double>) {
    for (int64_t i = 0; i < len; ++i) {
      double v, d;
      activation_f64<A>(gate[i], v, d);
      out[i] = v * up[i];
    }
  } else {
    float g[kGluBlock], u[kGluBlock];
    vec::widen(gate, g, len);
    vec::widen(up, u, len);
    forward_f32<A>(g, u, g, len);
    vec::narrow(g, out, len);
  }
}

template <GluActivation A, typename T>
inline void backward_block(const T* dy, const T* gate, const T* up, T* dgate, T* dup, int64_t len) {
  if constexpr (std::is_same_v<T, float>) {
    backward_f32<A>(dy, gate, up, dgate, dup, len);
  } else if constexpr (std::is_same_v<T, double>) {
    for (int64_t i = 0; i < len; ++i) {
      double v, d;
      activation_f64<A>(gate[i], v, d);
      dgate[i] = dy[i] * up[i] * d;
      dup[i] = dy[i] * v;
    }
  } else {
    float g[kGluBlock], u[kGluBlock], y[kGluBlock];
    vec::widen(gate, g, len);
    vec::widen(up, u, len);
    vec::widen(dy, y, len);
    backward_f32<A>(y, g, u, g, u, len);
    vec::narrow(g, dgate, len);
    vec::narrow(u, dup, len);
  }
}

// Elements [begin, end) of flat rows. float32 outputs of kStreamMinBytes or
// more are written with streaming stores: a short head up to the vector's
// alignment, then aligned blocks (the gradients come from the same allocator
// alignment, so one head serves both).
template <GluActivation A, typename T>
void forward_range(const T* gate, const T* up, T* out, int64_t begin, int64_t end, bool stream) {
  if constexpr (std::is_same_v<T, float> && vec::kCanStream) {
    if (stream) {
      const int64_t head = std::min(end, begin + vec::floats_to_align(out + begin, sizeof(Vec)));
      forward_f32<A>(gate + begin, up + begin, out + begin, head - begin);
      for (int64_t b = head; b < end; b += kGluBlock)
        forward_f32<A, true>(gate + b, up + b, out + b, std::min(kGluBlock, end - b));
      return vec::stream_fence();
    }
  }
  for (int64_t b = begin; b < end; b += kGluBlock)
    forward_block<A, T>(gate + b, up + b, out + b, std::min(kGluBlock, end - b));
}

template <GluActivation A, typename T>
void backward_range(const T* dy, const T* gate, const T* up, T* dgate, T* dup, int64_t begin, int64_t end,
                    bool stream) {
  if constexpr (std::is_same_v<T, float> && vec::kCanStream) {
    if (stream && vec::floats_to_align(dgate, sizeof(Vec)) == vec::floats_to_align(dup, sizeof(Vec))) {
      const int64_t head = std::min(end, begin + vec::floats_to_align(dgate + begin, sizeof(Vec)));
      backward_f32<A>(dy + begin, gate + begin, up + begin, dgate + begin, dup + begin, head - begin);
      for (int64_t b = head; b < end; b += kGluBlock)
        backward_f32<A, true>(dy + b, gate + b, up + b, dgate + b, dup + b, std::min(kGluBlock, end - b));
      return vec::stream_fence();
    }
  }
  for (int64_t b = begin; b < end; b += kGluBlock)
    backward_block<A, T>(dy + b, gate + b, up + b, dgate + b, dup + b, std::min(kGluBlock, end - b));
}

// A flat range of n elements in parallel, split only at multiples of
// kGluBlock: every element then falls at the same place of the same block
// (vector body or scalar tail) whatever the thread count, so the results are
// bitwise the same for any number of threads.
template <typename F>
void parallel_blocks(int64_t n, const F& fn) {
  const int64_t blocks = (n + kGluBlock - 1) / kGluBlock;
  at::parallel_for(0, blocks, kGrain / kGluBlock, [&](int64_t b0, int64_t b1) {
    fn(b0 * kGluBlock, std::min(n, b1 * kGluBlock));
  });
}

// Contiguous inputs run as one flat range (no per-row overhead for narrow
// rows), strided ones row by row.
template <GluActivation A, typename T>
void forward_rows(const GluForwardArgs& a) {
  const auto* gate = static_cast<const T*>(a.gate);
  const auto* up = static_cast<const T*>(a.up);
  auto* out = static_cast<T*>(a.out);
  const int64_t n = a.rows * a.cols;
  const bool stream = n * int64_t(sizeof(T)) >= vec::kStreamMinBytes;
  if (a.gate_stride == a.cols && a.up_stride == a.cols) {
    parallel_blocks(n, [&](int64_t begin, int64_t end) { forward_range<A, T>(gate, up, out, begin, end, stream); });
    return;
  }
  at::parallel_for(0, a.rows, cpu::row_grain(a.cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      forward_range<A, T>(gate + r * a.gate_stride, up + r * a.up_stride, out + r * a.cols, 0, a.cols, stream);
  });
}

template <GluActivation A, typename T>
void backward_rows(const GluBackwardArgs& a) {
  const auto* dy = static_cast<const T*>(a.grad_out);
  const auto* gate = static_cast<const T*>(a.gate);
  const auto* up = static_cast<const T*>(a.up);
  auto* dgate = static_cast<T*>(a.grad_gate);
  auto* dup = static_cast<T*>(a.grad_up);
  const int64_t n = a.rows * a.cols;
  const bool stream = n * int64_t(sizeof(T)) >= vec::kStreamMinBytes;
  if (a.grad_out_stride == a.cols && a.gate_stride == a.cols && a.up_stride == a.cols) {
    parallel_blocks(n, [&](int64_t begin, int64_t end) {
      backward_range<A, T>(dy, gate, up, dgate, dup, begin, end, stream);
    });
    return;
  }
  at::parallel_for(0, a.rows, cpu::row_grain(a.cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      backward_range<A, T>(dy + r * a.grad_out_stride, gate + r * a.gate_stride, up + r * a.up_stride,
                           dgate + r * a.cols, dup + r * a.cols, 0, a.cols, stream);
  });
}

// Calls fn(activation tag) with the activation as a compile-time constant.
template <typename F>
void visit_activation(GluActivation act, const F& fn) {
  switch (act) {
    case GluActivation::SiLU: return fn(std::integral_constant<GluActivation, GluActivation::SiLU>{});
    case GluActivation::GeluErf: return fn(std::integral_constant<GluActivation, GluActivation::GeluErf>{});
    case GluActivation::GeluTanh: return fn(std::integral_constant<GluActivation, GluActivation::GeluTanh>{});
  }
}

}  // namespace

void glu_forward(c10::ScalarType dtype, GluActivation act, const GluForwardArgs& args) {
  cpu::visit_float_dtype(dtype, "glu", [&](auto type_tag) {
    using T = decltype(type_tag);
    visit_activation(act, [&](auto a) { forward_rows<decltype(a)::value, T>(args); });
  });
}

void glu_backward(c10::ScalarType dtype, GluActivation act, const GluBackwardArgs& args) {
  cpu::visit_float_dtype(dtype, "glu_backward", [&](auto type_tag) {
    using T = decltype(type_tag);
    visit_activation(act, [&](auto a) { backward_rows<decltype(a)::value, T>(args); });
  });
}

MY_MPS_OPS_CPU_KERNELS_END

MY_MPS_OPS_REGISTER_CPU_KERNEL(my_mps_ops::cpu::glu_forward_stub, glu_forward);
MY_MPS_OPS_REGISTER_CPU_KERNEL(my_mps_ops::cpu::glu_backward_stub, glu_backward);
