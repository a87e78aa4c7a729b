// Gated activations of transformer MLPs: swiglu(gate, up) = silu(gate) * up
// and geglu(gate, up, approximate) = gelu(gate) * up.
//
// One pass each way; the backward recomputes the activation from gate rather
// than saving it (one tensor less kept alive per MLP in training). CPU kernels
// (explicit float32 vectors, parallel), the Metal path (shaders/glu.metal), Meta, autograd.
#include "metal_launch.h"
#include "op_common.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>

namespace my_mps_ops {
namespace {

using at::Tensor;

enum class Activation { SiLU, GeluErf, GeluTanh };

Activation gelu_kind(const char* op, c10::string_view approximate) {
  if (approximate == "none") return Activation::GeluErf;
  if (approximate == "tanh") return Activation::GeluTanh;
  TORCH_CHECK(false, op, ": approximate must be \"none\" or \"tanh\", got \"", approximate, "\"");
}

const char* op_name(Activation act, bool backward) {
  if (act == Activation::SiLU) return backward ? "my_mps_ops.swiglu_backward" : "my_mps_ops.swiglu";
  return backward ? "my_mps_ops.geglu_backward" : "my_mps_ops.geglu";
}

void check_inputs(const char* op, const Tensor& gate, const Tensor& up) {
  check_float_dtype(gate, op, "gate");
  check_same_dtype(up, gate, op, "up", "gate");
  check_same_device(up, gate, op, "up", "gate");
  TORCH_CHECK(up.sym_sizes() == gate.sym_sizes(), op, ": up must have the shape of gate ", gate.sym_sizes(),
              ", got ", up.sym_sizes());
}

void check_backward_inputs(const char* op, const Tensor& grad_out, const Tensor& gate, const Tensor& up) {
  check_inputs(op, gate, up);
  check_same_dtype(grad_out, gate, op, "grad_out", "gate");
  check_same_device(grad_out, gate, op, "grad_out", "gate");
  TORCH_CHECK(grad_out.sym_sizes() == gate.sym_sizes(), op, ": grad_out must have the shape of gate ",
              gate.sym_sizes(), ", got ", grad_out.sym_sizes());
}

// ------------------------------------------------------------- activations

constexpr double kSqrtHalf = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;
constexpr double kSqrt2OverPi = 0.79788456080286535588;
constexpr double kTanhCoef = 0.044715;

// ---------------------------------------------------------------- CPU kernels
// Blocks of kBlock elements are widened to float32 (float64 stays float64),
// then each activation is a branch-free loop the compiler vectorises. The
// float32 path uses its own exp (Cody-Waite reduction + degree-6 polynomial,
// ~2 ulp) and erf (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7): the libm
// calls behind at::vec's portable build run one element at a time.

constexpr int64_t kGrain = 32768;
constexpr int64_t kBlock = 256;

inline float erf_f32(float x) {
  const float a = std::fabs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  const float poly =
      t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const float y = 1.0f - poly * cpu::exp_f32(-a * a);
  return x < 0.0f ? -y : y;
}

inline float exp_of(float x) { return cpu::exp_f32(x); }
inline double exp_of(double x) { return std::exp(x); }
inline float erf_of(float x) { return erf_f32(x); }
inline double erf_of(double x) { return std::erf(x); }

// act(x) and act'(x).
template <Activation A, typename S>
inline void activation(S x, S& value, S& grad) {
  if constexpr (A == Activation::SiLU) {
    const S s = S(1) / (S(1) + exp_of(-x));
    value = x * s;
    grad = s * (S(1) + x * (S(1) - s));
  } else if constexpr (A == Activation::GeluErf) {
    const S cdf = S(0.5) * (S(1) + erf_of(x * S(kSqrtHalf)));
    value = x * cdf;
    grad = cdf + x * S(kInvSqrt2Pi) * exp_of(S(-0.5) * x * x);
  } else {
    // 0.5 * (1 + tanh(u)) = sigmoid(2u) = s: written this way the negative
    // tail keeps its digits (1 + tanh(u) cancels to nothing there), and
    // 0.5 * (1 - tanh(u)^2) = 2 s (1 - s), with 1 - s = e * s where e <= 1.
    const S u = S(kSqrt2OverPi) * (x + S(kTanhCoef) * x * x * x);
    const S e = exp_of(S(-2) * u);
    const S sig = S(1) / (S(1) + e);
    const S one_minus = x < S(0) ? S(1) - sig : e * sig;
    value = x * sig;
    grad = sig + S(2) * x * sig * one_minus * S(kSqrt2OverPi) * (S(1) + S(3 * kTanhCoef) * x * x);
  }
}

// The same activations on float32 vectors V (cpu::f32x4 / f32x8 / f32x16 in
// the baseline / AVX2 / AVX-512 copies; explicit vectors: the scalar form
// above auto-vectorises to less than half this speed).
template <Activation A, typename V>
__attribute__((always_inline)) inline void activation_v(V x, V& value, V& grad) {
  using cpu::exp_poly;
  if constexpr (A == Activation::SiLU) {
    const V s = 1.0f / (1.0f + exp_poly(-x));
    value = x * s;
    grad = s * (1.0f + x * (1.0f - s));
  } else if constexpr (A == Activation::GeluErf) {
    // erf as erf_f32 (Abramowitz & Stegun 7.1.26) with the sign applied last.
    const V h = x * float(kSqrtHalf);
    const V a = h < 0.0f ? -h : h;
    const V t = 1.0f / (1.0f + 0.3275911f * a);
    const V poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
    const V e = 1.0f - poly * exp_poly(-a * a);
    const V cdf = 0.5f * (1.0f + (h < 0.0f ? -e : e));
    value = x * cdf;
    grad = cdf + x * float(kInvSqrt2Pi) * exp_poly(-0.5f * x * x);
  } else {
    const V u = float(kSqrt2OverPi) * (x + float(kTanhCoef) * x * x * x);
    const V e = exp_poly(-2.0f * u);
    const V sig = 1.0f / (1.0f + e);
    const V one_minus = x < 0.0f ? 1.0f - sig : e * sig;
    value = x * sig;
    grad = sig + 2.0f * x * sig * one_minus * float(kSqrt2OverPi) * (1.0f + float(3 * kTanhCoef) * x * x);
  }
}

// float32 loops over vectors V; out may alias gate and the gradients may alias
// gate / up (the staged narrow-type path reuses its blocks): each element is
// read before it is written.
template <typename V, bool kStream>
__attribute__((always_inline)) inline void put(float* p, V v) {
  if constexpr (kStream) cpu::streamv(p, v);
  else cpu::storev(p, v);
}

template <Activation A, typename V, bool kStream = false>
__attribute__((always_inline)) inline void forward_f32(const float* gate, const float* up, float* out, int64_t len) {
  constexpr int64_t L = cpu::kLanes<V>;
  int64_t i = 0;
  for (; i + L <= len; i += L) {
    V v, d;
    activation_v<A>(cpu::loadv<V>(gate + i), v, d);
    put<V, kStream>(out + i, v * cpu::loadv<V>(up + i));
  }
  for (; i < len; ++i) {
    float v, d;
    activation<A>(gate[i], v, d);
    out[i] = v * up[i];
  }
}

template <Activation A, typename V, bool kStream = false>
__attribute__((always_inline)) inline void backward_f32(const float* dy, const float* gate, const float* up,
                                                        float* dgate, float* dup, int64_t len) {
  constexpr int64_t L = cpu::kLanes<V>;
  int64_t i = 0;
  for (; i + L <= len; i += L) {
    V v, d;
    activation_v<A>(cpu::loadv<V>(gate + i), v, d);
    const V y = cpu::loadv<V>(dy + i), u = cpu::loadv<V>(up + i);
    put<V, kStream>(dgate + i, y * u * d);
    put<V, kStream>(dup + i, y * v);
  }
  for (; i < len; ++i) {
    float v, d;
    activation<A>(gate[i], v, d);
    const float y = dy[i], u = up[i];
    dgate[i] = y * u * d;
    dup[i] = y * v;
  }
}

// One block of at most kBlock elements. always_inline: the body takes the
// instruction set of the function it is inlined into (see below). float32 is
// read and written in place; float16/bfloat16 are widened into float32 blocks
// in cache; float64 (gradcheck) runs the scalar form.
template <Activation A, typename T, typename V = cpu::f32x4>
__attribute__((always_inline)) inline void forward_block(const T* gate, const T* up, T* out, int64_t len) {
  if constexpr (std::is_same_v<T, float>) {
    forward_f32<A, V>(gate, up, out, len);
  } else if constexpr (std::is_same_v<T, double>) {
    for (int64_t i = 0; i < len; ++i) {
      double v, d;
      activation<A>(gate[i], v, d);
      out[i] = v * up[i];
    }
  } else {
    float g[kBlock], u[kBlock];
    cpu::widen(gate, g, len);
    cpu::widen(up, u, len);
    forward_f32<A, V>(g, u, g, len);
    cpu::narrow(g, out, len);
  }
}

template <Activation A, typename T, typename V = cpu::f32x4>
__attribute__((always_inline)) inline void backward_block(const T* dy, const T* gate, const T* up, T* dgate, T* dup,
                                                          int64_t len) {
  if constexpr (std::is_same_v<T, float>) {
    backward_f32<A, V>(dy, gate, up, dgate, dup, len);
  } else if constexpr (std::is_same_v<T, double>) {
    for (int64_t i = 0; i < len; ++i) {
      double v, d;
      activation<A>(gate[i], v, d);
      dgate[i] = dy[i] * up[i] * d;
      dup[i] = dy[i] * v;
    }
  } else {
    float g[kBlock], u[kBlock], y[kBlock];
    cpu::widen(gate, g, len);
    cpu::widen(up, u, len);
    cpu::widen(dy, y, len);
    backward_f32<A, V>(y, g, u, g, u, len);
    cpu::narrow(g, dgate, len);
    cpu::narrow(u, dup, len);
  }
}

// The portable build targets the baseline instruction set; on x86-64 CPUs
// with AVX2 and FMA the same loops run from an AVX2 copy (twice the width),
// picked at run time.
#ifdef MY_MPS_OPS_X86_AVX2_COPIES
// float32 outputs of kStreamMinBytes or more are written with streaming
// stores: a short head up to the vector's alignment, then aligned blocks (dgate
// and dup come from the same allocator alignment, so one head serves both).
template <Activation A, typename T, typename V>
__attribute__((always_inline)) inline void forward_range_v(const T* gate, const T* up, T* out, int64_t begin,
                                                           int64_t end, bool stream) {
  if constexpr (std::is_same_v<T, float>) {
    if (stream) {
      const int64_t head = std::min(end, begin + cpu::floats_to_align(out + begin, sizeof(V)));
      forward_f32<A, V>(gate + begin, up + begin, out + begin, head - begin);
      for (int64_t b = head; b < end; b += kBlock)
        forward_f32<A, V, true>(gate + b, up + b, out + b, std::min(kBlock, end - b));
      return cpu::stream_fence();
    }
  }
  for (int64_t b = begin; b < end; b += kBlock)
    forward_block<A, T, V>(gate + b, up + b, out + b, std::min(kBlock, end - b));
}
template <Activation A, typename T, typename V>
__attribute__((always_inline)) inline void backward_range_v(const T* dy, const T* gate, const T* up, T* dgate, T* dup,
                                                            int64_t begin, int64_t end, bool stream) {
  if constexpr (std::is_same_v<T, float>) {
    if (stream && cpu::floats_to_align(dgate, sizeof(V)) == cpu::floats_to_align(dup, sizeof(V))) {
      const int64_t head = std::min(end, begin + cpu::floats_to_align(dgate + begin, sizeof(V)));
      backward_f32<A, V>(dy + begin, gate + begin, up + begin, dgate + begin, dup + begin, head - begin);
      for (int64_t b = head; b < end; b += kBlock)
        backward_f32<A, V, true>(dy + b, gate + b, up + b, dgate + b, dup + b, std::min(kBlock, end - b));
      return cpu::stream_fence();
    }
  }
  for (int64_t b = begin; b < end; b += kBlock)
    backward_block<A, T, V>(dy + b, gate + b, up + b, dgate + b, dup + b, std::min(kBlock, end - b));
}

// The AVX2 copies (eight lanes) and, on CPUs with AVX-512F, sixteen-lane
// copies: about a quarter less time per element in cache, which is what is left
// above memory bandwidth in the backward.
template <Activation A, typename T>
__attribute__((target("avx2,fma"))) void forward_range_avx2(const T* gate, const T* up, T* out, int64_t begin,
                                                            int64_t end, bool stream) {
  forward_range_v<A, T, cpu::f32x8>(gate, up, out, begin, end, stream);
}
template <Activation A, typename T>
__attribute__((target("avx512f,avx2,fma"))) void forward_range_avx512(const T* gate, const T* up, T* out,
                                                                      int64_t begin, int64_t end, bool stream) {
  forward_range_v<A, T, cpu::f32x16>(gate, up, out, begin, end, stream);
}
template <Activation A, typename T>
__attribute__((target("avx2,fma"))) void backward_range_avx2(const T* dy, const T* gate, const T* up, T* dgate,
                                                             T* dup, int64_t begin, int64_t end, bool stream) {
  backward_range_v<A, T, cpu::f32x8>(dy, gate, up, dgate, dup, begin, end, stream);
}
template <Activation A, typename T>
__attribute__((target("avx512f,avx2,fma"))) void backward_range_avx512(const T* dy, const T* gate, const T* up,
                                                                       T* dgate, T* dup, int64_t begin, int64_t end,
                                                                       bool stream) {
  backward_range_v<A, T, cpu::f32x16>(dy, gate, up, dgate, dup, begin, end, stream);
}
#endif

// Inputs are row views (cpu::row_view): rows of `cols` elements, each input
// with its own row stride; outputs are contiguous. Contiguous inputs run as one
// flat range (no per-row overhead for narrow rows), strided ones row by row.
template <Activation A, typename T>
void forward_cpu_kernel(const T* gate, int64_t gate_stride, const T* up, int64_t up_stride, T* out, int64_t rows,
                        int64_t cols) {
  const int64_t n = rows * cols;
  [[maybe_unused]] const bool stream = n * int64_t(sizeof(T)) >= cpu::kStreamMinBytes;
  auto run = [&](const T* g, const T* u, T* o, int64_t begin, int64_t end) {
#ifdef MY_MPS_OPS_X86_AVX2_COPIES
    if (cpu::has_avx512()) return forward_range_avx512<A, T>(g, u, o, begin, end, stream);
    if (cpu::has_avx2_fma()) return forward_range_avx2<A, T>(g, u, o, begin, end, stream);
#endif
    for (int64_t b = begin; b < end; b += kBlock) forward_block<A, T>(g + b, u + b, o + b, std::min(kBlock, end - b));
  };
  if (gate_stride == cols && up_stride == cols) {
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) { run(gate, up, out, begin, end); });
    return;
  }
  at::parallel_for(0, rows, cpu::row_grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) run(gate + r * gate_stride, up + r * up_stride, out + r * cols, 0, cols);
  });
}

