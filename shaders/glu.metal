// Gated activations: swiglu = silu(gate) * up, geglu = gelu(gate) * up.
// Elementwise over a non-uniform grid; each thread handles N_PER elements.
// The backward kernels recompute the activation from gate.
#include <metal_stdlib>
using namespace metal;

constant constexpr uint N_PER = 4;

// Metal has no erf: Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7).
inline float erf_approx(float x) {
  const float sign = x < 0.0f ? -1.0f : 1.0f;
  const float a = fabs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  return sign * (1.0f - poly * precise::exp(-a * a));
}

inline float sigmoid(float x) { return 1.0f / (1.0f + precise::exp(-x)); }

constant constexpr float kSqrtHalf = 0.70710678118654752f;
constant constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constant constexpr float kSqrt2OverPi = 0.79788456080286536f;
constant constexpr float kTanhCoef = 0.044715f;

// (gelu(x), gelu'(x)); approximate: 0 = erf, 1 = tanh.
inline float2 gelu_and_grad(float x, uint approximate) {
  if (approximate == 0) {
    const float cdf = 0.5f * (1.0f + erf_approx(x * kSqrtHalf));
    return float2(x * cdf, cdf + x * kInvSqrt2Pi * precise::exp(-0.5f * x * x));
  }
  const float inner = kSqrt2OverPi * (x + kTanhCoef * x * x * x);
  const float t = precise::tanh(inner);
  const float d_inner = kSqrt2OverPi * (1.0f + 3.0f * kTanhCoef * x * x);
  return float2(0.5f * x * (1.0f + t), 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * d_inner);
}

template <typename T>
kernel void swiglu_forward(device const T* gate [[buffer(0)]], device const T* up [[buffer(1)]],
                           device T* out [[buffer(2)]], constant uint& n [[buffer(3)]],
                           uint tid [[thread_position_in_grid]]) {
  for (uint k = 0; k < N_PER; ++k) {
    const uint i = tid * N_PER + k;
    if (i < n) {
      const float g = float(gate[i]);
      out[i] = T(g * sigmoid(g) * float(up[i]));
    }
  }
}

template <typename T>
kernel void swiglu_backward(device const T* grad_out [[buffer(0)]], device const T* gate [[buffer(1)]],
                            device const T* up [[buffer(2)]], device T* grad_gate [[buffer(3)]],
                            device T* grad_up [[buffer(4)]], constant uint& n [[buffer(5)]],
                            uint tid [[thread_position_in_grid]]) {
  for (uint k = 0; k < N_PER; ++k) {
    const uint i = tid * N_PER + k;
    if (i < n) {
      const float g = float(gate[i]);
      const float dy = float(grad_out[i]);
      const float s = sigmoid(g);
      grad_gate[i] = T(dy * float(up[i]) * s * (1.0f + g * (1.0f - s)));
      grad_up[i] = T(dy * g * s);
    }
  }
}

template <typename T>
kernel void geglu_forward(device const T* gate [[buffer(0)]], device const T* up [[buffer(1)]],
                          device T* out [[buffer(2)]], constant uint& n [[buffer(3)]],
                          constant uint& approximate [[buffer(4)]], uint tid [[thread_position_in_grid]]) {
  for (uint k = 0; k < N_PER; ++k) {
    const uint i = tid * N_PER + k;
    if (i < n) {
      out[i] = T(gelu_and_grad(float(gate[i]), approximate).x * float(up[i]));
    }
  }
}

template <typename T>
kernel void geglu_backward(device const T* grad_out [[buffer(0)]], device const T* gate [[buffer(1)]],
                           device const T* up [[buffer(2)]], device T* grad_gate [[buffer(3)]],
                           device T* grad_up [[buffer(4)]], constant uint& n [[buffer(5)]],
                           constant uint& approximate [[buffer(6)]], uint tid [[thread_position_in_grid]]) {
  for (uint k = 0; k < N_PER; ++k) {
    const uint i = tid * N_PER + k;
    if (i < n) {
      const float2 gg = gelu_and_grad(float(gate[i]), approximate);
      const float dy = float(grad_out[i]);
      grad_gate[i] = T(dy * float(up[i]) * gg.y);
      grad_up[i] = T(dy * gg.x);
    }
  }
}

#define INSTANTIATE_GLU(T)                                                                                   \
  template [[host_name("swiglu_forward_" #T)]] kernel void swiglu_forward<T>(                               \
      device const T*, device const T*, device T*, constant uint&, uint);                                   \
  template [[host_name("swiglu_backward_" #T)]] kernel void swiglu_backward<T>(                             \
      device const T*, device const T*, device const T*, device T*, device T*, constant uint&, uint);       \
  template [[host_name("geglu_forward_" #T)]] kernel void geglu_forward<T>(                                 \
      device const T*, device const T*, device T*, constant uint&, constant uint&, uint);                   \
  template [[host_name("geglu_backward_" #T)]] kernel void geglu_backward<T>(                               \
      device const T*, device const T*, device const T*, device T*, device T*, constant uint&, constant uint&, \
      uint);

INSTANTIATE_GLU(float)
INSTANTIATE_GLU(half)
INSTANTIATE_GLU(bfloat)
