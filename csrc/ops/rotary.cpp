// Rotary position embedding (RoPE): rotary_embedding(x, cos, sin,
// interleaved, seq_dim) and rotary_embedding_qk for q and k in one launch.
//
// x is 4-D: (batch, seq, heads, head_dim) with seq_dim=1, or (batch, heads,
// seq, head_dim) with seq_dim=2. cos/sin are [seq, pairs] (shared by the
// batch) or [batch, seq, pairs], any float dtype (used as float32; as float64
// for float64 x on the CPU); the first 2 * pairs elements of each head rotate
// (NeoX half-split pairs (i, i + pairs), or GPT-J interleaved pairs (2i,
// 2i + 1)), the rest pass through. The backward is the rotation transposed:
// the same kernels with -sin. cos and sin get no gradient. Loop:
// cpu/rotary_kernels.cpp; Metal: metal/rotary.cpp and shaders/rotary.metal.
#include "cpu/rotary.h"
#include "metal/rotary.h"
#include "ops/autograd_emulation.h"
#include "ops/common.h"
#include "ops/double_backward.h"

#include <ATen/ops/cat.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/stack.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

namespace my_mps_ops {
namespace {

using at::Tensor;
constexpr const char* kRotaryOp = "my_mps_ops.rotary_embedding";
constexpr const char* kRotaryQKOp = "my_mps_ops.rotary_embedding_qk";

struct RotaryDims {
  int64_t batch, seq, heads, head_dim, pairs;
  int64_t rows() const { return batch * seq * heads; }
};

RotaryDims check_inputs(const char* op, const char* name, const Tensor& x, const Tensor& cos, const Tensor& sin,
                        int64_t seq_dim) {
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
  const int64_t pairs = cos.size(-1);
  TORCH_CHECK(2 * pairs <= head_dim, op, ": rotary dim 2 * cos.size(-1) = ", 2 * pairs, " exceeds head_dim ",
              head_dim);
  TORCH_CHECK(x.numel() <= UINT32_MAX, op, ": ", name, " is too large");
  return RotaryDims{batch, seq, heads, head_dim, pairs};
}

Tensor as_float_table(const Tensor& t) { return t.to(at::kFloat).contiguous(); }
// The native kernels rotate float64 x by float64 tables (float32 otherwise).
Tensor as_table_for(const Tensor& t, const Tensor& x) {
  return t.to(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

Tensor rotate(const Tensor& x_in, const Tensor& cos, const Tensor& sin, bool interleaved, int64_t seq_dim, bool conj,
              const char* op) {
  const RotaryDims d = check_inputs(op, "x", x_in, cos, sin, seq_dim);
  const Tensor x = x_in.contiguous();
  Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (d.rows() == 0 || d.head_dim == 0) return out;
  if (use_metal_path(x)) {
    metal::rotary(op, {x, out}, {as_float_table(cos), as_float_table(sin), interleaved, seq_dim, conj});
    return out;
  }
  const Tensor c = as_table_for(cos, x), s = as_table_for(sin, x);
  cpu::rotary_stub(x.scalar_type(),
                   cpu::RotaryArgs{x.const_data_ptr(), out.mutable_data_ptr(), c.const_data_ptr(),
                                   s.const_data_ptr(), d.batch, d.seq, d.heads, d.head_dim, d.pairs,
                                   cos.dim() == 3 ? d.seq * d.pairs : 0, seq_dim, interleaved, conj});
  return out;
}

std::tuple<Tensor, Tensor> rotate_qk(const Tensor& q_in, const Tensor& k_in, const Tensor& cos, const Tensor& sin,
                                     bool interleaved, int64_t seq_dim, bool conj, const char* op) {
  const RotaryDims dq = check_inputs(op, "q", q_in, cos, sin, seq_dim);
  const RotaryDims dk = check_inputs(op, "k", k_in, cos, sin, seq_dim);
  check_same_dtype(k_in, q_in, op, "k", "q");
  TORCH_CHECK(dk.batch == dq.batch && dk.seq == dq.seq && dk.head_dim == dq.head_dim, op,
              ": k must match q in batch, seq and head_dim (heads may differ), got ", k_in.sizes(), " and ",
              q_in.sizes());
  // The native kernel has no launch to save: it rotates q, then k.
  if (!use_metal_path(q_in)) {
    return {rotate(q_in, cos, sin, interleaved, seq_dim, conj, op),
            rotate(k_in, cos, sin, interleaved, seq_dim, conj, op)};
  }
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), c = as_float_table(cos), s = as_float_table(sin);
  Tensor q_out = at::empty_like(q, at::MemoryFormat::Contiguous);
  Tensor k_out = at::empty_like(k, at::MemoryFormat::Contiguous);
  if (dq.rows() + dk.rows() == 0 || dq.head_dim == 0) return {q_out, k_out};
  metal::rotary_qk(op, {q, q_out}, {k, k_out}, {c, s, interleaved, seq_dim, conj});
  return {q_out, k_out};
}

// ------------------------------------------------------- CPU and MPS kernels

Tensor rotary_impl(const Tensor& x, const Tensor& cos, const Tensor& sin, bool interleaved, int64_t seq_dim) {
  return rotate(x, cos, sin, interleaved, seq_dim, false, kRotaryOp);
}
Tensor rotary_backward_impl(const Tensor& grad, const Tensor& cos, const Tensor& sin, bool interleaved,
                            int64_t seq_dim) {
  return rotate(grad, cos, sin, interleaved, seq_dim, true, "my_mps_ops.rotary_embedding_backward");
}
std::tuple<Tensor, Tensor> rotary_qk_impl(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                          bool interleaved, int64_t seq_dim) {
  return rotate_qk(q, k, cos, sin, interleaved, seq_dim, false, kRotaryQKOp);
}
std::tuple<Tensor, Tensor> rotary_qk_backward_impl(const Tensor& gq, const Tensor& gk, const Tensor& cos,
                                                   const Tensor& sin, bool interleaved, int64_t seq_dim) {
  return rotate_qk(gq, gk, cos, sin, interleaved, seq_dim, true, "my_mps_ops.rotary_embedding_qk_backward");
}

// ------------------------------------------------------------ Meta kernels
// Shapes only; symbolic-size safe.

Tensor rotary_meta(const Tensor& x, const Tensor& cos, const Tensor& sin, bool interleaved, int64_t seq_dim) {
  TORCH_CHECK(x.dim() == 4, kRotaryOp, ": x must be 4-D, got ", x.sym_sizes());
  check_float_dtype(x, kRotaryOp, "x");
  return at::empty_like(x, at::MemoryFormat::Contiguous);
}
std::tuple<Tensor, Tensor> rotary_qk_meta(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                          bool interleaved, int64_t seq_dim) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "my_mps_ops.rotary_embedding_qk: q and k must be 4-D");
  return {at::empty_like(q, at::MemoryFormat::Contiguous), at::empty_like(k, at::MemoryFormat::Contiguous)};
}

// ---------------------------------------------------------------- autograd

void check_no_table_grad(const Tensor& cos, const Tensor& sin) {
  TORCH_CHECK(!cos.requires_grad() && !sin.requires_grad(), kRotaryOp,
              ": cos and sin receive no gradient; detach them (they are usually buffers)");
}

using RotarySignature = Tensor(const Tensor&, const Tensor&, const Tensor&, bool, int64_t);
using RotaryQKSignature =
    std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool, int64_t);