template <Activation A, typename T>
void backward_cpu_kernel(const T* dy, int64_t dy_stride, const T* gate, int64_t gate_stride, const T* up,
                         int64_t up_stride, T* dgate, T* dup, int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  [[maybe_unused]] const bool stream = n * int64_t(sizeof(T)) >= cpu::kStreamMinBytes;
  auto run = [&](const T* y, const T* g, const T* u, T* dg, T* du, int64_t begin, int64_t end) {
#ifdef MY_MPS_OPS_X86_AVX2_COPIES
    if (cpu::has_avx512()) return backward_range_avx512<A, T>(y, g, u, dg, du, begin, end, stream);
    if (cpu::has_avx2_fma()) return backward_range_avx2<A, T>(y, g, u, dg, du, begin, end, stream);
#endif
    for (int64_t b = begin; b < end; b += kBlock)
      backward_block<A, T>(y + b, g + b, u + b, dg + b, du + b, std::min(kBlock, end - b));
  };
  if (dy_stride == cols && gate_stride == cols && up_stride == cols) {
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) { run(dy, gate, up, dgate, dup, begin, end); });
    return;
  }
  at::parallel_for(0, rows, cpu::row_grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      run(dy + r * dy_stride, gate + r * gate_stride, up + r * up_stride, dgate + r * cols, dup + r * cols, 0, cols);
  });
}

