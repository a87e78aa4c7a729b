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
#include <vector>

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

// The mask and score options the dense and packed attention Functions keep
// for their backward.
void save_attention_options(torch::autograd::AutogradContext* ctx, bool causal, const std::optional<double>& scale,
                            int64_t window_left, int64_t window_right, double softcap) {
  ctx->saved_data["causal"] = causal;
  ctx->saved_data["scale"] = scale.has_value() ? c10::IValue(*scale) : c10::IValue();
  ctx->saved_data["window_left"] = window_left;
  ctx->saved_data["window_right"] = window_right;
  ctx->saved_data["softcap"] = softcap;
}

std::optional<double> saved_scale(torch::autograd::AutogradContext* ctx) {
  const c10::IValue& scale = ctx->saved_data["scale"];
  return scale.isNone() ? std::nullopt : std::optional<double>(scale.toDouble());
}

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
    save_attention_options(ctx, causal, scale, window_left, window_right, softcap);
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
    const std::optional<double> scale = saved_scale(ctx);
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


// ===================================================== packed variable length
// flash_attention_varlen: FlashAttention's varlen layout. q (total_q, q_heads,
// D), k and v (total_k, kv_heads, D) hold `batch` sequences back to back:
// sequence b is q rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] and k/v rows
// cu_seqlens_k[b] .. cu_seqlens_k[b + 1] (int32, batch + 1 offsets from 0 to
// the totals), attended to as flash_attention of that sequence alone (causal
// and windows aligned bottom-right per sequence). lse is (q_heads, total_q),
// FlashAttention's layout. max_seqlen_q / max_seqlen_k bound the lengths (the
// Metal grid is sized by them). The kernels are the dense ones, reading each
// sequence at its offsets (the CPU loops in the packed layout, the Metal
// kernels on (heads, total, D) copies); a dense batch is the case of equal
// lengths.

constexpr const char* kVarlenOp = "my_mps_ops.flash_attention_varlen";
constexpr const char* kVarlenBackwardOp = "my_mps_ops.flash_attention_varlen_backward";

void check_cu_seqlens(const char* op, const Tensor& cu, const Tensor& q, const char* name) {
  TORCH_CHECK(cu.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", cu.scalar_type());
  check_same_device(cu, q, op, name, "q");
  TORCH_CHECK(cu.dim() == 1 && cu.sym_size(0) >= 1, op, ": ", name,
              " must have shape (batch + 1,) (cumulative sequence offsets starting at 0), got ", cu.sym_sizes());
}

void check_varlen_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q,
                         const Tensor& cu_k, const c10::SymInt& max_q, const c10::SymInt& max_k,
                         const std::optional<double>& scale) {
  check_float_dtype(q, op, "q");
  check_same_dtype(k, q, op, "k", "q");
  check_same_dtype(v, q, op, "v", "q");
  check_same_device(k, q, op, "k", "q");
  check_same_device(v, q, op, "v", "q");
  TORCH_CHECK(q.dim() == 3, op, ": q must have 3 dimensions (total_q, heads, head_dim), got shape ", q.sym_sizes());
  TORCH_CHECK(k.dim() == 3, op, ": k must have 3 dimensions (total_k, heads, head_dim), got shape ", k.sym_sizes());
  TORCH_CHECK(v.dim() == 3, op, ": v must have 3 dimensions (total_k, heads, head_dim), got shape ", v.sym_sizes());
  TORCH_CHECK(supported_head_dim(q.sym_size(2)), op, ": q head_dim ", q.sym_size(2),
              " is not supported (supported: 32, 64, 80, 96, 128, 256)");
  TORCH_CHECK(k.sym_size(2) == q.sym_size(2) && v.sym_size(2) == q.sym_size(2), op,
              ": k and v head_dim must equal q head_dim (", q.sym_size(2), "), got ", k.sym_size(2), " and ",
              v.sym_size(2));
  TORCH_CHECK(v.sym_size(0) == k.sym_size(0) && v.sym_size(1) == k.sym_size(1), op,
              ": v must have the shape of k ", k.sym_sizes(), ", got ", v.sym_sizes());
  const bool heads_divide = k.sym_size(1) == 0 ? q.sym_size(1) == 0 : q.sym_size(1) % k.sym_size(1) == 0;
  TORCH_CHECK(heads_divide, op,
              ": the number of k/v heads must divide the number of q heads (grouped-query attention), got q heads ",
              q.sym_size(1), " and k/v heads ", k.sym_size(1));
  check_cu_seqlens(op, cu_q, q, "cu_seqlens_q");
  check_cu_seqlens(op, cu_k, q, "cu_seqlens_k");
  TORCH_CHECK(cu_q.sym_size(0) == cu_k.sym_size(0), op,
              ": cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got ", cu_q.sym_size(0),
              " and ", cu_k.sym_size(0));
  TORCH_CHECK(max_q >= 0 && max_k >= 0, op, ": max_seqlen_q and max_seqlen_k must be >= 0, got ", max_q, " and ",
              max_k);
  if (scale.has_value()) {
    TORCH_CHECK(std::isfinite(*scale), op, ": scale must be finite, got ", *scale);
  }
}

