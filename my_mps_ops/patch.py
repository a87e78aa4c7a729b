"""patch_model: swap my_mps_ops kernels into an existing Llama-style model."""

from __future__ import annotations

import torch
from torch import nn

from . import nn as my_nn


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


def patch_model(model: nn.Module) -> nn.Module:
    """Replaces RMSNorm modules (torch.nn.RMSNorm, transformers' LlamaRMSNorm)
    with my_mps_ops.nn.RMSNorm sharing the same weight Parameter. In place;
    returns the model."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not _is_rms_norm(child):
                continue
            weight = getattr(child, "weight", None)
            replacement = my_nn.RMSNorm(weight.shape[0] if weight is not None else child.normalized_shape,
                                        eps=_rms_norm_eps(child), elementwise_affine=weight is not None,
                                        device=weight.device if weight is not None else None,
                                        dtype=weight.dtype if weight is not None else None)
            if weight is not None:
                replacement.weight = weight  # the same Parameter: optimizers keep working
            setattr(module, child_name, replacement)
    return model
