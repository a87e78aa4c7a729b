// Flash attention: softmax(scale * q k^T [+ causal mask]) v without ever
// materialising the [L, S] score matrix, forward and backward.
//
// Layout: q [B, Hq, L, D], k [B, Hkv, S, D], v [B, Hkv, S, D], Hkv dividing Hq
// (grouped-query attention: q head h reads k/v head h / (Hq / Hkv)).
// Causal masking is aligned to the bottom right: query i sees key j iff
// j <= i + (S - L) (torch.nn.attention.bias.causal_lower_right; equal to
// is_causal=True of F.scaled_dot_product_attention when L == S). A query row
// that sees no key at all (L > S, causal) gets output 0 and log-sum-exp -inf,
// and contributes nothing to any gradient.
//
// The forward returns (out, lse): lse[b, h, i] = log(sum_j exp(scale * q_i.k_j))
// over visible keys, float32 (float64 for float64 inputs), which the backward
// uses to recompute the probabilities tile by tile (FlashAttention-2). Loops:
// cpu/flash_attention_kernels.cpp; Metal: metal/flash_attention.cpp and
// shaders/flash_attention.metal.
#include "cpu/flash_attention.h"
#include "metal/flash_attention.h"
#include "ops/autograd_emulation.h"
#include "ops/common.h"
#include "ops/double_backward.h"

#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/logsumexp.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/where.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace my_mps_ops {
namespace {

using at::Tensor;

constexpr const char* kFlashAttentionOp = "my_mps_ops.flash_attention";
constexpr const char* kFlashAttentionBackwardOp = "my_mps_ops.flash_attention_backward";
// The head sizes the Metal kernels are instantiated for (shaders/flash_attention.metal).
constexpr int64_t kSupportedHeadDims[] = {32, 64, 80, 96, 128, 256};

bool supported_head_dim(const c10::SymInt& d) {
  for (int64_t s : kSupportedHeadDims) {
    if (d == s) return true;
  }
  return false;
}

void check_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                  const std::optional<double>& scale) {
  check_float_dtype(q, op, "q");
  check_same_dtype(k, q, op, "k", "q");
  check_same_dtype(v, q, op, "v", "q");
  check_same_device(k, q, op, "k", "q");
  check_same_device(v, q, op, "v", "q");
  TORCH_CHECK(q.dim() == 4, op, ": q must have 4 dimensions (batch, heads, seq, head_dim), got shape ",
              q.sym_sizes());
  TORCH_CHECK(k.dim() == 4, op, ": k must have 4 dimensions (batch, heads, seq, head_dim), got shape ",
              k.sym_sizes());
  TORCH_CHECK(v.dim() == 4, op, ": v must have 4 dimensions (batch, heads, seq, head_dim), got shape ",
              v.sym_sizes());
  TORCH_CHECK(supported_head_dim(q.sym_size(3)), op, ": q head_dim ", q.sym_size(3),
              " is not supported (supported: 32, 64, 80, 96, 128, 256)");
  TORCH_CHECK(k.sym_size(3) == q.sym_size(3), op, ": k head_dim must equal q head_dim (", q.sym_size(3), "), got ",
              k.sym_size(3));
  TORCH_CHECK(v.sym_size(3) == q.sym_size(3), op, ": v head_dim must equal q head_dim (", q.sym_size(3), "), got ",
              v.sym_size(3));
  TORCH_CHECK(k.sym_size(0) == q.sym_size(0) && v.sym_size(0) == q.sym_size(0), op,
              ": q, k and v must have the same batch size, got ", q.sym_size(0), ", ", k.sym_size(0), ", ",
              v.sym_size(0));
  TORCH_CHECK(v.sym_size(1) == k.sym_size(1), op, ": v must have as many heads as k (", k.sym_size(1), "), got ",
              v.sym_size(1));
  TORCH_CHECK(v.sym_size(2) == k.sym_size(2), op, ": v must have the sequence length of k (", k.sym_size(2),
              "), got ", v.sym_size(2));
  // Zero heads on both sides is an empty (valid) problem.
  const bool heads_divide = k.sym_size(1) == 0 ? q.sym_size(1) == 0 : q.sym_size(1) % k.sym_size(1) == 0;
  TORCH_CHECK(heads_divide, op,
              ": the number of k/v heads must divide the number of q heads (grouped-query attention), got q heads ",
              q.sym_size(1), " and k/v heads ", k.sym_size(1));
  if (scale.has_value()) {
    TORCH_CHECK(std::isfinite(*scale), op, ": scale must be finite, got ", *scale);
  }
}

