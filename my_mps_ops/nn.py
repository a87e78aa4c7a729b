"""Drop-in modules built on my_mps_ops operators."""

import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import ops


def default_rms_norm_eps(dtype: torch.dtype) -> float:
    """The eps torch.nn.RMSNorm / F.rms_norm use when given None: the machine
    epsilon of the dtype they compute in, float32 for float16 and bfloat16
    inputs (not the input dtype's, as their docstring says: float16's is
    8192 times larger)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


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
        if len(self.normalized_shape) != 1:
            return torch.nn.functional.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return ops.rms_norm(x, self.weight, self.eps if self.eps is not None else default_rms_norm_eps(x.dtype))

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


class CrossEntropyLoss(torch.nn.Module):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` on [N, V] logits with class
    indices: ignore_index, label_smoothing and reduction run fused
    (my_mps_ops.cross_entropy). Class weights, probability targets and other
    shapes fall back to ``torch.nn.functional.cross_entropy``."""

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, ignore_index: int = -100, reduce=None,
                 reduction: str = "mean", label_smoothing: float = 0.0) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        fused = (self.weight is None and input.dim() == 2 and target.dim() == 1 and target.dtype == torch.long
                 and input.dtype in (torch.float32, torch.float16, torch.bfloat16))
        if not fused:
            return torch.nn.functional.cross_entropy(input, target, self.weight, ignore_index=self.ignore_index,
                                                     reduction=self.reduction, label_smoothing=self.label_smoothing)
        return ops.cross_entropy(input, target, self.ignore_index, self.label_smoothing, self.reduction)


class LinearCrossEntropy(torch.nn.Module):
    """The loss of a language-model head without its logits:
    ``loss = module(hidden, weight, target, bias=None)`` equals
    ``F.cross_entropy(hidden @ weight.T + bias, target, ...)`` (with optional
    Gemma-2 logit softcap and z-loss; see my_mps_ops.linear_cross_entropy).
    hidden may have any leading shape ([..., H]; target [...])."""

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                 logit_softcap: Optional[float] = None, z_loss: float = 0.0) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.reduction = reduction
        self.logit_softcap = logit_softcap
        self.z_loss = z_loss

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        loss = ops.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1), bias,
                                        self.ignore_index, self.label_smoothing, self.reduction,
                                        self.logit_softcap, self.z_loss)
        return loss.reshape(target.shape) if self.reduction == "none" else loss

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"reduction={self.reduction!r}, logit_softcap={self.logit_softcap}, z_loss={self.z_loss}")


class QuantizedLinear(torch.nn.Module):
    """``nn.Linear`` with a frozen quantized weight (my_mps_ops.quantize formats):
    ``y = x @ W.T + bias`` through my_mps_ops.quantized_linear. The codes,
    scales (and affine biases) are buffers, so ``state_dict`` saves and loads
    them; ``bias`` stays a Parameter, frozen like the weight (set
    ``requires_grad`` to train it). Build one with ``from_linear``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4, group_size: int = 64,
                 mode: str = "affine", dtype: Optional[torch.dtype] = None, device=None) -> None:
        super().__init__()
        from .quantization import quantize

        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.mode = bits, group_size, mode
        q, scales, biases = quantize(torch.zeros(out_features, in_features, dtype=dtype or torch.float32,
                                                 device=device), bits, group_size, mode)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales)
        self.register_buffer("biases", biases)
        self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                       requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, bits: int = 4, group_size: int = 64,
                    mode: str = "affine") -> "QuantizedLinear":
        from .quantization import quantize

        w = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size, mode,
                     dtype=w.dtype, device=w.device)
        module.qweight, module.scales, module.biases = quantize(w, bits, group_size, mode)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def forward(self, x: Tensor) -> Tensor:
        return ops.quantized_linear(x, self.qweight, self.scales, self.biases, self.bias, self.bits, self.group_size,
                                    self.mode)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}, mode={self.mode!r}")


def quantize_model(model: torch.nn.Module, bits: int = 4, group_size: int = 64, mode: str = "affine",
                   skip: Sequence[str] = ("lm_head",)) -> torch.nn.Module:
    """Replaces, in place, every ``nn.Linear`` whose input size is a multiple of
    ``group_size`` by a QuantizedLinear (frozen quantized weight), except
    modules whose qualified name contains one of ``skip`` (the output head by
    default; embeddings are not Linear and stay as they are). Returns the model."""
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            path = f"{parent_name}.{name}".lstrip(".")
            if type(child) is torch.nn.Linear and child.in_features % group_size == 0 \
                    and not any(s in path for s in skip):
                setattr(parent, name, QuantizedLinear.from_linear(child, bits, group_size, mode))
    return model


class RotaryEmbedding(torch.nn.Module):
    """Rotary position embedding for q and k of shape (batch, seq, heads, head_dim)
    (or (batch, heads, seq, head_dim) with ``seq_dim=2``): cos/sin tables as
    non-persistent buffers, applied to q and k in one launch
    (my_mps_ops.rotary_embedding_qk). ``rotary_dim`` < head_dim rotates only the
    first rotary_dim elements (partial rotary). Positions ``offset`` to
    ``offset + seq - 1`` past ``max_seq_len`` grow the tables (in eager mode;
    under torch.compile they raise: build the module with a larger
    ``max_seq_len``)."""

    def __init__(self, rotary_dim: int, max_seq_len: int = 4096, base: float = 10000.0, interleaved: bool = False,
                 seq_dim: int = 1, device=None) -> None:
        super().__init__()
        if rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
        self.rotary_dim, self.base, self.interleaved, self.seq_dim = rotary_dim, base, interleaved, seq_dim
        cos, sin = self._tables(0, max_seq_len, device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.cos.shape[0]

    def _tables(self, begin: int, end: int, device):
        """cos and sin of positions [begin, end), float32: a position's row does
        not depend on the table's length."""
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.rotary_dim, 2, device=device, dtype=torch.float32)
                                        / self.rotary_dim))
        angles = torch.outer(torch.arange(begin, end, device=device, dtype=torch.float32), inv_freq)
        return angles.cos(), angles.sin()

    def forward(self, q: Tensor, k: Tensor, offset: int = 0):
        seq = q.shape[self.seq_dim]
        if offset < 0:
            raise ValueError(f"RotaryEmbedding: offset must be >= 0, got {offset}")
        end = offset + seq
        if end > self.max_seq_len:
            if torch.compiler.is_compiling():
                raise ValueError(f"RotaryEmbedding: positions up to offset + seq = {end} exceed max_seq_len = "
                                 f"{self.max_seq_len}, and the tables cannot grow under torch.compile; build the "
                                 f"module with max_seq_len >= {end}")
            # Grow to at least twice the length (amortised), keeping the rows there are.
            cos, sin = self._tables(self.max_seq_len, max(end, 2 * self.max_seq_len), self.cos.device)
            self.cos = torch.cat([self.cos, cos.to(self.cos.dtype)])
            self.sin = torch.cat([self.sin, sin.to(self.sin.dtype)])
        cos, sin = self.cos[offset:end], self.sin[offset:end]
        return ops.rotary_embedding_qk(q, k, cos, sin, self.interleaved, self.seq_dim)
