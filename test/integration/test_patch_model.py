"""patch_model: my_mps_ops kernels swapped into plain PyTorch and Hugging Face
models keep outputs, gradients, Parameters and state_dict keys; each switch
leaves its kind of module untouched when off."""

import copy

import pytest
import torch
from torch import nn

import my_mps_ops
from my_mps_ops.models import TinyLlama, TinyLlamaConfig
from my_mps_ops.patch import FusedGateUpSwiGLUMLP, FusedSwiGLUMLP, patch_model

CFG = TinyLlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=96, max_seq_len=32)


def test_patch_model_swaps_rms_norms_and_keeps_outputs():
    torch.manual_seed(0)
    model = TinyLlama(CFG, use_my_ops=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.RMSNorm):
                m.weight.uniform_(0.5, 1.5)
    tokens = torch.randint(0, CFG.vocab_size, (2, 9))
    before = model(tokens)
    norms_before = sum(isinstance(m, torch.nn.RMSNorm) for m in model.modules())
    weights = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    patch_model(model)
    assert list(model.state_dict()) == keys
    assert sum(isinstance(m, my_mps_ops.nn.RMSNorm) for m in model.modules()) == norms_before == 2 * CFG.n_layers + 1
    assert not any(type(m) is torch.nn.RMSNorm for m in model.modules())
    assert all(p is weights[n] for n, p in model.named_parameters())  # same Parameters
    assert sum(isinstance(m, FusedSwiGLUMLP) for m in model.modules()) == CFG.n_layers
    torch.testing.assert_close(model(tokens), before, atol=1e-5, rtol=1e-5)


def test_patch_model_training_step_gradients_agree():
    torch.manual_seed(0)
    reference = TinyLlama(CFG, use_my_ops=False)
    patched = copy.deepcopy(reference)
    patch_model(patched)
    tokens = torch.randint(0, CFG.vocab_size, (2, 15))
    reference.loss(tokens).backward()
    patched.loss(tokens).backward()
    for (name, p_ref), p_patched in zip(reference.named_parameters(), patched.parameters()):
        torch.testing.assert_close(p_patched.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_patch_model_on_transformers_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    tokens = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        before = model(tokens).logits
    patch_model(model)
    assert sum(isinstance(m, my_mps_ops.nn.RMSNorm) for m in model.modules()) == 2 * 2 + 1
    assert sum(isinstance(m, FusedSwiGLUMLP) for m in model.modules()) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, before, atol=1e-5, rtol=1e-5)


def test_patch_model_on_transformers_phi3_fused_gate_up():
    transformers = pytest.importorskip("transformers")
    config = transformers.Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(config)
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    tokens = torch.randint(0, 64, (2, 11))
    patch_model(model)
    assert list(model.state_dict()) == keys
    assert sum(isinstance(m, FusedGateUpSwiGLUMLP) for m in model.modules()) == 2
    out, ref = model(tokens).logits, reference(tokens).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    for (name, p_ref), p in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)


class LlamaStyleMLP(nn.Module):
    """transformers' LlamaMLP layout: gate_proj, up_proj, down_proj, act_fn."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Phi3StyleMLP(nn.Module):
    """transformers' Phi3MLP layout: one fused gate_up_proj, down_proj, activation_fn."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.activation_fn = nn.SiLU()

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.activation_fn(gate) * up)


def model_with_every_kind():
    """RMSNorms (with and without weight) and SiLU-gated MLPs in each layout patch_model knows."""
    torch.manual_seed(0)
    return nn.ModuleDict({"llama": TinyLlama(CFG, use_my_ops=False), "llama_mlp": LlamaStyleMLP(16, 24),
                          "phi3_mlp": Phi3StyleMLP(16, 24), "norm": nn.RMSNorm(16),
                          "plain_norm": nn.RMSNorm(16, elementwise_affine=False)})


