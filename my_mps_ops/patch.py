"""patch_model: swap my_mps_ops kernels into an existing Llama-style model."""

from __future__ import annotations

import torch
from torch import nn

from . import nn as my_nn
from . import ops


def _rms_norm_eps(module: nn.Module):
    for attr in ("eps", "variance_epsilon"):
        if hasattr(module, attr):
            return getattr(module, attr)
    return None


def _is_rms_norm(module: nn.Module) -> bool:
    if isinstance(module, my_nn.RMSNorm):
        return False
    if isinstance(module, nn.RMSNorm):
        return len(module.normalized_shape) == 1
    # Hugging Face transformers' LlamaRMSNorm and its many copies: a 1-D
    # weight and an epsilon, normalising over the last dimension.
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and _rms_norm_eps(module) is not None)


# Gated MLPs with a SiLU gate: (gate, up, down) Linear attribute names.
_GATED_MLP_NAMES = (("gate_proj", "up_proj", "down_proj"),  # Hugging Face Llama, Mistral, Qwen2, ...
                    ("w_gate", "w_up", "w_down"))           # my_mps_ops.models.TinyLlama's plain twin


class FusedSwiGLUMLP(nn.Module):
    """``down(swiglu(gate(x), up(x)))`` over the original Linear modules, kept
    under their original names (same state_dict keys)."""

    def __init__(self, names, gate: nn.Linear, up: nn.Linear, down: nn.Linear):
        super().__init__()
        self._names = names
        for name, linear in zip(names, (gate, up, down)):
            setattr(self, name, linear)

    def forward(self, x):
        gate, up, down = (getattr(self, n) for n in self._names)
        return down(ops.swiglu(gate(x), up(x)))


class FusedGateUpSwiGLUMLP(nn.Module):
    """``down(swiglu(*gate_up(x).chunk(2, -1)))`` for MLPs with one fused
    gate/up projection (transformers' Phi3MLP); swiglu reads the two halves in
    place. The Linear modules keep their names (same state_dict keys)."""

    def __init__(self, gate_up_proj: nn.Linear, down_proj: nn.Linear):
        super().__init__()
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(ops.swiglu(gate, up))


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLU", "SiLUActivation")


def _fused_gate_up_mlp(module: nn.Module):
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if isinstance(module, FusedGateUpSwiGLUMLP) or not (isinstance(gate_up, nn.Linear) and isinstance(down, nn.Linear)):
        return None
    if gate_up.out_features != 2 * down.in_features or not _is_silu(getattr(module, "activation_fn", None)):
        return None
    return gate_up, down


def _silu_gated_mlp(module: nn.Module):
    if isinstance(module, (FusedSwiGLUMLP, my_nn.SwiGLU)):
        return None
    for names in _GATED_MLP_NAMES:
        linears = [getattr(module, n, None) for n in names]
        if not all(isinstance(l, nn.Linear) for l in linears):
            continue
        act = getattr(module, "act_fn", None)
        if names[0] == "gate_proj" and not _is_silu(act):
            return None  # another activation (e.g. GELU): leave it
        if names[0] == "w_gate" and type(module).__name__ != "SwiGLU":
            return None
        return names, linears
    return None


def _replacement_rms_norm(norm: nn.Module) -> my_nn.RMSNorm:
    weight = getattr(norm, "weight", None)
    replacement = my_nn.RMSNorm(weight.shape[0] if weight is not None else norm.normalized_shape,
                                eps=_rms_norm_eps(norm), elementwise_affine=weight is not None,
                                device=weight.device if weight is not None else None,
                                dtype=weight.dtype if weight is not None else None)
    if weight is not None:
        replacement.weight = weight  # the same Parameter: optimizers keep working
    return replacement


def patch_model(model: nn.Module, *, rms_norm: bool = True, swiglu: bool = True) -> nn.Module:
    """Swaps my_mps_ops kernels into a Llama-style model, in place, keeping every
    Parameter (optimizers keep working) and state_dict key. Each switch turns
    one kind of replacement on or off; modules of a kind switched off are left
    untouched:

    - ``rms_norm``: RMSNorm modules (torch.nn.RMSNorm, transformers'
      LlamaRMSNorm and copies) become my_mps_ops.nn.RMSNorm;
    - ``swiglu``: SiLU-gated MLPs (transformers' LlamaMLP-style
      gate_proj/up_proj/down_proj with act_fn SiLU, or Phi3MLP-style
      gate_up_proj/down_proj with activation_fn SiLU) run their gate through
      the fused my_mps_ops.swiglu.

    Returns the model."""
    if not isinstance(model, nn.Module):
        raise TypeError("patch_model expects a torch.nn.Module (the model to patch in place), "
                        f"got {type(model).__name__}")
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if swiglu:
                mlp = _silu_gated_mlp(child)
                if mlp is not None:
                    names, (gate, up, down) = mlp
                    setattr(module, child_name, FusedSwiGLUMLP(names, gate, up, down))
                    continue
                fused = _fused_gate_up_mlp(child)
                if fused is not None:
                    setattr(module, child_name, FusedGateUpSwiGLUMLP(*fused))
                    continue
            if rms_norm and _is_rms_norm(child):
                setattr(module, child_name, _replacement_rms_norm(child))
    return model