class RotaryFunction : public torch::autograd::Function<RotaryFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& cos, const Tensor& sin,
                        bool interleaved, int64_t seq_dim) {
    static auto op = typed_op<RotarySignature>("my_mps_ops::rotary_embedding");
    check_no_table_grad(cos, sin);
    at::AutoDispatchBelowADInplaceOrView guard;
    save_metal_emulation(ctx);
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["interleaved"] = interleaved;
    ctx->saved_data["seq_dim"] = seq_dim;
    return op.call(x, cos, sin, interleaved, seq_dim);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const BackwardEmulationScope emulation(ctx);
    static auto op = typed_op<RotarySignature>("my_mps_ops::rotary_embedding_backward");
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
    static auto op = typed_op<RotaryQKSignature>("my_mps_ops::rotary_embedding_qk");
    check_no_table_grad(cos, sin);
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->set_materialize_grads(false);  // an unused output's gradient stays undefined: no work for it
    save_metal_emulation(ctx);
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["interleaved"] = interleaved;
    ctx->saved_data["seq_dim"] = seq_dim;
    auto [qo, ko] = op.call(q, k, cos, sin, interleaved, seq_dim);
    return {qo, ko};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const BackwardEmulationScope emulation(ctx);
    static auto op = typed_op<RotaryQKSignature>("my_mps_ops::rotary_embedding_qk_backward");
    static auto single = typed_op<RotarySignature>("my_mps_ops::rotary_embedding_backward");
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

// Under torch.func's grad / vjp / jvp (ops/common.h): the rotation written with
// PyTorch ops in the kernels' dtypes (float32 tables and math; float64 for
// float64 x), rounded once to x's dtype.
Tensor rotary_composite(const Tensor& x, const Tensor& cos, const Tensor& sin, bool interleaved, int64_t seq_dim,
                        const char* op, const char* name) {
  check_inputs(op, name, x, cos, sin, seq_dim);
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // [seq, pairs] or [batch, seq, pairs] broadcast against x's layout.
  auto table = [&](const Tensor& t) {
    Tensor b = t.to(acc);
    if (b.dim() == 2) b = b.unsqueeze(0);
    return b.unsqueeze(seq_dim == 1 ? 2 : 1);
  };
  const Tensor c = table(cos), s = table(sin), xa = x.to(acc);
  const int64_t pairs = cos.size(-1), head_dim = x.size(3);
  const Tensor first = interleaved ? xa.slice(3, 0, 2 * pairs, 2) : xa.narrow(3, 0, pairs);
  const Tensor second = interleaved ? xa.slice(3, 1, 2 * pairs, 2) : xa.narrow(3, pairs, pairs);
  const Tensor out_first = first * c - second * s, out_second = second * c + first * s;
  const Tensor rotated =
      interleaved ? at::stack({out_first, out_second}, -1).flatten(-2) : at::cat({out_first, out_second}, -1);
  return at::cat({rotated, xa.narrow(3, 2 * pairs, head_dim - 2 * pairs)}, -1).to(x.scalar_type());
}

Tensor rotary_autograd(const Tensor& x, const Tensor& cos, const Tensor& sin, bool interleaved, int64_t seq_dim) {
  if (under_functorch_differentiation(x, cos, sin))
    return rotary_composite(x, cos, sin, interleaved, seq_dim, kRotaryOp, "x");
  return RotaryFunction::apply(x, cos, sin, interleaved, seq_dim);
}
std::tuple<Tensor, Tensor> rotary_qk_autograd(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                              bool interleaved, int64_t seq_dim) {
  if (under_functorch_differentiation(q, k, cos, sin)) {
    check_same_dtype(k, q, kRotaryQKOp, "k", "q");
    return {rotary_composite(q, cos, sin, interleaved, seq_dim, kRotaryQKOp, "q"),
            rotary_composite(k, cos, sin, interleaved, seq_dim, kRotaryQKOp, "k")};
  }
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
  m.impl("rotary_embedding_backward", double_backward_unsupported_kernel());
  m.impl("rotary_embedding_qk_backward", double_backward_unsupported_kernel());
}

}  // namespace my_mps_ops
