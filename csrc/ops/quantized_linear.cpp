// quantized_linear: y = x @ W^T + bias with W held quantized (formats:
// my_mps_ops/quantization.py; MLX's affine, bitsandbytes' nf4/fp4). For a few
// rows of x (decoding) fused products read the codes and expand them where
// they are used, never writing a float weight: y = x @ W^T forward and
// grad_x = grad_out @ W backward. For more rows, W is expanded to float32 a
// tile of output rows at a time (a few MiB, never the whole weight) and each
// tile multiplies x with PyTorch's matmul (the matmul's arithmetic per weight
// outweighs the expansion there). The quantized weight is frozen: it gets no
// gradient.
//
// Kernels: cpu/quantized_kernels.cpp (CPU) or shaders/quantized.metal (Metal).
#include "cpu/quantized.h"
#include "metal/quantized.h"
#include "ops/autograd_emulation.h"
#include "ops/common.h"
#include "ops/double_backward.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/accumulate.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>

namespace my_mps_ops {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr const char* kQuantizedLinearOp = "my_mps_ops.quantized_linear";
constexpr const char* kQuantizedLinearBackwardOp = "my_mps_ops.quantized_linear_backward";
// Float32 bytes of one dequantized tile of output rows: a quarter of a
// 4096 x 4096 weight, so that such a layer takes 4 expansions and 4 matmuls
// (each a parallel region whose threads all have to be scheduled before it
// ends: fewer is faster on a busy machine) while the float weight is never
// held whole.
constexpr int64_t kTileBytes = int64_t(16) << 20;

struct QuantFormat {
  cpu::QuantMode mode;
  int64_t bits, group_size, out_features, in_features;
};

cpu::QuantMode parse_mode(const char* op, c10::string_view mode) {
  if (mode == "affine") return cpu::QuantMode::Affine;
  if (mode == "nf4") return cpu::QuantMode::NF4;
  if (mode == "fp4") return cpu::QuantMode::FP4;
  TORCH_CHECK(false, op, ": mode must be \"affine\", \"nf4\" or \"fp4\", got \"", mode, "\"");
}

QuantFormat check_weight(const char* op, const Tensor& qweight, const Tensor& scales, const OptTensor& biases,
                         int64_t group_size, int64_t bits, c10::string_view mode_name) {
  const cpu::QuantMode mode = parse_mode(op, mode_name);
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0, op, ": group_size must be a positive multiple of 32, got ",
              group_size);
  TORCH_CHECK(qweight.dim() == 2 && scales.dim() == 2 && scales.size(0) == qweight.size(0), op,
              ": qweight must be [out_features, packed] and scales [out_features, groups], got ", qweight.sizes(),
              " and ", scales.sizes());
  TORCH_CHECK(scales.is_floating_point(), op, ": scales must be floating point, got ", scales.scalar_type());
  const int64_t in_features = scales.size(1) * group_size;
  if (mode == cpu::QuantMode::Affine) {
    TORCH_CHECK(bits >= 2 && bits <= 8 && bits != 7, op, ": affine bits must be 2, 3, 4, 5, 6 or 8, got ", bits);
    TORCH_CHECK(qweight.scalar_type() == at::kUInt32, op, ": affine qweight must be uint32 words, got ",
                qweight.scalar_type());
    TORCH_CHECK(qweight.size(1) * 32 == in_features * bits, op, ": qweight has ", qweight.size(1),
                " words per row, but ", scales.size(1), " groups of ", group_size, " codes of ", bits, " bits need ",
                in_features * bits / 32);
    TORCH_CHECK(biases.has_value() && biases->sizes() == scales.sizes(), op,
                ": affine mode needs biases of the scales' shape ", scales.sizes());
  } else {
    TORCH_CHECK(bits == 4, op, ": ", mode_name, " stores 4 bits per weight, got bits=", bits);
    TORCH_CHECK(qweight.scalar_type() == at::kByte, op, ": ", mode_name, " qweight must be uint8, got ",
                qweight.scalar_type());
    TORCH_CHECK(qweight.size(1) * 2 == in_features, op, ": qweight has ", qweight.size(1), " bytes per row, but ",
                in_features, " inputs need ", in_features / 2);
  }
  check_same_device(scales, qweight, op, "scales", "qweight");
  return QuantFormat{mode, bits, group_size, qweight.size(0), in_features};
}

void check_input(const char* op, const Tensor& x, const QuantFormat& f, const Tensor& qweight) {
  check_float_dtype(x, op, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == f.in_features, op, ": x's last dimension must be in_features = ",
              f.in_features, ", got ", x.sizes());
  check_same_device(qweight, x, op, "qweight", "x");
}

