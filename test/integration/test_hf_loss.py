"""patch_model(linear_cross_entropy=True) on transformers causal LMs: in train
mode with labels the loss comes from linear_cross_entropy (no logits) and
equals the model's own loss, with the same gradients; eval mode and calls
without labels are unchanged; models whose forward changes the logits before
the loss are left alone and reported."""

import copy

import pytest
import torch

import my_mps_ops
from my_mps_ops import patch_model

transformers = pytest.importorskip("transformers")


def llama(tie=False, vocab=300):
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tie,
                                   attention_dropout=0.1)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def batch(vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (3, 11), generator=g)
    labels = tokens.clone()
    labels[0, :4] = -100  # a prompt that is not trained on
    labels[2, 7:] = -100  # padding
    return tokens, labels


def train_step(model, seed=0, **kwargs):
    tokens, labels = batch(model.config.vocab_size)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model(input_ids=tokens, labels=labels, use_cache=False, **kwargs)
    loss = out["loss"] if not isinstance(out, tuple) else out[0]
    loss.backward()
    return out, loss


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_training_loss_and_gradients_equal_the_model_and_skip_the_logits(tie):
    reference = llama(tie)
    patched = patch_model(copy.deepcopy(reference), rms_norm=False, swiglu=False)
    assert patched.my_mps_ops_patch_summary.patched == {"linear_cross_entropy": 1}
    out, loss = train_step(patched)
    ref_out, ref_loss = train_step(reference)
    assert out.logits is None and ref_out.logits is not None
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(reference.named_parameters(), patched.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_num_items_in_batch_shift_labels_and_tuple_outputs():
    reference = llama()
    patched = patch_model(copy.deepcopy(reference), rms_norm=False, swiglu=False)
    tokens, labels = batch()
    count = torch.tensor(17)
    for kwargs in (dict(num_items_in_batch=count), dict(shift_labels=torch.roll(labels, -1, 1))):
        patched.train(), reference.train()
        torch.manual_seed(1)  # the same attention-dropout masks
        ours = patched(input_ids=tokens, labels=labels, use_cache=False, attention_mask=None, **kwargs).loss
        torch.manual_seed(1)
        theirs = reference(input_ids=tokens, labels=labels, use_cache=False, **kwargs).loss
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.manual_seed(2)
    out = patched(input_ids=tokens, labels=labels, use_cache=False, return_dict=False)
    assert isinstance(out, tuple) and out[1] is None
    torch.manual_seed(2)
    torch.testing.assert_close(out[0], reference(input_ids=tokens, labels=labels, use_cache=False).loss,
                               atol=1e-5, rtol=1e-5)


def test_eval_mode_and_calls_without_labels_are_unchanged():
    reference = llama()
    patched = patch_model(copy.deepcopy(reference), rms_norm=False, swiglu=False).eval()
    reference.eval()
    tokens, labels = batch()
    ours, theirs = patched(input_ids=tokens, labels=labels), reference(input_ids=tokens, labels=labels)
    torch.testing.assert_close(ours.logits, theirs.logits)
    torch.testing.assert_close(ours.loss, theirs.loss)
    patched.train()
    assert patched(input_ids=tokens).logits.shape == (3, 11, 300)


def test_gemma2_final_softcapping_goes_through_the_op():
    cfg = transformers.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, vocab_size=300, final_logit_softcapping=3.0)
    torch.manual_seed(0)
    reference = transformers.Gemma2ForCausalLM(cfg)
    patched = patch_model(copy.deepcopy(reference), rms_norm=False, swiglu=False, geglu=False)
    assert patched.my_mps_ops_patch_summary.patched == {"linear_cross_entropy": 1}
    _, loss = train_step(patched)
    _, ref_loss = train_step(reference)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert patched.config.final_logit_softcapping == 3.0  # restored after the call
    for (name, p), q in zip(reference.named_parameters(), patched.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_forward_that_scales_the_logits_is_left_alone():
    # Cohere multiplies the logits by logit_scale between lm_head and the loss.
    cfg = transformers.CohereConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=300, logit_scale=0.5)
    torch.manual_seed(0)
    model = transformers.CohereForCausalLM(cfg)
    patch_model(model, rms_norm=False, swiglu=False)
    summary = model.my_mps_ops_patch_summary
    assert "linear_cross_entropy" not in summary.patched
    (skip,) = [s for s in summary.skipped if s.kind == "linear_cross_entropy"]
    assert "changed lm_head's output" in skip.reason
    tokens, labels = batch()
    assert model.train()(input_ids=tokens, labels=labels).logits is not None
    with pytest.raises(my_mps_ops.patch.PatchError, match="changed lm_head's output"):
        patch_model(transformers.CohereForCausalLM(cfg), rms_norm=False, swiglu=False, geglu=False, strict=True)


def test_switch_off_and_plain_modules():
    model = llama()
    patch_model(model, linear_cross_entropy=False)
    assert "linear_cross_entropy" not in model.my_mps_ops_patch_summary.patched
    assert "_my_mps_ops_forward" not in vars(model)