// An input as a row view: in place when it is one, else a contiguous copy.
std::pair<Tensor, cpu::RowView> as_rows(const Tensor& t) {
  if (auto view = cpu::row_view(t)) return {t, *view};
  Tensor c = t.contiguous();
  return {c, *cpu::row_view(c)};
}

// What the CPU and Metal paths take, prepared once by forward_any /
// backward_any: inputs as row views (gv.rows x gv.cols), contiguous outputs.
struct ForwardIO {
  Tensor gate, up, out;
  cpu::RowView gv, uv;
};
struct BackwardIO {
  Tensor grad_out, gate, up, dgate, dup;
  cpu::RowView dyv, gv, uv;
};

template <Activation A>
void forward_cpu(const ForwardIO& io) {
  MY_MPS_OPS_DISPATCH_CPU_TYPES(io.gate.scalar_type(), "glu_cpu", [&] {
    forward_cpu_kernel<A, scalar_t>(io.gate.const_data_ptr<scalar_t>(), io.gv.row_stride,
                                    io.up.const_data_ptr<scalar_t>(), io.uv.row_stride,
                                    io.out.mutable_data_ptr<scalar_t>(), io.gv.rows, io.gv.cols);
  });
}

template <Activation A>
void backward_cpu(const BackwardIO& io) {
  MY_MPS_OPS_DISPATCH_CPU_TYPES(io.gate.scalar_type(), "glu_backward_cpu", [&] {
    backward_cpu_kernel<A, scalar_t>(io.grad_out.const_data_ptr<scalar_t>(), io.dyv.row_stride,
                                     io.gate.const_data_ptr<scalar_t>(), io.gv.row_stride,
                                     io.up.const_data_ptr<scalar_t>(), io.uv.row_stride,
                                     io.dgate.mutable_data_ptr<scalar_t>(), io.dup.mutable_data_ptr<scalar_t>(),
                                     io.gv.rows, io.gv.cols);
  });
}