// Output rows [row_begin, row_begin + rows) of W as float32 [rows, in].
Tensor dequantized_tile(const char* op, const QuantFormat& f, const Tensor& qweight, const Tensor& scales,
                        const Tensor& biases, int64_t row_begin, int64_t rows) {
  Tensor tile = at::empty({rows, f.in_features}, scales.options());
  if (use_metal_path(tile)) {
    metal::dequantize_rows(op, qweight, scales, biases, tile, row_begin, f.group_size, f.bits,
                           static_cast<uint32_t>(f.mode));
    return tile;
  }
  cpu::dequantize_rows_stub(cpu::DequantizeRowsArgs{qweight.const_data_ptr(), scales.const_data_ptr<float>(),
                                                    biases.const_data_ptr<float>(), tile.mutable_data_ptr<float>(),
                                                    row_begin, row_begin + rows, f.in_features, f.group_size,
                                                    static_cast<int32_t>(f.bits), f.mode});
  return tile;
}

int64_t tile_rows(const QuantFormat& f) {
  // At least 8 rows a tile, at most every row (std::clamp would need out_features >= 8).
  const int64_t rows = std::max<int64_t>(kTileBytes / std::max<int64_t>(4 * f.in_features, 1), 8);
  return std::min<int64_t>(rows, std::max<int64_t>(f.out_features, 1));
}

// Rows of x (forward) and of grad_out (backward) up to which the fused
// products run instead of the tiles, in passes of at most
// kQuantMatvecMaxRows rows. Measured with one thread, 4096 x 4096 at 4 bits:
// the fused forward took 5 ms for 8 rows and 10 ms for 16, the tiles 13 ms
// for 17; the fused grad_x 7 ms for 8 rows and 15-18 ms for 12-16, the tiles
// 9-14 ms for 9-17.
constexpr int64_t kFusedMaxRowsForward = 2 * cpu::kQuantMatvecMaxRows;
static_assert(cpu::kQuantMatvecMaxRows == shaders::kQuantMatvecMaxRows,
              "a pass of the fused products takes as many rows on both paths");
constexpr int64_t kFusedMaxRowsBackward = cpu::kQuantMatvecMaxRows;

bool use_fused(const QuantFormat& f, int64_t rows, int64_t max_rows) {
  return rows > 0 && rows <= max_rows && f.in_features > 0 && f.out_features > 0;
}

struct Prepared {
  Tensor qweight, scales, biases;
};
// Contiguous codes and float32 scales / biases (biases: the scales for
// nf4/fp4, bound but never read).
Prepared prepare(const QuantFormat& f, const Tensor& qweight, const Tensor& scales, const OptTensor& biases) {
  Tensor s = scales.to(at::kFloat).contiguous();
  Tensor b = f.mode == cpu::QuantMode::Affine ? biases->to(at::kFloat).contiguous() : s;
  return {qweight.contiguous(), s, b};
}

cpu::QuantMatvecArgs matvec_args(const QuantFormat& f, const Prepared& w, const Tensor& in, const Tensor& bias,
                                 const Tensor& out) {
  return cpu::QuantMatvecArgs{w.qweight.const_data_ptr(), w.scales.const_data_ptr<float>(),
                              w.biases.const_data_ptr<float>(), in.const_data_ptr(),
                              bias.defined() ? bias.const_data_ptr() : nullptr, out.mutable_data_ptr(), in.size(0),
                              f.out_features, f.in_features, f.group_size, static_cast<int32_t>(f.bits), f.mode,
                              in.scalar_type() == at::kDouble};
}

// ------------------------------------------------------- CPU and MPS kernels

