"""patch_model on every causal-LM family of the installed transformers: logits
and gradients of the patched model equal the unpatched model's, in train mode
with dropout active (same seed) and in eval mode."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

import hf_families  # noqa: E402
from my_mps_ops import patch_model  # noqa: E402

FAMILIES = hf_families.causal_lm_families()


@pytest.mark.parametrize("model_type,class_name", FAMILIES, ids=[t for t, _ in FAMILIES])
def test_patched_family_matches_unpatched(model_type, class_name):
    try:
        reference, tokens = hf_families.build(model_type, class_name, dropout=0.1)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"{model_type} is not built here: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    patched = patch_model(copy.deepcopy(reference))
    summary = patched.my_mps_ops_patch_summary
    print(model_type, summary)

    reference.train()
    patched.train()
    ref = hf_families.run(reference, tokens, seed=7)
    out = hf_families.run(patched, tokens, seed=7)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4, msg=f"{model_type}: train-mode logits")
    probe = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    (ref * probe).sum().backward()
    (out * probe).sum().backward()
    for (name, p_ref), (_, p) in zip(reference.named_parameters(), patched.named_parameters()):
        if p_ref.grad is None:
            assert p.grad is None, name
            continue
        # float32 rounding in the backward's reductions grows with the gradient's size (Gemma 4's scaled
        # embeddings get gradients in the hundreds): the absolute tolerance scales with its largest entry
        scale = max(1.0, p_ref.grad.abs().max().item())
        torch.testing.assert_close(p.grad, p_ref.grad, atol=5e-5 * scale, rtol=1e-3,
                                   msg=f"{model_type}: grad of {name}")

    reference.eval()
    patched.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_families.run(patched, tokens, 0), hf_families.run(reference, tokens, 0),
                                   atol=2e-5, rtol=1e-4, msg=f"{model_type}: eval-mode logits")

    if "linear_cross_entropy" in summary.patched:
        # The training loss with labels (fused: no logits) equals the model's own, same dropout masks.
        reference.train()
        patched.train()
        labels = tokens.clone()
        labels[0, :2] = -100
        losses = []
        for model in (reference, patched):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(11)
                losses.append(model(tokens, labels=labels, use_cache=False).loss)
        torch.testing.assert_close(losses[1], losses[0], atol=2e-5, rtol=1e-4, msg=f"{model_type}: training loss")


def test_llama_family_is_patched_and_gemma_norms_use_the_offset_variant():
    # The families this project was built for must not silently fall back.
    llama, _ = hf_families.build("llama", "LlamaForCausalLM")
    summary = patch_model(llama).my_mps_ops_patch_summary
    assert summary.patched == {"rms_norm": 5, "swiglu": 2, "linear_cross_entropy": 1} and not summary.skipped, \
        str(summary)
    gemma, _ = hf_families.build("gemma", "GemmaForCausalLM")
    summary = patch_model(gemma).my_mps_ops_patch_summary
    assert summary.patched.get("rms_norm(1+weight)") == 5 and summary.patched.get("geglu(tanh)") == 2, str(summary)
