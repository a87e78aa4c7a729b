"""my_mps_ops.cross_entropy: values and gradients vs F.cross_entropy,
registrations, compile, memory, errors."""

import pytest
import torch
import torch.nn.functional as F

import my_mps_ops
from support import (COMPILE, GRADCHECK, OPCHECK, TOLERANCES, Sample, assert_compiled_matches_eager,
                     assert_double_backward_raises, feeding, float64_leaves)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ops = torch.ops.my_mps_ops


def make(n, v, dtype, device, ignore_some=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype).to(device)
    target = torch.randint(0, v, (n,), generator=g)
    if ignore_some and n > 2:
        target[1] = -100
    return logits, target.to(device)


# (rows, classes): one list for the value and gradient tests (every backend,
# dtype, reduction and label smoothing) and, where marked, gradcheck, opcheck
# and torch.compile (two sizes of one rank: one dynamic graph serves both).
SAMPLES = [
    Sample((6, 1)),
    Sample((6, 7)),
    Sample((5, 11), also=(GRADCHECK, OPCHECK)),
    Sample((5, 13), also=(COMPILE,)),
    Sample((9, 13), also=(COMPILE,)),
    Sample((6, 1000)),
    Sample((6, 5003)),
]


def sample_inputs(sample, dtype, device, requires_grad=False):
    """(logits, target); target[1] ignored (-100) where there are over 2 rows."""
    logits, target = make(*sample.case, dtype, device)
    return logits.requires_grad_(requires_grad), target


def tol(dtype):
    return {k: v * 4 for k, v in TOLERANCES[dtype].items()}


