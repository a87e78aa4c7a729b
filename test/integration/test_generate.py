"""TinyLlama.generate with a KV cache (flash_attention prefill, flash_attention_decode per token; plain
PyTorch: SDPA with the cache mask) gives the tokens of recomputing the whole sequence every step."""

import pytest
import torch

from my_mps_ops.models import TinyLlama, TinyLlamaConfig
from my_mps_ops.models.tiny_llama import KVCache

CFG = TinyLlamaConfig(vocab_size=64, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=48)


def model(use_my_ops, seed=0):
    torch.manual_seed(seed)
    m = TinyLlama(CFG, use_my_ops=use_my_ops).eval()
    with torch.no_grad():  # sharper logits than the default init: fewer near-ties in the argmax
        for p in m.parameters():
            p.mul_(3.0)
    return m


def prompt(batch, length, seed=1):
    return torch.randint(0, CFG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("use_my_ops", [True, False])
def test_cached_generate_matches_recomputing(backend, use_my_ops):
    if backend.name == "metal_emulator" and not use_my_ops:
        pytest.skip("plain PyTorch has no Metal path to emulate")
    m = model(use_my_ops).to(backend.device)
    tokens = prompt(2, 20).to(backend.device)  # a prompt past 16 tokens prefills with flash_attention
    new = 6 if backend.name == "metal_emulator" else 12
    cached = m.generate(tokens, new)
    recomputed = m.generate(tokens, new, use_cache=False)
    assert cached.shape == (2, 20 + new)
    assert torch.equal(cached, recomputed)


def test_cache_longer_than_needed_and_both_settings_agree():
    """A cache allocated past the final length (rows never written stay zero and are never read); the
    my_mps_ops and plain models (same weights) produce the same tokens."""
    ours, plain = model(True), model(False)
    plain.load_state_dict(ours.state_dict())
    tokens = prompt(3, 5, seed=2)
    a = ours.generate(tokens, 10, max_cache_len=40)
    b = plain.generate(tokens, 10, max_cache_len=40)
    assert torch.equal(a, b)
    assert torch.equal(a, ours.generate(tokens, 10, use_cache=False))


def test_cache_grows_in_place():
    m = model(True)
    cache = m.new_cache(batch=2, max_len=32)
    k0 = cache.k[0]
    m.forward_cached(prompt(2, 4), cache, prefill=True)
    m.forward_cached(prompt(2, 1, seed=3), cache)
    assert cache.k[0] is k0 and cache.seqlens.tolist() == [5, 5]
    assert isinstance(cache, KVCache) and (cache.k[0][:, :, 5:] == 0).all()


def test_generate_past_the_rotary_tables_raises():
    with pytest.raises(ValueError, match="max_seq_len"):
        model(True).generate(prompt(1, 40), 20)
