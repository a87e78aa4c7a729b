// linear_cross_entropy: F.cross_entropy(softcap(hidden @ weight.T + bias),
// target) + z_loss * lse^2 per counted row, without ever holding the [N, V]
// logits. The logits of float16 / bfloat16 inputs are taken to float32 before
// the loss, and the loss is float32 (float64 for float64), as language models
// compute it (transformers' ForCausalLMLoss upcasts the logits first). Rows are taken a chunk at a time: the chunk's logits come from one
// matmul, a fused per-row pass (CPU loop or Metal kernel) turns them into the
// rows' loss and lse and, for a gradient, into d loss / d logits in place,
// and two more matmuls add the chunk's share of grad_hidden and grad_weight.
//
// With a reduction ("mean", "sum") and inputs that need a gradient, the
// autograd Function takes the forward and the gradient in that one pass
// (linear_cross_entropy_with_grad, for a loss gradient of 1) and its backward
// only scales the saved gradients: 3 matmuls in all, as the unfused
// hidden @ weight.T with F.cross_entropy. Otherwise (reduction "none", or a
// gradient with create_graph=True) linear_cross_entropy_backward recomputes
// each chunk's logits: 4 matmuls. Weight is read once per chunk and matmul.
//
// Loop: cpu/linear_cross_entropy_kernels.cpp; Metal row pass:
// metal/linear_cross_entropy.cpp and shaders/linear_cross_entropy.metal.
#include "cpu/linear_cross_entropy.h"
#include "metal/linear_cross_entropy.h"
#include "ops/autograd_emulation.h"
#include "ops/common.h"
#include "ops/double_backward.h"
#include "ops/loss.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/cross_entropy_loss.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <string>
#include <tuple>

namespace my_mps_ops {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Grads = std::tuple<Tensor, Tensor, Tensor>;

constexpr const char* kLinearCrossEntropyOp = "my_mps_ops.linear_cross_entropy";
constexpr const char* kLinearCrossEntropyBackwardOp = "my_mps_ops.linear_cross_entropy_backward";
constexpr const char* kLinearCrossEntropyWithGradOp = "my_mps_ops.linear_cross_entropy_with_grad";
// Logits of one chunk of rows, in the accumulation dtype: an eighth of all
// the rows' logits, within 64..256 MiB (512 rows of a 128k vocabulary in
// float32 at most), at least 16 rows for the matmuls. Larger chunks mean
// fewer passes over the weight and its gradient (each chunk reads weight
// twice and reads and writes grad_weight once), smaller ones less memory.
constexpr int64_t kMinChunkBytes = int64_t(64) << 20;
constexpr int64_t kMaxChunkBytes = int64_t(256) << 20;
constexpr int64_t kMinChunkRows = 16;

struct LceOptions {
  int64_t ignore_index;
  double smoothing;
  double softcap;  // 0: none
  double z_loss;
  Reduction reduction;
};

LceOptions lce_options(const char* op, int64_t ignore_index, double smoothing, c10::string_view reduction,
                       const std::optional<double>& softcap, double z_loss) {
  TORCH_CHECK(smoothing >= 0.0 && smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ", smoothing);
  TORCH_CHECK(!softcap.has_value() || *softcap > 0.0, op, ": logit_softcap must be positive or None, got ",
              softcap.value_or(0.0));
  TORCH_CHECK(z_loss >= 0.0, op, ": z_loss must be >= 0, got ", z_loss);
  return LceOptions{ignore_index, smoothing, softcap.value_or(0.0), z_loss, parse_reduction(op, reduction)};
}

void check_lce_inputs(const char* op, const Tensor& hidden, const Tensor& weight, const Tensor& target,
                      const OptTensor& bias) {
  check_float_dtype(hidden, op, "hidden");
  TORCH_CHECK(hidden.dim() == 2, op, ": hidden must have shape [N, H], got ", hidden.sym_sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.sym_size(1) == hidden.sym_size(1), op,
              ": weight must have shape [V, H] with H = hidden.size(1) = ", hidden.sym_size(1), ", got ",
              weight.sym_sizes());
  TORCH_CHECK(weight.sym_size(0) > 0, op, ": weight must have at least one class (row)");
  check_same_dtype(weight, hidden, op, "weight", "hidden");
  check_same_device(weight, hidden, op, "weight", "hidden");
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64 class indices, got ",
              target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.sym_size(0) == hidden.sym_size(0), op, ": target must have shape [N] = [",
              hidden.sym_size(0), "], got ", target.sym_sizes());
  check_same_device(target, hidden, op, "target", "hidden");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->sym_size(0) == weight.sym_size(0), op, ": bias must have shape [V] = [",
                weight.sym_size(0), "], got ", bias->sym_sizes());
    check_same_dtype(*bias, hidden, op, "bias", "hidden");
    check_same_device(*bias, hidden, op, "bias", "hidden");
  }
}

