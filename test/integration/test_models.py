"""The tiny Llama reference model: my_mps_ops kernels give the same logits and
gradients as plain PyTorch; a compiled training step has no graph breaks and
matches eager."""

import copy

import torch

import my_mps_ops
from my_mps_ops.models import TinyLlama, TinyLlamaConfig

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
