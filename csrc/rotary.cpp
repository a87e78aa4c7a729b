// Rotary position embedding (RoPE): rotary_embedding(x, cos, sin,
// interleaved, seq_dim) and rotary_embedding_qk for q and k in one launch.
//
// x is 4-D: (batch, seq, heads, head_dim) with seq_dim=1, or (batch, heads,
// seq, head_dim) with seq_dim=2. cos/sin are [seq, half] (shared by the batch)
// or [batch, seq, half], any float dtype (used as float32); the first 2*half
// elements of each head rotate (NeoX half-split pairs (i, i+half), or GPT-J
// interleaved pairs (2i, 2i+1)), the rest pass through. The backward is the
// rotation transposed: the same kernel with -sin. cos and sin get no gradient.
#include "metal/launch.h"
#include "op_common.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

namespace my_mps_ops {
namespace {

using at::Tensor;
constexpr const char* kOp = "my_mps_ops.rotary_embedding";

// Mirrors RotaryShape in shaders/rotary.metal (bound as bytes).
struct RotaryShape {
  uint32_t batch, seq, heads, head_dim, half;
  uint32_t cos_batch_stride;
  uint32_t seq_dim;
  uint32_t interleaved;
  uint32_t conj;
};

RotaryShape check_and_shape(const char* op, const char* name, const Tensor& x, const Tensor& cos, const Tensor& sin,
                            bool interleaved, int64_t seq_dim, bool conj) {
  check_float_dtype(x, op, name);
  TORCH_CHECK(x.dim() == 4, op, ": ", name, " must be 4-D (batch, seq, heads, head_dim) or (batch, heads, seq, "
              "head_dim), got ", x.sizes());
  TORCH_CHECK(seq_dim == 1 || seq_dim == 2, op, ": seq_dim must be 1 (batch, seq, heads, dim) or 2 (batch, heads, "
              "seq, dim), got ", seq_dim);
  check_same_device(cos, x, op, "cos", name);
  check_same_device(sin, x, op, "sin", name);
  TORCH_CHECK(cos.is_floating_point() && sin.is_floating_point(), op, ": cos and sin must be floating point");
  TORCH_CHECK(cos.sizes() == sin.sizes(), op, ": cos and sin must have the same shape, got ", cos.sizes(), " and ",
              sin.sizes());
  const int64_t batch = x.size(0), seq = x.size(seq_dim), heads = x.size(seq_dim == 1 ? 2 : 1),
                head_dim = x.size(3);
  TORCH_CHECK((cos.dim() == 2 && cos.size(0) == seq) || (cos.dim() == 3 && cos.size(0) == batch && cos.size(1) == seq),
              op, ": cos must be [seq, rotary_dim / 2] = [", seq, ", *] or [batch, seq, rotary_dim / 2], got ",
              cos.sizes());
  const int64_t half = cos.size(-1);
  TORCH_CHECK(2 * half <= head_dim, op, ": rotary dim 2 * cos.size(-1) = ", 2 * half, " exceeds head_dim ",
              head_dim);
  TORCH_CHECK(x.numel() <= UINT32_MAX, op, ": ", name, " is too large");
  return RotaryShape{uint32_t(batch), uint32_t(seq), uint32_t(heads), uint32_t(head_dim), uint32_t(half),
                     uint32_t(cos.dim() == 3 ? seq * half : 0), uint32_t(seq_dim), uint32_t(interleaved),
                     uint32_t(conj)};
}

// ---------------------------------------------------------------- CPU kernel

// One row of head_dim elements in the accumulation type S.
template <typename S>
__attribute__((always_inline)) inline void rotate_row(const S* xr, S* yr, const float* c, const float* sn,
                                                      const RotaryShape& p) {
  const S sign = p.conj ? S(-1) : S(1);
  if (p.interleaved) {
    for (uint32_t i = 0; i < p.half; ++i) {
      const S x0 = xr[2 * i], x1 = xr[2 * i + 1], cv = c[i], sv = sign * sn[i];
      yr[2 * i] = x0 * cv - x1 * sv;
      yr[2 * i + 1] = x1 * cv + x0 * sv;
    }
  } else {
    for (uint32_t i = 0; i < p.half; ++i) {  // contiguous halves: vectorises
      const S x0 = xr[i], x1 = xr[i + p.half], cv = c[i], sv = sign * sn[i];
      yr[i] = x0 * cv - x1 * sv;
      yr[i + p.half] = x1 * cv + x0 * sv;
    }
  }
  for (uint32_t i = 2 * p.half; i < p.head_dim; ++i) yr[i] = xr[i];
}

// Rows [begin, end); float16/bfloat16 rows are widened into `row` (2 *
// head_dim floats) and narrowed back. always_inline: the body takes the
// instruction set of the function it is inlined into (the AVX2 copy below, or
// the portable one).
template <typename T>
__attribute__((always_inline)) inline void rotate_rows(const T* x, T* out, const float* cos_t, const float* sin_t,
                                                       const RotaryShape& p, int64_t begin, int64_t end, float* row) {
  for (int64_t r = begin; r < end; ++r) {
    int64_t b, s;
    if (p.seq_dim == 1) {
      s = (r / p.heads) % p.seq;
      b = r / (int64_t(p.heads) * p.seq);
    } else {
      s = r % p.seq;
      b = r / (int64_t(p.seq) * p.heads);
    }
    const float* c = cos_t + b * p.cos_batch_stride + s * p.half;
    const float* sn = sin_t + b * p.cos_batch_stride + s * p.half;
    const T* xr = x + r * p.head_dim;
    T* yr = out + r * p.head_dim;
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      rotate_row<T>(xr, yr, c, sn, p);
    } else {
      cpu::widen(xr, row, p.head_dim);
      rotate_row<float>(row, row + p.head_dim, c, sn, p);
      cpu::narrow(row + p.head_dim, yr, p.head_dim);
    }
  }
}

#ifdef MY_MPS_OPS_X86_AVX2_COPIES
template <typename T>
__attribute__((target("avx2,fma"))) void rotate_rows_avx2(const T* x, T* out, const float* cos_t, const float* sin_t,
                                                          const RotaryShape& p, int64_t begin, int64_t end,
                                                          float* row) {
  rotate_rows<T>(x, out, cos_t, sin_t, p, begin, end, row);
}
#endif

template <typename T>
void rotate_cpu(const T* x, T* out, const float* cos_t, const float* sin_t, const RotaryShape& p) {
  const int64_t rows = int64_t(p.batch) * p.seq * p.heads;
  at::parallel_for(0, rows, cpu::row_grain(p.head_dim), [&](int64_t begin, int64_t end) {
    std::vector<float> row(std::is_same_v<T, float> || std::is_same_v<T, double> ? 0 : 2 * p.head_dim);
#ifdef MY_MPS_OPS_X86_AVX2_COPIES
    if (cpu::has_avx2_fma()) return rotate_rows_avx2<T>(x, out, cos_t, sin_t, p, begin, end, row.data());
#endif
    rotate_rows<T>(x, out, cos_t, sin_t, p, begin, end, row.data());
  });
}

Tensor as_float_table(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

// ------------------------------------------------------------ Metal path

constexpr const char* kLibrary = "rotary";

std::array<uint64_t, 3> group_for(metal::Executor& executor, const std::string& kernel, uint64_t rows) {
  const metal::PipelineInfo info = executor.pipeline_info(kLibrary, kernel);
  return {std::min<uint64_t>({uint64_t(info.max_threads_per_threadgroup), 256, rows}), 1, 1};
}

Tensor rotate(const Tensor& x_in, const Tensor& cos, const Tensor& sin, bool interleaved, int64_t seq_dim, bool conj,
              const char* op) {
  const RotaryShape shape = check_and_shape(op, "x", x_in, cos, sin, interleaved, seq_dim, conj);
  const Tensor x = x_in.contiguous(), c = as_float_table(cos), s = as_float_table(sin);
  Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const uint64_t rows = uint64_t(shape.batch) * shape.seq * shape.heads;
  if (rows == 0 || shape.head_dim == 0) return out;
  if (x.is_mps() || metal::metal_emulation_enabled()) {
    auto& executor = metal::executor_for(x.device());
    const std::string kernel = std::string("rotary_") + metal_type_name(x.scalar_type());
    metal::Launch launch(kLibrary, kernel);
    launch.buffer(x).buffer(out).buffer(c).buffer(s).scalar(shape)
        .dispatch_threads({rows, 1, 1}, group_for(executor, kernel, rows));
    executor.run(launch);
    return out;
  }
  MY_MPS_OPS_DISPATCH_CPU_TYPES(x.scalar_type(), "rotary_cpu", [&] {
    rotate_cpu<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), c.const_data_ptr<float>(),
                         s.const_data_ptr<float>(), shape);
  });
  return out;
}