Tensor quantized_linear_impl(const Tensor& x, const Tensor& qweight, const Tensor& scales, const OptTensor& biases,
                             const OptTensor& bias, int64_t group_size, int64_t bits, c10::string_view mode) {
  const QuantFormat f = check_weight(kQuantizedLinearOp, qweight, scales, biases, group_size, bits, mode);
  check_input(kQuantizedLinearOp, x, f, qweight);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == f.out_features, kQuantizedLinearOp,
                ": bias must have shape [out_features] = [", f.out_features, "], got ", bias->sizes());
  }
  const Prepared w = prepare(f, qweight, scales, biases);
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor x2 = x.reshape({-1, f.in_features}).to(acc);
  Tensor out = at::empty({x2.size(0), f.out_features}, x2.options());
  auto shape = x.sizes().vec();
  shape.back() = f.out_features;
  if (use_fused(f, x2.size(0), kFusedMaxRowsForward)) {
    // The Metal kernel reads x as float4 (16-byte aligned).
    const Tensor xc = x2.storage_offset() % 4 == 0 ? x2.contiguous() : x2.clone(at::MemoryFormat::Contiguous);
    const Tensor b = bias.has_value() ? bias->to(acc).contiguous() : Tensor();
    for (int64_t m0 = 0; m0 < xc.size(0); m0 += cpu::kQuantMatvecMaxRows) {
      const int64_t m = std::min(cpu::kQuantMatvecMaxRows, xc.size(0) - m0);
      const Tensor xs = xc.narrow(0, m0, m), outs = out.narrow(0, m0, m);
      if (use_metal_path(xc)) {
        metal::quantized_matvec(kQuantizedLinearOp, w.qweight, w.scales, w.biases, xs, b, outs, f.group_size,
                                f.bits, static_cast<uint32_t>(f.mode));
      } else {
        cpu::quantized_matvec_stub(matvec_args(f, w, xs, b, outs));
      }
    }
    return out.to(x.scalar_type()).reshape(shape);
  }
  const int64_t step = tile_rows(f);
  for (int64_t o0 = 0; o0 < f.out_features; o0 += step) {
    const int64_t n = std::min(step, f.out_features - o0);
    Tensor slice = out.narrow(1, o0, n);
    const Tensor tile = dequantized_tile(kQuantizedLinearOp, f, w.qweight, w.scales, w.biases, o0, n).to(acc);
    if (bias.has_value()) {
      slice.copy_(at::addmm(bias->narrow(0, o0, n).to(acc), x2, tile.t()));
    } else {
      slice.copy_(at::mm(x2, tile.t()));
    }
  }
  return out.to(x.scalar_type()).reshape(shape);
}

std::tuple<Tensor, Tensor> quantized_linear_backward_impl(const Tensor& grad_out, const Tensor& qweight,
                                                          const Tensor& scales, const OptTensor& biases,
                                                          int64_t group_size, int64_t bits, c10::string_view mode,
                                                          bool want_bias) {
  const QuantFormat f = check_weight(kQuantizedLinearBackwardOp, qweight, scales, biases, group_size, bits, mode);
  check_float_dtype(grad_out, kQuantizedLinearBackwardOp, "grad_out");
  TORCH_CHECK(grad_out.size(-1) == f.out_features, kQuantizedLinearBackwardOp,
              ": grad_out's last dimension must be out_features = ", f.out_features, ", got ", grad_out.sizes());
  const Prepared w = prepare(f, qweight, scales, biases);
  const at::ScalarType acc = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // The row count named, not -1: with no output features there is nothing to infer it from.
  const int64_t rows = c10::multiply_integers(grad_out.sizes().begin(), grad_out.sizes().end() - 1);
  const Tensor g2 = grad_out.reshape({rows, f.out_features}).to(acc);
  Tensor grad_x;
  if (use_fused(f, g2.size(0), kFusedMaxRowsBackward)) {
    const Tensor gc = g2.contiguous();
    grad_x = at::empty({g2.size(0), f.in_features}, g2.options());
    for (int64_t m0 = 0; m0 < gc.size(0); m0 += cpu::kQuantMatvecMaxRows) {
      const int64_t m = std::min(cpu::kQuantMatvecMaxRows, gc.size(0) - m0);
      const Tensor gs = gc.narrow(0, m0, m), grad_xs = grad_x.narrow(0, m0, m);
      if (use_metal_path(gc)) {
        metal::quantized_matvec_t(kQuantizedLinearBackwardOp, w.qweight, w.scales, w.biases, gs, grad_xs,
                                  f.group_size, f.bits, static_cast<uint32_t>(f.mode));
      } else {
        cpu::quantized_matvec_t_stub(matvec_args(f, w, gs, Tensor(), grad_xs));
      }
    }
  } else {
    grad_x = at::empty({g2.size(0), f.in_features}, g2.options());
    if (f.out_features == 0) grad_x.zero_();
    const int64_t step = tile_rows(f);
    for (int64_t o0 = 0; o0 < f.out_features; o0 += step) {
      const int64_t n = std::min(step, f.out_features - o0);
      const Tensor tile =
          dequantized_tile(kQuantizedLinearBackwardOp, f, w.qweight, w.scales, w.biases, o0, n).to(acc);
      // The first tile writes grad_x, the others add to it.
      if (o0 == 0) {
        at::mm_out(grad_x, g2.narrow(1, o0, n), tile);
      } else {
        grad_x.addmm_(g2.narrow(1, o0, n), tile);
      }
    }
  }
  auto shape = grad_out.sizes().vec();
  shape.back() = f.in_features;
  Tensor grad_bias = want_bias ? g2.sum(0).to(grad_out.scalar_type()) : unwanted_grad(grad_out);
  return {grad_x.to(grad_out.scalar_type()).reshape(shape), grad_bias};
}

// ------------------------------------------------------------ Meta kernels

