"""patch_model: swap my_mps_ops kernels into an existing model, only where they
reproduce the module exactly.

A module is replaced only when its structure is one we know (an RMSNorm; a
gated MLP with gate/up/down projections) AND the replacement reproduces its
forward on probe inputs: random rows at two scales (the small one makes a
different eps show), with the module's own weights perturbed (so a weight
offset such as Gemma's ``1 + weight`` or an ignored weight shows), in train
mode under one seed (so dropout or other randomness inside the module's forward
shows) and in eval mode. Anything else is left alone and listed in the summary
with the reason.
"""

from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import nn

from . import nn as my_nn
from . import ops

logger = logging.getLogger(__name__)


# ---- the summary

@dataclass
class SkippedModule:
    path: str
    type_name: str
    kind: str
    reason: str


@dataclass
class PatchSummary:
    """What patch_model did: modules patched per kind (e.g. ``rms_norm``,
    ``rms_norm(1+weight)``, ``swiglu``, ``geglu(tanh)``) and modules it looked at but
    left alone, with the reason."""

    patched: dict = field(default_factory=dict)
    skipped: List[SkippedModule] = field(default_factory=list)
    # With attention=True: the live counts of fused attention calls and SDPA
    # fallbacks by reason (my_mps_ops.hf_attention.stats).
    attention: Optional[object] = None

    def _count(self, kind: str) -> None:
        self.patched[kind] = self.patched.get(kind, 0) + 1

    def __str__(self) -> str:
        lines = ["my_mps_ops.patch_model: patched " +
                 (", ".join(f"{n} {k}" for k, n in sorted(self.patched.items())) or "nothing")]
        for s in self.skipped:
            lines.append(f"  skipped {s.path or '<root>'} ({s.type_name}, {s.kind}): {s.reason}")
        if self.attention is not None:
            lines.append(f"  {self.attention}")
        return "\n".join(lines)


class PatchError(RuntimeError):
    """patch_model(strict=True) found a module of a kind it patches that it cannot reproduce exactly."""


# ---- probing: does a replacement reproduce the module?

def _tolerance(dtype: torch.dtype) -> Tuple[float, float]:
    if dtype == torch.float64:
        return 1e-10, 1e-10
    if dtype == torch.float32:
        return 2e-5, 2e-5
    if dtype == torch.bfloat16:
        return 2e-2, 2e-2
    return 2e-3, 2e-3


def _set_training(module: nn.Module, flags):
    for m, flag in zip(module.modules(), flags):
        m.training = flag


def _same_random_stream(device):
    # Both modules see the same random numbers, and the caller's stream is
    # left as it was (the probe must not shift a training run's dropout).
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(device_type=device.type)