// The options after every argument check of `op`; `scalar_loss`: the op
// returns gradients of a reduced loss, so reduction "none" is refused.
LceOptions checked_lce_options(const char* op, const Tensor& hidden, const Tensor& weight, const Tensor& target,
                               const OptTensor& bias, int64_t ignore_index, double smoothing,
                               c10::string_view reduction, const std::optional<double>& softcap, double z_loss,
                               bool scalar_loss = false) {
  const LceOptions o = lce_options(op, ignore_index, smoothing, reduction, softcap, z_loss);
  TORCH_CHECK(!scalar_loss || o.reduction != Reduction::None, op,
              ": needs reduction \"mean\" or \"sum\" (a scalar loss)");
  check_lce_inputs(op, hidden, weight, target, bias);
  return o;
}

// Per-row statistics and the row pass run in float32 (float64 for float64).
at::ScalarType lce_acc_dtype(const Tensor& hidden) {
  return hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

int64_t chunk_rows(int64_t rows, int64_t classes, at::ScalarType acc) {
  const int64_t bytes_per_row = std::max<int64_t>(classes * static_cast<int64_t>(c10::elementSize(acc)), 1);
  const int64_t chunk_bytes = std::clamp<int64_t>(rows * bytes_per_row / 8, kMinChunkBytes, kMaxChunkBytes);
  return std::clamp<int64_t>(chunk_bytes / bytes_per_row, kMinChunkRows, std::max<int64_t>(rows, 1));
}

// Gradient accumulators: grad_weight / grad_bias sum over chunks in the
// accumulation dtype, then take the parameter's dtype.
struct LceGrads {
  Tensor hidden, weight_acc, bias_acc;
};

// One pass over the rows in chunks. `scale` [rows] (accumulation dtype): the
// gradient of the reduced loss with respect to each row's loss, or undefined
// for the forward alone. Writes loss_rows and lse [rows].
void run_chunks(const Tensor& hidden, const Tensor& weight, const OptTensor& bias, const Tensor& target,
                const LceOptions& o, const Tensor& scale, const std::array<bool, 3>& mask, const Tensor& loss_rows,
                const Tensor& lse, LceGrads& grads) {
  const at::ScalarType acc = lce_acc_dtype(hidden);
  const int64_t rows = hidden.size(0), classes = weight.size(0);
  const bool metal = use_metal_path(hidden), want_grad = scale.defined();
  const Tensor weight_t = weight.t();
  const int64_t step = chunk_rows(rows, classes, acc);
  for (int64_t r0 = 0; r0 < rows; r0 += step) {
    const int64_t n = std::min(step, rows - r0);
    const Tensor h = hidden.narrow(0, r0, n), t = target.narrow(0, r0, n);
    const Tensor logits = bias.has_value() ? at::addmm(*bias, h, weight_t) : at::mm(h, weight_t);
    const Tensor z = logits.to(acc).contiguous();  // the row pass works in place
    const Tensor loss_c = loss_rows.narrow(0, r0, n), lse_c = lse.narrow(0, r0, n);
    const Tensor scale_c = want_grad ? scale.narrow(0, r0, n).contiguous() : Tensor();
    if (metal) {
      metal::linear_cross_entropy_rows(kLinearCrossEntropyOp, {z, t, loss_c, lse_c, scale_c},
                                       {o.ignore_index, o.smoothing, o.softcap, o.z_loss});
    } else {
      const int64_t bad = cpu::linear_cross_entropy_rows_stub(
          acc, cpu::LinearCrossEntropyRowsArgs{z.mutable_data_ptr(), t.const_data_ptr<int64_t>(),
                                               loss_c.mutable_data_ptr(), lse_c.mutable_data_ptr(),
                                               want_grad ? scale_c.const_data_ptr() : nullptr, n, classes,
                                               o.ignore_index, o.smoothing, o.softcap, o.z_loss});
      TORCH_CHECK(bad < 0, kLinearCrossEntropyOp, ": target[", r0 + bad, "] = ",
                  bad >= 0 ? t.const_data_ptr<int64_t>()[bad] : 0, " is out of range for ", classes,
                  " classes (and is not ignore_index ", o.ignore_index, ")");
    }
    if (!want_grad) continue;
    const Tensor dz = z.to(hidden.scalar_type());
    if (mask[0]) {
      Tensor out = grads.hidden.narrow(0, r0, n);
      at::mm_out(out, dz, weight);
    }
    if (mask[1]) {
      if (r0 == 0) {  // the first chunk's product starts the sum (no zero fill)
        grads.weight_acc = at::mm(dz.t(), h).to(acc);
      } else if (acc == hidden.scalar_type()) {
        grads.weight_acc.addmm_(dz.t(), h);
      } else {  // a float16 / bfloat16 product per chunk, summed in float32
        grads.weight_acc.add_(at::mm(dz.t(), h));
      }
    }
    if (mask[2]) grads.bias_acc = r0 == 0 ? z.sum(0) : grads.bias_acc.add_(z.sum(0));
  }
}

// The rows that are not ignored, and their indices, on the native CPU path
// (their matmuls are skipped); every row on the Metal path, where selecting
// them would wait for the GPU (ignored rows get a zero gradient there).
struct CountedRows {
  Tensor hidden, target, index;  // index undefined: every row
};
CountedRows counted_rows(const Tensor& hidden, const Tensor& target, int64_t ignore_index) {
  if (use_metal_path(hidden) || hidden.size(0) == 0) return {hidden, target, Tensor()};
  const Tensor keep = target.ne(ignore_index);
  const int64_t kept = keep.sum().item<int64_t>();
  if (kept == hidden.size(0)) return {hidden, target, Tensor()};
  const Tensor index = keep.nonzero().squeeze(1);
  return {hidden.index_select(0, index), target.index_select(0, index), index};
}

// (loss, lse) and, when scale_of is given, the gradients of the loss.
struct LceResult {
  Tensor loss, lse, grad_hidden, grad_weight, grad_bias;
};

LceResult linear_cross_entropy_pass(const Tensor& hidden_in, const Tensor& weight_in,
                                    const Tensor& target_in, const OptTensor& bias_in, const LceOptions& o,
                                    const Tensor& grad_loss, std::array<bool, 3> mask) {
  const at::ScalarType acc = lce_acc_dtype(hidden_in);
  const Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous(), target = target_in.contiguous();
  const OptTensor bias = bias_in.has_value() ? OptTensor(bias_in->contiguous()) : std::nullopt;
  const int64_t rows = hidden.size(0), classes = weight.size(0);
  mask[2] = mask[2] && bias.has_value();
  const bool want_grad = grad_loss.defined() && (mask[0] || mask[1] || mask[2]);
  const CountedRows counted = counted_rows(hidden, target, o.ignore_index);
  const int64_t n = counted.hidden.size(0);
  Tensor loss_rows = at::zeros({n}, hidden.options().dtype(acc)), lse = at::zeros({n}, hidden.options().dtype(acc));
  LceGrads grads;
  Tensor scale;
  if (want_grad) {
    // The factor each row's loss gets, from every row's target (a mean counts them all).
    scale = row_scale(grad_loss, target, o.ignore_index, o.reduction, acc);
    if (counted.index.defined()) scale = scale.index_select(0, counted.index);
    if (mask[0]) grads.hidden = at::empty({n, hidden.size(1)}, hidden.options());
  }
  if (n > 0) run_chunks(counted.hidden, weight, bias, counted.target, o, scale, mask, loss_rows, lse, grads);
  if (want_grad && n == 0) {  // every row ignored: zero gradients
    if (mask[1]) grads.weight_acc = at::zeros({classes, hidden.size(1)}, hidden.options().dtype(acc));
    if (mask[2]) grads.bias_acc = at::zeros({classes}, hidden.options().dtype(acc));
  }
  if (counted.index.defined()) {  // back to every row: ignored ones have loss 0 (and lse 0)
    loss_rows = at::zeros({rows}, loss_rows.options()).index_copy_(0, counted.index, loss_rows);
    lse = at::zeros({rows}, lse.options()).index_copy_(0, counted.index, lse);
    if (want_grad && mask[0])
      grads.hidden = at::zeros_like(hidden).index_copy_(0, counted.index, grads.hidden);
  }
  LceResult result;
  result.loss = reduce_rows(loss_rows, target, o.ignore_index, o.reduction, acc);
  result.lse = lse;
  result.grad_hidden = want_grad && mask[0] ? grads.hidden : unwanted_grad(hidden);
  result.grad_weight = want_grad && mask[1] ? grads.weight_acc.to(weight.scalar_type()) : unwanted_grad(hidden);
  result.grad_bias = want_grad && mask[2] ? grads.bias_acc.to(bias->scalar_type()) : unwanted_grad(hidden);
  return result;
}

// ------------------------------------------------------- CPU and MPS kernels

std::tuple<Tensor, Tensor> linear_cross_entropy_impl(const Tensor& hidden, const Tensor& weight, const Tensor& target,
                                                     const OptTensor& bias, int64_t ignore_index, double smoothing,
                                                     c10::string_view reduction,
                                                     std::optional<double> softcap, double z_loss) {
  const LceOptions o = checked_lce_options(kLinearCrossEntropyOp, hidden, weight, target, bias, ignore_index,
                                           smoothing, reduction, softcap, z_loss);
  LceResult r = linear_cross_entropy_pass(hidden, weight, target, bias, o, Tensor(), {false, false, false});
  return {r.loss, r.lse};
}

Grads linear_cross_entropy_backward_impl(const Tensor& grad_loss, const Tensor& hidden, const Tensor& weight,
                                         const Tensor& target, const OptTensor& bias, int64_t ignore_index,
                                         double smoothing, c10::string_view reduction, std::optional<double> softcap,
                                         double z_loss, std::array<bool, 3> mask) {
  const LceOptions o = checked_lce_options(kLinearCrossEntropyBackwardOp, hidden, weight, target, bias, ignore_index,
                                           smoothing, reduction, softcap, z_loss);
  LceResult r = linear_cross_entropy_pass(hidden, weight, target, bias, o, grad_loss, mask);
  return {r.grad_hidden, r.grad_weight, r.grad_bias};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_cross_entropy_with_grad_impl(
    const Tensor& hidden, const Tensor& weight, const Tensor& target, const OptTensor& bias, int64_t ignore_index,
    double smoothing, c10::string_view reduction, std::optional<double> softcap, double z_loss,
    std::array<bool, 3> mask) {
  const LceOptions o = checked_lce_options(kLinearCrossEntropyWithGradOp, hidden, weight, target, bias, ignore_index,
                                           smoothing, reduction, softcap, z_loss, /*scalar_loss=*/true);
  const Tensor one = at::ones({}, hidden.options().dtype(lce_acc_dtype(hidden)));
  LceResult r = linear_cross_entropy_pass(hidden, weight, target, bias, o, one, mask);
  return {r.loss, r.lse, r.grad_hidden, r.grad_weight, r.grad_bias};
}

// ------------------------------------------------------------ Meta kernels
// Shapes only; symbolic-size safe.

Tensor loss_like(const Tensor& hidden, Reduction reduction) {
  const auto options = hidden.options().dtype(lce_acc_dtype(hidden));
  return reduction == Reduction::None ? at::empty_symint({hidden.sym_size(0)}, options) : at::empty({}, options);
}
Grads grads_meta(const Tensor& hidden, const Tensor& weight, const OptTensor& bias, std::array<bool, 3> mask) {
  return {mask[0] ? at::empty_like(hidden, at::MemoryFormat::Contiguous) : unwanted_grad(hidden),
          mask[1] ? at::empty_like(weight, at::MemoryFormat::Contiguous) : unwanted_grad(hidden),
          mask[2] && bias.has_value() ? at::empty_like(*bias, at::MemoryFormat::Contiguous) : unwanted_grad(hidden)};
}

std::tuple<Tensor, Tensor> linear_cross_entropy_meta(const Tensor& hidden, const Tensor& weight, const Tensor& target,
                                                     const OptTensor& bias, int64_t ignore_index, double smoothing,
                                                     c10::string_view reduction,
                                                     std::optional<double> softcap, double z_loss) {
  const LceOptions o = checked_lce_options(kLinearCrossEntropyOp, hidden, weight, target, bias, ignore_index,
                                           smoothing, reduction, softcap, z_loss);
  return {loss_like(hidden, o.reduction),
          at::empty_symint({hidden.sym_size(0)}, hidden.options().dtype(lce_acc_dtype(hidden)))};
}

Grads linear_cross_entropy_backward_meta(const Tensor& grad_loss, const Tensor& hidden, const Tensor& weight,
                                         const Tensor& target, const OptTensor& bias, int64_t ignore_index,
                                         double smoothing, c10::string_view reduction, std::optional<double> softcap,
                                         double z_loss, std::array<bool, 3> mask) {
  checked_lce_options(kLinearCrossEntropyBackwardOp, hidden, weight, target, bias, ignore_index, smoothing, reduction,
                      softcap, z_loss);
  return grads_meta(hidden, weight, bias, mask);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_cross_entropy_with_grad_meta(
    const Tensor& hidden, const Tensor& weight, const Tensor& target, const OptTensor& bias, int64_t ignore_index,
    double smoothing, c10::string_view reduction, std::optional<double> softcap, double z_loss,
    std::array<bool, 3> mask) {
  const LceOptions o = checked_lce_options(kLinearCrossEntropyWithGradOp, hidden, weight, target, bias, ignore_index,
                                           smoothing, reduction, softcap, z_loss, /*scalar_loss=*/true);
  auto [gh, gw, gb] = grads_meta(hidden, weight, bias, mask);
  return {loss_like(hidden, o.reduction),
          at::empty_symint({hidden.sym_size(0)}, hidden.options().dtype(lce_acc_dtype(hidden))), gh, gw, gb};
}

// ---------------------------------------------------------------- autograd

using BackwardSignature = Grads(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, int64_t,
                                double, c10::string_view, std::optional<double>, double, std::array<bool, 3>);

class LinearCrossEntropyFunction : public torch::autograd::Function<LinearCrossEntropyFunction> {
 public:
  // prefold: take the gradients in the forward pass (reduction mean / sum,
  // and some input needs a gradient).
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& hidden,
                                                const Tensor& weight, const Tensor& target, const OptTensor& bias,
                                                int64_t ignore_index, double smoothing, c10::string_view reduction,
                                                std::optional<double> softcap, double z_loss,
                                                std::array<bool, 3> wanted, bool prefold) {
    Tensor loss, lse, gh, gw, gb;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      if (prefold) {
        static auto op = typed_op<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
            const Tensor&, const Tensor&, const Tensor&, const OptTensor&, int64_t, double, c10::string_view,
            std::optional<double>, double, std::array<bool, 3>)>("my_mps_ops::linear_cross_entropy_with_grad");
        std::tie(loss, lse, gh, gw, gb) =
            op.call(hidden, weight, target, bias, ignore_index, smoothing, reduction, softcap, z_loss, wanted);
      } else {
        static auto op = typed_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                             const OptTensor&, int64_t, double, c10::string_view,
                                                             std::optional<double>, double)>(
            "my_mps_ops::linear_cross_entropy");
        std::tie(loss, lse) = op.call(hidden, weight, target, bias, ignore_index, smoothing, reduction, softcap, z_loss);
      }
    }
    save_metal_emulation(ctx);
    ctx->save_for_backward({hidden, weight, target, bias.value_or(Tensor()), gh, gw, gb});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["smoothing"] = smoothing;
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["softcap"] = softcap.has_value() ? c10::IValue(*softcap) : c10::IValue();
    ctx->saved_data["z_loss"] = z_loss;
    ctx->saved_data["prefold"] = prefold;
    ctx->mark_non_differentiable({lse});
    return {loss, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const BackwardEmulationScope emulation(ctx);
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   saved[3].defined() && ctx->needs_input_grad(3)};
    torch::autograd::variable_list none(12);
    if (!grads[0].defined() || (!mask[0] && !mask[1] && !mask[2])) return none;
    Tensor gh, gw, gb;
    // The saved gradients are constants to autograd: with create_graph=True
    // the backward op runs instead (its own backward raises, naming the op).
    if (ctx->saved_data["prefold"].toBool() && !at::GradMode::is_enabled()) {
      const Tensor& g = grads[0];
      // loss.backward() on the CPU: the saved gradients as they are (no copy of
      // a [V, H] weight gradient); otherwise scaled (no host sync on mps, and
      // no value read from a tensor being traced by torch.compile).
      const bool plain_cpu = g.is_cpu() && !g.key_set().has(c10::DispatchKey::Python) &&
                             !g.key_set().has(c10::DispatchKey::Functionalize);
      const bool unit = plain_cpu && g.numel() == 1 && g.item<double>() == 1.0;
      auto scaled = [&](const Tensor& saved_grad) { return unit ? saved_grad : saved_grad * g.to(saved_grad.scalar_type()); };
      if (mask[0]) gh = scaled(saved[4]);
      if (mask[1]) gw = scaled(saved[5]);
      if (mask[2]) gb = scaled(saved[6]);
    } else {
      static auto op = typed_op<BackwardSignature>("my_mps_ops::linear_cross_entropy_backward");
      const c10::IValue& softcap_value = ctx->saved_data["softcap"];
      const std::optional<double> softcap =
          softcap_value.isNone() ? std::nullopt : std::optional<double>(softcap_value.toDouble());
      const OptTensor bias = saved[3].defined() ? OptTensor(saved[3]) : std::nullopt;
      std::tie(gh, gw, gb) = op.call(grads[0], saved[0], saved[1], saved[2], bias,
                                     ctx->saved_data["ignore_index"].toInt(), ctx->saved_data["smoothing"].toDouble(),
                                     ctx->saved_data["reduction"].toStringRef(), softcap,
                                     ctx->saved_data["z_loss"].toDouble(), mask);
    }
    none[0] = mask[0] ? gh : Tensor();
    none[1] = mask[1] ? gw : Tensor();
    none[3] = mask[2] ? gb : Tensor();
    return none;
  }
};

