// flash_attention_decode: the attention of a few new tokens per sequence
// (q_len 1..16) against a preallocated KV cache, forward only.
//
// q (batch, q_heads, q_len, head_dim); k_cache, v_cache (batch, kv_heads,
// cache_len, head_dim), kv_heads dividing q_heads (q head h reads kv head
// h / (q_heads / kv_heads), without repeating K/V); cache_seqlens (batch,)
// int32 or int64: only the first cache_seqlens[b] rows of sequence b are
// valid (the rest is never read, so it may hold anything), and the q_len new
// tokens are the last q_len of them. Query i of sequence b therefore sits at
// a = i + cache_seqlens[b] - q_len: causal, it sees keys <= a (bottom-right
// alignment per sequence), otherwise every valid key; window_left >= 0 also
// drops keys < a - window_left. softcap and sinks as flash_attention. Rows
// that see no key give 0 (lse -inf, or the sink's logit).
//
// The key range is split into chunks computed in parallel and combined in a
// second pass (cpu/attention_decode_kernels.cpp; Metal:
// metal/attention_decode.cpp, shaders/attention_decode.metal). Forward only:
// asking for a gradient through it raises (the Autograd kernel below).
#include "cpu/attention_decode.h"
#include "metal/attention_decode.h"
#include "ops/common.h"

#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace my_mps_ops {
// A named namespace: ops/*.cpp build as one translation unit, so these
// helpers must not collide with flash_attention.cpp's.
namespace attention_decode_op {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr const char* kOp = "my_mps_ops.flash_attention_decode";
constexpr int64_t kHeadDims[] = {32, 64, 80, 96, 128, 256};

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& seqlens,
                  const std::optional<double>& scale, int64_t window_left, double softcap, const OptTensor& sinks) {
  check_float_dtype(q, kOp, "q");
  check_same_dtype(k, q, kOp, "k_cache", "q");
  check_same_dtype(v, q, kOp, "v_cache", "q");
  check_same_device(k, q, kOp, "k_cache", "q");
  check_same_device(v, q, kOp, "v_cache", "q");
  check_same_device(seqlens, q, kOp, "cache_seqlens", "q");
  TORCH_CHECK(q.dim() == 4, kOp, ": q must have 4 dimensions (batch, q_heads, q_len, head_dim), got shape ",
              q.sym_sizes());
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4, kOp,
              ": k_cache and v_cache must have 4 dimensions (batch, kv_heads, cache_len, head_dim), got shapes ",
              k.sym_sizes(), " and ", v.sym_sizes());
  bool supported = false;
  for (int64_t d : kHeadDims) supported = supported || q.sym_size(3) == d;
  TORCH_CHECK(supported, kOp, ": head_dim ", q.sym_size(3), " is not supported (supported: 32, 64, 80, 96, 128, 256)");
  TORCH_CHECK(k.sym_sizes() == v.sym_sizes(), kOp, ": k_cache and v_cache must have the same shape, got ",
              k.sym_sizes(), " and ", v.sym_sizes());
  TORCH_CHECK(k.sym_size(0) == q.sym_size(0) && k.sym_size(3) == q.sym_size(3), kOp,
              ": k_cache must be (batch, kv_heads, cache_len, head_dim) with q's batch and head_dim (", q.sym_size(0),
              ", ", q.sym_size(3), "), got shape ", k.sym_sizes());
  const bool heads_divide = k.sym_size(1) == 0 ? q.sym_size(1) == 0 : q.sym_size(1) % k.sym_size(1) == 0;
  TORCH_CHECK(heads_divide, kOp, ": the number of kv heads must divide the number of q heads, got q heads ",
              q.sym_size(1), " and kv heads ", k.sym_size(1));
  TORCH_CHECK(seqlens.dim() == 1 && seqlens.sym_size(0) == q.sym_size(0), kOp,
              ": cache_seqlens must have shape (batch,) = [", q.sym_size(0), "], got ", seqlens.sym_sizes());
  TORCH_CHECK(seqlens.scalar_type() == at::kInt || seqlens.scalar_type() == at::kLong, kOp,
              ": cache_seqlens must be int32 or int64, got ", seqlens.scalar_type());
  if (scale.has_value()) TORCH_CHECK(std::isfinite(*scale), kOp, ": scale must be finite, got ", *scale);
  TORCH_CHECK(window_left >= -1, kOp, ": window_left must be >= 0, or -1 for unbounded; got ", window_left);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, kOp, ": softcap must be finite and >= 0 (0: off), got ",
              softcap);
  if (sinks.has_value()) {
    check_float_dtype(*sinks, kOp, "sinks");
    check_same_device(*sinks, q, kOp, "sinks", "q");
    TORCH_CHECK(sinks->dim() == 1 && sinks->sym_size(0) == q.sym_size(1), kOp,
                ": sinks must have shape (q heads,) = [", q.sym_size(1), "], got ", sinks->sym_sizes());
  }
}