def _probe_mismatch(original: nn.Module, replacement: nn.Module, width: int, weights: List[torch.Tensor],
                    device, dtype) -> Optional[str]:
    """None if replacement(x) equals original(x) on the probe inputs, else why not."""
    flags = [m.training for m in original.modules()]
    saved = [w.detach().clone() for w in weights]
    gen = torch.Generator().manual_seed(1234)
    rtol, atol = _tolerance(dtype)
    try:
        with torch.no_grad():
            for w in weights:  # away from any init value (ones, zeros)
                w.add_(0.5 * torch.randn(w.shape, generator=gen).to(w.dtype).to(w.device))
            for scale in (1.0, 1e-3):
                x = (scale * torch.randn(2, 3, width, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)
                for training in (True, False):
                    original.train(training)
                    replacement.train(training)
                    outs = []
                    for m in (original, replacement):
                        with _same_random_stream(device):
                            torch.manual_seed(4321)
                            outs.append(m(x))
                    ref, out = outs
                    if not isinstance(ref, torch.Tensor):
                        return f"its forward returns {type(ref).__name__}, not a tensor"
                    if ref.dtype != out.dtype or ref.shape != out.shape:
                        return f"output {tuple(ref.shape)} {ref.dtype} vs fused {tuple(out.shape)} {out.dtype}"
                    err = (out.double() - ref.double()).abs()
                    bound = atol * ref.double().abs().max().clamp_min(1.0) + rtol * ref.double().abs()
                    if not bool((err <= bound).all()):
                        mode = "train" if training else "eval"
                        return (f"output differs from the fused op by up to {err.max().item():.3g} "
                                f"({mode} mode, input scale {scale:g})")
    except Exception as e:  # noqa: BLE001 - any failure means "cannot reproduce"
        return f"probe failed: {type(e).__name__}: {e}"
    finally:
        with torch.no_grad():
            for w, s in zip(weights, saved):
                w.copy_(s)
        # The replacement shares the original's Linear modules: set it first,
        # then restore every flag of the original's tree.
        replacement.train(flags[0])
        _set_training(original, flags)
    return None


# ---- RMSNorm

_RMS_NORM_NAME = re.compile(r"rms_?norm", re.IGNORECASE)
_EPS_ATTRS = ("eps", "variance_epsilon", "epsilon", "norm_eps", "layer_norm_epsilon")


def _rms_norm_eps(module: nn.Module):
    for attr in _EPS_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


class OffsetRMSNorm(my_nn.RMSNorm):
    """my_mps_ops.nn.RMSNorm scaling by ``weight + weight_offset`` (Gemma-style
    norms store ``weight`` as an offset from 1)."""

    def __init__(self, *args, weight_offset: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_offset = weight_offset

    def forward(self, x):
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return ops.rms_norm(x, self.weight + self.weight_offset, eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight_offset={self.weight_offset}"


def _rms_norm_candidate(module: nn.Module) -> bool:
    if isinstance(module, my_nn.RMSNorm):
        return False
    if isinstance(module, nn.RMSNorm):
        return True
    return bool(_RMS_NORM_NAME.search(type(module).__name__)) and not any(True for _ in module.children())


def _extra_inputs(module: nn.Module) -> List[str]:
    """Names of the forward parameters after the input (e.g. a gated norm's
    ``gate``): a caller may pass them, and the fused modules take the input
    only, so a probe of forward(x) alone cannot prove a replacement exact."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return []
    return [p.name for p in params[1:]]


def _rms_norm_replacements(norm: nn.Module):
    """(kind, replacement) pairs that may reproduce `norm`, or a reason string."""
    extra = _extra_inputs(norm)
    if extra:
        return f"forward takes more than the input ({', '.join(extra)}); the fused norm takes the input only"
    weight = getattr(norm, "weight", None)
    if weight is not None and not (isinstance(weight, nn.Parameter) and weight.dim() == 1):
        return "weight is not a 1-D Parameter"
    if isinstance(norm, nn.RMSNorm):
        if len(norm.normalized_shape) != 1:
            return "normalises over more than the last dimension"
        eps = norm.eps
    else:
        eps = _rms_norm_eps(norm)
        if eps is None:
            return "no eps attribute (" + "/".join(_EPS_ATTRS) + ")"
    if weight is None:
        width = norm.normalized_shape[0] if isinstance(norm, nn.RMSNorm) else None
        if width is None:
            return "no weight and no normalized_shape"
    else:
        width = weight.shape[0]
    kwargs = dict(eps=eps, elementwise_affine=weight is not None,
                  device=weight.device if weight is not None else None,
                  dtype=weight.dtype if weight is not None else None)
    plain = my_nn.RMSNorm(width, **kwargs)
    candidates = [("rms_norm", plain)]
    if weight is not None:
        candidates.append(("rms_norm(1+weight)", OffsetRMSNorm(width, weight_offset=1.0, **kwargs)))
        for _, r in candidates:
            r.weight = weight  # the same Parameter: optimizers keep working
    for attr in _EPS_ATTRS:
        # model code may read the norm's eps under its own name (transformers' Mamba-2 mixers pass
        # self.norm.variance_epsilon to a fused kernel): keep it readable on the replacement
        value = getattr(norm, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            for _, r in candidates:
                if not hasattr(r, attr):
                    setattr(r, attr, value)
    return candidates


# ---- gated MLPs

# (gate, up, down) Linear attribute names of gated MLPs.
_GATED_MLP_NAMES = (("gate_proj", "up_proj", "down_proj"),  # transformers' Llama, Mistral, Qwen, Gemma, ...
                    ("w1", "w3", "w2"),                      # Mixtral-style experts, DBRX
                    ("w_gate", "w_up", "w_down"),            # my_mps_ops.models.TinyLlama's plain twin
                    ("wi_0", "wi_1", "wo"))                  # T5-style gated GELU


def _silu_product(gate, up):
    return ops.swiglu(gate, up)


def _gelu_tanh_product(gate, up):
    return ops.geglu(gate, up, "tanh")


def _gelu_product(gate, up):
    return ops.geglu(gate, up, "none")


# kind -> fused activation of (gate, up); named functions, looked up from the
# module's `kind` at call time, so patched models still pickle.
_GATED_ACTIVATIONS = {"swiglu": _silu_product, "geglu(tanh)": _gelu_tanh_product, "geglu": _gelu_product}


class FusedGatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with the activation and product fused, over
    the original Linear modules, kept under their original names (same
    state_dict keys)."""

    def __init__(self, names, gate: nn.Linear, up: nn.Linear, down: nn.Linear, kind: str = "swiglu"):
        super().__init__()
        self._names = names
        self.kind = kind
        for name, linear in zip(names, (gate, up, down)):
            setattr(self, name, linear)

    def forward(self, x):
        gate, up, down = (getattr(self, n) for n in self._names)
        return down(_GATED_ACTIVATIONS[self.kind](gate(x), up(x)))

    def extra_repr(self) -> str:
        return self.kind


class FusedSwiGLUMLP(FusedGatedMLP):
    """FusedGatedMLP with a SiLU gate."""

    def __init__(self, names, gate: nn.Linear, up: nn.Linear, down: nn.Linear, kind: str = "swiglu"):
        super().__init__(names, gate, up, down, "swiglu")


class FusedGeGLUMLP(FusedGatedMLP):
    """FusedGatedMLP with a GELU (erf or tanh) gate."""


class FusedGateUpMLP(nn.Module):
    """``down(act(gate) * up)`` with ``gate, up = gate_up_proj(x).chunk(2, -1)``
    (transformers' Phi3MLP layout); the fused op reads the two halves in place.
    The Linear modules keep their names (same state_dict keys)."""

    def __init__(self, gate_up_proj: nn.Linear, down_proj: nn.Linear, kind: str = "swiglu"):
        super().__init__()
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj
        self.kind = kind

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(_GATED_ACTIVATIONS[self.kind](gate, up))

    def extra_repr(self) -> str:
        return self.kind


class FusedGateUpSwiGLUMLP(FusedGateUpMLP):
    """FusedGateUpMLP with a SiLU gate."""

    def __init__(self, gate_up_proj: nn.Linear, down_proj: nn.Linear, kind: str = "swiglu"):
        super().__init__(gate_up_proj, down_proj, "swiglu")


def _fused_mlp(layout, kind):
    silu = kind == "swiglu"
    if layout[0] == "gate_up":
        _, gate_up, down = layout
        return (FusedGateUpSwiGLUMLP if silu else FusedGateUpMLP)(gate_up, down, kind)
    names, (gate, up, down) = layout
    return (FusedSwiGLUMLP if silu else FusedGeGLUMLP)(names, gate, up, down, kind)


def _mlp_layout(module: nn.Module):
    """The gated-MLP layout of `module`, or None if it has none."""
    if isinstance(module, (FusedGatedMLP, FusedGateUpMLP)):
        return None
    for names in _GATED_MLP_NAMES:
        linears = [getattr(module, n, None) for n in names]
        if all(isinstance(l, nn.Linear) for l in linears):
            gate, up, down = linears
            if gate.in_features == up.in_features and gate.out_features == up.out_features == down.in_features:
                return names, linears
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if isinstance(gate_up, nn.Linear) and isinstance(down, nn.Linear) and gate_up.out_features == 2 * down.in_features:
        return ("gate_up", gate_up, down)
    return None


def _mlp_in_features(layout) -> Tuple[int, List[nn.Parameter]]:
    linears = layout[1:] if layout[0] == "gate_up" else layout[1]
    params = [p for l in linears for p in l.parameters(recurse=False)]
    return linears[0].in_features, params


# ---- MoE experts stored as 3-D weights

class FusedGatedExperts(nn.Module):
    """A mixture of experts whose weights are 3-D Parameters (transformers'
    ``*Experts`` modules: ``gate_up_proj`` [experts, 2 * inner, hidden],
    ``down_proj`` [experts, hidden, inner]), each expert's ``act(gate) * up``
    fused. Routes tokens as those modules do: each expert takes the tokens
    whose ``top_k_index`` names it, scales its output by their
    ``top_k_weights`` and adds it into theirs. The Parameters keep their names."""

    def __init__(self, gate_up_proj: nn.Parameter, down_proj: nn.Parameter, kind: str = "swiglu"):
        super().__init__()
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj
        self.num_experts = gate_up_proj.shape[0]
        self.kind = kind

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # [experts, k, tokens]; index num_experts marks a dropped slot
            routed = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            experts = torch.greater(routed.sum(dim=(-1, -2)), 0).nonzero()
        for expert in experts:
            expert = expert[0]
            if expert == self.num_experts:
                continue
            slot, token = torch.where(routed[expert])
            gate, up = nn.functional.linear(hidden_states[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
            h = nn.functional.linear(_GATED_ACTIVATIONS[self.kind](gate, up), self.down_proj[expert])
            out.index_add_(0, token, (h * top_k_weights[token, slot, None]).to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"{self.num_experts} experts, {self.kind}"


def _experts_layout(module: nn.Module):
    """(gate_up_proj, down_proj) of a 3-D-weight experts module, or None."""
    if isinstance(module, FusedGatedExperts) or not type(module).__name__.endswith("Experts"):
        return None
    params = dict(module.named_parameters(recurse=False))
    gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
    if set(params) != {"gate_up_proj", "down_proj"} or gate_up is None or down is None:
        return None
    if gate_up.dim() != 3 or down.dim() != 3 or any(True for _ in module.children() if not _is_activation(_)):
        return None
    experts, two_inner, hidden = gate_up.shape
    if down.shape != (experts, hidden, two_inner // 2) or two_inner % 2:
        return None
    return gate_up, down


def _is_activation(module: nn.Module) -> bool:
    return not any(True for _ in module.parameters())


class _ExpertsProbe(nn.Module):
    """Calls an experts module on a fixed routing: probes see forward(x)."""

    def __init__(self, experts: nn.Module, num_experts: int, seed: int = 99):
        super().__init__()
        self.experts = experts
        self.num_experts = num_experts
        self.seed = seed

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        gen = torch.Generator().manual_seed(self.seed)
        k = min(2, self.num_experts)
        index = torch.stack([torch.randperm(self.num_experts, generator=gen)[:k] for _ in range(tokens.shape[0])])
        weights = torch.rand(index.shape, generator=gen, dtype=torch.float64).to(tokens.dtype)
        return self.experts(tokens, index.to(tokens.device), weights.to(tokens.device))


# ---- the pass

def _first_match(path, child, kind_group, candidates, width, weights, summary, strict):
    """The first candidate that reproduces `child`, or None (recorded as skipped)."""
    first = next(iter(weights), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    reasons = []
    for kind, replacement in candidates:
        mismatch = _probe_mismatch(child, replacement, width, weights, device, dtype)
        if mismatch is None:
            return kind, replacement
        reasons.append(f"{kind}: {mismatch}")
    _skip(summary, strict, path, child, kind_group, "; ".join(reasons))
    return None


def _skip(summary, strict, path, child, kind, reason):
    module = child.experts if isinstance(child, _ExpertsProbe) else child
    entry = SkippedModule(path, type(module).__name__, kind, reason)
    summary.skipped.append(entry)
    if strict:
        raise PatchError(f"patch_model(strict=True): cannot reproduce {path} ({entry.type_name}) exactly: {reason}")


def _use_fused_attention(model, summary, strict):
    from . import hf_attention

    if not hasattr(model, "set_attn_implementation"):
        _skip(summary, strict, "", model, "attention", "not a transformers model (no set_attn_implementation)")
        return
    model.set_attn_implementation(hf_attention.register())
    summary._count("attention")
    summary.attention = hf_attention.stats


def _use_fused_loss(model, summary, strict):
    from . import hf_loss

    reason = hf_loss.probe_mismatch(model)
    if reason is not None:
        _skip(summary, strict, "", model, "linear_cross_entropy", reason)
        return
    hf_loss.enable(model)
    summary._count("linear_cross_entropy")


def _is_causal_lm(model) -> bool:
    return hasattr(model, "get_output_embeddings") and hasattr(model, "loss_function")


def patch_model(model: nn.Module, *, rms_norm: bool = True, swiglu: bool = True, geglu: bool = True,
                linear_cross_entropy: bool = True, attention: bool = False, strict: bool = False) -> nn.Module:
    """Swaps my_mps_ops kernels into a model, in place, keeping every Parameter
    (optimizers keep working) and state_dict key. Each switch turns one kind of
    replacement on or off; modules of a kind switched off are left untouched:

    - ``rms_norm``: RMSNorm modules (torch.nn.RMSNorm, transformers' *RMSNorm
      classes) become my_mps_ops.nn.RMSNorm (or OffsetRMSNorm for norms that
      scale by ``1 + weight``);
    - ``swiglu`` / ``geglu``: gated MLPs (gate_proj/up_proj/down_proj, w1/w3/w2,
      wi_0/wi_1/wo, or one fused gate_up_proj) whose gate is SiLU / GELU (erf
      or tanh) run the activation and product through the fused op;
    - ``linear_cross_entropy``: a transformers causal LM computes its training
      loss (train mode, ``labels`` given) from the last hidden states and
      ``lm_head`` with my_mps_ops.linear_cross_entropy, never holding the
      logits (``output.logits`` is then None); eval mode and calls without
      labels are unchanged (my_mps_ops.hf_loss);
    - ``attention`` (off by default): a transformers model switches to
      ``attn_implementation="my_mps_ops"`` (my_mps_ops.hf_attention: fused
      flash_attention where exact, SDPA otherwise, both counted).

    A module is replaced only if the replacement reproduces its forward (see the
    module docstring); others are left alone, or with ``strict=True`` raise
    PatchError. The summary (PatchSummary: patched per kind, skipped with the
    reason) is logged at INFO and kept as ``model.my_mps_ops_patch_summary``.

    Returns the model."""
    if not isinstance(model, nn.Module):
        raise TypeError("patch_model expects a torch.nn.Module (the model to patch in place), "
                        f"got {type(model).__name__}")
    summary = PatchSummary()
    mlp_kinds = [k for k in _GATED_ACTIVATIONS if (swiglu if k == "swiglu" else geglu)]
    paths = {id(m): n for n, m in model.named_modules()}
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            path = f"{paths.get(id(module), '')}.{child_name}".lstrip(".")
            if mlp_kinds:
                layout = _mlp_layout(child)
                if layout is not None:
                    extra = _extra_inputs(child)
                    if extra:
                        _skip(summary, strict, path, child, "gated_mlp", f"forward takes more than the input "
                              f"({', '.join(extra)}); the fused MLP takes the input only")
                        continue
                    width, weights = _mlp_in_features(layout)
                    candidates = [(k, _fused_mlp(layout, k)) for k in mlp_kinds]
                    match = _first_match(path, child, "gated_mlp", candidates, width, weights, summary, strict)
                    if match is not None:
                        setattr(module, child_name, match[1])
                        summary._count(match[0])
                    continue
            if mlp_kinds:
                experts = _experts_layout(child)
                if experts is not None:
                    gate_up, down = experts
                    n = gate_up.shape[0]
                    candidates = [(k + "(experts)", _ExpertsProbe(FusedGatedExperts(gate_up, down, k), n))
                                  for k in mlp_kinds]
                    match = _first_match(path, _ExpertsProbe(child, n), "experts", candidates, gate_up.shape[2],
                                         [gate_up, down], summary, strict)
                    if match is not None:
                        setattr(module, child_name, match[1].experts)
                        summary._count(match[0])
                    continue
            if rms_norm and _rms_norm_candidate(child):
                candidates = _rms_norm_replacements(child)
                if isinstance(candidates, str):
                    _skip(summary, strict, path, child, "rms_norm", candidates)
                    continue
                width = candidates[0][1].normalized_shape[0]
                weights = [w for w in [getattr(child, "weight", None)] if w is not None]
                match = _first_match(path, child, "rms_norm", candidates, width, weights, summary, strict)
                if match is not None:
                    setattr(module, child_name, match[1])
                    summary._count(match[0])
    if linear_cross_entropy and _is_causal_lm(model):
        _use_fused_loss(model, summary, strict)
    if attention:
        _use_fused_attention(model, summary, strict)
    model.my_mps_ops_patch_summary = summary
    logger.info("%s", summary)
    return model