// The offsets on the host (a device-to-host copy, and so a sync, on mps),
// checked against the totals and the max lengths the kernels rely on.
void check_cu_values(const char* op, const int32_t* c, int64_t n, int64_t total, int64_t max_len, const char* name,
                     const char* max_name) {
  TORCH_CHECK(c[0] == 0, op, ": ", name, "[0] must be 0, got ", c[0]);
  for (int64_t b = 0; b + 1 < n; ++b) {
    TORCH_CHECK(c[b + 1] >= c[b], op, ": ", name, " must be non-decreasing, got ", name, "[", b, "] = ", c[b],
                " > ", name, "[", b + 1, "] = ", c[b + 1]);
    TORCH_CHECK(c[b + 1] - c[b] <= max_len, op, ": sequence ", b, " has length ", c[b + 1] - c[b], " (", name,
                ") but ", max_name, " is ", max_len);
  }
  TORCH_CHECK(c[n - 1] == total, op, ": the last entry of ", name, " must be the total number of rows ", total,
              ", got ", c[n - 1]);
}
Tensor host_cu_seqlens(const char* op, const Tensor& cu, int64_t total, int64_t max_len, const char* name,
                       const char* max_name) {
  Tensor host = cu.to(at::kCPU).contiguous();
  check_cu_values(op, host.const_data_ptr<int32_t>(), host.numel(), total, max_len, name, max_name);
  return host;
}

AttentionWindow varlen_window(int64_t max_q, int64_t max_k, bool causal, int64_t window_left, int64_t window_right) {
  const int64_t span = max_q + max_k;
  const auto bound = [span](int64_t w) { return w > span ? -1 : w; };
  return {bound(window_left), causal ? 0 : bound(window_right)};
}

// (total, heads, D) <-> contiguous (heads, total, D), converting in the same
// pass (.to() of a transposed view keeps its strides: a second copy).
Tensor swap_rows_and_heads(const Tensor& t, at::ScalarType dt) {
  Tensor r = at::empty({t.size(1), t.size(0), t.size(2)}, t.options().dtype(dt));
  r.copy_(t.transpose(0, 1));
  return r;
}
Tensor rows_major(const Tensor& t, at::ScalarType dt) { return swap_rows_and_heads(t, dt); }

cpu::FlashAttentionDims varlen_dims(const Tensor& q, const Tensor& k, const Tensor& cu_q, const Tensor& cu_k,
                                    int64_t max_q, int64_t max_k, AttentionWindow w) {
  cpu::FlashAttentionDims d;
  d.batch = cu_q.numel() - 1;
  d.q_heads = q.size(1);
  d.kv_heads = k.size(1);
  d.group = d.kv_heads > 0 ? d.q_heads / d.kv_heads : 1;
  d.q_len = max_q;
  d.kv_len = max_k;
  d.head_dim = q.size(2);
  d.window_left = w.left;
  d.window_right = w.right;
  d.cu_q = cu_q.const_data_ptr<int32_t>();
  d.cu_k = cu_k.const_data_ptr<int32_t>();
  d.q_head_stride = q.size(0);
  d.kv_head_stride = k.size(0);
  return d;
}