// ------------------------------------------------------------ Metal path

constexpr const char* kLibrary = "glu";
constexpr int64_t kPerThread = 4;  // N_PER in the shader

uint32_t metal_approximate(Activation act) { return act == Activation::GeluTanh ? 1u : 0u; }

// Mirrors GluShape in shaders/glu.metal.
struct GluShape {
  uint32_t rows, cols, gate_stride, up_stride, grad_stride, approximate;
};

uint32_t metal_extent(int64_t v, const char* op, const char* what) {
  TORCH_CHECK(v >= 0 && v <= UINT32_MAX, op, ": ", what, " ", v, " is too large for the Metal kernel");
  return static_cast<uint32_t>(v);
}

// Grid (ceil(cols / N_PER), rows); threadgroups of up to 256 threads, widest
// along the row.
void dispatch_rows(metal::Launch& launch, metal::Executor& executor, const std::string& kernel, uint64_t rows,
                   uint64_t cols) {
  const metal::PipelineInfo info = executor.pipeline_info(kLibrary, kernel);
  const uint64_t limit = std::min<uint64_t>(info.max_threads_per_threadgroup, 256);
  const uint64_t threads_x = (cols + kPerThread - 1) / kPerThread;
  const uint64_t group_x = std::min(limit, threads_x);
  const uint64_t group_y = std::min<uint64_t>(rows, std::max<uint64_t>(1, limit / group_x));
  launch.dispatch_threads({threads_x, rows, 1}, {group_x, group_y, 1});
}

