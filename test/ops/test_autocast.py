"""torch.autocast gives our ops the dtypes it gives the PyTorch ops they stand
in for: flash_attention runs in the lower precision (as
scaled_dot_product_attention), cross_entropy in float32 (as
cross_entropy_loss), layer_norm in float32 on MPS; the others run in the dtypes
they are given (registrations in csrc/ops/autocast.cpp)."""

import pytest
import torch
import torch.nn.functional as F

import my_mps_ops

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_flash_attention_runs_in_the_autocast_dtype_like_sdpa(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 32, generator=g, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=dtype):
        ours = my_mps_ops.ops.flash_attention(q, k, v, causal=True)
        theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert ours.dtype == theirs.dtype == dtype
    # the reference: sdpa in float64 on the inputs rounded to the autocast dtype
    ref = F.scaled_dot_product_attention(*(t.detach().to(dtype).double() for t in (q, k, v)), is_causal=True)
    torch.testing.assert_close(ours.double(), ref, atol=2e-2, rtol=2e-2)
    ours.float().sum().backward()
    assert q.grad.dtype == torch.float32  # gradients come back in the parameters' dtype


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_runs_in_float32_under_autocast_like_f_cross_entropy(dtype, reduction):
    g = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(6, 50, generator=g)).to(dtype).requires_grad_()
    target = torch.randint(0, 50, (6,), generator=g)
    with torch.autocast("cpu", dtype=dtype):
        ours = my_mps_ops.ops.cross_entropy(logits, target, reduction=reduction)
        theirs = F.cross_entropy(logits, target, reduction=reduction)
    assert ours.dtype == theirs.dtype == torch.float32
    ref = F.cross_entropy(logits.detach().double(), target, reduction=reduction)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)
    ours.sum().backward()
    assert logits.grad.dtype == dtype


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_linear_cross_entropy_under_autocast_like_linear_then_cross_entropy(dtype):
    # linear runs in the lower precision, cross_entropy_loss in float32: the
    # composite's loss is float32 and its gradients come back in float32.
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 32, generator=g, requires_grad=True)
    weight = (0.2 * torch.randn(50, 32, generator=g)).requires_grad_()
    target = torch.randint(0, 50, (6,), generator=g)
    with torch.autocast("cpu", dtype=dtype):
        ours = my_mps_ops.linear_cross_entropy(hidden, weight, target)
        theirs = F.cross_entropy(F.linear(hidden, weight), target)
    assert ours.dtype == theirs.dtype == torch.float32
    ref = F.cross_entropy((hidden.detach().to(dtype) @ weight.detach().to(dtype).T).double(), target)
    torch.testing.assert_close(ours.double(), ref, atol=2e-2, rtol=2e-2)
    ours.backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32


def test_other_ops_keep_their_dtypes_under_cpu_autocast():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 64, generator=g).bfloat16()
    w = torch.randn(64, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert my_mps_ops.ops.layer_norm(x, None, None, 1e-5).dtype == F.layer_norm(x, (64,)).dtype == torch.bfloat16
        assert my_mps_ops.ops.rms_norm(x.float(), w, 1e-6).dtype == F.rms_norm(x.float(), (64,), w).dtype
        assert my_mps_ops.ops.swiglu(x, x).dtype == torch.bfloat16


@pytest.mark.parametrize("op,keys", [("flash_attention", ["AutocastCPU", "AutocastMPS"]),
                                     ("cross_entropy", ["AutocastCPU", "AutocastMPS"]),
                                     ("linear_cross_entropy", ["AutocastCPU", "AutocastMPS"]),
                                     ("layer_norm", ["AutocastMPS"])])
def test_autocast_kernels_are_registered(op, keys):
    for key in ("AutocastCPU", "AutocastMPS"):
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"my_mps_ops::{op}", key)
        assert has == (key in keys), (op, key)


@pytest.mark.skipif(not torch.backends.mps.is_available(), reason="needs an Apple GPU (MPS)")
def test_mps_autocast_dtypes():
    x = torch.randn(2, 4, 9, 64, device="mps")
    with torch.autocast("mps", dtype=torch.float16):
        assert my_mps_ops.ops.flash_attention(x, x, x).dtype == torch.float16
        assert my_mps_ops.ops.layer_norm(x.half(), None, None, 1e-5).dtype == torch.float32
        assert my_mps_ops.ops.cross_entropy(x.reshape(-1, 64).half(), torch.zeros(72, dtype=torch.long,
                                                                                  device="mps")).dtype == torch.float32