// lse (and the backward's delta rows) are float32, float64 for float64 inputs.
at::ScalarType lse_dtype(const Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_backward_inputs(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                           const Tensor& out, const Tensor& lse, const std::optional<double>& scale) {
  check_inputs(kFlashAttentionBackwardOp, q, k, v, scale);
  TORCH_CHECK(grad_out.sym_sizes() == q.sym_sizes(), kFlashAttentionBackwardOp, ": grad_out must have the shape of q ",
              q.sym_sizes(), ", got ", grad_out.sym_sizes());
  TORCH_CHECK(out.sym_sizes() == q.sym_sizes(), kFlashAttentionBackwardOp, ": out must have the shape of q ", q.sym_sizes(),
              ", got ", out.sym_sizes());
  check_same_dtype(grad_out, q, kFlashAttentionBackwardOp, "grad_out", "q");
  check_same_dtype(out, q, kFlashAttentionBackwardOp, "out", "q");
  check_same_device(grad_out, q, kFlashAttentionBackwardOp, "grad_out", "q");
  check_same_device(out, q, kFlashAttentionBackwardOp, "out", "q");
  check_same_device(lse, q, kFlashAttentionBackwardOp, "lse", "q");
  TORCH_CHECK(lse.dim() == 3 && lse.sym_size(0) == q.sym_size(0) && lse.sym_size(1) == q.sym_size(1) &&
                  lse.sym_size(2) == q.sym_size(2),
              kFlashAttentionBackwardOp, ": lse must have shape (batch, q heads, q seq) = [", q.sym_size(0), ", ", q.sym_size(1),
              ", ", q.sym_size(2), "], got ", lse.sym_sizes());
  TORCH_CHECK(lse.scalar_type() == lse_dtype(q), kFlashAttentionBackwardOp, ": lse must be ", lse_dtype(q), " for ",
              q.scalar_type(), " inputs, got ", lse.scalar_type());
}

double resolve_scale(const std::optional<double>& scale, int64_t head_dim) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
}

cpu::FlashAttentionDims dims_of(const Tensor& q, const Tensor& k, bool causal) {
  cpu::FlashAttentionDims d;
  d.batch = q.size(0);
  d.q_heads = q.size(1);
  d.kv_heads = k.size(1);
  d.group = d.kv_heads > 0 ? d.q_heads / d.kv_heads : 1;
  d.q_len = q.size(2);
  d.kv_len = k.size(2);
  d.head_dim = q.size(3);
  d.causal = causal;
  return d;
}

Tensor lse_like(const Tensor& q) {
  return at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(lse_dtype(q)));
}

// The CPU kernels work on contiguous float32 (float64 for float64) copies of
// the inputs, none for contiguous float32/float64: O(B * H * seq * D) extra
// memory, linear in the sequence.
Tensor to_acc(const Tensor& t) { return t.to(lse_dtype(t)).contiguous(); }