void forward_metal(Activation act, const ForwardIO& io) {
  const char* op = op_name(act, false);
  const GluShape shape{metal_extent(io.gv.rows, op, "rows"), metal_extent(io.gv.cols, op, "row length"),
                       metal_extent(io.gv.row_stride, op, "gate row stride"),
                       metal_extent(io.uv.row_stride, op, "up row stride"), 0, metal_approximate(act)};
  auto& executor = metal::executor_for(io.gate.device());
  const std::string kernel = std::string(act == Activation::SiLU ? "swiglu_forward_" : "geglu_forward_") +
                             metal_type_name(io.gate.scalar_type());
  metal::Launch launch(kLibrary, kernel);
  launch.buffer(io.gate).buffer(io.up).buffer(io.out).scalar(shape);
  dispatch_rows(launch, executor, kernel, io.gv.rows, io.gv.cols);
  executor.run(launch);
}

void backward_metal(Activation act, const BackwardIO& io) {
  const char* op = op_name(act, true);
  const GluShape shape{metal_extent(io.gv.rows, op, "rows"), metal_extent(io.gv.cols, op, "row length"),
                       metal_extent(io.gv.row_stride, op, "gate row stride"),
                       metal_extent(io.uv.row_stride, op, "up row stride"),
                       metal_extent(io.dyv.row_stride, op, "grad_out row stride"), metal_approximate(act)};
  auto& executor = metal::executor_for(io.gate.device());
  const std::string kernel = std::string(act == Activation::SiLU ? "swiglu_backward_" : "geglu_backward_") +
                             metal_type_name(io.gate.scalar_type());
  metal::Launch launch(kLibrary, kernel);
  launch.buffer(io.grad_out).buffer(io.gate).buffer(io.up).buffer(io.dgate).buffer(io.dup).scalar(shape);
  dispatch_rows(launch, executor, kernel, io.gv.rows, io.gv.cols);
  executor.run(launch);
}

