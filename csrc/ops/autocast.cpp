// Autocast: what torch.autocast does to each op's inputs, following the
// policy ATen gives the PyTorch op ours stands in for (aten/src/ATen/
// autocast_mode.cpp, the AutocastCPU and AutocastMPS lists):
// - flash_attention, flash_attention_varlen: lower precision, as
//   scaled_dot_product_attention on both;
// - cross_entropy: float32, as cross_entropy_loss on CPU (and its nll_loss /
//   log_softmax parts on MPS);
// - linear_cross_entropy: lower precision for hidden @ weight.T (linear's
//   policy on both); the loss comes from float32 logits and is float32, as
//   cross_entropy_loss's is under autocast;
// - layer_norm: float32 on MPS (layer_norm's policy there); on CPU ATen leaves
//   layer_norm alone, and so do we;
// - every other op falls through (rms_norm, silu/gelu products and the rotary
//   products are in no list: they run in the dtypes they are given).
// Each kernel casts its floating inputs (at::autocast::cached_cast: only
// float16/bfloat16/float32 tensors on the autocast device), then calls the op
// with autocast excluded. Backward ops are not registered: autograd runs them
// on what the forward saved.
#include "ops/common.h"

#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace my_mps_ops {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// sinks stay as they are: the kernels read them in float32 (float64 for
// float64 inputs) whatever their dtype, as logits of the softmax.
template <c10::DeviceType kDevice>
std::tuple<Tensor, Tensor> flash_attention_autocast(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                                    std::optional<double> scale, int64_t window_left,
                                                    int64_t window_right, double softcap, const OptTensor& sinks) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const auto dtype = at::autocast::get_lower_precision_fp_from_device_type(kDevice);
  return typed_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, bool,
                                             std::optional<double>, int64_t, int64_t, double, const OptTensor&)>(
             "my_mps_ops::flash_attention")
      .call(at::autocast::cached_cast(dtype, q, kDevice), at::autocast::cached_cast(dtype, k, kDevice),
            at::autocast::cached_cast(dtype, v, kDevice), causal, scale, window_left, window_right, softcap, sinks);
}

template <c10::DeviceType kDevice>
std::tuple<Tensor, Tensor> flash_attention_varlen_autocast(const Tensor& q, const Tensor& k, const Tensor& v,
                                                           const Tensor& cu_q, const Tensor& cu_k, c10::SymInt max_q,
                                                           c10::SymInt max_k, bool causal,
                                                           std::optional<double> scale, int64_t window_left,
                                                           int64_t window_right, double softcap,
                                                           const OptTensor& sinks) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const auto dtype = at::autocast::get_lower_precision_fp_from_device_type(kDevice);
  return typed_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                             const Tensor&, c10::SymInt, c10::SymInt, bool, std::optional<double>,
                                             int64_t, int64_t, double, const OptTensor&)>(
             "my_mps_ops::flash_attention_varlen")
      .call(at::autocast::cached_cast(dtype, q, kDevice), at::autocast::cached_cast(dtype, k, kDevice),
            at::autocast::cached_cast(dtype, v, kDevice), cu_q, cu_k, max_q, max_k, causal, scale, window_left,
            window_right, softcap, sinks);
}

template <c10::DeviceType kDevice>
std::tuple<Tensor, Tensor> cross_entropy_autocast(const Tensor& logits, const Tensor& target, int64_t ignore_index,
                                                  double label_smoothing, c10::string_view reduction) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  return typed_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, int64_t, double, c10::string_view)>(
             "my_mps_ops::cross_entropy")
      .call(at::autocast::cached_cast(at::kFloat, logits, kDevice), target, ignore_index, label_smoothing,
            reduction);
}

template <c10::DeviceType kDevice>
std::tuple<Tensor, Tensor> linear_cross_entropy_autocast(const Tensor& hidden, const Tensor& weight,
                                                         const Tensor& target, const OptTensor& bias,
                                                         int64_t ignore_index, double smoothing,
                                                         c10::string_view reduction, std::optional<double> softcap,
                                                         double z_loss) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const auto dtype = at::autocast::get_lower_precision_fp_from_device_type(kDevice);
  const OptTensor cast_bias =
      bias.has_value() ? OptTensor(at::autocast::cached_cast(dtype, *bias, kDevice)) : std::nullopt;
  return typed_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, int64_t,
                                          double, c10::string_view, std::optional<double>, double)>(
          "my_mps_ops::linear_cross_entropy")
          .call(at::autocast::cached_cast(dtype, hidden, kDevice), at::autocast::cached_cast(dtype, weight, kDevice),
                target, cast_bias, ignore_index, smoothing, reduction, softcap, z_loss);
}

template <c10::DeviceType kDevice>
Tensor layer_norm_autocast(const Tensor& input, const OptTensor& weight, const OptTensor& bias, double eps) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const auto to_float = [](const OptTensor& t) -> OptTensor {
    return t.has_value() ? OptTensor(at::autocast::cached_cast(at::kFloat, *t, kDevice)) : t;
  };
  return typed_op<Tensor(const Tensor&, const OptTensor&, const OptTensor&, double)>("my_mps_ops::layer_norm")
      .call(at::autocast::cached_cast(at::kFloat, input, kDevice), to_float(weight), to_float(bias), eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(my_mps_ops, AutocastCPU, m) {
  m.impl("flash_attention", &flash_attention_autocast<c10::DeviceType::CPU>);
  m.impl("flash_attention_varlen", &flash_attention_varlen_autocast<c10::DeviceType::CPU>);
  m.impl("cross_entropy", &cross_entropy_autocast<c10::DeviceType::CPU>);
  m.impl("linear_cross_entropy", &linear_cross_entropy_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(my_mps_ops, AutocastMPS, m) {
  m.impl("flash_attention", &flash_attention_autocast<c10::DeviceType::MPS>);
  m.impl("flash_attention_varlen", &flash_attention_varlen_autocast<c10::DeviceType::MPS>);
  m.impl("cross_entropy", &cross_entropy_autocast<c10::DeviceType::MPS>);
  m.impl("linear_cross_entropy", &linear_cross_entropy_autocast<c10::DeviceType::MPS>);
  m.impl("layer_norm", &layer_norm_autocast<c10::DeviceType::MPS>);
}

}  // namespace my_mps_ops
