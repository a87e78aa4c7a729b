// Cross-entropy of logits [N, V] against integer targets [N], matching
// torch.nn.functional.cross_entropy (ignore_index, label_smoothing,
// reduction "mean" | "sum" | "none").
//
// The forward reads each row once (blocks of the row are reduced while in
// cache, with a running log-sum-exp) and keeps only the per-row lse [N] for
// the backward, which writes grad_logits in the logits' dtype directly: no
// [N, V] float32 intermediate (F.cross_entropy keeps log_softmax's [N, V]).
#include "metal/launch.h"
#include "op_common.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>

namespace my_mps_ops {
namespace {

using at::Tensor;
constexpr const char* kOp = "my_mps_ops.cross_entropy";
constexpr const char* kBackwardOp = "my_mps_ops.cross_entropy_backward";

enum class Reduction { None, Mean, Sum };

Reduction parse_reduction(const char* op, c10::string_view r) {
  if (r == "mean") return Reduction::Mean;
  if (r == "sum") return Reduction::Sum;
  if (r == "none") return Reduction::None;
  TORCH_CHECK(false, op, ": reduction must be \"mean\", \"sum\" or \"none\", got \"", r, "\"");
}

void check_inputs(const char* op, const Tensor& logits, const Tensor& target, double label_smoothing) {
  check_float_dtype(logits, op, "logits");
  TORCH_CHECK(logits.dim() == 2, op, ": logits must have shape [N, V], got ", logits.sym_sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64 class indices, got ",
              target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.sym_size(0) == logits.sym_size(0), op, ": target must have shape [N] = [",
              logits.sym_size(0), "], got ", target.sym_sizes());
  check_same_device(target, logits, op, "target", "logits");
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
}

// float32 statistics, float64 for float64 logits (gradcheck).
at::ScalarType stats_dtype(const Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Per-row factor of the gradient: grad_loss for "none", broadcast for "sum",
// divided by the number of counted rows for "mean". ATen ops, no host sync.
Tensor row_scale(const Tensor& grad_loss, const Tensor& target, int64_t ignore_index, Reduction reduction,
                 at::ScalarType dtype) {
  const int64_t n = target.size(0);
  Tensor g = grad_loss.to(dtype);
  if (reduction == Reduction::None) return g.contiguous();
  if (reduction == Reduction::Mean) g = g.div(target.ne(ignore_index).sum().to(dtype));
  return g.reshape({1}).expand({n}).contiguous();
}

Tensor reduce_rows(const Tensor& losses, const Tensor& target, int64_t ignore_index, Reduction reduction,
                   at::ScalarType dtype) {
  if (reduction == Reduction::None) return losses.to(dtype);
  Tensor total = losses.sum();
  if (reduction == Reduction::Mean) total = total.div(target.ne(ignore_index).sum().to(losses.scalar_type()));
  return total.to(dtype);
}

// ---------------------------------------------------------------- CPU kernels

constexpr int64_t kBlock = 512;

// Max and sum of one in-cache block, then the sum of exp(x - m) over it.
// float32 blocks go through eight-lane vectors (lane arrays with a max do not
// auto-vectorise); float64 (gradcheck) stays scalar.
// float32 blocks on vectors V (cpu::f32x8 in the AVX2 copies, cpu::f32x4 in
// the baseline ones), two accumulators each.
template <typename V>
__attribute__((always_inline)) inline void block_max_sum(const float* x, int64_t len, float& max_out,
                                                         float& sum_out) {
  constexpr int64_t L = cpu::kLanes<V>;
  V m0 = cpu::splatv<V>(-std::numeric_limits<float>::infinity()), m1 = m0, s0 = {}, s1 = {};
  int64_t i = 0;
  for (; i + 2 * L <= len; i += 2 * L) {
    const V a = cpu::loadv<V>(x + i), b = cpu::loadv<V>(x + i + L);
    m0 = cpu::maxv(m0, a), m1 = cpu::maxv(m1, b);
    s0 += a, s1 += b;
  }
  float m = cpu::reduce_maxv(cpu::maxv(m0, m1)), sum = cpu::reduce_sumv(s0 + s1);
  for (; i < len; ++i) m = std::max(m, x[i]), sum += x[i];
  max_out = m, sum_out = sum;
}
template <typename V>
__attribute__((always_inline)) inline void block_max_sum(const double* x, int64_t len, double& max_out,
                                                         double& sum_out) {
  double m = -std::numeric_limits<double>::infinity(), sum = 0;
  for (int64_t i = 0; i < len; ++i) m = std::max(m, x[i]), sum += x[i];
  max_out = m, sum_out = sum;
}
template <typename V>
__attribute__((always_inline)) inline float block_exp_sum(const float* x, int64_t len, float m) {
  constexpr int64_t L = cpu::kLanes<V>;
  const V mv = cpu::splatv<V>(m);
  V e0 = {}, e1 = {};
  int64_t i = 0;
  for (; i + 2 * L <= len; i += 2 * L) {
    e0 += cpu::exp_poly(cpu::loadv<V>(x + i) - mv);
    e1 += cpu::exp_poly(cpu::loadv<V>(x + i + L) - mv);
  }
  float sum = cpu::reduce_sumv(e0 + e1);
  for (; i < len; ++i) sum += cpu::exp_f32(x[i] - m);
  return sum;
}
template <typename V>
__attribute__((always_inline)) inline double block_exp_sum(const double* x, int64_t len, double m) {
  double sum = 0;
  for (int64_t i = 0; i < len; ++i) sum += std::exp(x[i] - m);
  return sum;
}

// Online log-sum-exp over one row, a block at a time (each block is read from
// memory once, then reduced in cache). Returns (lse, sum of z).
template <typename T, typename V = cpu::f32x4>
__attribute__((always_inline)) inline std::pair<cpu::acc_t<T>, cpu::acc_t<T>> row_lse(const T* z, int64_t v) {
  using Acc = cpu::acc_t<T>;
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  Acc staged[kBlock];
  Acc m = kNegInf, s = 0, sum_z = 0;
  for (int64_t b = 0; b < v; b += kBlock) {
    const int64_t len = std::min(kBlock, v - b);
    // Narrow types are widened into a staging block; wide ones are read in
    // place (a copy here would compile to rep movs and cost more than the math).
    const Acc* block = staged;
    if constexpr (std::is_same_v<T, Acc>) {
      block = z + b;
    } else {
      cpu::widen(z + b, staged, len);
    }
    Acc block_max, block_sum;
    block_max_sum<V>(block, len, block_max, block_sum);
    sum_z += block_sum;
    const Acc new_m = std::max(m, block_max);
    if (new_m == kNegInf) continue;
    const Acc bs = block_exp_sum<V>(block, len, new_m);
    s = (m == kNegInf ? Acc(0) : s * std::exp(m - new_m)) + bs;
    m = new_m;
  }
  return {m + std::log(s), sum_z};
}

#ifdef MY_MPS_OPS_X86_AVX2_COPIES
template <typename T>
__attribute__((target("avx2,fma"))) std::pair<cpu::acc_t<T>, cpu::acc_t<T>> row_lse_avx2(const T* z, int64_t v) {
  return row_lse<T, cpu::f32x8>(z, v);
}
#endif

template <typename T>
void forward_cpu_kernel(const T* logits, const int64_t* target, cpu::acc_t<T>* loss, cpu::acc_t<T>* lse_out,
                        int64_t rows, int64_t v, int64_t ignore_index, float smoothing,
                        std::atomic<int64_t>& bad_row) {
  using Acc = cpu::acc_t<T>;
  at::parallel_for(0, rows, cpu::row_grain(v), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* z = logits + r * v;
#ifdef MY_MPS_OPS_X86_AVX2_COPIES
      const auto [lse, sum_z] = cpu::has_avx2_fma() ? row_lse_avx2<T>(z, v) : row_lse<T>(z, v);
#else
      const auto [lse, sum_z] = row_lse<T>(z, v);
#endif
      lse_out[r] = lse;
      const int64_t t = target[r];
      if (t == ignore_index) {
        loss[r] = Acc(0);
      } else if (t < 0 || t >= v) {
        bad_row.store(r);
        loss[r] = std::numeric_limits<Acc>::quiet_NaN();
      } else {
        loss[r] = lse - (Acc(1) - smoothing) * static_cast<Acc>(z[t]) - Acc(smoothing) * sum_z / static_cast<Acc>(v);
      }
    }
  });
}

template <typename T, bool kStream = false, typename V = cpu::f32x4>
__attribute__((always_inline)) inline void backward_rows(const T* logits, const int64_t* target,
                                                         const cpu::acc_t<T>* lse, const cpu::acc_t<T>* scale,
                                                         T* grad, int64_t begin, int64_t end, int64_t v,
                                                         int64_t ignore_index, float smoothing) {
  using Acc = cpu::acc_t<T>;
  {
    Acc block[kBlock];
    for (int64_t r = begin; r < end; ++r) {
      const T* z = logits + r * v;
      T* gr = grad + r * v;
      const int64_t t = target[r];
      if (t == ignore_index) {
        for (int64_t i = 0; i < v; ++i) gr[i] = T(0);
        continue;
      }
      const Acc g = scale[r], row_lse = lse[r], uniform = Acc(smoothing) / static_cast<Acc>(v);
      if constexpr (std::is_same_v<T, Acc> && std::is_same_v<Acc, float>) {
        // float32: one loop straight from the logits to the gradient.
        constexpr int64_t L = cpu::kLanes<V>;
        const V lse_v = cpu::splatv<V>(row_lse);
        int64_t i = 0;
        if constexpr (kStream) {  // large outputs: streaming stores from the first aligned element
          for (const int64_t head = std::min(v, cpu::floats_to_align(gr, sizeof(V))); i < head; ++i)
            gr[i] = g * (cpu::exp_f32(z[i] - row_lse) - uniform);
          for (; i + L <= v; i += L) cpu::streamv(gr + i, g * (cpu::exp_poly(cpu::loadv<V>(z + i) - lse_v) - uniform));
        }
        for (; i + L <= v; i += L) cpu::storev(gr + i, g * (cpu::exp_poly(cpu::loadv<V>(z + i) - lse_v) - uniform));
        for (; i < v; ++i) gr[i] = g * (cpu::exp_f32(z[i] - row_lse) - uniform);
        if (t >= 0 && t < v) gr[t] -= g * (Acc(1) - smoothing);
        continue;
      }
      for (int64_t b = 0; b < v; b += kBlock) {
        const int64_t len = std::min(kBlock, v - b);
        if constexpr (std::is_same_v<Acc, float>) {  // float16 / bfloat16 through a float32 block
          cpu::widen(z + b, block, len);
          constexpr int64_t L = cpu::kLanes<V>;
          const V lse_v = cpu::splatv<V>(row_lse);
          int64_t i = 0;
          for (; i + L <= len; i += L)
            cpu::storev(block + i, g * (cpu::exp_poly(cpu::loadv<V>(block + i) - lse_v) - uniform));
          for (; i < len; ++i) block[i] = g * (cpu::exp_f32(block[i] - row_lse) - uniform);
          if (t >= b && t < b + len) block[t - b] -= g * (Acc(1) - smoothing);
          cpu::narrow(block, gr + b, len);
        } else {
          for (int64_t i = 0; i < len; ++i) block[i] = g * (std::exp(static_cast<Acc>(z[b + i]) - row_lse) - uniform);
          if (t >= b && t < b + len) block[t - b] -= g * (Acc(1) - smoothing);
          for (int64_t i = 0; i < len; ++i) gr[b + i] = static_cast<T>(block[i]);
        }
      }
    }
  }
}

#ifdef MY_MPS_OPS_X86_AVX2_COPIES
template <typename T>
__attribute__((target("avx2,fma"))) void backward_rows_avx2(const T* logits, const int64_t* target,
                                                            const cpu::acc_t<T>* lse, const cpu::acc_t<T>* scale,
                                                            T* grad, int64_t begin, int64_t end, int64_t v,
                                                            int64_t ignore_index, float smoothing) {
  if (int64_t(sizeof(T)) * v * (end - begin) >= cpu::kStreamMinBytes) {
    backward_rows<T, true, cpu::f32x8>(logits, target, lse, scale, grad, begin, end, v, ignore_index, smoothing);
    return cpu::stream_fence();
  }
  backward_rows<T, false, cpu::f32x8>(logits, target, lse, scale, grad, begin, end, v, ignore_index, smoothing);
}
#endif

template <typename T>
void backward_cpu_kernel(const T* logits, const int64_t* target, const cpu::acc_t<T>* lse,
                         const cpu::acc_t<T>* scale, T* grad, int64_t rows, int64_t v, int64_t ignore_index,
                         float smoothing) {
  at::parallel_for(0, rows, cpu::row_grain(v), [&](int64_t begin, int64_t end) {
#ifdef MY_MPS_OPS_X86_AVX2_COPIES
    if (cpu::has_avx2_fma())
      return backward_rows_avx2<T>(logits, target, lse, scale, grad, begin, end, v, ignore_index, smoothing);
#endif
    backward_rows<T>(logits, target, lse, scale, grad, begin, end, v, ignore_index, smoothing);
  });
}

// ------------------------------------------------------------ Metal path

constexpr const char* kLibrary = "cross_entropy";
constexpr int64_t kReadsPerThread = 4;

std::tuple<Tensor, Tensor> forward_metal(const Tensor& logits_in, const Tensor& target_in, int64_t ignore_index,
                                         double smoothing, Reduction reduction) {
  const Tensor logits = logits_in.contiguous(), target = target_in.contiguous();
  const int64_t rows = logits.size(0), v = logits.size(1);
  Tensor losses = at::empty({rows}, logits.options().dtype(at::kFloat));
  Tensor lse = at::empty({rows}, logits.options().dtype(at::kFloat));
  if (rows > 0 && v > 0) {
    TORCH_CHECK(v <= UINT32_MAX, kOp, ": too many classes for the Metal kernel: ", v);
    auto& executor = metal::executor_for(logits.device());
    const std::string kernel = std::string("cross_entropy_forward_") + metal_type_name(logits.scalar_type());
    const metal::PipelineInfo info = executor.pipeline_info(kLibrary, kernel);
    const uint32_t threads =
        row_threadgroup_size(v, kReadsPerThread, info.max_threads_per_threadgroup, info.thread_execution_width);
    metal::Launch launch(kLibrary, kernel);
    launch.buffer(logits).buffer(target).buffer(losses).buffer(lse)
        .scalar<uint32_t>(static_cast<uint32_t>(v))
        .scalar<int64_t>(ignore_index)
        .scalar<float>(static_cast<float>(smoothing))
        .dispatch_threadgroups({uint64_t(rows), 1, 1}, {threads, 1, 1});
    executor.run(launch);
  } else if (rows > 0) {
    losses.fill_(std::numeric_limits<float>::quiet_NaN());
    lse.fill_(-std::numeric_limits<float>::infinity());
  }
  return {reduce_rows(losses, target, ignore_index, reduction, logits.scalar_type()), lse};
}

Tensor backward_metal(const Tensor& grad_loss, const Tensor& logits_in, const Tensor& target_in, const Tensor& lse,
                      int64_t ignore_index, double smoothing, Reduction reduction) {
  const Tensor logits = logits_in.contiguous(), target = target_in.contiguous();
  Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  const int64_t rows = logits.size(0), v = logits.size(1);
  if (rows == 0 || v == 0) return grad;
  const Tensor scale = row_scale(grad_loss, target, ignore_index, reduction, at::kFloat);
  auto& executor = metal::executor_for(logits.device());
  const std::string kernel = std::string("cross_entropy_backward_") + metal_type_name(logits.scalar_type());
  const metal::PipelineInfo info = executor.pipeline_info(kLibrary, kernel);
  const uint32_t threads =
      row_threadgroup_size(v, kReadsPerThread, info.max_threads_per_threadgroup, info.thread_execution_width);
  metal::Launch launch(kLibrary, kernel);
  launch.buffer(logits).buffer(target).buffer(lse.contiguous()).buffer(scale).buffer(grad)
      .scalar<uint32_t>(static_cast<uint32_t>(v))
      .scalar<int64_t>(ignore_index)
      .scalar<float>(static_cast<float>(smoothing))
      .dispatch_threadgroups({uint64_t(rows), 1, 1}, {threads, 1, 1});
  executor.run(launch);
  return grad;
}

// -------------------------------------------------------- per-device kernels

std::tuple<Tensor, Tensor> cross_entropy_cpu(const Tensor& logits_in, const Tensor& target_in, int64_t ignore_index,
                                             double smoothing, c10::string_view reduction_name) {
  const Reduction reduction = parse_reduction(kOp, reduction_name);
  check_inputs(kOp, logits_in, target_in, smoothing);
  if (metal::metal_emulation_enabled()) return forward_metal(logits_in, target_in, ignore_index, smoothing, reduction);
  const Tensor logits = logits_in.contiguous(), target = target_in.contiguous();
  const int64_t rows = logits.size(0), v = logits.size(1);
  Tensor losses = at::empty({rows}, logits.options().dtype(stats_dtype(logits)));
  Tensor lse = at::empty({rows}, logits.options().dtype(stats_dtype(logits)));
  TORCH_CHECK(v > 0 || rows == 0, kOp, ": logits must have at least one class");
  std::atomic<int64_t> bad_row{-1};
  if (rows > 0) {
    MY_MPS_OPS_DISPATCH_CPU_TYPES(logits.scalar_type(), "cross_entropy_cpu", [&] {
      using Acc = cpu::acc_t<scalar_t>;
      forward_cpu_kernel<scalar_t>(logits.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(),
                                   losses.mutable_data_ptr<Acc>(), lse.mutable_data_ptr<Acc>(), rows, v,
                                   ignore_index, static_cast<float>(smoothing), bad_row);
    });
  }
  const int64_t bad = bad_row.load();
  TORCH_CHECK(bad < 0, kOp, ": target[", bad, "] = ", bad >= 0 ? target.const_data_ptr<int64_t>()[bad] : 0,
              " is out of range for ", v, " classes (and is not ignore_index ", ignore_index, ")");
  return {reduce_rows(losses, target, ignore_index, reduction, logits.scalar_type()), lse};
}

Tensor cross_entropy_backward_cpu(const Tensor& grad_loss, const Tensor& logits_in, const Tensor& target_in,
                                  const Tensor& lse, int64_t ignore_index, double smoothing,
                                  c10::string_view reduction_name) {
  const Reduction reduction = parse_reduction(kBackwardOp, reduction_name);
  check_inputs(kBackwardOp, logits_in, target_in, smoothing);
  if (metal::metal_emulation_enabled())
    return backward_metal(grad_loss, logits_in, target_in, lse, ignore_index, smoothing, reduction);
  const Tensor logits = logits_in.contiguous(), target = target_in.contiguous();
  Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  const int64_t rows = logits.size(0), v = logits.size(1);
  if (rows == 0 || v == 0) return grad;
  const Tensor scale = row_scale(grad_loss, target, ignore_index, reduction, stats_dtype(logits));
  const Tensor lse_c = lse.to(stats_dtype(logits)).contiguous();
  MY_MPS_OPS_DISPATCH_CPU_TYPES(logits.scalar_type(), "cross_entropy_backward_cpu", [&] {
    using Acc = cpu::acc_t<scalar_t>;
    backward_cpu_kernel<scalar_t>(logits.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(),
                                  lse_c.const_data_ptr<Acc>(), scale.const_data_ptr<Acc>(),
                                  grad.mutable_data_ptr<scalar_t>(), rows, v, ignore_index,
                                  static_cast<float>(smoothing));
  });
  return grad;
}

std::tuple<Tensor, Tensor> cross_entropy_mps(const Tensor& logits, const Tensor& target, int64_t ignore_index,
                                             double smoothing, c10::string_view reduction) {
  check_inputs(kOp, logits, target, smoothing);
  return forward_metal(logits, target, ignore_index, smoothing, parse_reduction(kOp, reduction));
}

Tensor cross_entropy_backward_mps(const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
                                  const Tensor& lse, int64_t ignore_index, double smoothing,
                                  c10::string_view reduction) {
  check_inputs(kBackwardOp, logits, target, smoothing);
  return backward_metal(grad_loss, logits, target, lse, ignore_index, smoothing,
                        parse_reduction(kBackwardOp, reduction));
}

std::tuple<Tensor, Tensor> cross_entropy_meta(const Tensor& logits, const Tensor& target, int64_t ignore_index,
                                              double smoothing, c10::string_view reduction_name) {
  const Reduction reduction = parse_reduction(kOp, reduction_name);
  check_inputs(kOp, logits, target, smoothing);
  Tensor loss = reduction == Reduction::None ? at::empty_symint({logits.sym_size(0)}, logits.options())
                                             : at::empty({}, logits.options());
  return {loss, at::empty_symint({logits.sym_size(0)}, logits.options().dtype(stats_dtype(logits)))};
}

Tensor cross_entropy_backward_meta(const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
                                   const Tensor& lse, int64_t ignore_index, double smoothing,
                                   c10::string_view reduction) {
  parse_reduction(kBackwardOp, reduction);
  check_inputs(kBackwardOp, logits, target, smoothing);
  return at::empty_like(logits, at::MemoryFormat::Contiguous);
}

// ------------------------------------------------------------------ autograd

class CrossEntropyFunction : public torch::autograd::Function<CrossEntropyFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& logits,
                                                const Tensor& target, int64_t ignore_index, double smoothing,
                                                c10::string_view reduction) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("my_mps_ops::cross_entropy", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, int64_t, double,
                                                           c10::string_view)>();
    Tensor loss, lse;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(loss, lse) = op.call(logits, target, ignore_index, smoothing, reduction);
    }
    ctx->save_for_backward({logits, target, lse});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["smoothing"] = smoothing;
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->mark_non_differentiable({lse});
    return {loss, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("my_mps_ops::cross_entropy_backward", "")
                         .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, double,
                                       c10::string_view)>();
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    const std::string reduction = ctx->saved_data["reduction"].toStringRef();
    Tensor grad = op.call(grads[0], saved[0], saved[1], saved[2], ctx->saved_data["ignore_index"].toInt(),
                          ctx->saved_data["smoothing"].toDouble(), reduction);
    return {grad, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> cross_entropy_autograd(const Tensor& logits, const Tensor& target, int64_t ignore_index,
                                                  double smoothing, c10::string_view reduction) {
  auto outs = CrossEntropyFunction::apply(logits, target, ignore_index, smoothing, reduction);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(my_mps_ops, CPU, m) {
  m.impl("cross_entropy", &cross_entropy_cpu);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cpu);
}

TORCH_LIBRARY_IMPL(my_mps_ops, MPS, m) {
  m.impl("cross_entropy", &cross_entropy_mps);
  m.impl("cross_entropy_backward", &cross_entropy_backward_mps);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Meta, m) {
  m.impl("cross_entropy", &cross_entropy_meta);
  m.impl("cross_entropy_backward", &cross_entropy_backward_meta);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Autograd, m) {
  m.impl("cross_entropy", &cross_entropy_autograd);
  m.impl("cross_entropy_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace my_mps_ops