struct VarlenProblem {
  Tensor cu_q, cu_k;  // host copies
  int64_t max_q, max_k;
  AttentionWindow w;
  double scale;
};

VarlenProblem varlen_problem(const char* op, const Tensor& q, const Tensor& k, const Tensor& cu_q,
                             const Tensor& cu_k, int64_t max_q, int64_t max_k, bool causal,
                             std::optional<double> scale, int64_t window_left, int64_t window_right) {
  return {host_cu_seqlens(op, cu_q, q.size(0), max_q, "cu_seqlens_q", "max_seqlen_q"),
          host_cu_seqlens(op, cu_k, k.size(0), max_k, "cu_seqlens_k", "max_seqlen_k"),
          max_q,
          max_k,
          varlen_window(max_q, max_k, causal, window_left, window_right),
          resolve_scale(scale, q.size(2))};
}

// The CPU kernels read the packed (total, heads, D) layout in place (contiguous, accumulation dtype).
std::tuple<Tensor, Tensor> varlen_forward_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                              const VarlenProblem& p, double softcap, const OptTensor& sinks) {
  const Tensor qa = to_acc(q), ka = to_acc(k), va = to_acc(v);
  const Tensor sa = sinks.has_value() ? to_acc(sinks->to(qa.scalar_type())) : Tensor();
  Tensor out_acc = at::empty(qa.sizes(), qa.options());
  Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(lse_dtype(q)));
  if (out_acc.numel() > 0) {
    cpu::flash_attention_forward_stub(
        qa.scalar_type(),
        cpu::FlashAttentionForwardArgs{qa.const_data_ptr(), ka.const_data_ptr(), va.const_data_ptr(),
                                       sa.defined() ? sa.const_data_ptr() : nullptr, out_acc.mutable_data_ptr(),
                                       lse.mutable_data_ptr(),
                                       varlen_dims(q, k, p.cu_q, p.cu_k, p.max_q, p.max_k, p.w), p.scale, softcap});
  }
  return {out_acc.to(q.scalar_type()), lse};
}

AttentionGrads varlen_backward_cpu(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                                   const Tensor& out, const Tensor& lse, const VarlenProblem& p, double softcap,
                                   const OptTensor& sinks) {
  const Tensor ga = to_acc(grad_out), qa = to_acc(q), ka = to_acc(k), va = to_acc(v), oa = to_acc(out);
  const Tensor lse_c = lse.contiguous();
  Tensor dq = at::empty(qa.sizes(), qa.options());
  Tensor dk = at::empty(ka.sizes(), ka.options());
  Tensor dv = at::empty(va.sizes(), va.options());
  Tensor delta = at::empty(lse.sizes(), lse_c.options());
  if (q.numel() > 0 || k.numel() > 0) {
    cpu::flash_attention_backward_stub(
        qa.scalar_type(),
        cpu::FlashAttentionBackwardArgs{ga.const_data_ptr(), qa.const_data_ptr(), ka.const_data_ptr(),
                                        va.const_data_ptr(), oa.const_data_ptr(), lse_c.const_data_ptr(),
                                        delta.mutable_data_ptr(), dq.mutable_data_ptr(), dk.mutable_data_ptr(),
                                        dv.mutable_data_ptr(),
                                        varlen_dims(q, k, p.cu_q, p.cu_k, p.max_q, p.max_k, p.w), p.scale, softcap});
  }
  const auto dt = q.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt), sinks_grad_or_empty(q, sinks, lse_c.unsqueeze(0), delta.unsqueeze(0))};
}

metal::FlashAttentionOptions varlen_metal_options(const VarlenProblem& p, double softcap, const OptTensor& sinks) {
  metal::FlashAttentionOptions o = attention_metal_options(p.w, p.scale, softcap, sinks);
  o.max_q = p.max_q;
  o.max_k = p.max_k;
  return o;
}