std::tuple<Tensor, Tensor> forward_cpu(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale) {
  const Tensor qa = to_acc(q), ka = to_acc(k), va = to_acc(v);
  Tensor out_acc = at::empty(q.sizes(), qa.options());
  Tensor lse = lse_like(q);
  if (out_acc.numel() > 0) {
    cpu::flash_attention_forward_stub(qa.scalar_type(),
                                      cpu::FlashAttentionForwardArgs{qa.const_data_ptr(), ka.const_data_ptr(),
                                                                     va.const_data_ptr(), out_acc.mutable_data_ptr(),
                                                                     lse.mutable_data_ptr(), dims_of(q, k, causal),
                                                                     scale});
  }
  Tensor out = out_acc.scalar_type() == q.scalar_type() ? out_acc : out_acc.to(q.scalar_type());
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> backward_cpu(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                                const Tensor& v, const Tensor& out, const Tensor& lse, bool causal,
                                                double scale) {
  const Tensor ga = to_acc(grad_out), qa = to_acc(q), ka = to_acc(k), va = to_acc(v), oa = to_acc(out);
  const Tensor lse_c = lse.contiguous();
  Tensor dq = at::empty(q.sizes(), qa.options());
  Tensor dk = at::empty(k.sizes(), ka.options());
  Tensor dv = at::empty(v.sizes(), va.options());
  Tensor delta = lse_like(q);
  if (q.numel() > 0 || k.numel() > 0) {  // the other side's gradient is then all zeros
    cpu::flash_attention_backward_stub(
        qa.scalar_type(),
        cpu::FlashAttentionBackwardArgs{ga.const_data_ptr(), qa.const_data_ptr(), ka.const_data_ptr(),
                                        va.const_data_ptr(), oa.const_data_ptr(), lse_c.const_data_ptr(),
                                        delta.mutable_data_ptr(), dq.mutable_data_ptr(), dk.mutable_data_ptr(),
                                        dv.mutable_data_ptr(), dims_of(q, k, causal), scale});
  }
  const auto dt = q.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
}

std::tuple<Tensor, Tensor> forward_metal(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, bool causal,
                                         double scale) {
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = lse_like(q);
  if (out.numel() == 0) return {out, lse};
  if (k.size(2) == 0) {  // no key at all: defined as zeros / -inf, nothing to launch
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  metal::flash_attention_forward(kFlashAttentionOp, {q, k, v, out, lse}, causal, scale);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> backward_metal(const Tensor& grad_out, const Tensor& q_in, const Tensor& k_in,
                                                  const Tensor& v_in, const Tensor& out, const Tensor& lse,
                                                  bool causal, double scale) {
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  metal::flash_attention_backward(
      kFlashAttentionBackwardOp, {grad_out.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), lse_like(q), dq, dk, dv},
      causal, scale);
  return {dq, dk, dv};
}

// ------------------------------------------------------- CPU and MPS kernels

std::tuple<Tensor, Tensor> flash_attention_impl(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                                std::optional<double> scale) {
  check_inputs(kFlashAttentionOp, q, k, v, scale);
  const double s = resolve_scale(scale, q.size(3));
  if (use_metal_path(q)) return forward_metal(q, k, v, causal, s);
  return forward_cpu(q, k, v, causal, s);
}

std::tuple<Tensor, Tensor, Tensor> flash_attention_backward_impl(const Tensor& grad_out, const Tensor& q,
                                                                 const Tensor& k, const Tensor& v, const Tensor& out,
                                                                 const Tensor& lse, bool causal,
                                                                 std::optional<double> scale) {
  check_backward_inputs(grad_out, q, k, v, out, lse, scale);
  const double s = resolve_scale(scale, q.size(3));
  if (use_metal_path(q)) return backward_metal(grad_out, q, k, v, out, lse, causal, s);
  return backward_cpu(grad_out, q, k, v, out, lse, causal, s);
}

// ------------------------------------------------------------ Meta kernels
// Shapes only; symbolic-size safe.

std::tuple<Tensor, Tensor> flash_attention_meta(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                                std::optional<double> scale) {
  check_inputs(kFlashAttentionOp, q, k, v, scale);
  Tensor out = at::empty_symint(q.sym_sizes(), q.options());
  Tensor lse = at::empty_symint({q.sym_size(0), q.sym_size(1), q.sym_size(2)}, q.options().dtype(lse_dtype(q)));
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> flash_attention_backward_meta(const Tensor& grad_out, const Tensor& q,
                                                                 const Tensor& k, const Tensor& v, const Tensor& out,
                                                                 const Tensor& lse, bool causal,
                                                                 std::optional<double> scale) {
  check_backward_inputs(grad_out, q, k, v, out, lse, scale);
  return {at::empty_symint(q.sym_sizes(), q.options()), at::empty_symint(k.sym_sizes(), k.options()),
          at::empty_symint(v.sym_sizes(), v.options())};
}

// ---------------------------------------------------------------- autograd

class FlashAttentionFunction : public torch::autograd::Function<FlashAttentionFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& q,
                                                const Tensor& k, const Tensor& v, bool causal,
                                                std::optional<double> scale) {
    static auto op = typed_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, bool,
                                                         std::optional<double>)>("my_mps_ops::flash_attention");
    Tensor out, lse;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, lse) = op.call(q, k, v, causal, scale);
    }
    save_metal_emulation(ctx);
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale.has_value() ? c10::IValue(*scale) : c10::IValue();
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const BackwardEmulationScope emulation(ctx);
    static auto op = typed_op<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                 const Tensor&, const Tensor&, const Tensor&, bool,
                                                                 std::optional<double>)>(
        "my_mps_ops::flash_attention_backward");
    const bool any = ctx->needs_input_grad(0) || ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    if (!grad_outputs[0].defined() || !any) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    const auto saved = ctx->get_saved_variables();
    const c10::IValue& scale_value = ctx->saved_data["scale"];
    const std::optional<double> scale =
        scale_value.isNone() ? std::nullopt : std::optional<double>(scale_value.toDouble());
    auto [dq, dk, dv] = op.call(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                                ctx->saved_data["causal"].toBool(), scale);
    return {ctx->needs_input_grad(0) ? dq : Tensor(), ctx->needs_input_grad(1) ? dk : Tensor(),
            ctx->needs_input_grad(2) ? dv : Tensor(), Tensor(), Tensor()};
  }
};