// Under torch.func's grad / vjp / jvp (ops/common.h): the composite itself.
std::tuple<Tensor, Tensor> linear_cross_entropy_composite(const Tensor& hidden, const Tensor& weight,
                                                          const Tensor& target, const OptTensor& bias,
                                                          const LceOptions& o) {
  const at::ScalarType acc = lce_acc_dtype(hidden);
  Tensor logits = (bias.has_value() ? at::addmm(*bias, hidden, weight.t()) : at::mm(hidden, weight.t())).to(acc);
  if (o.softcap > 0.0) logits = (logits / o.softcap).tanh() * o.softcap;
  const Tensor lse = logits.logsumexp({1});
  const int64_t aten_reduction = o.reduction == Reduction::None   ? at::Reduction::None
                                 : o.reduction == Reduction::Mean ? at::Reduction::Mean
                                                                  : at::Reduction::Sum;
  Tensor loss = at::cross_entropy_loss(logits, target, std::nullopt, aten_reduction, o.ignore_index, o.smoothing);
  if (o.z_loss > 0.0) {
    const Tensor z_rows = (lse * lse * o.z_loss).masked_fill(target.eq(o.ignore_index), 0.0);
    loss = loss + reduce_rows(z_rows, target, o.ignore_index, o.reduction, acc);
  }
  return {loss, lse.detach()};
}