// The Metal kernels read (heads, total, D) copies and the offsets on q's device.
Tensor heads_major(const Tensor& t) { return swap_rows_and_heads(t, t.scalar_type()); }

std::tuple<Tensor, Tensor> varlen_forward_metal(const Tensor& q, const Tensor& k, const Tensor& v,
                                                const Tensor& cu_q, const Tensor& cu_k, const VarlenProblem& p,
                                                double softcap, const OptTensor& sinks) {
  const Tensor qh = heads_major(q), kh = heads_major(k), vh = heads_major(v);
  Tensor out = at::empty(qh.sizes(), qh.options());
  Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(lse_dtype(q)));
  if (out.numel() == 0) return {rows_major(out, q.scalar_type()), lse};
  if (k.numel() == 0) {  // no key in any sequence: zeros / -inf (the sink), nothing to launch
    out.zero_();
    if (sinks.has_value()) {
      lse.copy_(sinks->to(at::kFloat).view({-1, 1}).expand(lse.sizes()));
    } else {
      lse.fill_(-std::numeric_limits<float>::infinity());
    }
    return {rows_major(out, q.scalar_type()), lse};
  }
  const Tensor sinks_f = sinks.has_value() ? sinks->to(at::kFloat).contiguous() : at::zeros({1}, lse.options());
  metal::flash_attention_forward(kVarlenOp, {qh, kh, vh, sinks_f, out, lse, cu_q.contiguous(), cu_k.contiguous()},
                                 varlen_metal_options(p, softcap, sinks));
  return {rows_major(out, q.scalar_type()), lse};
}

AttentionGrads varlen_backward_metal(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Tensor& out, const Tensor& lse, const Tensor& cu_q, const Tensor& cu_k,
                                     const VarlenProblem& p, double softcap, const OptTensor& sinks) {
  const Tensor qh = heads_major(q), kh = heads_major(k), vh = heads_major(v);
  Tensor dq = at::empty(qh.sizes(), qh.options());
  Tensor dk = at::empty(kh.sizes(), kh.options());
  Tensor dv = at::empty(vh.sizes(), vh.options());
  const auto dt = q.scalar_type();
  if (q.numel() == 0 || k.numel() == 0) {
    const Tensor no_grad =
        sinks.has_value() ? at::zeros(sinks->sizes(), sinks->options()) : at::empty({0}, q.options());
    return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options()), at::zeros(v.sizes(), v.options()),
            no_grad};
  }
  const Tensor lse_c = lse.contiguous(), delta = at::empty(lse.sizes(), lse_c.options());
  metal::flash_attention_backward(kVarlenBackwardOp,
                                  {heads_major(grad_out), qh, kh, vh, heads_major(out), lse_c, delta, dq, dk, dv,
                                   cu_q.contiguous(), cu_k.contiguous()},
                                  varlen_metal_options(p, softcap, sinks));
  return {rows_major(dq, dt), rows_major(dk, dt), rows_major(dv, dt),
          sinks_grad_or_empty(q, sinks, lse_c.unsqueeze(0), delta.unsqueeze(0))};
}

std::tuple<Tensor, Tensor> flash_attention_varlen_impl(const Tensor& q, const Tensor& k, const Tensor& v,
                                                       const Tensor& cu_q, const Tensor& cu_k, c10::SymInt max_q,
                                                       c10::SymInt max_k, bool causal, std::optional<double> scale,
                                                       int64_t window_left, int64_t window_right, double softcap,
                                                       const OptTensor& sinks) {
  check_varlen_inputs(kVarlenOp, q, k, v, cu_q, cu_k, max_q, max_k, scale);
  check_attention_options(kVarlenOp, q, window_left, window_right, softcap, sinks);
  const VarlenProblem p = varlen_problem(kVarlenOp, q, k, cu_q, cu_k, max_q.expect_int(), max_k.expect_int(), causal,
                                         scale, window_left, window_right);
  if (use_metal_path(q)) return varlen_forward_metal(q, k, v, cu_q, cu_k, p, softcap, sinks);
  return varlen_forward_cpu(q, k, v, p, softcap, sinks);
}