@pytest.mark.parametrize("rms_norm", [True, False], ids=["rms_norm_on", "rms_norm_off"])
@pytest.mark.parametrize("swiglu", [True, False], ids=["swiglu_on", "swiglu_off"])
def test_each_switch_patches_only_its_kind(rms_norm, swiglu):
    model = model_with_every_kind()
    before = dict(model.named_modules())
    norms = {n for n, m in before.items() if type(m) is nn.RMSNorm}
    mlps = {n for n, m in before.items() if type(m).__name__ in ("SwiGLU", "LlamaStyleMLP", "Phi3StyleMLP")}
    assert len(norms) == 2 * CFG.n_layers + 1 + 2 and len(mlps) == CFG.n_layers + 2
    weights = dict(model.named_parameters())
    keys = list(model.state_dict())

    assert patch_model(model, rms_norm=rms_norm, swiglu=swiglu) is model
    after = dict(model.named_modules())
    for name in norms:
        if rms_norm:
            assert isinstance(after[name], my_mps_ops.nn.RMSNorm), name
        else:
            assert after[name] is before[name], name
    for name in mlps:
        if swiglu:
            assert isinstance(after[name], (FusedSwiGLUMLP, FusedGateUpSwiGLUMLP)), name
        else:
            assert after[name] is before[name], name
    assert sum(isinstance(m, FusedGateUpSwiGLUMLP) for m in model.modules()) == (1 if swiglu else 0)
    assert list(model.state_dict()) == keys
    assert all(p is weights[n] for n, p in model.named_parameters())  # same Parameters


def test_every_switch_off_leaves_the_model_as_it_was():
    model = model_with_every_kind()
    before = dict(model.named_modules())
    patch_model(model, rms_norm=False, swiglu=False)
    after = dict(model.named_modules())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)


@pytest.mark.parametrize("not_a_module", [None, "model", {"weight": torch.ones(2)}], ids=["None", "str", "state_dict"])
def test_patch_model_refuses_what_is_not_a_module(not_a_module):
    expected = r"patch_model expects a torch\.nn\.Module .*got " + type(not_a_module).__name__
    with pytest.raises(TypeError, match=expected):
        patch_model(not_a_module)


def test_switches_are_keyword_only():
    with pytest.raises(TypeError):
        patch_model(model_with_every_kind(), False)


