"""my_mps_ops.linear_cross_entropy: loss and the three gradients vs a float64
composite (matmul, softcap, F.cross_entropy, z-loss), registrations, compile,
memory, errors."""

import pytest
import torch
import torch.nn.functional as F

import my_mps_ops
from support import (COMPILE, GRADCHECK, OPCHECK, TOLERANCES, Sample, assert_compiled_matches_eager, feeding)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ops = torch.ops.my_mps_ops

# (rows N, hidden H, vocabulary V, options): one list for the value and
# gradient tests (every backend and dtype) and, where marked, gradcheck,
# opcheck and torch.compile. V is never a multiple of a tile; options cover
# bias, softcap, z-loss, smoothing, every reduction and ignored rows.
SAMPLES = [
    Sample((1, 8, 5, "mean"), also=(GRADCHECK,)),
    Sample((6, 16, 37, "sum-bias-ignore"), also=(GRADCHECK, OPCHECK)),
    Sample((5, 6, 13, "mean-bias-smooth-softcap-zloss-ignore"), also=(GRADCHECK,)),
    Sample((9, 24, 301, "mean-softcap-zloss"), also=(COMPILE,)),
    Sample((13, 24, 301, "mean-softcap-zloss"), also=(COMPILE,)),
    Sample((7, 32, 1001, "none-smooth-ignore"), also=(OPCHECK,)),
    Sample((33, 40, 2053, "mean-bias-smooth-softcap-zloss-ignore")),
    Sample((5, 16, 64, "sum-all_ignored")),
]


def options(flags):
    reduction = flags.split("-")[0]
    return dict(reduction=reduction, label_smoothing=0.1 if "smooth" in flags else 0.0,
                logit_softcap=4.0 if "softcap" in flags else None, z_loss=1e-2 if "zloss" in flags else 0.0)


def sample_inputs(sample, dtype, device, requires_grad=False):
    """(hidden, weight, target, bias or None, options)."""
    n, h, v, flags = sample.case
    g = torch.Generator().manual_seed(n * 1000 + v)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (2.0 / h ** 0.5)
    bias = torch.randn(v, generator=g) if "bias" in flags else None
    target = torch.randint(0, v, (n,), generator=g)
    if "ignore" in flags and n > 2:
        target[1] = target[n - 1] = -100
    if "all_ignored" in flags:
        target[:] = -100
    leaves = [t.to(dtype=dtype, device=device).requires_grad_(requires_grad) if t is not None else None
              for t in (hidden, weight, bias)]
    return leaves[0], leaves[1], target.to(device), leaves[2], options(flags)


def reference(hidden, weight, target, bias, reduction, label_smoothing, logit_softcap, z_loss):
    """The composite the op stands for, on whatever dtype it is given."""
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    rows = F.cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing)
    counted = target != -100
    rows = rows + z_loss * logits.logsumexp(-1).square() * counted
    if reduction == "none":
        return rows
    return rows.sum() / counted.sum() if reduction == "mean" else rows.sum()


def ours(hidden, weight, target, bias, o):
    return my_mps_ops.linear_cross_entropy(hidden, weight, target, bias, -100, o["label_smoothing"], o["reduction"],
                                           o["logit_softcap"], o["z_loss"])


def tol(dtype):
    # float16 / bfloat16: the logits are a matmul of rounded inputs rounded to
    # the dtype (as hidden @ weight.T is), then reduced over V classes.
    scale = 4 if dtype in (torch.float32, torch.float64) else 8
    return {k: v * scale for k, v in TOLERANCES[dtype].items()}


@pytest.mark.parametrize("sample", SAMPLES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_and_gradients(backend, dtype, sample):
    hidden, weight, target, bias, o = sample_inputs(sample, dtype, backend.device, requires_grad=True)
    loss = ours(hidden, weight, target, bias, o)
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    refs = [t.detach().cpu().double().requires_grad_() for t in leaves]
    ref_bias = refs[2] if bias is not None else None
    ref = reference(refs[0], refs[1], target.cpu(), ref_bias, **o)
    # the loss of float32 logits, as transformers' ForCausalLMLoss computes it
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.shape == ref.shape
    torch.testing.assert_close(loss.cpu().double(), ref, equal_nan=True, **tol(dtype))
    g = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    loss.backward(g.to(device=loss.device, dtype=dtype))
    ref.backward(g)
    for leaf, r in zip(leaves, refs):
        assert leaf.grad.dtype == dtype
        torch.testing.assert_close(leaf.grad.cpu().double(), r.grad, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float64])