void check_varlen_backward_inputs(const Tensor& grad_out, const Tensor& q, const Tensor& out, const Tensor& lse) {
  const char* op = kVarlenBackwardOp;
  TORCH_CHECK(grad_out.sym_sizes() == q.sym_sizes(), op, ": grad_out must have the shape of q ", q.sym_sizes(),
              ", got ", grad_out.sym_sizes());
  TORCH_CHECK(out.sym_sizes() == q.sym_sizes(), op, ": out must have the shape of q ", q.sym_sizes(), ", got ",
              out.sym_sizes());
  check_same_dtype(grad_out, q, op, "grad_out", "q");
  check_same_dtype(out, q, op, "out", "q");
  check_same_device(grad_out, q, op, "grad_out", "q");
  check_same_device(out, q, op, "out", "q");
  check_same_device(lse, q, op, "lse", "q");
  TORCH_CHECK(lse.dim() == 2 && lse.sym_size(0) == q.sym_size(1) && lse.sym_size(1) == q.sym_size(0), op,
              ": lse must have shape (q heads, total_q) = [", q.sym_size(1), ", ", q.sym_size(0), "], got ",
              lse.sym_sizes());
  TORCH_CHECK(lse.scalar_type() == lse_dtype(q), op, ": lse must be ", lse_dtype(q), " for ", q.scalar_type(),
              " inputs, got ", lse.scalar_type());
}

AttentionGrads flash_attention_varlen_backward_impl(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                                    const Tensor& v, const Tensor& out, const Tensor& lse,
                                                    const Tensor& cu_q, const Tensor& cu_k, c10::SymInt max_q,
                                                    c10::SymInt max_k, bool causal, std::optional<double> scale,
                                                    int64_t window_left, int64_t window_right, double softcap,
                                                    const OptTensor& sinks) {
  check_varlen_inputs(kVarlenBackwardOp, q, k, v, cu_q, cu_k, max_q, max_k, scale);
  check_varlen_backward_inputs(grad_out, q, out, lse);
  check_attention_options(kVarlenBackwardOp, q, window_left, window_right, softcap, sinks);
  const VarlenProblem p = varlen_problem(kVarlenBackwardOp, q, k, cu_q, cu_k, max_q.expect_int(), max_k.expect_int(),
                                         causal, scale, window_left, window_right);
  if (use_metal_path(q)) return varlen_backward_metal(grad_out, q, k, v, out, lse, cu_q, cu_k, p, softcap, sinks);
  return varlen_backward_cpu(grad_out, q, k, v, out, lse, p, softcap, sinks);
}

std::tuple<Tensor, Tensor> flash_attention_varlen_meta(const Tensor& q, const Tensor& k, const Tensor& v,
                                                       const Tensor& cu_q, const Tensor& cu_k, c10::SymInt max_q,
                                                       c10::SymInt max_k, bool causal, std::optional<double> scale,
                                                       int64_t window_left, int64_t window_right, double softcap,
                                                       const OptTensor& sinks) {
  check_varlen_inputs(kVarlenOp, q, k, v, cu_q, cu_k, max_q, max_k, scale);
  check_attention_options(kVarlenOp, q, window_left, window_right, softcap, sinks);
  return {at::empty_symint(q.sym_sizes(), q.options()),
          at::empty_symint({q.sym_size(1), q.sym_size(0)}, q.options().dtype(lse_dtype(q)))};
}

AttentionGrads flash_attention_varlen_backward_meta(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                                    const Tensor& v, const Tensor& out, const Tensor& lse,
                                                    const Tensor& cu_q, const Tensor& cu_k, c10::SymInt max_q,
                                                    c10::SymInt max_k, bool causal, std::optional<double> scale,
                                                    int64_t window_left, int64_t window_right, double softcap,
                                                    const OptTensor& sinks) {
  check_varlen_inputs(kVarlenBackwardOp, q, k, v, cu_q, cu_k, max_q, max_k, scale);
  check_varlen_backward_inputs(grad_out, q, out, lse);
  check_attention_options(kVarlenBackwardOp, q, window_left, window_right, softcap, sinks);
  return {at::empty_symint(q.sym_sizes(), q.options()), at::empty_symint(k.sym_sizes(), k.options()),
          at::empty_symint(v.sym_sizes(), v.options()),
          sinks.has_value() ? at::empty_symint(sinks->sym_sizes(), sinks->options()) : at::empty({0}, q.options())};
}