class ScaledRMSNorm(nn.Module):
    """An RMSNorm whose formula differs from the fused op (extra scale): must be left alone."""

    def __init__(self, dim, eps=1e-6, extra=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.extra = eps, extra

    def forward(self, x):
        return self.extra * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class DropoutSwiGLUMLP(LlamaStyleMLP):
    """A Llama MLP with dropout inside its forward: the fused MLP would drop the dropout."""

    def forward(self, x):
        return self.down_proj(nn.functional.dropout(self.act_fn(self.gate_proj(x)), 0.5, self.training)
                              * self.up_proj(x))


class GemmaStyleRMSNorm(nn.Module):
    """Gemma's formula: normalise, then scale by (1 + weight)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


class GeluTanhMLP(LlamaStyleMLP):
    def __init__(self, dim, hidden):
        super().__init__(dim, hidden)
        self.act_fn = nn.GELU(approximate="tanh")


def test_patch_model_leaves_what_it_cannot_reproduce_and_says_why():
    torch.manual_seed(0)
    model = nn.ModuleDict({"scaled": ScaledRMSNorm(16, extra=1.5), "eps": ScaledRMSNorm(16, eps=1e-2),
                           "dropout_mlp": DropoutSwiGLUMLP(16, 24), "ok": ScaledRMSNorm(16)}).train()
    before = dict(model.named_children())
    patch_model(model)
    summary = model.my_mps_ops_patch_summary
    assert model["scaled"] is before["scaled"] and model["dropout_mlp"] is before["dropout_mlp"]
    assert isinstance(model["ok"], my_mps_ops.nn.RMSNorm) and model["ok"].weight is before["ok"].weight
    # eps=1e-2 reproduces only with that eps: the replacement takes the module's eps, so it is exact.
    assert isinstance(model["eps"], my_mps_ops.nn.RMSNorm) and model["eps"].eps == 1e-2
    assert summary.patched == {"rms_norm": 2}
    skipped = {s.path: s for s in summary.skipped}
    assert set(skipped) == {"scaled", "dropout_mlp"}
    assert "differs" in skipped["scaled"].reason and "train mode" in skipped["dropout_mlp"].reason
    assert "skipped dropout_mlp (DropoutSwiGLUMLP, gated_mlp)" in str(summary)
    assert model.training and all(m.training for m in model.modules())  # modes restored


def test_patch_model_strict_raises_instead_of_skipping():
    model = nn.Sequential(ScaledRMSNorm(8, extra=2.0))
    with pytest.raises(my_mps_ops.patch.PatchError, match=r"strict=True.*0 \(ScaledRMSNorm\).*differs"):
        patch_model(model, strict=True)


def test_patch_model_uses_offset_norm_and_geglu_where_exact():
    torch.manual_seed(0)
    model = nn.Sequential(GemmaStyleRMSNorm(16), GeluTanhMLP(16, 24)).eval()
    with torch.no_grad():
        model[0].weight.uniform_(-0.5, 0.5)
    x = torch.randn(3, 5, 16)
    ref = model(x)
    patch_model(model)
    assert model.my_mps_ops_patch_summary.patched == {"rms_norm(1+weight)": 1, "geglu(tanh)": 1}
    assert isinstance(model[0], my_mps_ops.patch.OffsetRMSNorm)
    assert isinstance(model[1], my_mps_ops.patch.FusedGeGLUMLP)
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


class GatedRMSNorm(nn.Module):
    """transformers' *RMSNormGated (Bamba, Mamba-2, ...): forward(x, gate=None), a
    plain RMSNorm when no gate is passed, so a probe of forward(x) alone passes."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, hidden_states, gate=None):
        if gate is not None:
            hidden_states = hidden_states * nn.functional.silu(gate)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * hidden_states * torch.rsqrt(variance + self.variance_epsilon)


class GatedMixer(nn.Module):
    """Calls its norm with a gate, as transformers' Mamba-2 mixers do."""

    def __init__(self, dim):
        super().__init__()
        self.in_proj = nn.Linear(dim, 2 * dim)
        self.norm = GatedRMSNorm(dim)
        self.mlp = GatedSiLUMLPWithResidual(dim, 24)

    def forward(self, x):
        hidden, gate = self.in_proj(x).chunk(2, dim=-1)
        return self.mlp(self.norm(hidden, gate=gate), residual=x)


class GatedSiLUMLPWithResidual(LlamaStyleMLP):
    """A Llama MLP layout whose forward takes a second input."""

    def forward(self, x, residual=None):
        out = super().forward(x)
        return out if residual is None else out + residual


def test_patch_model_leaves_modules_whose_forward_takes_more_than_the_input():
    torch.manual_seed(0)
    model = GatedMixer(16).train()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 16)
    ref = model(x)
    patch_model(model)
    assert type(model.norm) is GatedRMSNorm and type(model.mlp) is GatedSiLUMLPWithResidual
    summary = model.my_mps_ops_patch_summary
    assert summary.patched == {}
    reasons = {s.path: s.reason for s in summary.skipped}
    assert "(gate)" in reasons["norm"] and "(residual)" in reasons["mlp"], str(summary)
    torch.testing.assert_close(model(x), ref)


