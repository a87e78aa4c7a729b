"""torch.func over the ops: vmap runs through PyTorch's per-sample fallback
(correct, with PyTorch's performance warning); grad and vjp are refused by
PyTorch for C++ autograd Functions with a clear error, as the README says."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vjp, vmap

import my_mps_ops

G = torch.Generator().manual_seed(0)
W = torch.randn(16, generator=G)
CASES = {
    "rms_norm": (lambda x: my_mps_ops.ops.rms_norm(x, W, 1e-6), lambda x: F.rms_norm(x, (16,), W, 1e-6)),
    "layer_norm": (lambda x: my_mps_ops.ops.layer_norm(x, W, W, 1e-5), lambda x: F.layer_norm(x, (16,), W, W, 1e-5)),
    "swiglu": (lambda x: my_mps_ops.ops.swiglu(x, x.flip(-1)), lambda x: F.silu(x) * x.flip(-1)),
    "geglu": (lambda x: my_mps_ops.ops.geglu(x, x.flip(-1), "tanh"),
              lambda x: F.gelu(x, approximate="tanh") * x.flip(-1)),
    "cross_entropy": (lambda x: my_mps_ops.ops.cross_entropy(x, torch.arange(x.shape[0]) % 16),
                      lambda x: F.cross_entropy(x, torch.arange(x.shape[0]) % 16)),
    "flash_attention": (lambda x: my_mps_ops.ops.flash_attention(*(x.reshape(1, 1, -1, 16).repeat(1, 1, 1, 2),) * 3),
                        lambda x: F.scaled_dot_product_attention(*(x.reshape(1, 1, -1, 16).repeat(1, 1, 1, 2),) * 3)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_vmap_matches_the_pytorch_composite(name):
    ours, theirs = CASES[name]
    xs = torch.randn(3, 4, 16, generator=G)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's "no batching rule" performance warning
        torch.testing.assert_close(vmap(ours)(xs), vmap(theirs)(xs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_grad_and_vjp_raise_a_clear_error(name):
    ours, _ = CASES[name]
    x = torch.randn(4, 16, generator=G)
    with pytest.raises(RuntimeError, match="C\\+\\+ torch::autograd::Function with functorch transforms"):
        grad(lambda t: ours(t).sum())(x)
    with pytest.raises(RuntimeError, match="C\\+\\+ torch::autograd::Function with functorch transforms"):
        vjp(ours, x)