std::tuple<Tensor, Tensor> rotate_qk(const Tensor& q_in, const Tensor& k_in, const Tensor& cos, const Tensor& sin,
                                     bool interleaved, int64_t seq_dim, bool conj, const char* op) {
  const RotaryShape pq = check_and_shape(op, "q", q_in, cos, sin, interleaved, seq_dim, conj);
  const RotaryShape pk = check_and_shape(op, "k", k_in, cos, sin, interleaved, seq_dim, conj);
  check_same_dtype(k_in, q_in, op, "k", "q");
  TORCH_CHECK(pk.batch == pq.batch && pk.seq == pq.seq && pk.head_dim == pq.head_dim, op,
              ": k must match q in batch, seq and head_dim (heads may differ), got ", k_in.sizes(), " and ",
              q_in.sizes());
  if (!(q_in.is_mps() || metal::metal_emulation_enabled()))
    return {rotate(q_in, cos, sin, interleaved, seq_dim, conj, op), rotate(k_in, cos, sin, interleaved, seq_dim, conj, op)};
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), c = as_float_table(cos), s = as_float_table(sin);
  Tensor q_out = at::empty_like(q, at::MemoryFormat::Contiguous), k_out = at::empty_like(k, at::MemoryFormat::Contiguous);
  const uint64_t q_rows = uint64_t(pq.batch) * pq.seq * pq.heads, k_rows = uint64_t(pk.batch) * pk.seq * pk.heads;
  if (q_rows + k_rows == 0 || pq.head_dim == 0) return {q_out, k_out};
  auto& executor = metal::executor_for(q.device());
  const std::string kernel = std::string("rotary_qk_") + metal_type_name(q.scalar_type());
  metal::Launch launch(kLibrary, kernel);
  launch.buffer(q).buffer(q_out).buffer(k).buffer(k_out).buffer(c).buffer(s).scalar(pq).scalar(pk)
      .scalar<uint32_t>(static_cast<uint32_t>(q_rows))
      .dispatch_threads({q_rows + k_rows, 1, 1}, group_for(executor, kernel, q_rows + k_rows));
  executor.run(launch);
  return {q_out, k_out};
}

