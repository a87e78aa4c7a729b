"""my_mps_ops.cross_entropy: values and gradients vs F.cross_entropy,
registrations, compile, memory, errors."""

import pytest
import torch
import torch.nn.functional as F

import my_mps_ops
from support import TOLERANCES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ops = torch.ops.my_mps_ops


def make(n, v, dtype, device, ignore_some=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype).to(device)
    target = torch.randint(0, v, (n,), generator=g)
    if ignore_some and n > 2:
        target[1] = -100
    return logits, target.to(device)


def tol(dtype):
    return {k: v * 4 for k, v in TOLERANCES[dtype].items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("v", [1, 7, 1000, 5003])
def test_values_and_gradients(backend, dtype, reduction, smoothing, v):
    logits, target = make(6, v, dtype, backend.device)
    logits.requires_grad_()
    loss = my_mps_ops.cross_entropy(logits, target, -100, smoothing, reduction)
    ref_logits = logits.detach().double().requires_grad_()
    ref = F.cross_entropy(ref_logits, target, ignore_index=-100, label_smoothing=smoothing, reduction=reduction)
    assert loss.dtype == dtype and loss.shape == ref.shape
    torch.testing.assert_close(loss.cpu().double(), ref.cpu(), **tol(dtype))
    g = torch.randn_like(ref)
    loss.backward(g.to(dtype))
    ref.backward(g)
    torch.testing.assert_close(logits.grad.cpu().double(), ref_logits.grad.cpu(), **tol(dtype))


def test_all_ignored_and_zero_rows(backend):
    logits = torch.randn(3, 5, device=backend.device, requires_grad=True)
    target = torch.full((3,), -100, device=backend.device)
    loss = my_mps_ops.cross_entropy(logits, target)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(logits.detach(), target))
    assert my_mps_ops.cross_entropy(logits, target, reduction="sum").item() == 0.0
    my_mps_ops.cross_entropy(logits, target, reduction="sum").backward()
    assert torch.equal(logits.grad.cpu(), torch.zeros(3, 5))
    empty = torch.randn(0, 5, device=backend.device)
    assert my_mps_ops.cross_entropy(empty, torch.zeros(0, dtype=torch.long, device=backend.device),
                                    reduction="none").shape == (0,)


def test_noncontiguous_logits(backend):
    base = torch.randn(40, 9, device=backend.device)
    logits = base.t()  # [9, 40], stride (1, 9)
    target = torch.randint(0, 40, (9,), device=backend.device)
    torch.testing.assert_close(my_mps_ops.cross_entropy(logits, target), F.cross_entropy(logits, target),
                               atol=1e-5, rtol=1e-5)


def test_large_vocabulary_bfloat16():
    logits, target = make(4, 262_144, torch.bfloat16, "cpu")
    loss = my_mps_ops.cross_entropy(logits, target)
    torch.testing.assert_close(loss.double(), F.cross_entropy(logits.double(), target), atol=2e-2, rtol=1e-2)


def test_large_gradient_streamed_cpu():
    # A float32 gradient of 16 MiB or more per thread takes the streaming-store
    # path; V = 40_003 makes every row start at a different alignment.
    logits, target = make(240, 40_003, torch.float32, "cpu")
    logits.requires_grad_()
    my_mps_ops.cross_entropy(logits, target, label_smoothing=0.1).backward()
    z64 = logits.detach().double().requires_grad_()
    F.cross_entropy(z64, target, label_smoothing=0.1).backward()
    torch.testing.assert_close(logits.grad.double(), z64.grad, atol=1e-9, rtol=1e-4)


def test_gradcheck_opcheck_compile():
    logits, target = make(5, 11, torch.float64, "cpu")
    logits.requires_grad_()
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda z: my_mps_ops.cross_entropy(z, target, -100, 0.2, reduction), (logits,))
    lf = logits.detach().float().requires_grad_()
    for reduction in ("mean", "none"):
        torch.library.opcheck(ops.cross_entropy.default, (lf, target, -100, 0.1, reduction))
        loss, lse = ops.cross_entropy(lf.detach(), target, -100, 0.1, reduction)
        torch.library.opcheck(ops.cross_entropy_backward.default,
                              (torch.ones_like(loss), lf.detach(), target, lse, -100, 0.1, reduction))
    torch._dynamo.reset()
    fn = torch.compile(lambda z, t: my_mps_ops.cross_entropy(z, t, label_smoothing=0.1), fullgraph=True,
                       dynamic=True)
    for n in (5, 9):
        z, t = make(n, 13, torch.float32, "cpu", seed=n)
        z.requires_grad_()
        eager = my_mps_ops.cross_entropy(z, t, label_smoothing=0.1)
        (ge,) = torch.autograd.grad(eager, z)
        comp = fn(z, t)
        (gc,) = torch.autograd.grad(comp, z)
        torch.testing.assert_close(comp, eager)
        torch.testing.assert_close(gc, ge)


def test_module_drop_in():
    logits, target = make(6, 20, torch.float32, "cpu", ignore_some=False)
    target[2] = 3
    for kwargs in ({}, {"reduction": "sum", "label_smoothing": 0.2}, {"ignore_index": 3}):
        ours = my_mps_ops.nn.CrossEntropyLoss(**kwargs)(logits, target)
        theirs = torch.nn.CrossEntropyLoss(**kwargs)(logits, target)
        torch.testing.assert_close(ours, theirs)
    w = torch.rand(20)  # class weights: falls back to F.cross_entropy
    torch.testing.assert_close(my_mps_ops.nn.CrossEntropyLoss(weight=w)(logits, target),
                               torch.nn.CrossEntropyLoss(weight=w)(logits, target))


def test_bad_inputs():
    logits = torch.randn(4, 10)
    with pytest.raises(RuntimeError, match=r"target\[2\] = 10 is out of range for 10 classes"):
        my_mps_ops.cross_entropy(logits, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(RuntimeError, match="target must be int64"):
        my_mps_ops.cross_entropy(logits, torch.tensor([0, 1, 2, 3], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"target must have shape \[N\]"):
        my_mps_ops.cross_entropy(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match=r"logits must have shape \[N, V\]"):
        my_mps_ops.cross_entropy(torch.randn(2, 3, 4), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="reduction must be"):
        my_mps_ops.cross_entropy(logits, torch.tensor([0, 1, 2, 3]), reduction="avg")
    with pytest.raises(RuntimeError, match="label_smoothing must be in"):
        my_mps_ops.cross_entropy(logits, torch.tensor([0, 1, 2, 3]), label_smoothing=1.5)


def test_out_of_range_target_on_the_metal_path_gives_nan():
    from my_mps_ops.testing import metal_emulation

    with metal_emulation():
        loss = my_mps_ops.cross_entropy(torch.randn(3, 5), torch.tensor([0, 7, 1]), reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
