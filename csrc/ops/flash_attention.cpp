// Flash attention: softmax(scale * q k^T [+ causal mask]) v without ever
// materialising the [L, S] score matrix, forward and backward.
//
// Layout: q [B, Hq, L, D], k [B, Hkv, S, D], v [B, Hkv, S, D], Hkv dividing Hq
// (grouped-query attention: q head h reads k/v head h / (Hq / Hkv)).
// Causal masking is aligned to the bottom right: query i sees key j iff
// j <= i + (S - L) (torch.nn.attention.bias.causal_lower_right; equal to
// is_causal=True of F.scaled_dot_product_attention when L == S). A query row
// that sees no key at all (L > S, causal; or a window past the keys) gets
// output 0 and log-sum-exp -inf (the sink's logit with sinks), and contributes
// nothing to any gradient.
//
// Options, all off by default:
// - window (window_left, window_right): query i, aligned as for causal at
//   a = i + S - L, sees keys a - window_left .. a + window_right, -1 meaning
//   unbounded on that side; with causal the right bound is min(right, 0).
//   Key blocks no query of a block sees are skipped.
// - softcap > 0: scores s = scale * q.k become softcap * tanh(s / softcap)
//   before the softmax (Gemma 2); the backward multiplies by 1 - tanh^2.
// - sinks (q_heads,): a learned logit per head that joins every row's softmax
//   denominator and contributes no value (gpt-oss): p_j = exp(s_j - lse) with
//   lse = log(exp(sink) + sum_j exp(s_j)). d loss / d sink_h =
//   -sum over the head's rows of exp(sink_h - lse) * rowsum(dO * O).
//
// The forward returns (out, lse): lse[b, h, i] = log(sum_j exp(s_ij) [+
// exp(sink_h)]) over visible keys, float32 (float64 for float64 inputs), which
// the backward uses to recompute the probabilities tile by tile
// (FlashAttention-2). Loops:
// cpu/flash_attention_kernels.cpp; Metal: metal/flash_attention.cpp and
// shaders/flash_attention.metal.
#include "cpu/flash_attention.h"
#include "metal/flash_attention.h"
#include "ops/autograd_emulation.h"
#include "ops/common.h"
#include "ops/double_backward.h"

#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/logsumexp.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace my_mps_ops {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

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

void check_attention_options(const char* op, const Tensor& q, int64_t window_left, int64_t window_right,
                             double softcap, const OptTensor& sinks) {
  TORCH_CHECK(window_left >= -1 && window_right >= -1, op,
              ": window_left and window_right must be >= 0, or -1 for unbounded; got ", window_left, " and ",
              window_right);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, op, ": softcap must be finite and >= 0 (0: off), got ",
              softcap);
  if (sinks.has_value()) {
    check_float_dtype(*sinks, op, "sinks");
    check_same_device(*sinks, q, op, "sinks", "q");
    TORCH_CHECK(sinks->dim() == 1 && sinks->sym_size(0) == q.sym_size(1), op,
                ": sinks must have shape (q heads,) = [", q.sym_size(1), "], got ", sinks->sym_sizes());
  }
}

// The kernels' window: causal caps the right bound at the diagonal; a bound
// wider than both sequences is unbounded (-1), so that no index arithmetic
// on it overflows.
struct AttentionWindow {
  int64_t left, right;
};
AttentionWindow attention_window(const Tensor& q, const Tensor& k, bool causal, int64_t window_left,
                                 int64_t window_right) {
  const int64_t span = q.size(2) + k.size(2);
  const auto bound = [span](int64_t w) { return w > span ? -1 : w; };
  return {bound(window_left), causal ? 0 : bound(window_right)};
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

cpu::FlashAttentionDims dims_of(const Tensor& q, const Tensor& k, AttentionWindow w) {
  cpu::FlashAttentionDims d;
  d.batch = q.size(0);
  d.q_heads = q.size(1);
  d.kv_heads = k.size(1);
  d.group = d.kv_heads > 0 ? d.q_heads / d.kv_heads : 1;
  d.q_len = q.size(2);
  d.kv_len = k.size(2);
  d.head_dim = q.size(3);
  d.window_left = w.left;
  d.window_right = w.right;
  return d;
}

Tensor lse_like(const Tensor& q) {
  return at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(lse_dtype(q)));
}

// The CPU kernels work on contiguous float32 (float64 for float64) copies of
// the inputs, none for contiguous float32/float64: O(B * H * seq * D) extra
// memory, linear in the sequence.
Tensor to_acc(const Tensor& t) { return t.to(lse_dtype(t)).contiguous(); }

