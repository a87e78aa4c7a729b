"""my_mps_ops.layer_norm: values, gradients, registrations, compile, errors."""

import pytest
import torch
import torch.nn.functional as F

import my_mps_ops
from support import (COMPILE, GRADCHECK, OPCHECK, TOLERANCES, Sample, assert_close, assert_compiled_matches_eager,
                     assert_double_backward_raises, assert_matches_torch_under_cpu_autocast, feeding,
                     float64_leaves)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ops = torch.ops.my_mps_ops

# The input shapes (normalised over the last dimension): one list for the
# value and gradient tests (every backend and dtype) and, where marked,
# gradcheck, opcheck and torch.compile (two sizes of one rank: one dynamic
# graph serves both). Rows of 4096 and more take the kernels' looped paths.
SAMPLES = [
    Sample((3, 1)),
    Sample((5, 1)),
    Sample((3, 3)),
    Sample((5, 7)),
    Sample((3, 2, 13), also=(GRADCHECK, OPCHECK)),
    Sample((3, 24), also=(COMPILE,)),
    Sample((8, 24), also=(COMPILE,)),
    Sample((3, 127)),
    Sample((5, 1000)),
    Sample((3, 4096)),
    Sample((5, 5000)),
    Sample((3, 8191)),
    # Several rows per threadgroup (the Metal path groups rows once there are
    # enough of them), row counts that do not divide evenly, and long rows.
    Sample((131, 24)),
    Sample((517, 9)),
    Sample((130, 4100)),
]


def sample_inputs(sample, dtype, device, requires_grad=False):
    """(input, weight, bias); the input off-centre and wider than 1."""
    n = sample.case[-1]
    x = (torch.randn(sample.case, dtype=dtype, device=device) * 2 + 1).requires_grad_(requires_grad)
    w = torch.randn(n, dtype=dtype, device=device, requires_grad=requires_grad)
    b = torch.randn(n, dtype=dtype, device=device, requires_grad=requires_grad)
    return x, w, b


def reference(x, w, b, eps):
    """float64 F.layer_norm on the cpu (differentiable)."""
    f64 = lambda t: None if t is None else t.cpu().double()
    return F.layer_norm(f64(x), (x.shape[-1],), f64(w), f64(b), eps)


def grad_tol(dtype):
    return {k: v * 4 for k, v in TOLERANCES[dtype].items()}