// -------------------------------------------------------- per-device kernels

Tensor rotary_impl(const Tensor& x, const Tensor& cos, const Tensor& sin, bool interleaved, int64_t seq_dim) {
  return rotate(x, cos, sin, interleaved, seq_dim, false, kOp);
}
Tensor rotary_backward_impl(const Tensor& grad, const Tensor& cos, const Tensor& sin, bool interleaved,
                            int64_t seq_dim) {
  return rotate(grad, cos, sin, interleaved, seq_dim, true, "my_mps_ops.rotary_embedding_backward");
}
std::tuple<Tensor, Tensor> rotary_qk_impl(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                          bool interleaved, int64_t seq_dim) {
  return rotate_qk(q, k, cos, sin, interleaved, seq_dim, false, "my_mps_ops.rotary_embedding_qk");
}
std::tuple<Tensor, Tensor> rotary_qk_backward_impl(const Tensor& gq, const Tensor& gk, const Tensor& cos,
                                                   const Tensor& sin, bool interleaved, int64_t seq_dim) {
  return rotate_qk(gq, gk, cos, sin, interleaved, seq_dim, true, "my_mps_ops.rotary_embedding_qk_backward");
}

Tensor rotary_meta(const Tensor& x, const Tensor& cos, const Tensor& sin, bool interleaved, int64_t seq_dim) {
  TORCH_CHECK(x.dim() == 4, kOp, ": x must be 4-D, got ", x.sym_sizes());
  check_float_dtype(x, kOp, "x");
  return at::empty_like(x, at::MemoryFormat::Contiguous);
}
std::tuple<Tensor, Tensor> rotary_qk_meta(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                          bool interleaved, int64_t seq_dim) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "my_mps_ops.rotary_embedding_qk: q and k must be 4-D");
  return {at::empty_like(q, at::MemoryFormat::Contiguous), at::empty_like(k, at::MemoryFormat::Contiguous)};
}

// ------------------------------------------------------------------ autograd