using VarlenForwardSignature = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                           const Tensor&, c10::SymInt, c10::SymInt, bool,
                                                           std::optional<double>, int64_t, int64_t, double,
                                                           const OptTensor&);
using VarlenBackwardSignature = AttentionGrads(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                               const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                               c10::SymInt, c10::SymInt, bool, std::optional<double>, int64_t,
                                               int64_t, double, const OptTensor&);

class FlashAttentionVarlenFunction : public torch::autograd::Function<FlashAttentionVarlenFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& q,
                                                const Tensor& k, const Tensor& v, const Tensor& cu_q,
                                                const Tensor& cu_k, c10::SymInt max_q, c10::SymInt max_k,
                                                bool causal, std::optional<double> scale, int64_t window_left,
                                                int64_t window_right, double softcap, const OptTensor& sinks) {
    static auto op = typed_op<VarlenForwardSignature>("my_mps_ops::flash_attention_varlen");
    Tensor out, lse;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, lse) =
          op.call(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window_left, window_right, softcap, sinks);
    }
    save_metal_emulation(ctx);
    ctx->save_for_backward({q, k, v, out, lse, cu_q, cu_k, sinks.value_or(Tensor())});
    ctx->saved_data["max_q"] = max_q;
    ctx->saved_data["max_k"] = max_k;
    save_attention_options(ctx, causal, scale, window_left, window_right, softcap);
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const BackwardEmulationScope emulation(ctx);
    static auto op = typed_op<VarlenBackwardSignature>("my_mps_ops::flash_attention_varlen_backward");
    torch::autograd::variable_list grads(13);
    const auto saved = ctx->get_saved_variables();
    // needs_input_grad counts tensor arguments: q, k, v, cu_q, cu_k, sinks.
    const bool want_sinks = saved[7].defined() && ctx->needs_input_grad(5);
    const bool any = ctx->needs_input_grad(0) || ctx->needs_input_grad(1) || ctx->needs_input_grad(2) || want_sinks;
    if (!grad_outputs[0].defined() || !any) return grads;
    const std::optional<double> scale = saved_scale(ctx);
    const OptTensor sinks = saved[7].defined() ? OptTensor(saved[7]) : std::nullopt;
    auto [dq, dk, dv, dsinks] =
        op.call(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6],
                ctx->saved_data["max_q"].toSymInt(), ctx->saved_data["max_k"].toSymInt(),
                ctx->saved_data["causal"].toBool(), scale, ctx->saved_data["window_left"].toInt(),
                ctx->saved_data["window_right"].toInt(), ctx->saved_data["softcap"].toDouble(), sinks);
    if (ctx->needs_input_grad(0)) grads[0] = dq;
    if (ctx->needs_input_grad(1)) grads[1] = dk;
    if (ctx->needs_input_grad(2)) grads[2] = dv;
    if (want_sinks) grads[12] = dsinks;
    return grads;
  }
};