at::ScalarType lse_dtype(const Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

double resolve_scale(const std::optional<double>& scale, int64_t head_dim) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
}

// A window wider than any cache is unbounded (keeps index arithmetic small).
int64_t window_bound(int64_t w, const Tensor& q, const Tensor& k) { return w > q.size(2) + k.size(2) ? -1 : w; }

// Rows of head_dim contiguous, as both kernels read a cache (in place).
bool rows_contiguous(const Tensor& t) { return t.stride(3) == 1 && (t.size(2) <= 1 || t.stride(2) == t.size(3)); }

std::tuple<Tensor, Tensor> forward_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& seqlens,
                                       bool causal, double scale, int64_t window_left, double softcap,
                                       const OptTensor& sinks) {
  const at::ScalarType acc = lse_dtype(q);
  const Tensor lens = seqlens.to(at::kLong).contiguous();
  const int64_t cache_len = k.size(2);
  int64_t used = 0;
  for (int64_t b = 0; b < lens.size(0); ++b) {
    const int64_t n = lens.const_data_ptr<int64_t>()[b];
    TORCH_CHECK(n >= 0 && n <= cache_len, kOp, ": cache_seqlens[", b, "] = ", n,
                " is outside the cache (0 .. cache_len = ", cache_len, ")");
    used = std::max(used, n);
  }
  // Float32 / float64 caches are read in place; others are converted, only
  // the rows some sequence uses.
  const auto as_acc = [&](const Tensor& c) {
    Tensor t = c.scalar_type() == acc ? c : c.narrow(2, 0, used).to(acc);
    return rows_contiguous(t) ? t : t.narrow(2, 0, used).contiguous();
  };
  const Tensor qa = q.to(acc).contiguous(), ka = as_acc(k), va = as_acc(v);
  const Tensor sa = sinks.has_value() ? sinks->to(acc).contiguous() : Tensor();
  Tensor out = at::empty(q.sizes(), qa.options());
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, qa.options());
  if (out.numel() > 0) {
    cpu::AttentionDecodeDims d;
    d.batch = q.size(0);
    d.q_heads = q.size(1);
    d.kv_heads = k.size(1);
    d.group = d.q_heads / d.kv_heads;
    d.q_len = q.size(2);
    d.head_dim = q.size(3);
    d.cache_len = cache_len;
    d.k_batch_stride = ka.stride(0);
    d.k_head_stride = ka.stride(1);
    d.v_batch_stride = va.stride(0);
    d.v_head_stride = va.stride(1);
    d.causal = causal;
    d.window_left = window_bound(window_left, q, k);
    cpu::attention_decode_stub(acc, cpu::AttentionDecodeArgs{qa.const_data_ptr(), ka.const_data_ptr(),
                                                              va.const_data_ptr(), lens.const_data_ptr<int64_t>(),
                                                              sa.defined() ? sa.const_data_ptr() : nullptr,
                                                              out.mutable_data_ptr(), lse.mutable_data_ptr(), d,
                                                              scale, softcap});
  }
  return {out.scalar_type() == q.scalar_type() ? out : out.to(q.scalar_type()), lse};
}

std::tuple<Tensor, Tensor> forward_metal(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                         const Tensor& seqlens, bool causal, double scale, int64_t window_left,
                                         double softcap, const OptTensor& sinks) {
  const Tensor q = q_in.contiguous();
  const Tensor k = rows_contiguous(k_in) ? k_in : k_in.contiguous();
  const Tensor v = rows_contiguous(v_in) ? v_in : v_in.contiguous();
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (k.size(2) == 0) {  // an empty cache: every row sees nothing, no launch
    out.zero_();
    if (sinks.has_value()) {
      lse.copy_(sinks->to(at::kFloat).view({1, -1, 1}).expand(lse.sizes()));
    } else {
      lse.fill_(-std::numeric_limits<float>::infinity());
    }
    return {out, lse};
  }
  const Tensor sinks_f = sinks.has_value() ? sinks->to(at::kFloat).contiguous() : at::zeros({1}, lse.options());
  metal::attention_decode(kOp, {q, k, v, seqlens.to(at::kInt).contiguous(), sinks_f, out, lse},
                          {causal, window_bound(window_left, q, k), scale, softcap, sinks.has_value()});
  return {out, lse};
}

