"""Every causal-LM family of the installed transformers, built small from its
own default config (random init, no downloads), for the patch_model tests.

The list comes from transformers itself (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
so families added by a newer transformers are tested as they appear. A family
whose default config cannot be shrunk generically, or that does not run a plain
token batch, is reported with the reason (its test is skipped, not dropped).

`python test/integration/hf_families.py` prints what patch_model patches and
skips in each family.
"""

from __future__ import annotations

import copy
import re
import time
import warnings

import torch

# Attribute values that make a default config tiny; applied where the config
# (or its text_config) has the attribute.
SMALL = dict(hidden_size=32, d_model=32, n_embd=32, n_embed=32, dim=32, intermediate_size=64, ffn_dim=64, n_inner=64,
             num_hidden_layers=2, n_layer=2, num_layers=2, n_layers=2, decoder_layers=2,
             num_attention_heads=4, n_head=4, n_heads=4, decoder_attention_heads=4, num_key_value_heads=2,
             head_dim=8, vocab_size=128, max_position_embeddings=64, n_positions=64,
             num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
             shared_expert_intermediate_size=32, moe_num_experts=4, first_k_dense_replace=1, rotary_dim=4,
             q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8)
TOKEN_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Dropout probabilities set in train-mode tests, where the config has them.
DROPOUT_ATTRS = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                 "hidden_dropout_prob", "attention_probs_dropout_prob", "activation_dropout", "ffn_dropout")
MAX_PARAMETERS = 10_000_000


def causal_lm_families():
    """[(model_type, class name)] of the installed transformers' causal LMs; the
    multimodal *ForConditionalGeneration entries are left to their text
    families, which the mapping lists too."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return [(t, c) for t, c in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if not c.endswith("ConditionalGeneration")]


# Family-specific widths (linear-attention, state-space and recurrent layers)
# by name pattern, applied where the default is larger: those layers' CPU
# fallbacks dominate the test time at their default sizes.
SMALL_BY_PATTERN = ((re.compile(r"head_dim$"), 8), (re.compile(r"(num|n)_(key_|value_)?heads$"), 4),
                    (re.compile(r"ffn_dim$"), 64), (re.compile(r"(lru_width|d_state|ssm_state_size)$"), 8),
                    (re.compile(r"chunk_size$"), 8), (re.compile(r"intermediate_size$"), 32))


def _set(cfg, key, value):
    try:
        setattr(cfg, key, value)
    except Exception:  # noqa: BLE001 - a derived or validated attribute: keep the default
        pass


def _shrink(cfg, dropout, by_pattern=True):
    for key, value in SMALL.items():
        if isinstance(getattr(cfg, key, None), int):
            _set(cfg, key, value)
    for key, current in list(vars(cfg).items()) if by_pattern else ():
        if isinstance(current, int) and not isinstance(current, bool) and key not in SMALL:
            for pattern, value in SMALL_BY_PATTERN:
                if pattern.search(key) and current > value:
                    _set(cfg, key, value)
                    break
    for key, value in TOKEN_IDS.items():
        try:
            setattr(cfg, key, value)
        except Exception:  # noqa: BLE001
            pass
    if dropout:
        for key in DROPOUT_ATTRS:
            if isinstance(getattr(cfg, key, None), float):
                setattr(cfg, key, dropout)
    if all(isinstance(getattr(cfg, k, None), int) for k in ("qk_head_dim", "qk_nope_head_dim", "qk_rope_head_dim")):
        # multi-head latent attention: derived at init, and its rotary tables are head_dim wide
        _set(cfg, "qk_head_dim", cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        _set(cfg, "head_dim", cfg.qk_rope_head_dim)
        if isinstance(getattr(cfg, "num_key_value_heads", None), int):  # keys and values per query head
            _set(cfg, "num_key_value_heads", cfg.num_attention_heads)
    sub = getattr(cfg, "text_config", None)
    if sub is not None and hasattr(sub, "to_dict"):
        _shrink(sub, dropout, by_pattern)
    return cfg


def build(model_type: str, class_name: str, dropout: float = 0.0, seed: int = 0):
    """(model, tokens) for a family, or raises with the reason it cannot be built here."""
    attempts = [(True, dropout), (False, dropout)] + ([(True, 0.0), (False, 0.0)] if dropout else [])
    for i, (by_pattern, p) in enumerate(attempts):
        # the pattern-shrunk widths may break a config constraint (then the generic ones only), and a few
        # families refuse dropout (then without it)
        try:
            return _build(model_type, class_name, p, seed, by_pattern)
        except Exception:  # noqa: BLE001
            if i == len(attempts) - 1:
                raise


def _build(model_type, class_name, dropout, seed, by_pattern):
    import transformers
    from transformers import AutoConfig

    transformers.logging.set_verbosity_error()
    cfg = _shrink(AutoConfig.for_model(model_type), dropout, by_pattern)
    cls = getattr(transformers, class_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            n = sum(p.numel() for p in cls(cfg).parameters())
        if n > MAX_PARAMETERS:
            raise RuntimeError(f"{n} parameters with the generic small config (limit {MAX_PARAMETERS})")
        torch.manual_seed(seed)
        model = cls(cfg)
    perturb_norm_weights(model, seed)
    vocab = getattr(cfg, "vocab_size", None) or getattr(getattr(cfg, "text_config", None), "vocab_size", 128)
    tokens = torch.randint(3, min(vocab, 128), (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        run(model, tokens, seed)  # raises if the family does not run a plain batch
    return model, tokens


def perturb_norm_weights(model, seed):
    """Moves 1-D norm weights away from their init (ones, or zeros for 1 + weight
    norms), so a patched norm with the wrong weight formula shows."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name.lower():
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def run(model, tokens, seed):
    """Logits under a fixed seed (the same dropout masks for two models whose
    modules draw random numbers in the same order)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model(tokens, use_cache=False).logits


def main():
    from my_mps_ops import patch_model

    for model_type, class_name in causal_lm_families():
        try:
            model, _ = build(model_type, class_name)
        except Exception as e:  # noqa: BLE001
            print(f"{model_type:28s} not built: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            continue
        start = time.time()
        summary = patch_model(copy.deepcopy(model)).my_mps_ops_patch_summary
        patched = ", ".join(f"{n} {k}" for k, n in sorted(summary.patched.items())) or "-"
        skipped = "; ".join(sorted({f"{s.type_name}: {s.reason[:60]}" for s in summary.skipped}))
        print(f"{model_type:28s} patched: {patched}" + (f" | skipped: {skipped}" if skipped else ""), flush=True)


if __name__ == "__main__":
    main()