@pytest.mark.parametrize("sample", SAMPLES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_values_and_gradients(backend, dtype, reduction, smoothing, sample):
    logits, target = sample_inputs(sample, dtype, backend.device, requires_grad=True)
    loss = my_mps_ops.cross_entropy(logits, target, -100, smoothing, reduction)
    (ref_logits,) = float64_leaves(logits)
    ref = F.cross_entropy(ref_logits, target.cpu(), ignore_index=-100, label_smoothing=smoothing, reduction=reduction)
    assert loss.dtype == dtype and loss.shape == ref.shape
    torch.testing.assert_close(loss.cpu().double(), ref.cpu(), **tol(dtype))
    g = torch.randn_like(ref)
    loss.backward(g.to(device=loss.device, dtype=dtype))
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


@pytest.mark.parametrize("sample", SAMPLES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float64_label_smoothing_stays_float64(reduction, sample):
    # float64 logits use label_smoothing as given (the CPU kernels used to round
    # it to float32: errors of ~1e-9).
    logits, target = sample_inputs(sample, torch.float64, "cpu", requires_grad=True)
    loss = my_mps_ops.cross_entropy(logits, target, -100, 0.1, reduction)
    (ref_logits,) = float64_leaves(logits)
    ref = F.cross_entropy(ref_logits, target, label_smoothing=0.1, reduction=reduction)
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
    g = torch.rand_like(ref)
    loss.backward(g)
    ref.backward(g)
    torch.testing.assert_close(logits.grad, ref_logits.grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("sample", feeding(SAMPLES, GRADCHECK), ids=str)
def test_gradcheck_float64(sample):
    logits, target = sample_inputs(sample, torch.float64, "cpu", requires_grad=True)
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda z: my_mps_ops.cross_entropy(z, target, -100, 0.2, reduction), (logits,))


@pytest.mark.parametrize("sample", feeding(SAMPLES, OPCHECK), ids=str)
def test_opcheck(sample):
    lf, target = sample_inputs(sample, torch.float32, "cpu", requires_grad=True)
    for reduction in ("mean", "none"):
        torch.library.opcheck(ops.cross_entropy.default, (lf, target, -100, 0.1, reduction))
        loss, lse = ops.cross_entropy(lf.detach(), target, -100, 0.1, reduction)
        torch.library.opcheck(ops.cross_entropy_backward.default,
                              (torch.ones_like(loss), lf.detach(), target, lse, -100, 0.1, reduction))


def test_torch_compile_forward_backward():
    samples = [sample_inputs(s, torch.float32, "cpu", requires_grad=True) for s in feeding(SAMPLES, COMPILE)]
    assert_compiled_matches_eager(lambda z, t: my_mps_ops.cross_entropy(z, t, label_smoothing=0.1), samples)


def test_double_backward_raises_naming_the_op(backend):
    logits, target = make(5, 11, torch.float32, backend.device)
    assert_double_backward_raises(lambda z: my_mps_ops.cross_entropy(z, target, label_smoothing=0.1),
                                  (logits.requires_grad_(),), "my_mps_ops.cross_entropy")


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


def test_no_classes_raises_on_every_backend(backend):
    # The Metal path used to return NaN losses here where the CPU path raised.
    logits = torch.randn(3, 0, device=backend.device)
    target = torch.zeros(3, dtype=torch.long, device=backend.device)
    with pytest.raises(RuntimeError, match="logits must have at least one class"):
        my_mps_ops.cross_entropy(logits, target)


# Vocabulary masking: each row takes one pattern, in turn. A fully masked row
# of finfo.min (every logit equal) has loss log(V) in PyTorch, which a loss
# formed as lse - z_t loses (the float32 lse = m + log s rounds to m).
MASK_PATTERNS = ["none", "ignored", "some", "target", "leading_block", "all_ignored", "all"]


def masked_inputs(sample, dtype, device, fill, rows):
    """sample_inputs with masked logits, as models mask a vocabulary
    (masked_fill with -inf or finfo(dtype).min). rows: "finite" keeps the
    patterns whose loss is finite in PyTorch, "all" every one."""
    logits, target = make(*sample.case, torch.float64, "cpu", ignore_some=False)
    n, v = logits.shape
    value = float("-inf") if fill == "-inf" else torch.finfo(dtype).min
    patterns = [p for p in MASK_PATTERNS
                if rows == "all" or p != "target"
                if rows == "all" or not (p == "all" and fill == "-inf")]
    g = torch.Generator().manual_seed(1)
    for r in range(n):
        pattern = patterns[r % len(patterns)]
        mask = torch.rand(v, generator=g) < 0.6
        if pattern == "none":
            mask[:] = False
        elif pattern in ("ignored", "all_ignored"):
            target[r] = -100
        elif pattern == "some":
            mask[target[r]] = False
        elif pattern == "target":
            mask[target[r]] = True
        elif pattern == "leading_block":  # the CPU loop's first 512-class block masked
            mask[:] = torch.arange(v) < min(600, v - 1)
            target[r] = v - 1
        if pattern.startswith("all"):
            mask[:] = True
        logits[r, mask] = value
    return logits.to(dtype).to(device), target.to(device)


@pytest.mark.parametrize("sample", [s for s in SAMPLES if s.case in ((9, 13), (6, 1000), (6, 5003))], ids=str)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("fill", ["-inf", "finfo.min"])
@pytest.mark.parametrize("rows", ["finite", "all"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
def test_masked_logits_match_pytorch(backend, dtype, fill, rows, smoothing, sample):
    # Losses equal F.cross_entropy computed in our accumulation dtype (float32;
    # float64 for float64) and rounded to the logits' dtype, inf and NaN
    # included: with smoothing, a sum of
    # several finfo(float32).min log-probabilities overflows to inf in
    # PyTorch's float32 as in ours. Gradients equal float64 autograd wherever
    # that is finite (PyTorch's gradient of an ignored, fully -inf row is NaN;
    # ours is 0).
    if dtype == torch.float64 and backend.name != "cpu":
        pytest.skip("float64 runs on the native CPU kernels only")
    logits, target = masked_inputs(sample, dtype, backend.device, fill, rows)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for reduction in ("none", "mean", "sum"):
        leaf = logits.detach().clone().requires_grad_()
        loss = my_mps_ops.cross_entropy(leaf, target, -100, smoothing, reduction)
        expected = F.cross_entropy(logits.cpu().to(acc), target.cpu(), label_smoothing=smoothing, reduction=reduction)
        assert loss.dtype == dtype
        torch.testing.assert_close(loss.cpu().double(), expected.to(dtype).double(), equal_nan=True, **tol(dtype))
        (ref_logits,) = float64_leaves(logits)
        ref = F.cross_entropy(ref_logits, target.cpu(), label_smoothing=smoothing, reduction=reduction)
        g = torch.rand_like(ref) + 0.5
        loss.backward(g.to(device=loss.device, dtype=dtype))
        ref.backward(g)
        finite = ref_logits.grad.isfinite()
        torch.testing.assert_close(leaf.grad.cpu().double()[finite], ref_logits.grad[finite], **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("offset", [-1e4, 6e4, 2e5])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_large_logits_keep_their_precision(backend, dtype, offset, smoothing):
    # Logits far from 0 (every row shifted by `offset`): F.cross_entropy forms
    # z - m before anything else, so its loss and softmax keep float32
    # precision; a float32 lse = m + log s here carries an error of ulp(|m|)
    # (1e-3 at 1e4), which exp(z - lse) would pass on to every gradient.
    if dtype == torch.float64 and backend.name != "cpu":
        pytest.skip("float64 runs on the native CPU kernels only")
    if offset > torch.finfo(dtype).max / 2:
        pytest.skip("offset not representable in this dtype")
    g = torch.Generator().manual_seed(3)
    v = 777
    logits = (torch.randn(5, v, generator=g, dtype=torch.float64) * 3 + offset).to(dtype)
    logits[2] = offset  # one row of equal logits: softmax 1/V
    target = torch.randint(0, v, (5,), generator=g)
    leaf = logits.to(backend.device).requires_grad_()
    loss = my_mps_ops.cross_entropy(leaf, target.to(backend.device), -100, smoothing, "none")
    (ref_logits,) = float64_leaves(logits)
    ref = F.cross_entropy(ref_logits, target, label_smoothing=smoothing, reduction="none")
    torch.testing.assert_close(loss.cpu().double(), ref, **tol(dtype))
    w = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    loss.backward(w.to(device=backend.device, dtype=dtype))
    ref.backward(w)
    torch.testing.assert_close(leaf.grad.cpu().double(), ref_logits.grad, **tol(dtype))
