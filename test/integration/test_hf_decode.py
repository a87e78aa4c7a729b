"""attn_implementation="my_mps_ops" while generating with transformers' cache classes: decoding steps
(keys outnumber queries, no padding) run flash_attention_decode and give SDPA's tokens and logits."""

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from my_mps_ops import hf_attention  # noqa: E402


def llama_pair():
    hf_attention.register()
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      attn_implementation="sdpa")
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).eval()
    ours = copy.deepcopy(reference)
    ours.set_attn_implementation("my_mps_ops")
    assert ours.config._attn_implementation == "my_mps_ops"
    return reference, ours


def test_generate_matches_sdpa_and_decodes_fused():
    reference, ours = llama_pair()
    tokens = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    hf_attention.stats.reset()
    got = ours.generate(tokens, attention_mask=mask, max_new_tokens=8, do_sample=False)
    expected = reference.generate(tokens, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert got.tolist() == expected.tolist()
    # prefill (2 layers) fused by flash_attention, then 7 decoding steps x 2 layers by flash_attention_decode
    assert hf_attention.stats.decode == 14 and hf_attention.stats.fused == 16
    assert not hf_attention.stats.fallbacks


def test_several_new_tokens_against_a_dynamic_cache():
    """q_len 3 after an 11-token prefill: transformers builds the causal mask offset by the cache, which is
    the bottom-right causal mask; it runs fused (it used to fall back) with SDPA's logits."""
    reference, ours = llama_pair()
    tokens = torch.randint(0, 64, (2, 14), generator=torch.Generator().manual_seed(2))
    logits = []
    hf_attention.stats.reset()
    for model in (ours, reference):
        cache = transformers.DynamicCache(config=model.config)
        # transformers 5.x renames past_key_values to cache
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        with torch.no_grad():
            model(tokens[:, :11], use_cache=True, **{name: cache})
            logits.append(model(tokens[:, 11:], use_cache=True, **{name: cache}).logits)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)
    assert hf_attention.stats.fused == 4 and hf_attention.stats.decode == 2 and not hf_attention.stats.fallbacks


def test_padding_still_falls_back():
    reference, ours = llama_pair()
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0  # left padding: every step has a padding mask
    hf_attention.stats.reset()
    got = ours.generate(tokens, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert got.tolist() == reference.generate(tokens, attention_mask=mask, max_new_tokens=4,
                                              do_sample=False).tolist()
    assert hf_attention.stats.decode == 0 and sum(hf_attention.stats.fallbacks.values()) > 0


def test_sliding_window_model_decodes_with_the_window():
    """Mistral with a 5-token sliding window: once the keys outnumber the window transformers hands each step
    the window mask, checked and left to the decode kernel's window_left."""
    hf_attention.register()
    config = transformers.MistralConfig(vocab_size=64, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        sliding_window=5, attn_implementation="sdpa")
    torch.manual_seed(0)
    reference = transformers.MistralForCausalLM(config).eval()
    ours = copy.deepcopy(reference)
    ours.set_attn_implementation("my_mps_ops")
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(tokens)
    hf_attention.stats.reset()
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    got, expected = ours.generate(tokens, **kw), reference.generate(tokens, **kw)
    assert got.sequences.tolist() == expected.sequences.tolist()
    for a, b in zip(got.logits, expected.logits):  # without the window they differ by ~1
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert hf_attention.stats.decode == 10 and not hf_attention.stats.fallbacks