class HFStyleRMSNorm(nn.Module):
    """transformers' LlamaRMSNorm: the eps is stored as variance_epsilon."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * hidden_states * torch.rsqrt(variance + self.variance_epsilon)


def test_patched_norm_keeps_the_eps_attribute_model_code_reads():
    # transformers' Mamba-2 mixers pass self.norm.variance_epsilon to a fused kernel
    model = nn.ModuleDict({"norm": HFStyleRMSNorm(16, eps=1e-5)})
    patch_model(model)
    assert isinstance(model["norm"], my_mps_ops.nn.RMSNorm)
    assert model["norm"].variance_epsilon == 1e-5 and model["norm"].eps == 1e-5


def test_patch_model_probes_do_not_move_the_random_stream():
    model = nn.Sequential(DropoutSwiGLUMLP(16, 24), nn.RMSNorm(16)).train()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    patch_model(model)
    torch.testing.assert_close(torch.rand(3), expected)


def test_attention_implementation_is_fused_where_exact_and_falls_back_to_sdpa():
    transformers = pytest.importorskip("transformers")
    from my_mps_ops import hf_attention

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).eval()
    model = patch_model(copy.deepcopy(reference), attention=True)
    summary = model.my_mps_ops_patch_summary
    assert model.config._attn_implementation == "my_mps_ops" and summary.attention is hf_attention.stats
    hf_attention.stats.reset()
    tokens = torch.randint(0, 64, (2, 11))
    with torch.no_grad():  # causal, no padding: fused (head_dim 32, grouped-query)
        torch.testing.assert_close(model(tokens).logits, reference(tokens).logits, atol=1e-5, rtol=1e-5)
    assert hf_attention.stats.fused == 2 and not hf_attention.stats.fallbacks
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :3] = 0  # left padding: SDPA with the mask, counted
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, attention_mask=mask).logits,
                                   reference(tokens, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
    assert hf_attention.stats.fused == 2 and sum(hf_attention.stats.fallbacks.values()) == 2
    assert "fallbacks to SDPA or eager" in str(summary)
    # decoding with a cache: one query row attends to every key (fused)
    assert model.generate(tokens[:1], max_new_tokens=4, do_sample=False).tolist() == \
        reference.generate(tokens[:1], max_new_tokens=4, do_sample=False).tolist()
    # training: gradients through the fused attention match SDPA's
    model.train()
    reference.train()
    model(tokens).logits.square().mean().backward()
    reference(tokens).logits.square().mean().backward()
    for (name, p_ref), p in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)


ATTENTION_ONLY = dict(rms_norm=False, swiglu=False, geglu=False, linear_cross_entropy=False)


def tiny_gemma2(transformers):
    """Gemma 2's attention: a logit softcap on every layer and a sliding window
    of 5 tokens on every other one (sequences of 13 make the window bite).
    Weights large enough that the softcap of 1 bends the scores."""
    config = transformers.Gemma2Config(
        vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, sliding_window=5, attn_logit_softcapping=1.0,
        final_logit_softcapping=None, query_pre_attn_scalar=32, max_position_embeddings=64, initializer_range=0.3,
        attn_implementation="eager")
    return transformers.Gemma2ForCausalLM(config)


def tiny_gpt_oss(transformers):
    """gpt-oss's attention: a learned sink logit per head on every layer and a
    sliding window of 5 tokens on every other one."""
    config = transformers.GptOssConfig(
        vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, sliding_window=5, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, initializer_range=0.3, attn_implementation="eager")
    return transformers.GptOssForCausalLM(config)


@pytest.mark.parametrize("build", [tiny_gemma2, tiny_gpt_oss])
def test_attention_with_softcap_sliding_window_and_sinks_is_fused_and_matches_eager(build):
    transformers = pytest.importorskip("transformers")
    from my_mps_ops import hf_attention

    torch.manual_seed(0)
    reference = build(transformers).eval()
    assert reference.config.layer_types == ["sliding_attention", "full_attention"]
    model = patch_model(copy.deepcopy(reference), attention=True, **ATTENTION_ONLY)
    hf_attention.stats.reset()
    tokens = torch.randint(0, 64, (2, 13))
    with torch.no_grad():  # both layers fused: the sliding layer's mask is exactly the kernel's window
        torch.testing.assert_close(model(tokens).logits, reference(tokens).logits, atol=2e-5, rtol=2e-5)
    assert hf_attention.stats.fused == 2 and not hf_attention.stats.fallbacks
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[0, :3] = 0  # left padding: the model's eager attention with the mask (SDPA has no softcap / sinks)
    with torch.no_grad():
        ours, theirs = model(tokens, attention_mask=mask).logits, reference(tokens, attention_mask=mask).logits
    torch.testing.assert_close(ours[1], theirs[1], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ours[0, 3:], theirs[0, 3:], atol=2e-5, rtol=2e-5)
    assert sum(hf_attention.stats.fallbacks.values()) == 2
    assert model.generate(tokens[:1], max_new_tokens=4, do_sample=False).tolist() == \
        reference.generate(tokens[:1], max_new_tokens=4, do_sample=False).tolist()
    # training: every gradient (the sinks' included) matches eager's
    model.train()
    reference.train()
    hf_attention.stats.reset()
    model(tokens).logits.square().mean().backward()
    reference(tokens).logits.square().mean().backward()
    assert hf_attention.stats.fused == 2
    for (name, p_ref), p in zip(reference.named_parameters(), model.parameters()):
        if p_ref.grad is None:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)
    sinks = [p.grad for name, p in model.named_parameters() if name.endswith("sinks")]
    assert len(sinks) == (2 if build is tiny_gpt_oss else 0) and all(g.abs().sum() > 0 for g in sinks)


def test_softcap_fallback_without_a_mask_stays_causal():
    """A query shorter than its keys without a mask (a static cache's prefill)
    falls back to the model's eager attention, which is given the top-left
    causal mask SDPA's is_causal stands for."""
    transformers = pytest.importorskip("transformers")
    from my_mps_ops import hf_attention

    torch.manual_seed(0)
    attention = tiny_gemma2(transformers).model.layers[1].self_attn
    q, k, v = torch.randn(1, 4, 3, 32), torch.randn(1, 2, 6, 32), torch.randn(1, 2, 6, 32)
    hf_attention.stats.reset()
    out, _ = hf_attention.attention_forward(attention, q, k, v, None, scaling=0.3, softcap=1.0)
    assert hf_attention.stats.fallbacks == {"query shorter than the keys": 1}
    scores = (1.0 * torch.tanh(0.3 * q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 1.0))
    scores = scores.masked_fill(~torch.ones(3, 6, dtype=torch.bool).tril(), -torch.inf)
    expected = (scores.softmax(-1) @ v.repeat_interleave(2, 1)).transpose(1, 2)
    torch.testing.assert_close(out, expected)


def test_attention_switch_on_a_plain_module_is_reported():
    model = patch_model(nn.Sequential(nn.RMSNorm(8)), attention=True)
    assert [s.kind for s in model.my_mps_ops_patch_summary.skipped] == ["attention"]
    with pytest.raises(my_mps_ops.patch.PatchError, match="set_attn_implementation"):
        patch_model(nn.Sequential(nn.RMSNorm(8)), attention=True, strict=True)


def test_moe_experts_with_3d_weights_are_fused_per_expert():
    transformers = pytest.importorskip("transformers")
    from my_mps_ops.patch import FusedGatedExperts

    config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    reference = transformers.MixtralForCausalLM(config)
    model = patch_model(copy.deepcopy(reference))
    assert model.my_mps_ops_patch_summary.patched == {"rms_norm": 5, "swiglu(experts)": 2, "linear_cross_entropy": 1}
    assert sum(isinstance(m, FusedGatedExperts) for m in model.modules()) == 2
    assert list(model.state_dict()) == list(reference.state_dict())
    tokens = torch.randint(0, 64, (2, 13))
    out, ref = model(tokens).logits, reference(tokens).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.square().mean().backward()
    ref.square().mean().backward()
    for (name, p_ref), p in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_packed_sequences_run_varlen_and_match_the_sequences_run_separately():
    """Two sequences packed into one row with restarting position_ids (what
    DataCollatorWithFlattening builds), or with its cu_seq_lens / max_length
    keyword arguments: attention runs flash_attention_varlen, and logits and
    every parameter gradient equal those of the sequences run one by one."""
    transformers = pytest.importorskip("transformers")
    from my_mps_ops import hf_attention

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = patch_model(transformers.LlamaForCausalLM(config), attention=True, **ATTENTION_ONLY)
    lengths = (7, 12)
    seqs = [torch.randint(0, 64, (1, n)) for n in lengths]
    packed = torch.cat(seqs, 1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]

    def grads():
        out = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad()
        return out

    hf_attention.stats.reset()
    separate = [model(s).logits for s in seqs]
    sum(l.square().mean() for l in separate).backward()
    expected_grads = grads()
    assert hf_attention.stats.packed == 0 and not hf_attention.stats.fallbacks
    cu = torch.tensor([0, 7, 19], dtype=torch.int32)
    for kwargs in (dict(position_ids=position_ids),
                   dict(position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=12,
                        max_length_k=12)):
        hf_attention.stats.reset()
        logits = model(packed, **kwargs).logits
        assert hf_attention.stats.packed == hf_attention.stats.fused == 2 and not hf_attention.stats.fallbacks
        torch.testing.assert_close(logits, torch.cat(separate, 1), atol=1e-5, rtol=1e-5)
        sum(l.square().mean() for l in logits.split(lengths, 1)).backward()
        for name, g in grads().items():
            torch.testing.assert_close(g, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # a mask that is not the sequences' causal blocks (padding) is not packed attention
    hf_attention.stats.reset()
    with torch.no_grad():
        model(packed, attention_mask=torch.ones_like(packed).index_fill_(1, torch.tensor([0]), 0),
              position_ids=position_ids)
    assert hf_attention.stats.packed == 0 and sum(hf_attention.stats.fallbacks.values()) == 2
