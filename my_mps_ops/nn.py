"""Drop-in modules built on my_mps_ops operators."""

import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import ops


class RMSNorm(torch.nn.Module):
    """Drop-in for ``torch.nn.RMSNorm``: same arguments, same state_dict keys.

    The fused kernel normalises over the last dimension; a multi-dimensional
    ``normalized_shape`` falls back to ``torch.nn.functional.rms_norm``.
    """

    __constants__ = ["normalized_shape", "eps", "elementwise_affine"]

    def __init__(self, normalized_shape: Union[int, Sequence[int]], eps: Optional[float] = None,
                 elementwise_affine: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = torch.nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            torch.nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        # torch.nn.RMSNorm's default eps is the input dtype's machine epsilon.
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        if len(self.normalized_shape) != 1:
            return torch.nn.functional.rms_norm(x, self.normalized_shape, self.weight, eps)
        return ops.rms_norm(x, self.weight, eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class SwiGLU(torch.nn.Module):
    """The Llama MLP, ``w_down(silu(w_gate(x)) * w_up(x))``, with the gated
    activation fused (my_mps_ops.swiglu). Parameters: w_gate, w_up, w_down."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.w_gate = torch.nn.Linear(dim, hidden_dim, bias=bias, device=device, dtype=dtype)
        self.w_up = torch.nn.Linear(dim, hidden_dim, bias=bias, device=device, dtype=dtype)
        self.w_down = torch.nn.Linear(hidden_dim, dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(ops.swiglu(self.w_gate(x), self.w_up(x)))


class LayerNorm(torch.nn.Module):
    """Drop-in for ``torch.nn.LayerNorm``: same arguments, same state_dict keys.

    The fused kernel normalises over the last dimension; a multi-dimensional
    ``normalized_shape`` falls back to ``torch.nn.functional.layer_norm``.
    """

    def __init__(self, normalized_shape: Union[int, Sequence[int]], eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = torch.nn.Parameter(torch.ones(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        if elementwise_affine and bias:
            self.bias = torch.nn.Parameter(torch.zeros(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        if len(self.normalized_shape) != 1:
            return torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