std::tuple<Tensor, Tensor> linear_cross_entropy_autograd(const Tensor& hidden, const Tensor& weight,
                                                         const Tensor& target, const OptTensor& bias,
                                                         int64_t ignore_index, double smoothing,
                                                         c10::string_view reduction, std::optional<double> softcap,
                                                         double z_loss) {
  const LceOptions o = lce_options(kLinearCrossEntropyOp, ignore_index, smoothing, reduction, softcap, z_loss);
  if (under_functorch_differentiation(hidden, weight, target, bias)) {
    check_lce_inputs(kLinearCrossEntropyOp, hidden, weight, target, bias);
    return linear_cross_entropy_composite(hidden, weight, target, bias, o);
  }
  const bool grad_mode = at::GradMode::is_enabled();
  const std::array<bool, 3> wanted{grad_mode && hidden.requires_grad(), grad_mode && weight.requires_grad(),
                                   grad_mode && bias.has_value() && bias->requires_grad()};
  const bool prefold = o.reduction != Reduction::None && (wanted[0] || wanted[1] || wanted[2]);
  auto outs = LinearCrossEntropyFunction::apply(hidden, weight, target, bias, ignore_index, smoothing, reduction,
                                                softcap, z_loss, wanted, prefold);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(my_mps_ops, CPU, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy_impl);
  m.impl("linear_cross_entropy_backward", &linear_cross_entropy_backward_impl);
  m.impl("linear_cross_entropy_with_grad", &linear_cross_entropy_with_grad_impl);
}

TORCH_LIBRARY_IMPL(my_mps_ops, MPS, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy_impl);
  m.impl("linear_cross_entropy_backward", &linear_cross_entropy_backward_impl);
  m.impl("linear_cross_entropy_with_grad", &linear_cross_entropy_with_grad_impl);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Meta, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy_meta);
  m.impl("linear_cross_entropy_backward", &linear_cross_entropy_backward_meta);
  m.impl("linear_cross_entropy_with_grad", &linear_cross_entropy_with_grad_meta);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Autograd, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy_autograd);
  m.impl("linear_cross_entropy_backward", double_backward_unsupported_kernel());
  m.impl("linear_cross_entropy_with_grad", double_backward_unsupported_kernel());
}

}  // namespace my_mps_ops