Tensor quantized_linear_meta(const Tensor& x, const Tensor& qweight, const Tensor& scales, const OptTensor& biases,
                             const OptTensor& bias, int64_t group_size, int64_t bits, c10::string_view mode) {
  const QuantFormat f = check_weight(kQuantizedLinearOp, qweight, scales, biases, group_size, bits, mode);
  check_input(kQuantizedLinearOp, x, f, qweight);
  auto shape = x.sym_sizes().vec();
  shape.back() = c10::SymInt(f.out_features);
  return at::empty_symint(shape, x.options());
}

std::tuple<Tensor, Tensor> quantized_linear_backward_meta(const Tensor& grad_out, const Tensor& qweight,
                                                          const Tensor& scales, const OptTensor& biases,
                                                          int64_t group_size, int64_t bits, c10::string_view mode,
                                                          bool want_bias) {
  const QuantFormat f = check_weight(kQuantizedLinearBackwardOp, qweight, scales, biases, group_size, bits, mode);
  auto shape = grad_out.sym_sizes().vec();
  shape.back() = c10::SymInt(f.in_features);
  return {at::empty_symint(shape, grad_out.options()),
          want_bias ? at::empty({f.out_features}, grad_out.options()) : unwanted_grad(grad_out)};
}

// ---------------------------------------------------------------- autograd

class QuantizedLinearFunction : public torch::autograd::Function<QuantizedLinearFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& qweight,
                        const Tensor& scales, const OptTensor& biases, const OptTensor& bias, int64_t group_size,
                        int64_t bits, c10::string_view mode) {
    static auto op = typed_op<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                     int64_t, int64_t, c10::string_view)>("my_mps_ops::quantized_linear");
    Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = op.call(x, qweight, scales, biases, bias, group_size, bits, mode);
    }
    save_metal_emulation(ctx);
    ctx->save_for_backward({qweight, scales, biases.value_or(Tensor())});
    ctx->saved_data["group_size"] = group_size;
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["mode"] = std::string(mode);
    ctx->saved_data["bias_dtype"] = bias.has_value() ? c10::IValue(static_cast<int64_t>(bias->scalar_type()))
                                                     : c10::IValue();
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const BackwardEmulationScope emulation(ctx);
    static auto op = typed_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                         const OptTensor&, int64_t, int64_t, c10::string_view, bool)>(
        "my_mps_ops::quantized_linear_backward");
    torch::autograd::variable_list none(8);
    const auto saved = ctx->get_saved_variables();
    // needs_input_grad counts the tensors given (x, qweight, scales, then
    // biases and bias when present); the result is by argument position.
    const bool has_bias = !ctx->saved_data["bias_dtype"].isNone();
    const bool want_x = ctx->needs_input_grad(0);
    const bool want_bias = has_bias && ctx->needs_input_grad(saved[2].defined() ? 4 : 3);
    if (!grads[0].defined() || (!want_x && !want_bias)) return none;
    const OptTensor biases = saved[2].defined() ? OptTensor(saved[2]) : std::nullopt;
    auto [grad_x, grad_bias] = op.call(grads[0], saved[0], saved[1], biases, ctx->saved_data["group_size"].toInt(),
                                       ctx->saved_data["bits"].toInt(), ctx->saved_data["mode"].toStringRef(),
                                       want_bias);
    none[0] = want_x ? grad_x : Tensor();
    if (want_bias) {
      none[4] = grad_bias.to(static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt()));
    }
    return none;
  }
};

Tensor quantized_linear_autograd(const Tensor& x, const Tensor& qweight, const Tensor& scales,
                                 const OptTensor& biases, const OptTensor& bias, int64_t group_size, int64_t bits,
                                 c10::string_view mode) {
  const bool frozen = !scales.requires_grad() && !(biases.has_value() && biases->requires_grad());
  TORCH_CHECK(frozen, kQuantizedLinearOp, ": the quantized weight is frozen (no gradient for scales or biases); "
              "detach them, or train an adapter (LoRA) beside the layer");
  return QuantizedLinearFunction::apply(x, qweight, scales, biases, bias, group_size, bits, mode);
}

}  // namespace

TORCH_LIBRARY_IMPL(my_mps_ops, CPU, m) {
  m.impl("quantized_linear", &quantized_linear_impl);
  m.impl("quantized_linear_backward", &quantized_linear_backward_impl);
}

TORCH_LIBRARY_IMPL(my_mps_ops, MPS, m) {
  m.impl("quantized_linear", &quantized_linear_impl);
  m.impl("quantized_linear_backward", &quantized_linear_backward_impl);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Meta, m) {
  m.impl("quantized_linear", &quantized_linear_meta);
  m.impl("quantized_linear_backward", &quantized_linear_backward_meta);
}

TORCH_LIBRARY_IMPL(my_mps_ops, Autograd, m) {
  m.impl("quantized_linear", &quantized_linear_autograd);
  m.impl("quantized_linear_backward", double_backward_unsupported_kernel());
}

}  // namespace my_mps_ops
