// Gated activations: swiglu = silu(gate) * up, geglu = gelu(gate) * up.
// Elementwise over a 2-D grid of threads (rows x column groups, see GluShape).
// Thread x of a row handles columns x, x + W, x + 2W, ... (W: the grid's
// width), so that the 32 lanes of a SIMD group read and write 32 consecutive
// elements at each step (coalesced; the emulator's profile() measured 25%
// for float when each thread took kGluColumnsPerThread adjacent columns).
// The backward kernels recompute the activation from gate.
#include <metal_stdlib>
#include "glu.h"
using namespace metal;

// Metal has no erf: Abramowitz & Stegun 7.1.26 (constants in glu.h).
inline float erf_approx(float x) {
  const float sign = x < 0.0f ? -1.0f : 1.0f;
  const float a = fabs(x);
  const float t = 1.0f / (1.0f + kErfP * a);
  const float poly = t * (kErfA1 + t * (kErfA2 + t * (kErfA3 + t * (kErfA4 + t * kErfA5))));
  return sign * (1.0f - poly * precise::exp(-a * a));
}

inline float sigmoid(float x) { return 1.0f / (1.0f + precise::exp(-x)); }

// (gelu(x), gelu'(x)).
inline float2 gelu_and_grad(float x, uint approximate) {
  if (approximate == kGeluErf) {
    const float cdf = 0.5f * (1.0f + erf_approx(x * kSqrtHalf));
    return float2(x * cdf, cdf + x * kInvSqrt2Pi * precise::exp(-0.5f * x * x));
  }
  // 0.5 * (1 + tanh(inner)) = sigmoid(2 * inner) = s, so the negative tail
  // keeps its digits (1 + tanh cancels there); 0.5 * (1 - tanh^2) = 2 s (1 - s)
  // with 1 - s = e * s where e <= 1 (e may be inf where x < 0).
  const float inner = kSqrt2OverPi * (x + kTanhCoef * x * x * x);
  const float e = precise::exp(-2.0f * inner);
  const float s = 1.0f / (1.0f + e);
  const float one_minus = x < 0.0f ? 1.0f - s : e * s;
  const float d_inner = kSqrt2OverPi * (1.0f + 3.0f * kTanhCoef * x * x);
  return float2(x * s, s + 2.0f * x * s * one_minus * d_inner);
}

template <typename T>
kernel void swiglu_forward(device const T* gate [[buffer(0)]], device const T* up [[buffer(1)]],
                           device T* out [[buffer(2)]], constant GluShape& s [[buffer(3)]],
                           uint2 tid [[thread_position_in_grid]], uint2 grid [[threads_per_grid]]) {
  const ulong row = tid.y;
  for (uint k = 0; k < kGluColumnsPerThread; ++k) {
    const uint col = tid.x + k * grid.x;
    if (col < s.cols) {
      const float g = float(gate[row * s.gate_stride + col]);
      out[row * s.cols + col] = T(g * sigmoid(g) * float(up[row * s.up_stride + col]));
    }
  }
}

template <typename T>
kernel void swiglu_backward(device const T* grad_out [[buffer(0)]], device const T* gate [[buffer(1)]],
                            device const T* up [[buffer(2)]], device T* grad_gate [[buffer(3)]],
                            device T* grad_up [[buffer(4)]], constant GluShape& s [[buffer(5)]],
                            uint2 tid [[thread_position_in_grid]], uint2 grid [[threads_per_grid]]) {
  const ulong row = tid.y;
  for (uint k = 0; k < kGluColumnsPerThread; ++k) {
    const uint col = tid.x + k * grid.x;
    if (col < s.cols) {
      const float g = float(gate[row * s.gate_stride + col]);
      const float dy = float(grad_out[row * s.grad_stride + col]);
      const float sg = sigmoid(g);
      const ulong i = row * s.cols + col;
      grad_gate[i] = T(dy * float(up[row * s.up_stride + col]) * sg * (1.0f + g * (1.0f - sg)));
      grad_up[i] = T(dy * g * sg);
    }
  }
}

template <typename T>
kernel void geglu_forward(device const T* gate [[buffer(0)]], device const T* up [[buffer(1)]],
                          device T* out [[buffer(2)]], constant GluShape& s [[buffer(3)]],
                          uint2 tid [[thread_position_in_grid]], uint2 grid [[threads_per_grid]]) {
  const ulong row = tid.y;
  for (uint k = 0; k < kGluColumnsPerThread; ++k) {
    const uint col = tid.x + k * grid.x;
    if (col < s.cols) {
      const float gelu = gelu_and_grad(float(gate[row * s.gate_stride + col]), s.approximate).x;
      out[row * s.cols + col] = T(gelu * float(up[row * s.up_stride + col]));
    }
  }
}

template <typename T>
kernel void geglu_backward(device const T* grad_out [[buffer(0)]], device const T* gate [[buffer(1)]],
                           device const T* up [[buffer(2)]], device T* grad_gate [[buffer(3)]],
                           device T* grad_up [[buffer(4)]], constant GluShape& s [[buffer(5)]],
                           uint2 tid [[thread_position_in_grid]], uint2 grid [[threads_per_grid]]) {
  const ulong row = tid.y;
  for (uint k = 0; k < kGluColumnsPerThread; ++k) {
    const uint col = tid.x + k * grid.x;
    if (col < s.cols) {
      const float2 gg = gelu_and_grad(float(gate[row * s.gate_stride + col]), s.approximate);
      const float dy = float(grad_out[row * s.grad_stride + col]);
      const ulong i = row * s.cols + col;
      grad_gate[i] = T(dy * float(up[row * s.up_stride + col]) * gg.y);
      grad_up[i] = T(dy * gg.x);
    }
  }
}

#define INSTANTIATE_GLU(T)                        \
  MY_MPS_OPS_INSTANTIATE_KERNEL(swiglu_forward, T)  \
  MY_MPS_OPS_INSTANTIATE_KERNEL(swiglu_backward, T) \
  MY_MPS_OPS_INSTANTIATE_KERNEL(geglu_forward, T)   \
  MY_MPS_OPS_INSTANTIATE_KERNEL(geglu_backward, T)

INSTANTIATE_GLU(float)
INSTANTIATE_GLU(half)
INSTANTIATE_GLU(bfloat)