// Under torch.func's grad / vjp / jvp (ops/common.h): attention written with
// PyTorch ops, in the accumulation dtype, with the kernels' semantics (GQA by
// repeating k/v heads, causal aligned bottom-right, rows that see no key 0).
std::tuple<Tensor, Tensor> flash_attention_composite(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                                     std::optional<double> scale) {
  check_inputs(kFlashAttentionOp, q, k, v, scale);
  const at::ScalarType acc = lse_dtype(q);
  const int64_t group = k.size(1) > 0 ? q.size(1) / k.size(1) : 1;
  const Tensor qa = q.to(acc), ka = k.to(acc).repeat_interleave(group, 1), va = v.to(acc).repeat_interleave(group, 1);
  Tensor scores = at::matmul(qa, ka.transpose(-2, -1)) * resolve_scale(scale, q.size(3));
  if (causal) {
    const int64_t q_len = q.size(2), kv_len = k.size(2);
    const auto index = q.options().dtype(at::kLong);
    const Tensor sees = at::arange(kv_len, index).unsqueeze(0) <= at::arange(q_len, index).unsqueeze(1) + (kv_len - q_len);
    scores = scores.masked_fill(sees.logical_not(), -std::numeric_limits<double>::infinity());
  }
  const Tensor lse = at::logsumexp(scores, {-1});
  // A row with no key: softmax of zeros (no NaN in its backward), then 0.
  const Tensor empty_row = lse.detach().isneginf().unsqueeze(-1);
  const Tensor probs = at::where(empty_row, 0.0, at::softmax(at::where(empty_row, 0.0, scores), -1));
  return {at::matmul(probs, va).to(q.scalar_type()), lse.detach()};
}

std::tuple<Tensor, Tensor> flash_attention_autograd(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                                    std::optional<double> scale) {
  if (under_functorch_differentiation(q, k, v)) return flash_attention_composite(q, k, v, causal, scale);
  auto outputs = FlashAttentionFunction::apply(q, k, v, causal, scale);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(my_mps_ops, CPU, m) {
  m.impl("flash_attention", &flash_attention_impl);
  m.impl("flash_attention_backward", &flash_attention_backward_impl);
}

TORCH_LIBRARY_IMPL(my_mps_ops, MPS, m) {
  m.impl("flash_attention", &flash_attention_impl);
  m.impl("flash_attention_backward", &flash_attention_backward_impl);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Meta, m) {
  m.impl("flash_attention", &flash_attention_meta);
  m.impl("flash_attention_backward", &flash_attention_backward_meta);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Autograd, m) {
  m.impl("flash_attention", &flash_attention_autograd);
  // The backward has no derivative of its own: double backward raises clearly.
  m.impl("flash_attention_backward", double_backward_unsupported_kernel());
}

}  // namespace my_mps_ops