// grad_sinks[h] = -sum over the rows of head h of exp(sink_h - lse) * delta
// (rows with lse -inf, no key and a -inf sink, count 0).
Tensor sink_grad(const Tensor& sinks, const Tensor& lse, const Tensor& delta) {
  const Tensor p_sink = at::where(lse.isneginf(), 0.0, (sinks.to(lse.scalar_type()).view({1, -1, 1}) - lse).exp());
  return (p_sink * delta).sum({0, 2}).neg().to(sinks.scalar_type());
}

std::tuple<Tensor, Tensor> forward_cpu(const Tensor& q, const Tensor& k, const Tensor& v, AttentionWindow w,
                                       double scale, double softcap, const OptTensor& sinks) {
  const Tensor qa = to_acc(q), ka = to_acc(k), va = to_acc(v);
  const Tensor sa = sinks.has_value() ? to_acc(sinks->to(qa.scalar_type())) : Tensor();
  Tensor out_acc = at::empty(q.sizes(), qa.options());
  Tensor lse = lse_like(q);
  if (out_acc.numel() > 0) {
    cpu::flash_attention_forward_stub(
        qa.scalar_type(),
        cpu::FlashAttentionForwardArgs{qa.const_data_ptr(), ka.const_data_ptr(), va.const_data_ptr(),
                                       sa.defined() ? sa.const_data_ptr() : nullptr, out_acc.mutable_data_ptr(),
                                       lse.mutable_data_ptr(), dims_of(q, k, w), scale, softcap});
  }
  Tensor out = out_acc.scalar_type() == q.scalar_type() ? out_acc : out_acc.to(q.scalar_type());
  return {out, lse};
}

using AttentionGrads = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// The gradient of sinks, or the empty tensor the schema returns without them.
Tensor sinks_grad_or_empty(const Tensor& q, const OptTensor& sinks, const Tensor& lse, const Tensor& delta) {
  if (!sinks.has_value()) return at::empty({0}, q.options());
  if (q.numel() == 0) return at::zeros(sinks->sizes(), sinks->options());
  return sink_grad(*sinks, lse, delta);
}

AttentionGrads backward_cpu(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                            const Tensor& out, const Tensor& lse, AttentionWindow w, double scale, double softcap,
                            const OptTensor& sinks) {
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
                                        dv.mutable_data_ptr(), dims_of(q, k, w), scale, softcap});
  }
  const auto dt = q.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt), sinks_grad_or_empty(q, sinks, lse_c, delta)};
}

metal::FlashAttentionOptions attention_metal_options(AttentionWindow w, double scale, double softcap,
                                                     const OptTensor& sinks) {
  return {w.left, w.right, scale, softcap, sinks.has_value()};
}

std::tuple<Tensor, Tensor> forward_metal(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                         AttentionWindow w, double scale, double softcap, const OptTensor& sinks) {
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = lse_like(q);
  if (out.numel() == 0) return {out, lse};
  if (k.size(2) == 0) {  // no key at all: defined as zeros / -inf (the sink), nothing to launch
    out.zero_();
    if (sinks.has_value()) {
      lse.copy_(sinks->to(at::kFloat).view({1, -1, 1}).expand(lse.sizes()));
    } else {
      lse.fill_(-std::numeric_limits<float>::infinity());
    }
    return {out, lse};
  }
  // The kernel reads sinks only when there are any; it is given a buffer either way.
  const Tensor sinks_f = sinks.has_value() ? sinks->to(at::kFloat).contiguous() : at::zeros({1}, lse.options());
  metal::flash_attention_forward(kFlashAttentionOp, {q, k, v, sinks_f, out, lse},
                                 attention_metal_options(w, scale, softcap, sinks));
  return {out, lse};
}

AttentionGrads backward_metal(const Tensor& grad_out, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                              const Tensor& out, const Tensor& lse, AttentionWindow w, double scale, double softcap,
                              const OptTensor& sinks) {
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    // No key: out is 0, so delta and every sink gradient are 0 too.
    const Tensor no_grad =
        sinks.has_value() ? at::zeros(sinks->sizes(), sinks->options()) : at::empty({0}, q.options());
    return {dq, dk, dv, no_grad};
  }
  const Tensor lse_c = lse.contiguous(), delta = lse_like(q);
  metal::flash_attention_backward(kFlashAttentionBackwardOp,
                                  {grad_out.contiguous(), q, k, v, out.contiguous(), lse_c, delta, dq, dk, dv},
                                  attention_metal_options(w, scale, softcap, sinks));
  return {dq, dk, dv, sinks_grad_or_empty(q, sinks, lse_c, delta)};
}