// -------------------------------------------------------- per-device kernels

Tensor forward_any(Activation act, const Tensor& gate, const Tensor& up) {
  Tensor out = at::empty(gate.sizes(), gate.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const auto [g, gv] = as_rows(gate);
  const auto [u, uv] = as_rows(up);
  const ForwardIO io{g, u, out, gv, uv};
  if (gate.is_mps() || metal::metal_emulation_enabled()) {
    forward_metal(act, io);
  } else if (act == Activation::SiLU) {
    forward_cpu<Activation::SiLU>(io);
  } else if (act == Activation::GeluErf) {
    forward_cpu<Activation::GeluErf>(io);
  } else {
    forward_cpu<Activation::GeluTanh>(io);
  }
  return out;
}

std::tuple<Tensor, Tensor> backward_any(Activation act, const Tensor& grad_out, const Tensor& gate,
                                        const Tensor& up) {
  const auto options = gate.options().memory_format(at::MemoryFormat::Contiguous);
  Tensor dgate = at::empty(gate.sizes(), options), dup = at::empty(gate.sizes(), options);
  if (gate.numel() == 0) return {dgate, dup};
  const auto [dy, dyv] = as_rows(grad_out);
  const auto [g, gv] = as_rows(gate);
  const auto [u, uv] = as_rows(up);
  const BackwardIO io{dy, g, u, dgate, dup, dyv, gv, uv};
  if (gate.is_mps() || metal::metal_emulation_enabled()) {
    backward_metal(act, io);
  } else if (act == Activation::SiLU) {
    backward_cpu<Activation::SiLU>(io);
  } else if (act == Activation::GeluErf) {
    backward_cpu<Activation::GeluErf>(io);
  } else {
    backward_cpu<Activation::GeluTanh>(io);
  }
  return {dgate, dup};
}

Tensor swiglu_impl(const Tensor& gate, const Tensor& up) {
  check_inputs(op_name(Activation::SiLU, false), gate, up);
  return forward_any(Activation::SiLU, gate, up);
}

std::tuple<Tensor, Tensor> swiglu_backward_impl(const Tensor& grad_out, const Tensor& gate, const Tensor& up) {
  check_backward_inputs(op_name(Activation::SiLU, true), grad_out, gate, up);
  return backward_any(Activation::SiLU, grad_out, gate, up);
}

Tensor geglu_impl(const Tensor& gate, const Tensor& up, c10::string_view approximate) {
  const Activation act = gelu_kind("my_mps_ops.geglu", approximate);
  check_inputs(op_name(act, false), gate, up);
  return forward_any(act, gate, up);
}

std::tuple<Tensor, Tensor> geglu_backward_impl(const Tensor& grad_out, const Tensor& gate, const Tensor& up,
                                               c10::string_view approximate) {
  const Activation act = gelu_kind("my_mps_ops.geglu_backward", approximate);
  check_backward_inputs(op_name(act, true), grad_out, gate, up);
  return backward_any(act, grad_out, gate, up);
}

// Shapes only; symbolic-size safe.
Tensor swiglu_meta(const Tensor& gate, const Tensor& up) {
  check_inputs(op_name(Activation::SiLU, false), gate, up);
  return at::empty_like(gate, at::MemoryFormat::Contiguous);
}

std::tuple<Tensor, Tensor> swiglu_backward_meta(const Tensor& grad_out, const Tensor& gate, const Tensor& up) {
  check_backward_inputs(op_name(Activation::SiLU, true), grad_out, gate, up);
  return {at::empty_like(gate, at::MemoryFormat::Contiguous), at::empty_like(gate, at::MemoryFormat::Contiguous)};
}

Tensor geglu_meta(const Tensor& gate, const Tensor& up, c10::string_view approximate) {
  check_inputs(op_name(gelu_kind("my_mps_ops.geglu", approximate), false), gate, up);
  return at::empty_like(gate, at::MemoryFormat::Contiguous);
}

std::tuple<Tensor, Tensor> geglu_backward_meta(const Tensor& grad_out, const Tensor& gate, const Tensor& up,
                                               c10::string_view approximate) {
  check_backward_inputs(op_name(gelu_kind("my_mps_ops.geglu_backward", approximate), true), grad_out, gate, up);
  return {at::empty_like(gate, at::MemoryFormat::Contiguous), at::empty_like(gate, at::MemoryFormat::Contiguous)};
}

// ------------------------------------------------------------------ autograd

class SwiGLUFunction : public torch::autograd::Function<SwiGLUFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& gate, const Tensor& up) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("my_mps_ops::swiglu", "")
                         .typed<Tensor(const Tensor&, const Tensor&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({gate, up});
    return op.call(gate, up);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("my_mps_ops::swiglu_backward", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&)>();
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return {Tensor(), Tensor()};
    auto [dgate, dup] = op.call(grads[0], saved[0], saved[1]);
    return {ctx->needs_input_grad(0) ? dgate : Tensor(), ctx->needs_input_grad(1) ? dup : Tensor()};
  }
};

