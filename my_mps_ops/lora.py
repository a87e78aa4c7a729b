"""Low-rank adapters (LoRA) over frozen linear layers, quantized or not: the
QLoRA recipe. ``add_lora(model)`` wraps every ``nn.Linear`` and
``my_mps_ops.nn.QuantizedLinear`` (but the output head) in a ``LoRALinear`` and
freezes everything else, so that only the adapters train:

    y = base(x) + (dropout(x) @ A.T @ B.T) * alpha / r

with A [r, in] initialised like ``nn.Linear``'s weight and B [out, r] zero, so
a fresh adapter leaves the model's outputs unchanged. The adapters are kept in
their own dtype (float32 by default) whatever the activations' dtype: x is
cast to it and the update back, as PEFT's LoRA layers do.

With PEFT installed, ``peft_lora_config(**LoraConfig_kwargs)`` returns a
``peft.LoraConfig`` that also knows how to put PEFT's own LoRA layers on
QuantizedLinear modules (see my_mps_ops/peft_lora.py), for ``get_peft_model``.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn import QuantizedLinear

LINEAR_TYPES: Tuple[Type[nn.Module], ...] = (nn.Linear, QuantizedLinear)


class LoRALinear(nn.Module):
    """``base(x)`` plus a rank-``r`` update; ``base`` (an ``nn.Linear`` or a
    ``QuantizedLinear``) is frozen."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not isinstance(base, LINEAR_TYPES):
            raise TypeError(f"LoRALinear wraps nn.Linear or my_mps_ops.nn.QuantizedLinear, got {type(base).__name__}")
        if r <= 0:
            raise ValueError(f"LoRALinear: the rank r must be positive, got {r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        device = next((t.device for t in base.state_dict().values()), None)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        update = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return out + (update * self.scaling).to(out.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             skip: Sequence[str] = ("lm_head",), dtype: torch.dtype = torch.float32) -> nn.Module:
    """Freezes every parameter of ``model`` and wraps, in place, each
    ``nn.Linear`` / ``QuantizedLinear`` whose qualified name contains none of
    ``skip`` in a LoRALinear. Returns the model; only the adapters train."""
    for p in model.parameters():
        p.requires_grad_(False)
    for parent_name, parent in list(model.named_modules()):
        if isinstance(parent, LoRALinear):
            continue
        for name, child in list(parent.named_children()):
            path = f"{parent_name}.{name}".lstrip(".")
            if isinstance(child, LINEAR_TYPES) and not any(s in path for s in skip):
                setattr(parent, name, LoRALinear(child, r, alpha, dropout, dtype))
    return model


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The adapters' parameters (what an optimizer of a LoRA model takes)."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            yield module.lora_A
            yield module.lora_B


def lora_state_dict(model: nn.Module) -> dict:
    """The adapters alone, by qualified name (a few MB to save after fine-tuning)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def peft_lora_config(**kwargs):
    """A ``peft.LoraConfig(**kwargs)`` under which ``get_peft_model`` puts PEFT's
    LoRA layers on my_mps_ops QuantizedLinear modules too. Needs ``peft``."""
    from .peft_lora import lora_config

    return lora_config(**kwargs)