// ------------------------------------------------------- CPU and MPS kernels

std::tuple<Tensor, Tensor> flash_attention_impl(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                                std::optional<double> scale, int64_t window_left,
                                                int64_t window_right, double softcap, const OptTensor& sinks) {
  check_inputs(kFlashAttentionOp, q, k, v, scale);
  check_attention_options(kFlashAttentionOp, q, window_left, window_right, softcap, sinks);
  const double s = resolve_scale(scale, q.size(3));
  const AttentionWindow w = attention_window(q, k, causal, window_left, window_right);
  if (use_metal_path(q)) return forward_metal(q, k, v, w, s, softcap, sinks);
  return forward_cpu(q, k, v, w, s, softcap, sinks);
}

AttentionGrads flash_attention_backward_impl(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                             const Tensor& v, const Tensor& out, const Tensor& lse, bool causal,
                                             std::optional<double> scale, int64_t window_left, int64_t window_right,
                                             double softcap, const OptTensor& sinks) {
  check_backward_inputs(grad_out, q, k, v, out, lse, scale);
  check_attention_options(kFlashAttentionBackwardOp, q, window_left, window_right, softcap, sinks);
  const double s = resolve_scale(scale, q.size(3));
  const AttentionWindow w = attention_window(q, k, causal, window_left, window_right);
  if (use_metal_path(q)) return backward_metal(grad_out, q, k, v, out, lse, w, s, softcap, sinks);
  return backward_cpu(grad_out, q, k, v, out, lse, w, s, softcap, sinks);
}

// ------------------------------------------------------------ Meta kernels
// Shapes only; symbolic-size safe.

std::tuple<Tensor, Tensor> flash_attention_meta(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                                std::optional<double> scale, int64_t window_left,
                                                int64_t window_right, double softcap, const OptTensor& sinks) {
  check_inputs(kFlashAttentionOp, q, k, v, scale);
  check_attention_options(kFlashAttentionOp, q, window_left, window_right, softcap, sinks);
  Tensor out = at::empty_symint(q.sym_sizes(), q.options());
  Tensor lse = at::empty_symint({q.sym_size(0), q.sym_size(1), q.sym_size(2)}, q.options().dtype(lse_dtype(q)));
  return {out, lse};
}

AttentionGrads flash_attention_backward_meta(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                             const Tensor& v, const Tensor& out, const Tensor& lse, bool causal,
                                             std::optional<double> scale, int64_t window_left, int64_t window_right,
                                             double softcap, const OptTensor& sinks) {
  check_backward_inputs(grad_out, q, k, v, out, lse, scale);
  check_attention_options(kFlashAttentionBackwardOp, q, window_left, window_right, softcap, sinks);
  return {at::empty_symint(q.sym_sizes(), q.options()), at::empty_symint(k.sym_sizes(), k.options()),
          at::empty_symint(v.sym_sizes(), v.options()),
          sinks.has_value() ? at::empty_symint(sinks->sym_sizes(), sinks->options()) : at::empty({0}, q.options())};
}

// ---------------------------------------------------------------- autograd

using AttentionForwardSignature = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, bool,
                                                              std::optional<double>, int64_t, int64_t, double,
                                                              const OptTensor&);
using AttentionBackwardSignature = AttentionGrads(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                  const Tensor&, const Tensor&, bool, std::optional<double>, int64_t,
                                                  int64_t, double, const OptTensor&);