std::tuple<Tensor, Tensor> decode_impl(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                       const Tensor& cache_seqlens, bool causal, std::optional<double> scale,
                                       int64_t window_left, double softcap, const OptTensor& sinks) {
  check_inputs(q, k_cache, v_cache, cache_seqlens, scale, window_left, softcap, sinks);
  const double s = resolve_scale(scale, q.size(3));
  if (use_metal_path(q)) {
    return forward_metal(q, k_cache, v_cache, cache_seqlens, causal, s, window_left, softcap, sinks);
  }
  return forward_cpu(q, k_cache, v_cache, cache_seqlens, causal, s, window_left, softcap, sinks);
}

std::tuple<Tensor, Tensor> decode_meta(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                       const Tensor& cache_seqlens, bool causal, std::optional<double> scale,
                                       int64_t window_left, double softcap, const OptTensor& sinks) {
  check_inputs(q, k_cache, v_cache, cache_seqlens, scale, window_left, softcap, sinks);
  return {at::empty_symint(q.sym_sizes(), q.options()),
          at::empty_symint({q.sym_size(0), q.sym_size(1), q.sym_size(2)}, q.options().dtype(lse_dtype(q)))};
}

using DecodeSignature = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool,
                                                   std::optional<double>, int64_t, double, const OptTensor&);

// Forward only: the outputs join the graph (so a mistaken backward is caught
// where it happens, not silently cut), and the backward raises.
class DecodeFunction : public torch::autograd::Function<DecodeFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& q,
                                                const Tensor& k, const Tensor& v, const Tensor& seqlens, bool causal,
                                                std::optional<double> scale, int64_t window_left, double softcap,
                                                const OptTensor& sinks) {
    static auto op = typed_op<DecodeSignature>("my_mps_ops::flash_attention_decode");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = op.call(q, k, v, seqlens, causal, scale, window_left, softcap, sinks);
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*, torch::autograd::variable_list) {
    TORCH_CHECK(false, kOp,
                " is forward only (inference / generation): it has no backward. Use my_mps_ops.flash_attention "
                "for training, or call it under torch.no_grad().");
    return {};
  }
};

std::tuple<Tensor, Tensor> decode_autograd(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                           const Tensor& cache_seqlens, bool causal, std::optional<double> scale,
                                           int64_t window_left, double softcap, const OptTensor& sinks) {
  auto outputs =
      DecodeFunction::apply(q, k_cache, v_cache, cache_seqlens, causal, scale, window_left, softcap, sinks);
  return {outputs[0], outputs[1]};
}

// Autocast: lower precision, as scaled_dot_product_attention (and
// flash_attention, ops/autocast.cpp). A cache allocated in that dtype is not
// copied; a float32 cache is converted on every call. sinks stay as they are.
template <c10::DeviceType kDevice>
std::tuple<Tensor, Tensor> decode_autocast(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                           const Tensor& cache_seqlens, bool causal, std::optional<double> scale,
                                           int64_t window_left, double softcap, const OptTensor& sinks) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const auto dtype = at::autocast::get_lower_precision_fp_from_device_type(kDevice);
  static auto op = typed_op<DecodeSignature>("my_mps_ops::flash_attention_decode");
  return op.call(at::autocast::cached_cast(dtype, q, kDevice), at::autocast::cached_cast(dtype, k_cache, kDevice),
                 at::autocast::cached_cast(dtype, v_cache, kDevice), cache_seqlens, causal, scale, window_left,
                 softcap, sinks);
}

}  // namespace
}  // namespace attention_decode_op

TORCH_LIBRARY_IMPL(my_mps_ops, CPU, m) { m.impl("flash_attention_decode", &attention_decode_op::decode_impl); }
TORCH_LIBRARY_IMPL(my_mps_ops, MPS, m) { m.impl("flash_attention_decode", &attention_decode_op::decode_impl); }
TORCH_LIBRARY_IMPL(my_mps_ops, Meta, m) { m.impl("flash_attention_decode", &attention_decode_op::decode_meta); }
TORCH_LIBRARY_IMPL(my_mps_ops, Autograd, m) {
  m.impl("flash_attention_decode", &attention_decode_op::decode_autograd);
}
TORCH_LIBRARY_IMPL(my_mps_ops, AutocastCPU, m) {
  m.impl("flash_attention_decode", &attention_decode_op::decode_autocast<c10::DeviceType::CPU>);
}
TORCH_LIBRARY_IMPL(my_mps_ops, AutocastMPS, m) {
  m.impl("flash_attention_decode", &attention_decode_op::decode_autocast<c10::DeviceType::MPS>);
}

}  // namespace my_mps_ops