// Under torch.func's differentiating transforms: the dense composite per
// sequence (the offsets read on the host).
std::tuple<Tensor, Tensor> flash_attention_varlen_composite(const Tensor& q, const Tensor& k, const Tensor& v,
                                                            const Tensor& cu_q, const Tensor& cu_k,
                                                            const c10::SymInt& max_q, const c10::SymInt& max_k,
                                                            bool causal, std::optional<double> scale,
                                                            int64_t window_left, int64_t window_right, double softcap,
                                                            const OptTensor& sinks) {
  check_varlen_inputs(kVarlenOp, q, k, v, cu_q, cu_k, max_q, max_k, scale);
  check_attention_options(kVarlenOp, q, window_left, window_right, softcap, sinks);
  // Under the transform every tensor, new ones included, is wrapped (no
  // storage to read): the offsets are read element by element.
  const auto values = [](const Tensor& cu) {
    std::vector<int32_t> host(cu.size(0));
    for (int64_t i = 0; i < cu.size(0); ++i) host[i] = cu[i].item<int32_t>();
    return host;
  };
  const std::vector<int32_t> cq = values(cu_q), ck = values(cu_k);
  check_cu_values(kVarlenOp, cq.data(), cq.size(), q.size(0), max_q.expect_int(), "cu_seqlens_q", "max_seqlen_q");
  check_cu_values(kVarlenOp, ck.data(), ck.size(), k.size(0), max_k.expect_int(), "cu_seqlens_k", "max_seqlen_k");
  // Windows wider than the longest pair are unbounded for every sequence.
  const AttentionWindow w = varlen_window(max_q.expect_int(), max_k.expect_int(), false, window_left, window_right);
  std::vector<Tensor> outs, lses;
  for (size_t b = 0; b + 1 < cq.size(); ++b) {
    const auto dense = [](const Tensor& t, int64_t begin, int64_t end) {
      return t.narrow(0, begin, end - begin).transpose(0, 1).unsqueeze(0);
    };
    auto [o, l] = flash_attention_composite(dense(q, cq[b], cq[b + 1]), dense(k, ck[b], ck[b + 1]),
                                            dense(v, ck[b], ck[b + 1]), causal, scale, w.left, w.right, softcap,
                                            sinks);
    outs.push_back(o.squeeze(0).transpose(0, 1));
    lses.push_back(l.squeeze(0));
  }
  if (outs.empty()) {
    return {at::empty(q.sizes(), q.options()), at::empty({q.size(1), 0}, q.options().dtype(lse_dtype(q)))};
  }
  return {at::cat(outs, 0), at::cat(lses, 1)};
}

std::tuple<Tensor, Tensor> flash_attention_varlen_autograd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                           const Tensor& cu_q, const Tensor& cu_k, c10::SymInt max_q,
                                                           c10::SymInt max_k, bool causal,
                                                           std::optional<double> scale, int64_t window_left,
                                                           int64_t window_right, double softcap,
                                                           const OptTensor& sinks) {
  if (under_functorch_differentiation(q, k, v, sinks)) {
    return flash_attention_varlen_composite(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window_left,
                                            window_right, softcap, sinks);
  }
  auto outputs = FlashAttentionVarlenFunction::apply(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window_left,
                                                     window_right, softcap, sinks);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(my_mps_ops, CPU, m) {
  m.impl("flash_attention", &flash_attention_impl);
  m.impl("flash_attention_backward", &flash_attention_backward_impl);
  m.impl("flash_attention_varlen", &flash_attention_varlen_impl);
  m.impl("flash_attention_varlen_backward", &flash_attention_varlen_backward_impl);
}

TORCH_LIBRARY_IMPL(my_mps_ops, MPS, m) {
  m.impl("flash_attention", &flash_attention_impl);
  m.impl("flash_attention_backward", &flash_attention_backward_impl);
  m.impl("flash_attention_varlen", &flash_attention_varlen_impl);
  m.impl("flash_attention_varlen_backward", &flash_attention_varlen_backward_impl);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Meta, m) {
  m.impl("flash_attention", &flash_attention_meta);
  m.impl("flash_attention_backward", &flash_attention_backward_meta);
  m.impl("flash_attention_varlen", &flash_attention_varlen_meta);
  m.impl("flash_attention_varlen_backward", &flash_attention_varlen_backward_meta);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Autograd, m) {
  m.impl("flash_attention", &flash_attention_autograd);
  // The backward has no derivative of its own: double backward raises clearly.
  m.impl("flash_attention_backward", double_backward_unsupported_kernel());
  m.impl("flash_attention_varlen", &flash_attention_varlen_autograd);
  m.impl("flash_attention_varlen_backward", double_backward_unsupported_kernel());
}

}  // namespace my_mps_ops
