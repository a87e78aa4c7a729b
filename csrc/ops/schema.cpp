// Every my_mps_ops operator schema, in one place. Kernels are registered per
// op family (csrc/<family>.cpp) for CPU, Meta, Autograd and, on macOS, MPS.
#include <torch/library.h>

TORCH_LIBRARY(my_mps_ops, m) {
  // RMSNorm over the last dimension, as torch.nn.functional.rms_norm.
  m.def("rms_norm(Tensor input, Tensor? weight, float eps) -> Tensor");
  // Returns (grad_input, grad_weight); an entry is an empty tensor when
  // output_mask says it is not needed (grad_weight also when weight is None).
  m.def("rms_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, float eps, bool[2] output_mask) -> (Tensor, Tensor)");
  // residual_out = x + residual; out = rms_norm(residual_out). Returns (out, residual_out).
  m.def("fused_add_rms_norm(Tensor x, Tensor residual, Tensor? weight, float eps) -> (Tensor, Tensor)");
  // Returns (grad_x, grad_weight); grad_residual equals grad_x.
  m.def("fused_add_rms_norm_backward(Tensor grad_out, Tensor? grad_residual_out, Tensor residual_out, Tensor? weight, float eps, bool[2] output_mask) -> (Tensor, Tensor)");

  // ---- layer_norm: over the last dimension, as torch.nn.functional.layer_norm.
  m.def("layer_norm(Tensor input, Tensor? weight, Tensor? bias, float eps) -> Tensor");
  // Returns (grad_input, grad_weight, grad_bias); empty tensors where not wanted.
  m.def("layer_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, float eps, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // ---- cross_entropy: logits [N, V], int64 target [N], as F.cross_entropy.
  // Returns (loss, lse): lse [N] float32 is the per-row log-sum-exp the
  // backward reuses. reduction: "mean", "sum" or "none".
  m.def("cross_entropy(Tensor logits, Tensor target, int ignore_index=-100, float label_smoothing=0.0, str reduction=\"mean\") -> (Tensor, Tensor)");
  m.def("cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor lse, int ignore_index, float label_smoothing, str reduction) -> Tensor");

  // ---- rotary: RoPE on 4-D x, (batch, seq, heads, dim) with seq_dim=1 or
  // (batch, heads, seq, dim) with seq_dim=2; cos/sin [seq, rot/2] or
  // [batch, seq, rot/2]; NeoX half-split or GPT-J interleaved pairs.
  m.def("rotary_embedding(Tensor x, Tensor cos, Tensor sin, bool interleaved=False, int seq_dim=1) -> Tensor");
  m.def("rotary_embedding_backward(Tensor grad_out, Tensor cos, Tensor sin, bool interleaved=False, int seq_dim=1) -> Tensor");
  m.def("rotary_embedding_qk(Tensor q, Tensor k, Tensor cos, Tensor sin, bool interleaved=False, int seq_dim=1) -> (Tensor, Tensor)");
  m.def("rotary_embedding_qk_backward(Tensor grad_q, Tensor grad_k, Tensor cos, Tensor sin, bool interleaved=False, int seq_dim=1) -> (Tensor, Tensor)");

  // ---- glu: gated activations of the Llama / Gemma MLPs. The backward ops
  // recompute the activation from gate instead of saving it.
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");  // silu(gate) * up
  m.def("swiglu_backward(Tensor grad_out, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  // gelu(gate, approximate) * up, approximate "none" (erf) or "tanh"
  m.def("geglu(Tensor gate, Tensor up, str approximate=\"none\") -> Tensor");
  m.def("geglu_backward(Tensor grad_out, Tensor gate, Tensor up, str approximate=\"none\") -> (Tensor, Tensor)");

  // ---- linear_cross_entropy: F.cross_entropy(softcap(hidden @ weight.T + bias),
  // target) + z_loss * lse^2 per counted row, without the [N, V] logits.
  // hidden [N, H], weight [V, H], target [N] int64, bias [V]. Returns (loss,
  // lse), both float32 (float64 for float64): the logits are upcast before the
  // loss, as transformers' ForCausalLMLoss does. lse [N] of the capped
  // logits, 0 for ignored rows.
  m.def("linear_cross_entropy(Tensor hidden, Tensor weight, Tensor target, Tensor? bias=None, int ignore_index=-100, float label_smoothing=0.0, str reduction=\"mean\", float? logit_softcap=None, float z_loss=0.0) -> (Tensor, Tensor)");
  // Returns (grad_hidden, grad_weight, grad_bias), recomputing each chunk's
  // logits; empty tensors where output_mask does not want them.
  m.def("linear_cross_entropy_backward(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor target, Tensor? bias, int ignore_index, float label_smoothing, str reduction, float? logit_softcap, float z_loss, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // The forward and the gradients of its (mean or sum) loss in one pass:
  // (loss, lse, grad_hidden, grad_weight, grad_bias) for a loss gradient of 1.
  m.def("linear_cross_entropy_with_grad(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, int ignore_index, float label_smoothing, str reduction, float? logit_softcap, float z_loss, bool[3] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- quantized_linear: x @ W^T + bias with W [out, in] quantized
  // (my_mps_ops.quantize: mode "affine" with uint32 qweight, scales and
  // biases [out, in / group_size]; "nf4" / "fp4" with uint8 qweight and the
  // absmax as scales). W is frozen: gradients for x and bias only.
  m.def("quantized_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? biases, Tensor? bias, int group_size, int bits, str mode) -> Tensor");
  // Returns (grad_x, grad_bias); grad_bias empty unless want_bias.
  m.def("quantized_linear_backward(Tensor grad_out, Tensor qweight, Tensor scales, Tensor? biases, int group_size, int bits, str mode, bool want_bias) -> (Tensor, Tensor)");

  // ---- flash_attention
  // Fused softmax(scale * q k^T) v over (batch, heads, seq, head_dim) inputs,
  // grouped-query heads, causal aligned to the bottom right. Returns (out, lse)
  // with lse the per-row log-sum-exp (float32; float64 for float64 inputs).
  // window_left / window_right: query i (aligned bottom-right, a = i + S - L)
  // sees keys a - left .. a + right, -1 unbounded (causal caps right at 0);
  // softcap > 0: scores -> softcap * tanh(scores / softcap) after the scale;
  // sinks (q_heads,): a per-head logit in every row's softmax denominator,
  // included in lse.
  m.def("flash_attention(Tensor q, Tensor k, Tensor v, bool causal=False, float? scale=None, int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? sinks=None) -> (Tensor out, Tensor lse)");
  // Returns (grad_q, grad_k, grad_v, grad_sinks), recomputing probabilities
  // from lse; grad_sinks is empty (shape [0]) without sinks.
  m.def("flash_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, float? scale, int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? sinks=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // Packed variable-length sequences (FlashAttention's varlen): q (total_q,
  // q_heads, D), k/v (total_k, kv_heads, D), sequence b at rows
  // cu_seqlens[b] .. cu_seqlens[b + 1] (int32); per sequence as
  // flash_attention. lse is (q_heads, total_q).
  m.def("flash_attention_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, bool causal=False, float? scale=None, int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? sinks=None) -> (Tensor out, Tensor lse)");
  m.def("flash_attention_varlen_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, bool causal, float? scale, int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? sinks=None) -> (Tensor, Tensor, Tensor, Tensor)");
}

// ---- flash_attention_decode: a few new tokens (q_len 1..16) per sequence
// against a preallocated KV cache (batch, kv_heads, cache_len, head_dim) of
// which the first cache_seqlens[b] rows are valid, the new tokens being the
// last q_len of them (causal aligned bottom-right per sequence). Split over
// the key length, forward only. Returns (out, lse) as flash_attention.
TORCH_LIBRARY_FRAGMENT(my_mps_ops, m) {
  m.def("flash_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, bool causal=True, float? scale=None, int window_left=-1, float softcap=0.0, Tensor? sinks=None) -> (Tensor out, Tensor lse)");
}