class FlashAttentionFunction : public torch::autograd::Function<FlashAttentionFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& q,
                                                const Tensor& k, const Tensor& v, bool causal,
                                                std::optional<double> scale, int64_t window_left,
                                                int64_t window_right, double softcap, const OptTensor& sinks) {
    static auto op = typed_op<AttentionForwardSignature>("my_mps_ops::flash_attention");
    Tensor out, lse;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, lse) = op.call(q, k, v, causal, scale, window_left, window_right, softcap, sinks);
    }
    save_metal_emulation(ctx);
    ctx->save_for_backward({q, k, v, out, lse, sinks.value_or(Tensor())});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale.has_value() ? c10::IValue(*scale) : c10::IValue();
    ctx->saved_data["window_left"] = window_left;
    ctx->saved_data["window_right"] = window_right;
    ctx->saved_data["softcap"] = softcap;
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const BackwardEmulationScope emulation(ctx);
    static auto op = typed_op<AttentionBackwardSignature>("my_mps_ops::flash_attention_backward");
    torch::autograd::variable_list grads(9);
    const auto saved = ctx->get_saved_variables();
    // needs_input_grad counts tensor arguments only (q, k, v, sinks); the
    // returned list has one entry per argument.
    const bool want_sinks = saved[5].defined() && ctx->needs_input_grad(3);
    const bool any = ctx->needs_input_grad(0) || ctx->needs_input_grad(1) || ctx->needs_input_grad(2) || want_sinks;
    if (!grad_outputs[0].defined() || !any) return grads;
    const c10::IValue& scale_value = ctx->saved_data["scale"];
    const std::optional<double> scale =
        scale_value.isNone() ? std::nullopt : std::optional<double>(scale_value.toDouble());
    const OptTensor sinks = saved[5].defined() ? OptTensor(saved[5]) : std::nullopt;
    auto [dq, dk, dv, dsinks] =
        op.call(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], saved[4], ctx->saved_data["causal"].toBool(),
                scale, ctx->saved_data["window_left"].toInt(), ctx->saved_data["window_right"].toInt(),
                ctx->saved_data["softcap"].toDouble(), sinks);
    if (ctx->needs_input_grad(0)) grads[0] = dq;
    if (ctx->needs_input_grad(1)) grads[1] = dk;
    if (ctx->needs_input_grad(2)) grads[2] = dv;
    if (want_sinks) grads[8] = dsinks;
    return grads;
  }
};

// Under torch.func's grad / vjp / jvp (ops/common.h): attention written with
// PyTorch ops, in the accumulation dtype, with the kernels' semantics (GQA by
// repeating k/v heads, causal and windows aligned bottom-right, softcap, the
// sink as an extra logit without a value, rows that see no key 0).
std::tuple<Tensor, Tensor> flash_attention_composite(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                                     std::optional<double> scale, int64_t window_left,
                                                     int64_t window_right, double softcap, const OptTensor& sinks) {
  check_inputs(kFlashAttentionOp, q, k, v, scale);
  check_attention_options(kFlashAttentionOp, q, window_left, window_right, softcap, sinks);
  const at::ScalarType acc = lse_dtype(q);
  const int64_t group = k.size(1) > 0 ? q.size(1) / k.size(1) : 1;
  const Tensor qa = q.to(acc), ka = k.to(acc).repeat_interleave(group, 1), va = v.to(acc).repeat_interleave(group, 1);
  Tensor scores = at::matmul(qa, ka.transpose(-2, -1)) * resolve_scale(scale, q.size(3));
  if (softcap > 0.0) scores = (scores / softcap).tanh() * softcap;
  const AttentionWindow w = attention_window(q, k, causal, window_left, window_right);
  const int64_t q_len = q.size(2), kv_len = k.size(2);
  if (w.left >= 0 || w.right >= 0) {
    const auto index = q.options().dtype(at::kLong);
    const Tensor key = at::arange(kv_len, index).unsqueeze(0);
    const Tensor aligned = at::arange(q_len, index).unsqueeze(1) + (kv_len - q_len);
    Tensor sees = at::ones({q_len, kv_len}, index.dtype(at::kBool));
    if (w.right >= 0) sees = sees.logical_and(key <= aligned + w.right);
    if (w.left >= 0) sees = sees.logical_and(key >= aligned - w.left);
    scores = scores.masked_fill(sees.logical_not(), -std::numeric_limits<double>::infinity());
  }
  if (sinks.has_value()) {
    const Tensor sink = sinks->to(acc).view({1, -1, 1, 1}).expand({q.size(0), q.size(1), q_len, 1});
    scores = at::cat({scores, sink}, -1);
  }
  const Tensor lse = at::logsumexp(scores, {-1});
  // A row with no key (and no sink): softmax of zeros (no NaN in its backward), then 0.
  const Tensor empty_row = lse.detach().isneginf().unsqueeze(-1);
  Tensor probs = at::where(empty_row, 0.0, at::softmax(at::where(empty_row, 0.0, scores), -1));
  if (sinks.has_value()) probs = probs.narrow(-1, 0, kv_len);
  return {at::matmul(probs, va).to(q.scalar_type()), lse.detach()};
}

std::tuple<Tensor, Tensor> flash_attention_autograd(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                                    std::optional<double> scale, int64_t window_left,
                                                    int64_t window_right, double softcap, const OptTensor& sinks) {
  if (under_functorch_differentiation(q, k, v, sinks)) {
    return flash_attention_composite(q, k, v, causal, scale, window_left, window_right, softcap, sinks);
  }
  auto outputs = FlashAttentionFunction::apply(q, k, v, causal, scale, window_left, window_right, softcap, sinks);
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
