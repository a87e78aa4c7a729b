"""The tiny Llama reference model and patch_model: my_mps_ops kernels give the
same logits and gradients as plain PyTorch; a compiled training step has no
graph breaks and matches eager."""

import copy

import pytest
import torch

import my_mps_ops
from my_mps_ops.models import TinyLlama, TinyLlamaConfig
from my_mps_ops.patch import FusedSwiGLUMLP, patch_model

CFG = TinyLlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=96, max_seq_len=32)


def pair(device="cpu"):
    torch.manual_seed(0)
    reference = TinyLlama(CFG, use_my_ops=False).to(device)
    ours = TinyLlama(CFG, use_my_ops=True).to(device)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def test_state_dict_keys_identical():
    reference, ours = pair()
    assert list(reference.state_dict()) == list(ours.state_dict())
    assert any(isinstance(m, my_mps_ops.nn.RMSNorm) for m in ours.modules())


def test_logits_and_gradients_match_plain_pytorch(backend):
    reference, ours = pair(backend.device)
    tokens = torch.randint(0, CFG.vocab_size, (3, 17), device=backend.device)
    torch.testing.assert_close(ours(tokens), reference(tokens), atol=1e-5, rtol=1e-5)
    reference.loss(tokens).backward()
    ours.loss(tokens).backward()
    for (name, p_ref), p_ours in zip(reference.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p_ours.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)


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
    from my_mps_ops.patch import FusedGateUpSwiGLUMLP

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


def test_compiled_training_step_has_no_graph_breaks_and_matches_eager():
    torch._dynamo.reset()
    reference, ours = pair()
    compiled_model = copy.deepcopy(ours)

    # Forward and loss are one compiled graph; AOTAutograd compiles the
    # matching backward graph (our ops' registered backward ops included),
    # which loss.backward() runs.
    def forward_loss(model, tokens):
        return model.loss(tokens)

    tokens = torch.randint(0, CFG.vocab_size, (2, 13))
    explanation = torch._dynamo.explain(forward_loss)(copy.deepcopy(ours), tokens)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    compiled = torch.compile(forward_loss, fullgraph=True, dynamic=True)
    for seq in (13, 21):  # two lengths: one dynamic graph
        tokens = torch.randint(0, CFG.vocab_size, (2, seq))
        eager_loss = forward_loss(ours, tokens)
        eager_loss.backward()
        compiled_loss = compiled(compiled_model, tokens)
        compiled_loss.backward()
        torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-5, rtol=1e-5)
        for p_e, p_c in zip(ours.parameters(), compiled_model.parameters()):
            torch.testing.assert_close(p_c.grad, p_e.grad, atol=1e-5, rtol=1e-4)
            p_e.grad = p_c.grad = None