@pytest.mark.parametrize("sample", SAMPLES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_values(backend, dtype, sample):
    x, w, b = sample_inputs(sample, dtype, backend.device)
    assert_close(my_mps_ops.layer_norm(x, w, b, 1e-5), reference(x, w, b, 1e-5), dtype)
    assert_close(my_mps_ops.layer_norm(x, None, None, 1e-5), reference(x, None, None, 1e-5), dtype)
    assert_close(my_mps_ops.layer_norm(x, w, None, 1e-5), reference(x, w, None, 1e-5), dtype)


@pytest.mark.parametrize("sample", SAMPLES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients(backend, dtype, sample):
    x, w, b = sample_inputs(sample, dtype, backend.device, requires_grad=True)
    g = torch.randn(sample.case, dtype=dtype, device=backend.device)
    my_mps_ops.layer_norm(x, w, b, 1e-5).backward(g)
    x64, w64, b64 = float64_leaves(x, w, b)
    F.layer_norm(x64, (sample.case[-1],), w64, b64, 1e-5).backward(g.cpu().double())
    for ours, ref in ((x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        torch.testing.assert_close(ours.cpu().double(), ref.cpu(), **grad_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_of_equal_values_give_exactly_the_bias(backend, dtype):
    # Found by test_properties.py: the row mean was a float32 sum / n, off by an
    # ulp for a row of equal values, and rstd (1/sqrt(eps) for such a row)
    # scaled that ulp up to ~1e-3 in the output and the weight gradient, where
    # F.layer_norm gives exactly the bias. The mean is now shifted by the row's
    # first element: exact for such rows.
    values = torch.tensor([3.7, -11.3, 0.1, 1e3], dtype=torch.float64)[:, None]
    x = values.expand(4, 33).to(dtype).to(backend.device).requires_grad_()
    w = torch.randn(33, dtype=dtype, device=backend.device, requires_grad=True)
    b = torch.randn(33, dtype=dtype, device=backend.device, requires_grad=True)
    out = my_mps_ops.layer_norm(x, w, b, 1e-8)
    assert torch.equal(out, b.detach().expand_as(out))
    out.backward(torch.randn_like(out))
    assert torch.equal(w.grad, torch.zeros_like(w))  # sum of grad_out * xhat, xhat exactly 0


@pytest.mark.parametrize("with_weight,with_bias", [(False, True), (True, False), (False, False)])
def test_gradients_with_absent_parameters(backend, with_weight, with_bias):
    # A bias without a weight (found by test_properties.py): the backward asked
    # autograd about the bias by its argument position, past the end of the
    # tensors given, and raised "Index out of range".
    x = torch.randn(3, 40, device=backend.device, requires_grad=True)
    w = torch.randn(40, device=backend.device, requires_grad=True) if with_weight else None
    b = torch.randn(40, device=backend.device, requires_grad=True) if with_bias else None
    g = torch.randn(3, 40, device=backend.device)
    my_mps_ops.layer_norm(x, w, b, 1e-5).backward(g)
    x64, w64, b64 = float64_leaves(x, w, b)
    F.layer_norm(x64, (40,), w64, b64, 1e-5).backward(g.cpu().double())
    for ours, ref in ((x, x64), (w, w64), (b, b64)):
        if ours is not None:
            torch.testing.assert_close(ours.grad.cpu().double(), ref.grad, **grad_tol(torch.float32))


@pytest.mark.parametrize("sample", feeding(SAMPLES, GRADCHECK), ids=str)
def test_gradcheck_float64(sample):
    x, w, b = sample_inputs(sample, torch.float64, "cpu", requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c, d: my_mps_ops.layer_norm(a, c, d, 1e-5), (x, w, b))
    assert torch.autograd.gradcheck(lambda a: my_mps_ops.layer_norm(a, None, None, 1e-5), (x,))


@pytest.mark.parametrize("sample", feeding(SAMPLES, OPCHECK), ids=str)
def test_opcheck(sample):
    xf, wf, bf = sample_inputs(sample, torch.float32, "cpu", requires_grad=True)
    torch.library.opcheck(ops.layer_norm.default, (xf, wf, bf, 1e-5))
    torch.library.opcheck(ops.layer_norm.default, (xf, None, None, 1e-5))
    g = torch.randn(sample.case)
    torch.library.opcheck(ops.layer_norm_backward.default, (g, xf.detach(), wf.detach(), bf.detach(), 1e-5,
                                                            [True, True, True]))
    torch.library.opcheck(ops.layer_norm_backward.default, (g, xf.detach(), None, None, 1e-5, [True, False, False]))


def test_torch_compile_forward_backward():
    samples = [sample_inputs(s, torch.float32, "cpu", requires_grad=True) for s in feeding(SAMPLES, COMPILE)]
    assert_compiled_matches_eager(lambda x, w, b: my_mps_ops.layer_norm(x, w, b, 1e-5).square(), samples,
                                  grad_tol=dict(atol=1e-4, rtol=1e-4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_parameters_of_a_narrow_input(backend, dtype):
    # As F.layer_norm: float32 weight and bias with a float16/bfloat16 input
    # (e.g. under autocast) give an output in the input's dtype and parameter
    # gradients in float32.
    n = 300
    x = (torch.randn(6, n, device=backend.device) * 2 + 1).to(dtype).requires_grad_()
    w = torch.randn(n, device=backend.device, requires_grad=True)
    b = torch.randn(n, device=backend.device, requires_grad=True)
    g = torch.randn(6, n, device=backend.device).to(dtype)
    out = my_mps_ops.layer_norm(x, w, b, 1e-5)
    assert out.dtype == dtype
    assert_close(out, reference(x, w, b, 1e-5), dtype)
    out.backward(g)
    assert w.grad.dtype == b.grad.dtype == torch.float32 and x.grad.dtype == dtype
    x64, w64, b64 = float64_leaves(x, w, b)
    F.layer_norm(x64, (n,), w64, b64, 1e-5).backward(g.cpu().double())
    for ours, ref in ((x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        torch.testing.assert_close(ours.cpu().double(), ref.cpu(), **grad_tol(dtype))


def test_float32_parameters_opcheck():
    x = torch.randn(4, 40).half().requires_grad_()
    w, b = torch.randn(40, requires_grad=True), torch.randn(40, requires_grad=True)
    g = torch.randn(4, 40).half()
    torch.library.opcheck(ops.layer_norm.default, (x, w, b, 1e-5))
    torch.library.opcheck(ops.layer_norm_backward.default, (g, x.detach(), w.detach(), b.detach(), 1e-5,
                                                           [True, True, True]))


def test_module_under_cpu_autocast_matches_torch():
    assert_matches_torch_under_cpu_autocast(my_mps_ops.nn.LayerNorm(32), torch.nn.LayerNorm(32))


def test_noncontiguous_offset_and_zero_size(backend):
    base = torch.randn(9, 70, device=backend.device)
    for x in (base[1:, 3:67], base.t()[:64, :8].t(), base[:, ::2]):
        w = torch.randn(x.shape[-1], device=backend.device)
        assert_close(my_mps_ops.layer_norm(x, w, w, 1e-5), reference(x, w, w, 1e-5), torch.float32)
    e = torch.randn(0, 5, device=backend.device, requires_grad=True)
    w = torch.randn(5, device=backend.device, requires_grad=True)
    out = my_mps_ops.layer_norm(e, w, w, 1e-5)
    assert out.shape == (0, 5)
    out.sum().backward()
    assert torch.equal(w.grad.cpu(), torch.zeros(5))


def test_torch_compile_and_module():
    torch._dynamo.reset()
    ours = my_mps_ops.nn.LayerNorm(24)
    theirs = torch.nn.LayerNorm(24)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    compiled = torch.compile(ours, fullgraph=True, dynamic=True)
    for rows in (3, 8):
        x = torch.randn(rows, 24)
        torch.testing.assert_close(compiled(x), theirs(x), atol=1e-5, rtol=1e-5)
        compiled(x).square().sum().backward()
        theirs(x).square().sum().backward()
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, atol=1e-4, rtol=1e-4)
        ours.zero_grad()
        theirs.zero_grad()
    no_bias = my_mps_ops.nn.LayerNorm(24, bias=False)
    assert no_bias.bias is None and set(no_bias.state_dict()) == {"weight"}


def test_double_backward_raises_naming_the_op(backend):
    x, w, b = (torch.randn(*shape, device=backend.device, requires_grad=True) for shape in ((3, 8), (8,), (8,)))
    assert_double_backward_raises(lambda x, w, b: my_mps_ops.layer_norm(x, w, b, 1e-5), (x, w, b),
                                  "my_mps_ops.layer_norm")


def test_bad_inputs_raise_naming_the_argument():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        my_mps_ops.layer_norm(x, torch.randn(7), None, 1e-5)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        my_mps_ops.layer_norm(x, None, torch.randn(9), 1e-5)
    with pytest.raises(RuntimeError, match="bias must have the dtype of input"):
        my_mps_ops.layer_norm(x, None, torch.randn(8, dtype=torch.float16), 1e-5)
    with pytest.raises(RuntimeError, match="weight must have the dtype of input"):  # float32 only for narrow input
        my_mps_ops.layer_norm(x.half(), torch.randn(8, dtype=torch.float64), None, 1e-5)
    with pytest.raises(RuntimeError, match="bias must have the same dtype as weight"):
        my_mps_ops.layer_norm(x.half(), torch.randn(8), torch.randn(8).half(), 1e-5)
    with pytest.raises(RuntimeError, match="input must be float32, float16 or bfloat16"):
        my_mps_ops.layer_norm(torch.ones(4, 8, dtype=torch.int32), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="eps must be finite and non-negative"):
        my_mps_ops.layer_norm(x, None, None, -1.0)