void check_no_table_grad(const Tensor& cos, const Tensor& sin) {
  TORCH_CHECK(!cos.requires_grad() && !sin.requires_grad(), kOp,
              ": cos and sin receive no gradient; detach them (they are usually buffers)");
}

class RotaryFunction : public torch::autograd::Function<RotaryFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& cos, const Tensor& sin,
                        bool interleaved, int64_t seq_dim) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("my_mps_ops::rotary_embedding", "")
                         .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, bool, int64_t)>();
    check_no_table_grad(cos, sin);
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["interleaved"] = interleaved;
    ctx->saved_data["seq_dim"] = seq_dim;
    return op.call(x, cos, sin, interleaved, seq_dim);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("my_mps_ops::rotary_embedding_backward", "")
                         .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, bool, int64_t)>();
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    Tensor g = op.call(grads[0], saved[0], saved[1], ctx->saved_data["interleaved"].toBool(),
                       ctx->saved_data["seq_dim"].toInt());
    return {g, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

class RotaryQKFunction : public torch::autograd::Function<RotaryQKFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& q,
                                                const Tensor& k, const Tensor& cos, const Tensor& sin,
                                                bool interleaved, int64_t seq_dim) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("my_mps_ops::rotary_embedding_qk", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                           const Tensor&, bool, int64_t)>();
    check_no_table_grad(cos, sin);
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->set_materialize_grads(false);  // an unused output's gradient stays undefined: no work for it
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["interleaved"] = interleaved;
    ctx->saved_data["seq_dim"] = seq_dim;
    auto [qo, ko] = op.call(q, k, cos, sin, interleaved, seq_dim);
    return {qo, ko};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("my_mps_ops::rotary_embedding_qk_backward", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                           const Tensor&, bool, int64_t)>();
    static auto single = c10::Dispatcher::singleton().findSchemaOrThrow("my_mps_ops::rotary_embedding_backward", "")
                             .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, bool, int64_t)>();
    const auto saved = ctx->get_saved_variables();
    const bool interleaved = ctx->saved_data["interleaved"].toBool();
    const int64_t seq_dim = ctx->saved_data["seq_dim"].toInt();
    Tensor dq, dk;
    if (grads[0].defined() && grads[1].defined()) {
      std::tie(dq, dk) = op.call(grads[0], grads[1], saved[0], saved[1], interleaved, seq_dim);
    } else {  // one output unused: rotate just the other gradient
      if (grads[0].defined()) dq = single.call(grads[0], saved[0], saved[1], interleaved, seq_dim);
      if (grads[1].defined()) dk = single.call(grads[1], saved[0], saved[1], interleaved, seq_dim);
    }
    return {dq, dk, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor rotary_autograd(const Tensor& x, const Tensor& cos, const Tensor& sin, bool interleaved, int64_t seq_dim) {
  return RotaryFunction::apply(x, cos, sin, interleaved, seq_dim);
}
std::tuple<Tensor, Tensor> rotary_qk_autograd(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                              bool interleaved, int64_t seq_dim) {
  auto outs = RotaryQKFunction::apply(q, k, cos, sin, interleaved, seq_dim);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(my_mps_ops, CPU, m) {
  m.impl("rotary_embedding", &rotary_impl);
  m.impl("rotary_embedding_backward", &rotary_backward_impl);
  m.impl("rotary_embedding_qk", &rotary_qk_impl);
  m.impl("rotary_embedding_qk_backward", &rotary_qk_backward_impl);
}

TORCH_LIBRARY_IMPL(my_mps_ops, MPS, m) {
  m.impl("rotary_embedding", &rotary_impl);
  m.impl("rotary_embedding_backward", &rotary_backward_impl);
  m.impl("rotary_embedding_qk", &rotary_qk_impl);
  m.impl("rotary_embedding_qk_backward", &rotary_qk_backward_impl);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Meta, m) {
  m.impl("rotary_embedding", &rotary_meta);
  m.impl("rotary_embedding_backward", &rotary_meta);
  m.impl("rotary_embedding_qk", &rotary_qk_meta);
  m.impl("rotary_embedding_qk_backward", &rotary_qk_meta);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Autograd, m) {
  m.impl("rotary_embedding", &rotary_autograd);
  m.impl("rotary_embedding_qk", &rotary_qk_autograd);
  m.impl("rotary_embedding_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("rotary_embedding_qk_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace my_mps_ops
