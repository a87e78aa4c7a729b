"""Every causal-LM family of the installed transformers, built small from its
own default config (random init, no downloads), for the patch_model tests.

The list comes from transformers itself (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
so families added by a newer transformers are tested as they appear. Each
default config is rebuilt through its own constructor with small sizes (so the
attributes it derives from them follow), with rules for what the sizes imply
(per-layer lists, Mamba-2 head shapes, latent-attention KV heads, heterogeneous
per-layer overrides) and a small per-family table (FAMILY_CONFIG, FAMILY_SETUP)
for defaults that do not run as they are. A family that still cannot be built,
or that does not run a plain token batch (NOT_PLAIN_BATCH), is reported with
the reason (its test is skipped, not dropped).

`python test/integration/hf_families.py` prints what patch_model patches and
skips in each family.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import time
import warnings
from typing import NamedTuple
from unittest import mock

import torch
from transformers import PreTrainedConfig

# Attribute values that make a default config tiny; applied where the config
# (or its text_config) has the attribute.
SMALL = dict(hidden_size=32, hidden_size_global=32, d_model=32, n_embd=32, n_embed=32, dim=32,
             intermediate_size=64, ffn_dim=64, n_inner=64,
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

# Family-specific config values, passed with the small sizes ("sub.attr" sets an
# attribute of a sub-config). Each works around a default config that does not
# build or run a plain batch as it is, so keep the reason next to it.
FAMILY_CONFIG = {
    # its rotary embedding looks rope_parameters up per layer type; the default is one flat dict
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    # DbrxAttention reads attn_config.rope_theta, which DbrxAttentionConfig does not declare
    # and clamps q/k/v to attn_config.clip_qkv, None by default (DBRX checkpoints use 8)
    "dbrx": {"attn_config.rope_theta": 10000.0, "attn_config.clip_qkv": 8.0},
    # expert counts have no default (None)
    "dots1": dict(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2),
    # the default shares the last 15 layers' KV cache: with 2 layers no layer would produce it
    "gemma3n_text": dict(num_kv_shared_layers=0),
    # layer_types has no default (None), and the first num_dense_layers (default 2) are dense
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    # ReformerModelWithLMHead refuses to run unless the config says decoder; its axial position embeddings
    # must sum to hidden_size and, in training, span exactly the sequence (7 tokens)
    "reformer": dict(is_decoder=True, axial_pos_embds_dim=(16, 16), axial_pos_shape=(1, 7)),
    # the hybrid layers share one transformer block, tied from the first hybrid layer to the others: a single
    # hybrid layer leaves the tie without a target and the model refuses to build
    "zamba": dict(num_hidden_layers=3, layers_block_type=["linear_attention", "hybrid", "hybrid"]),
}
# SMALL attributes whose default is None when the config derives them (head_dim from
# hidden_size and the heads): left to that derivation.
DERIVED = ("head_dim", "attention_head_dim", "num_key_value_heads")

# Causal-LM classes that cannot run a plain token batch: skipped with the reason.
_DRAFT = ("a speculative-decoding draft model: its forward requires the target model's inputs_embeds and "
          "shared_kv_states, not a token batch")
NOT_PLAIN_BATCH = {"gemma4_assistant": _DRAFT, "gemma4_unified_assistant": _DRAFT}

# Family-specific steps after the model is built, each for a model that does not
# run a plain batch otherwise.
FAMILY_SETUP = {
    # X-MOD routes each batch through per-language adapters and needs to be told the language
    "xmod": lambda model: model.set_default_language(model.config.languages[0]),
}


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
                    (re.compile(r"chunk_size$"), 8), (re.compile(r"intermediate_size$"), 32),
                    (re.compile(r"vocab"), 128), (re.compile(r"hidden_size_per_layer"), 8))


class Shrink(NamedTuple):
    """How a config is shrunk: dropout probability set where the config has one,
    family-specific widths by name pattern (SMALL_BY_PATTERN), and per-layer
    lists keeping every kind of layer (else the first layers')."""
    dropout: float = 0.0
    by_pattern: bool = True
    every_layer_kind: bool = True


def _set(cfg, key, value):
    try:
        setattr(cfg, key, value)
    except Exception:  # noqa: BLE001 - a derived or validated attribute: keep the default
        pass


def _get(cfg, key):
    """cfg.key or None; for a heterogeneous config (per-layer values, e.g.
    Gemma 4's head_dim) the global value, which plain attribute access refuses."""
    try:
        return getattr(cfg, key, None)
    except RuntimeError:  # AmbiguousGlobalPerLayerAttributeError
        return cfg._getattr_without_heterogeneous_validation(key, None)


def _fields(cfg):
    """{name: declared default} of the config's dataclass fields ({} for a plain class)."""
    if not dataclasses.is_dataclass(cfg):
        return {}
    return {f.name: f.default for f in dataclasses.fields(cfg)}


def _overrides(cfg, rules):
    """{attribute: small value} for one config (not its sub-configs)."""
    amap = getattr(type(cfg), "attribute_map", {}) or {}
    declared = _fields(cfg)
    out = {}
    for key, value in SMALL.items():
        key = amap.get(key, key)
        if key in declared and declared[key] is None and key in DERIVED:
            continue  # left to the config's own derivation from the sizes set here
        if isinstance(_get(cfg, key), int) and not isinstance(_get(cfg, key), bool):
            out[key] = value
    for key, current in list(vars(cfg).items()) if rules.by_pattern else ():
        if isinstance(current, int) and not isinstance(current, bool) and key not in out and key not in SMALL:
            if declared.get(key, 0) is None and key in declared:
                continue  # derived at init: recomputed from the small sizes
            for pattern, value in SMALL_BY_PATTERN:
                if pattern.search(key) and current > value:
                    out[key] = value
                    break
    _per_layer_lists(cfg, out, rules.every_layer_kind)
    _consistent(cfg, out)
    out.update(TOKEN_IDS)
    if rules.dropout:
        for key in DROPOUT_ATTRS:
            if isinstance(_get(cfg, key), float):
                out[key] = rules.dropout
    return out


LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")


def _per_layer_lists(cfg, out, every_kind):
    """Per-layer lists (layer_types and the like, one entry per default layer)
    cut to the small layer count, keeping each kind of layer the list names
    while there is room (e.g. a sliding and a full attention layer, not two of
    the first kind; or, with every_kind False, the first layers' entries)."""
    count = next((k for k in LAYER_COUNTS if k in out), None)
    default = _get(cfg, count) if count else None
    if not isinstance(default, int) or default <= out[count]:
        return
    for key, value in vars(cfg).items():
        if isinstance(value, (list, tuple)) and len(value) == default and key not in out:
            kinds = []
            for v in value if every_kind else value[:out[count]]:
                if v not in kinds or not every_kind:
                    kinds.append(v)
            small = [kinds[i % len(kinds)] for i in range(out[count])]
            if key in SMALL and all(isinstance(v, int) and not isinstance(v, bool) for v in small):
                small = [SMALL[key]] * len(small)  # a per-layer size (intermediate_size per layer)
            out[key] = type(value)(small)


# (heads, head width, expansion, groups, inner width) of state-space (Mamba-2)
# mixers, which need heads * head width == inner width (expansion * hidden_size
# where the config has no inner width of its own) and groups dividing heads.
SSM_SHAPES = (("num_heads", "head_dim", "expand", "n_groups", None),
              ("mamba_n_heads", "mamba_d_head", "mamba_expand", "mamba_n_groups", "mamba_d_ssm"))


def _consistent(cfg, out):
    def get(key):
        return out.get(key, _get(cfg, key))

    for heads, width, expand, groups, inner in SSM_SHAPES:
        h, e, hidden = get(heads), get(expand), get("hidden_size")
        if all(isinstance(v, int) for v in (h, e, hidden)) and isinstance(get(width), int):
            out[width] = e * hidden // h
            if inner and isinstance(get(inner), int):
                out[inner] = e * hidden
            if isinstance(get(groups), int):
                out[groups] = math.gcd(get(groups), h)
    if all(isinstance(get(k), int) for k in ("qk_nope_head_dim", "qk_rope_head_dim")):
        # multi-head latent attention: keys and values per query head (given to the constructor, which
        # may check it; the widths follow in _derive)
        if isinstance(get("num_key_value_heads"), int) and isinstance(get("num_attention_heads"), int):
            out["num_key_value_heads"] = get("num_attention_heads")
    for experts in ("n_routed_experts", "num_experts"):
        if isinstance(get(experts), int) and "num_experts_per_tok" in vars(cfg) and get("num_experts_per_tok") is None:
            out["num_experts_per_tok"] = 2  # routed experts per token, None by default in a few configs


def _derive(cfg):
    """Attributes the small sizes imply, where the config does not derive them itself."""
    def ints(*keys):
        return all(isinstance(_get(cfg, k), int) for k in keys)

    def unset(key):  # declared, but None
        return key in vars(cfg) and vars(cfg)[key] is None

    if ints("hidden_size", "num_attention_heads") and unset("head_dim"):
        _set(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)  # read as an int by the model
    if ints("num_attention_heads") and unset("num_key_value_heads"):
        _set(cfg, "num_key_value_heads", cfg.num_attention_heads)
    if ints("qk_head_dim", "qk_nope_head_dim", "qk_rope_head_dim"):
        # multi-head latent attention: derived at init, and its rotary tables are head_dim wide
        _set(cfg, "qk_head_dim", _get(cfg, "qk_nope_head_dim") + _get(cfg, "qk_rope_head_dim"))
        _set(cfg, "head_dim", _get(cfg, "qk_rope_head_dim"))
        if ints("num_key_value_heads"):  # keys and values per query head
            _set(cfg, "num_key_value_heads", _get(cfg, "num_attention_heads"))
    for experts in ("n_routed_experts", "num_experts"):
        if ints(experts, "n_group", "topk_group"):  # grouped routing: groups divide the experts
            _set(cfg, "n_group", 2)
            _set(cfg, "topk_group", 1)
            break


def _rebuild(cfg, rules, extra=None):
    """A new config of cfg's class with the small sizes passed to its constructor
    (so attributes it derives from them follow), sub-configs likewise; whatever
    the constructor does not take or overrides is set afterwards."""
    overrides = {**_overrides(cfg, rules), **(extra or {})}
    declared = _fields(cfg)
    kwargs = {k: v for k, v in overrides.items() if k in declared}
    for key, value in vars(cfg).items():
        if isinstance(value, PreTrainedConfig) and key in declared:
            kwargs[key] = _rebuild(value, rules)
    if getattr(cfg, "is_heterogeneous", False) and "per_layer_config" not in overrides:
        kwargs["per_layer_config"] = _per_layer_config(cfg, overrides)
    try:
        new = type(cfg)(**kwargs)
    except Exception:  # noqa: BLE001 - a config that validates its arguments together: shrink in place
        new = copy.deepcopy(cfg)
        for key, value in vars(cfg).items():
            if isinstance(value, PreTrainedConfig):
                _set(new, key, _rebuild(value, rules))
    for key, value in overrides.items():
        if _get(new, key) != value:
            _set(new, key, value)
    _derive(new)
    return new


def _per_layer_config(cfg, out):
    """The per-layer overrides of a heterogeneous config (e.g. Gemma 4's wider
    full-attention heads) for the small layers: each small layer takes the
    overrides of the first default layer of its kind (layer_types), or of the
    same index, with sizes scaled like the global ones (a per-layer size above
    the global default becomes twice the small global size, one below it half)."""
    spec = cfg._heterogeneity_spec.per_layer_overrides
    count = next((k for k in LAYER_COUNTS if k in out), None)
    old_types, new_types = vars(cfg).get("layer_types"), out.get("layer_types")
    result = {}
    for i in range(out[count] if count else 0):
        j = i
        if isinstance(old_types, list) and isinstance(new_types, list) and new_types[i] in old_types:
            j = old_types.index(new_types[i])
        layer = {}
        for attr, value in spec.get(j, {}).items():
            small, default = out.get(attr), _get(cfg, attr)
            if isinstance(value, int) and isinstance(small, int) and isinstance(default, int) and value != default:
                value = 2 * small if value > default else max(1, small // 2)
            elif isinstance(value, int) and isinstance(small, int):
                value = small
            layer[attr] = value
        for attr, value in spec.get(j, {}).items():  # sizes equal by default stay equal (heads and KV heads)
            first = next(a for a, v in spec[j].items() if v == value)
            layer[attr] = layer[first]
        if layer:
            result[i] = layer
    return result


def small_config(model_type, cls, rules=None):
    """The family's default config, shrunk. A causal LM whose config class is the
    text part of a composite (multimodal or encoder-decoder) config gets that part."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type)
    wanted = getattr(cls, "config_class", None)
    if isinstance(wanted, type) and not isinstance(cfg, wanted):
        cfg = next((v for v in vars(cfg).values() if isinstance(v, wanted)), cfg)
    family = FAMILY_CONFIG.get(model_type, {})
    cfg = _rebuild(cfg, rules or Shrink(), {k: v for k, v in family.items() if "." not in k})
    for key, value in family.items():
        if "." in key:
            sub, attr = key.split(".", 1)
            setattr(getattr(cfg, sub), attr, value)
    return cfg


def build(model_type: str, class_name: str, dropout: float = 0.0, seed: int = 0):
    """(model, tokens) for a family, or raises with the reason it cannot be built here."""
    if model_type in NOT_PLAIN_BATCH:
        raise NotImplementedError(NOT_PLAIN_BATCH[model_type])
    # The pattern-shrunk widths may break a config constraint (then the generic ones only), a layer kind
    # may need settings the default config leaves unset (then the first layers' kinds only), and a few
    # families refuse dropout (then without it).
    attempts = [Shrink(p, by_pattern, every_kind) for p in dict.fromkeys((dropout, 0.0))
                for every_kind in (True, False) for by_pattern in (True, False)]
    for i, rules in enumerate(attempts):
        try:
            return _build(model_type, class_name, seed, rules)
        except Exception:  # noqa: BLE001
            if i == len(attempts) - 1:
                raise


def _build(model_type, class_name, seed, rules):
    import transformers

    transformers.logging.set_verbosity_error()
    cls = getattr(transformers, class_name)
    cfg = small_config(model_type, cls, rules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            n = sum(p.numel() for p in cls(cfg).parameters())
        if n > MAX_PARAMETERS:
            raise RuntimeError(f"{n} parameters with the generic small config (limit {MAX_PARAMETERS})")
        torch.manual_seed(seed)
        model = cls(cfg)
    perturb_norm_weights(model, seed)
    if model_type in FAMILY_SETUP:
        FAMILY_SETUP[model_type](model)
    vocab = getattr(cfg, "vocab_size", None) or getattr(getattr(cfg, "text_config", None), "vocab_size", 128)
    # audio decoders (MusicGen) take one row of tokens per codebook per sample
    rows = 2 * (cfg.num_codebooks if isinstance(getattr(cfg, "num_codebooks", None), int) else 1)
    tokens = torch.randint(3, min(vocab, 128), (rows, 7), generator=torch.Generator().manual_seed(seed))
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


def _seed_from_generator():
    """torch.seed() made deterministic: a new seed drawn from the (seeded) global
    generator. Reformer's reversible layers reseed from torch.seed() before each
    layer, which would give two runs different dropout masks."""
    seed = int(torch.randint(0, 2**62, (1,)).item())
    torch.manual_seed(seed)
    return seed


def run(model, tokens, seed):
    """Logits under a fixed seed (the same dropout masks for two models whose
    modules draw random numbers in the same order)."""
    with torch.random.fork_rng(devices=[]), mock.patch.object(torch, "seed", _seed_from_generator):
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