@pytest.mark.parametrize("sample", SAMPLES[:4], ids=str)
def test_float64_keeps_float64_cpu(dtype, sample):
    hidden, weight, target, bias, o = sample_inputs(sample, dtype, "cpu", requires_grad=True)
    loss = ours(hidden, weight, target, bias, o)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, reference(hidden, weight, target, bias, **o), **TOLERANCES[torch.float64])


@pytest.mark.parametrize("sample", feeding(SAMPLES, GRADCHECK), ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(sample, reduction):
    # "mean" takes the gradient in the forward pass, "none" recomputes it.
    hidden, weight, target, bias, o = sample_inputs(sample, torch.float64, "cpu", requires_grad=True)
    o = dict(o, reduction=reduction)
    leaves = tuple(t for t in (hidden, weight, bias) if t is not None)
    fn = (lambda h, w, b=None: ours(h, w, target, b, o))
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("sample", feeding(SAMPLES, OPCHECK), ids=str)
def test_opcheck(sample):
    hidden, weight, target, bias, o = sample_inputs(sample, torch.float32, "cpu", requires_grad=True)
    args = (hidden, weight, target, bias, -100, o["label_smoothing"], o["reduction"], o["logit_softcap"], o["z_loss"])
    torch.library.opcheck(ops.linear_cross_entropy.default, args)
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    grad_loss = torch.ones(()) if o["reduction"] != "none" else torch.rand(hidden.shape[0])
    torch.library.opcheck(ops.linear_cross_entropy_backward.default, (grad_loss,) + detached + ([True, True, True],))
    if o["reduction"] != "none":
        torch.library.opcheck(ops.linear_cross_entropy_with_grad.default, detached + ([True, True, True],))


def test_torch_compile_forward_backward():
    def loss_fn(hidden, weight, target):
        return my_mps_ops.linear_cross_entropy(hidden, weight, target, None, -100, 0.0, "mean", 4.0, 1e-2)

    samples = [sample_inputs(s, torch.float32, "cpu", requires_grad=True)[:3] for s in feeding(SAMPLES, COMPILE)]
    assert_compiled_matches_eager(loss_fn, samples, grad_tol=dict(atol=1e-5, rtol=1e-4))


def test_nn_module_takes_any_leading_shape(backend):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 16, generator=g, device="cpu").to(backend.device).requires_grad_()
    weight = torch.randn(50, 16, generator=g).to(backend.device).requires_grad_()
    target = torch.randint(0, 50, (2, 5), generator=g).to(backend.device)
    module = my_mps_ops.nn.LinearCrossEntropy(reduction="none")
    loss = module(hidden, weight, target)
    expected = F.cross_entropy((hidden @ weight.T).flatten(0, 1), target.flatten(), reduction="none")
    assert loss.shape == (2, 5)
    torch.testing.assert_close(loss.flatten(), expected, atol=1e-5, rtol=1e-5)


def test_double_backward_raises_naming_the_op():
    hidden, weight, target, bias, o = sample_inputs(SAMPLES[1], torch.float64, "cpu", requires_grad=True)
    leaves = (hidden, weight, bias)
    plain = torch.autograd.grad(ours(*leaves[:2], target, bias, o).square(), leaves)
    grads = torch.autograd.grad(ours(*leaves[:2], target, bias, o).square(), leaves, create_graph=True)
    for got, expected in zip(grads, plain):
        torch.testing.assert_close(got, expected)
        assert got.requires_grad
    with pytest.raises(RuntimeError, match="my_mps_ops.linear_cross_entropy: double backward is not supported"):
        torch.autograd.grad(grads[0].sum(), leaves, allow_unused=True)


def test_only_the_gradients_asked_for():
    hidden, weight, target, bias, o = sample_inputs(SAMPLES[1], torch.float32, "cpu")
    weight.requires_grad_()
    ours(hidden, weight, target, bias, o).backward()
    assert hidden.grad is None and bias.grad is None and weight.grad is not None
    with torch.no_grad():
        assert ours(hidden, weight, target, bias, o).grad_fn is None