class GeGLUFunction : public torch::autograd::Function<GeGLUFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& gate, const Tensor& up,
                        c10::string_view approximate) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("my_mps_ops::geglu", "")
                         .typed<Tensor(const Tensor&, const Tensor&, c10::string_view)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({gate, up});
    ctx->saved_data["approximate"] = std::string(approximate);
    return op.call(gate, up, approximate);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("my_mps_ops::geglu_backward", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                           c10::string_view)>();
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor()};
    const std::string approximate = ctx->saved_data["approximate"].toStringRef();
    auto [dgate, dup] = op.call(grads[0], saved[0], saved[1], approximate);
    return {ctx->needs_input_grad(0) ? dgate : Tensor(), ctx->needs_input_grad(1) ? dup : Tensor(), Tensor()};
  }
};

Tensor swiglu_autograd(const Tensor& gate, const Tensor& up) { return SwiGLUFunction::apply(gate, up); }
Tensor geglu_autograd(const Tensor& gate, const Tensor& up, c10::string_view approximate) {
  return GeGLUFunction::apply(gate, up, approximate);
}

}  // namespace

TORCH_LIBRARY_IMPL(my_mps_ops, CPU, m) {
  m.impl("swiglu", &swiglu_impl);
  m.impl("swiglu_backward", &swiglu_backward_impl);
  m.impl("geglu", &geglu_impl);
  m.impl("geglu_backward", &geglu_backward_impl);
}

TORCH_LIBRARY_IMPL(my_mps_ops, MPS, m) {
  m.impl("swiglu", &swiglu_impl);
  m.impl("swiglu_backward", &swiglu_backward_impl);
  m.impl("geglu", &geglu_impl);
  m.impl("geglu_backward", &geglu_backward_impl);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Meta, m) {
  m.impl("swiglu", &swiglu_meta);
  m.impl("swiglu_backward", &swiglu_backward_meta);
  m.impl("geglu", &geglu_meta);
  m.impl("geglu_backward", &geglu_backward_meta);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Autograd, m) {
  m.impl("swiglu", &swiglu_autograd);
  m.impl("geglu", &geglu_autograd);
  m.impl("swiglu_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("geglu_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace my_mps_ops