def test_peak_memory_stays_below_the_logits_cpu():
    # The [N, V] float32 logits would take 256 MiB; rows are chunked (64 MiB of
    # logits at a time), so forward + backward allocate well under that,
    # gradients included.
    from my_mps_ops.memory import peak_allocated_mb

    n, h, v = 512, 64, 131072
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = (torch.randn(v, h, generator=g) * 0.1).requires_grad_()
    target = torch.randint(0, v, (n,), generator=g)
    peak = peak_allocated_mb(lambda: my_mps_ops.linear_cross_entropy(hidden, weight, target).backward()) * 2**20
    logits_bytes = n * v * 4
    assert peak < 0.5 * logits_bytes, f"peak {peak / 2**20:.0f} MiB vs logits {logits_bytes / 2**20:.0f} MiB"


def test_tied_weight_gets_both_gradients():
    # A language model whose head shares the embedding: the weight's gradient is
    # the sum of the embedding's and the head's.
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 8, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 40, (6,), generator=g)
    target = torch.randint(0, 40, (6,), generator=g)
    ours_loss = my_mps_ops.linear_cross_entropy(F.embedding(tokens, weight).tanh(), weight, target)
    (ours_grad,) = torch.autograd.grad(ours_loss, weight)
    ref = F.cross_entropy(F.embedding(tokens, weight).tanh() @ weight.T, target)
    (ref_grad,) = torch.autograd.grad(ref, weight)
    torch.testing.assert_close(ours_grad, ref_grad)


def test_bad_inputs_raise_naming_the_argument():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    cases = [
        ((h, torch.randn(10, 7), t), "weight must have shape"),
        ((h.half(), w, t), "weight must have the same dtype as hidden"),
        ((h, w, t.int()), "target must be int64"),
        ((h, w, t[:3]), "target must have shape"),
        ((h[0], w, t), "hidden must have shape"),
        ((h, w, t, torch.randn(9)), "bias must have shape"),
        ((h, w, t, None, -100, 1.5), "label_smoothing must be in"),
        ((h, w, t, None, -100, 0.0, "avg"), "reduction must be"),
        ((h, w, t, None, -100, 0.0, "mean", -1.0), "logit_softcap must be positive"),
        ((h, w, t, None, -100, 0.0, "mean", None, -0.1), "z_loss must be >= 0"),
        ((h, w, torch.tensor([0, 1, 2, 10])), r"target\[3\] = 10 is out of range"),
        ((h, torch.randn(0, 8), t), "at least one class"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            my_mps_ops.linear_cross_entropy(*args)
    # The op that returns the gradients with the loss needs a scalar loss, on every backend (Meta too), and
    # checks its inputs like the others.
    with_grad = torch.ops.my_mps_ops.linear_cross_entropy_with_grad
    for device in ("cpu", "meta"):
        hd, wd, td = h.to(device), w.to(device), t.to(device)
        with pytest.raises(RuntimeError, match=r'linear_cross_entropy_with_grad: needs reduction "mean" or "sum"'):
            with_grad(hd, wd, td, None, -100, 0.0, "none", None, 0.0, [True, True, False])
        with pytest.raises(RuntimeError, match=r"linear_cross_entropy_with_grad: weight must have shape"):
            with_grad(hd, wd[:, :7], td, None, -100, 0.0, "mean", None, 0.0, [True, True, False])


def test_zero_rows(backend):
    h = torch.randn(0, 8, device=backend.device, requires_grad=True)
    w = torch.randn(10, 8, device=backend.device, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long, device=backend.device)
    assert my_mps_ops.linear_cross_entropy(h, w, t, reduction="none").shape == (0,)
    loss = my_mps_ops.linear_cross_entropy(h, w, t, reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(w.grad.cpu(), torch.zeros(10, 8))


def test_backward_twice_with_retain_graph_and_a_scaled_loss():
    # The gradient taken in the forward pass is returned as saved for
    # loss.backward(): a second backward must still add the same amount.
    hidden, weight, target, bias, o = sample_inputs(SAMPLES[1], torch.float64, "cpu", requires_grad=True)
    loss = ours(hidden, weight, target, bias, o)
    for _ in range(3):
        loss.backward(retain_graph=True)
    (3.0 * loss).backward()
    ref_leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    (6.0 * reference(ref_leaves[0], ref_leaves[1], target, ref_leaves[2], **o)).backward()
    for leaf, r in zip((hidden, weight, bias), ref_leaves):
        torch.testing.assert_close(leaf.grad, r.grad)
