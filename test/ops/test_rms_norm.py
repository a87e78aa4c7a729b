"""my_mps_ops.rms_norm and fused_add_rms_norm: values, gradients, registrations, compile, errors."""

import pytest
import torch
import torch.nn.functional as F

import my_mps_ops
from support import (COMPILE, GRADCHECK, OPCHECK, TOLERANCES, Sample, assert_close, assert_compiled_matches_eager,
                     assert_double_backward_raises, assert_matches_torch_under_cpu_autocast, feeding, float64,
                     float64_leaves)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ops = torch.ops.my_mps_ops
EPS = 1e-6

# The input shapes (normalised over the last dimension), for rms_norm and
# fused_add_rms_norm alike: one list for the value and gradient tests (every
# backend and dtype, with and without weight) and, where marked, gradcheck,
# opcheck and torch.compile (two sizes of one rank: one dynamic graph serves
# both). Rows of 4096 and more take the kernels' looped paths; zero-size
# shapes have their own checks below as well.
SAMPLES = [
    Sample((17,)),
    Sample((3, 1)),
    Sample((5, 1)),
    Sample((3, 3)),
    Sample((5, 7)),
    Sample((3, 17), also=(COMPILE,)),
    Sample((6, 17), also=(COMPILE,)),
    Sample((4, 33)),
    Sample((3, 2, 17), also=(GRADCHECK, OPCHECK)),
    Sample((2, 3, 40)),
    Sample((4, 3, 40), also=(OPCHECK,)),
    Sample((3, 127)),
    Sample((5, 128)),
    Sample((2, 2, 3, 130)),
    Sample((4, 300)),
    Sample((5, 1000)),
    Sample((3, 4096)),
    Sample((5, 5000)),
    Sample((3, 8191)),
    # Several rows per threadgroup (the Metal path groups rows once there are
    # enough of them), row counts that do not divide evenly, and long rows.
    Sample((131, 24)),
    Sample((517, 9)),
    Sample((130, 4100)),
    Sample((2, 65536)),
    Sample((0, 16)),
    Sample((4, 0)),
    Sample((0,)),
    Sample((2, 0, 8)),
]
ZERO_SIZE = [s for s in SAMPLES if 0 in s.case]
# The gradient tests take rows up to 8191 wide: the 65536-wide ones would cost
# seconds per dtype and backend.
GRADIENT_SAMPLES = [s for s in SAMPLES if s.case[-1] <= 8191]


def sample_inputs(sample, dtype, device, requires_grad=False):
    """(input, weight)."""
    x = torch.randn(sample.case, dtype=dtype, device=device, requires_grad=requires_grad)
    w = torch.randn(sample.case[-1], dtype=dtype, device=device, requires_grad=requires_grad)
    return x, w


def reference(x, weight, eps):
    """float64 composite reference, on the cpu (differentiable)."""
    x64 = x.cpu().double()
    y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    return y * weight.cpu().double() if weight is not None else y


def reference_grads(x, weight, eps, grad_out):
    x64, w64 = float64_leaves(x, weight)
    reference(x64, w64, eps).backward(float64(grad_out))
    return x64.grad, (w64.grad if w64 is not None else None)


def grad_tol(dtype, n, rows=1):
    # Gradients sum over a row (dx) or over rows (dw): allow for the extra
    # rounding of low-precision inputs, and for dw's sum over many rows (its
    # rounding errors grow like the square root of their count).
    tol = dict(TOLERANCES[dtype])
    if dtype != torch.float64:
        factor = 4 * max(1.0, (rows / 8) ** 0.5)
        tol = {k: v * factor for k, v in tol.items()}
    return tol


@pytest.mark.parametrize("sample", SAMPLES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_values(backend, dtype, sample):
    x, w = sample_inputs(sample, dtype, backend.device)
    for weight in (w, None):
        out = my_mps_ops.rms_norm(x, weight, EPS)
        assert out.shape == x.shape and out.is_contiguous()
        assert_close(out, reference(x, weight, EPS), dtype)


@pytest.mark.parametrize("sample", GRADIENT_SAMPLES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients(backend, dtype, sample):
    n = sample.case[-1]
    for with_weight in (True, False):
        x, w = sample_inputs(sample, dtype, backend.device, requires_grad=True)
        w = w if with_weight else None
        g = torch.randn(sample.case, dtype=dtype, device=backend.device)
        my_mps_ops.rms_norm(x, w, EPS).backward(g)
        dx_ref, dw_ref = reference_grads(x, w, EPS, g)
        torch.testing.assert_close(x.grad.cpu().double(), dx_ref, **grad_tol(dtype, n))
        if with_weight:
            torch.testing.assert_close(w.grad.cpu().double(), dw_ref, **grad_tol(dtype, n, x.numel() // max(n, 1)))


def test_matches_torch_rms_norm(backend):
    x = torch.randn(6, 250, device=backend.device)
    w = torch.randn(250, device=backend.device)
    torch.testing.assert_close(my_mps_ops.rms_norm(x, w, 1e-5), F.rms_norm(x, (250,), w, 1e-5),
                               atol=1e-5, rtol=1e-5)


def test_noncontiguous_and_offset_views(backend):
    base = torch.randn(8, 2 * 96 + 5, device=backend.device)
    transposed = torch.randn(96, 8, device=backend.device).t()  # stride (1, 8)
    strided = base[:, 5::2]  # offset and step
    offset_rows = base[3:, 5:101]  # storage offset, row stride != n
    w = torch.randn(96, device=backend.device)[::1]
    w_strided = torch.randn(192, device=backend.device)[::2]
    for x in (transposed, strided, offset_rows):
        assert not x.is_contiguous() or x.storage_offset() > 0
        assert_close(my_mps_ops.rms_norm(x, w, 1e-6), reference(x, w, 1e-6))
        assert_close(my_mps_ops.rms_norm(x, w_strided, 1e-6), reference(x, w_strided, 1e-6))


def test_only_requested_gradients(backend):
    x = torch.randn(3, 64, device=backend.device)
    w = torch.randn(64, device=backend.device, requires_grad=True)
    my_mps_ops.rms_norm(x, w, 1e-6).sum().backward()
    _, dw_ref = reference_grads(x, w, 1e-6, torch.ones(3, 64))
    torch.testing.assert_close(w.grad.cpu().double(), dw_ref, atol=1e-4, rtol=1e-4)
    grad_input, grad_weight = ops.rms_norm_backward(torch.ones_like(x), x, w.detach(), 1e-6, [False, True])
    assert grad_input.numel() == 0 and grad_weight.shape == (64,)
    grad_input, grad_weight = ops.rms_norm_backward(torch.ones_like(x), x, w.detach(), 1e-6, [True, False])
    assert grad_input.shape == x.shape and grad_weight.numel() == 0


@pytest.mark.parametrize("sample", ZERO_SIZE, ids=str)
def test_zero_size(backend, sample):
    x = torch.randn(sample.case, device=backend.device, requires_grad=True)
    w = torch.randn(sample.case[-1], device=backend.device, requires_grad=True)
    out = my_mps_ops.rms_norm(x, w, 1e-6)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad.cpu(), torch.zeros(sample.case[-1]))


@pytest.mark.parametrize("sample", feeding(SAMPLES, GRADCHECK), ids=str)
def test_gradcheck_float64(sample):
    x, w = sample_inputs(sample, torch.float64, "cpu", requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: my_mps_ops.rms_norm(a, b, 1e-5), (x, w))
    assert torch.autograd.gradcheck(lambda a: my_mps_ops.rms_norm(a, None, 1e-5), (x,))


@pytest.mark.parametrize("sample", feeding(SAMPLES, OPCHECK), ids=str)
@pytest.mark.parametrize("with_weight", [True, False])
def test_opcheck(with_weight, sample):
    x, w = sample_inputs(sample, torch.float32, "cpu", requires_grad=True)
    w = w if with_weight else None
    torch.library.opcheck(ops.rms_norm.default, (x, w, 1e-6))
    g = torch.randn(sample.case)
    wd = w.detach() if w is not None else None
    torch.library.opcheck(ops.rms_norm_backward.default, (g, x.detach(), wd, 1e-6, [True, True]))
    torch.library.opcheck(ops.rms_norm_backward.default, (g, x.detach(), wd, 1e-6, [False, True]))


def test_torch_compile_forward_backward():
    def block(x, r, w):
        out, h = my_mps_ops.fused_add_rms_norm(x, r, w, 1e-6)
        return (out * 2 + h).sum() + my_mps_ops.rms_norm(x, w, 1e-6).square().sum()

    samples = []
    for sample in feeding(SAMPLES, COMPILE):
        x, w = sample_inputs(sample, torch.float32, "cpu", requires_grad=True)
        samples.append((x, torch.randn(sample.case, requires_grad=True), w))
    assert_compiled_matches_eager(block, samples, grad_tol=dict(atol=1e-5, rtol=1e-5))


def test_double_backward_raises_naming_the_op(backend):
    # It used to raise "derivative for my_mps_ops::rms_norm_backward is not implemented".
    x, r, w = (torch.randn(*shape, device=backend.device, requires_grad=True) for shape in ((3, 8), (3, 8), (8,)))
    assert_double_backward_raises(lambda x, w: my_mps_ops.rms_norm(x, w, 1e-5), (x, w), "my_mps_ops.rms_norm")
    assert_double_backward_raises(lambda x, r, w: torch.cat(my_mps_ops.fused_add_rms_norm(x, r, w, 1e-5)), (x, r, w),
                                  "my_mps_ops.fused_add_rms_norm")


def test_torch_compile_module_forward_backward():
    torch._dynamo.reset()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(48, 48)
            self.norm = my_mps_ops.nn.RMSNorm(48, eps=1e-6)

        def forward(self, x):
            return self.norm(self.proj(x)).relu()

    torch.manual_seed(0)
    eager = Block()
    compiled_module = Block()
    compiled_module.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_module, fullgraph=True, dynamic=True)
    for rows in (5, 9):  # two sizes: the dynamic graph must serve both
        x = torch.randn(rows, 48)
        out_e, out_c = eager(x), compiled(x)
        torch.testing.assert_close(out_c, out_e)
        out_e.square().sum().backward()
        out_c.square().sum().backward()
        for pe, pc in zip(eager.parameters(), compiled_module.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, atol=1e-5, rtol=1e-5)
            pe.grad = pc.grad = None


def test_nn_module_is_drop_in():
    torch.manual_seed(0)
    ours = my_mps_ops.nn.RMSNorm(24, eps=1e-5)
    theirs = torch.nn.RMSNorm(24, eps=1e-5)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 24)
    torch.testing.assert_close(ours(x), theirs(x))
    no_affine = my_mps_ops.nn.RMSNorm(24, elementwise_affine=False)
    torch.testing.assert_close(no_affine(x), torch.nn.RMSNorm(24, elementwise_affine=False)(x))
    # eps=None uses torch.nn.RMSNorm's default (test_default_eps_is_torchs).
    torch.testing.assert_close(my_mps_ops.nn.RMSNorm(24)(x), torch.nn.RMSNorm(24)(x))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_default_eps_is_torchs(backend, dtype):
    # eps=None means what torch.nn.RMSNorm takes then: float32's machine epsilon
    # for float16 / bfloat16 inputs (the input dtype's was 8192 times larger
    # for float16: outputs off by up to 0.74 on small inputs), float64's for
    # float64. Also through patch_model and torch.compile.
    if dtype == torch.float64 and backend.name != "cpu":
        pytest.skip("float64 runs on the native CPU kernels only")
    torch.manual_seed(0)
    x = (torch.randn(6, 32) * 1e-3).to(dtype)
    theirs = torch.nn.RMSNorm(32, dtype=dtype)
    expected = theirs(x).detach()
    ours = my_mps_ops.nn.RMSNorm(32, dtype=dtype).to(backend.device)
    patched = my_mps_ops.patch_model(torch.nn.Sequential(torch.nn.RMSNorm(32, dtype=dtype))).to(backend.device)
    assert isinstance(patched[0], my_mps_ops.nn.RMSNorm)
    for module in (ours, patched):
        torch.testing.assert_close(module(x.to(backend.device)).cpu(), expected, **TOLERANCES[dtype])
    if backend.name == "cpu":
        torch._dynamo.reset()
        compiled = torch.compile(ours, fullgraph=True)
        torch.testing.assert_close(compiled(x), expected, **TOLERANCES[dtype])


def test_bad_inputs_raise_naming_the_argument():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        my_mps_ops.rms_norm(x, torch.randn(7), 1e-6)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        my_mps_ops.rms_norm(x, torch.randn(2, 8), 1e-6)
    with pytest.raises(RuntimeError, match="weight must have the dtype of input"):
        my_mps_ops.rms_norm(x, torch.randn(8, dtype=torch.float16), 1e-6)
    with pytest.raises(RuntimeError, match="weight must have the dtype of input"):  # float32 only for narrow input
        my_mps_ops.rms_norm(x.bfloat16(), torch.randn(8, dtype=torch.float64), 1e-6)
    with pytest.raises(RuntimeError, match="weight must be on the same device"):
        my_mps_ops.rms_norm(x, torch.randn(8, device="meta"), 1e-6)
    with pytest.raises(RuntimeError, match="input must be float32, float16 or bfloat16"):
        my_mps_ops.rms_norm(torch.ones(4, 8, dtype=torch.int32), None, 1e-6)
    with pytest.raises(RuntimeError, match="eps must be finite and non-negative"):
        my_mps_ops.rms_norm(x, None, -1.0)
    with pytest.raises(RuntimeError, match="input must have at least one dimension"):
        my_mps_ops.rms_norm(torch.tensor(1.0), None, 1e-6)
    with pytest.raises(RuntimeError, match="grad_out must have the shape of input"):
        ops.rms_norm_backward(torch.randn(4, 9), x, None, 1e-6, [True, True])


# ------------------------------------------------------- fused_add_rms_norm

def fused_reference(x, residual, weight, eps):
    h = (x + residual)  # rounded to the dtype, as the op does
    return reference(h, weight, eps), h


@pytest.mark.parametrize("sample", SAMPLES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_forward(backend, dtype, sample):
    x, w = sample_inputs(sample, dtype, backend.device)
    r = torch.randn(sample.case, dtype=dtype, device=backend.device)
    out, h = my_mps_ops.fused_add_rms_norm(x, r, w, EPS)
    ref_out, ref_h = fused_reference(x, r, w, EPS)
    assert torch.equal(h.cpu(), ref_h.cpu())
    assert_close(out, ref_out, dtype)
    out, h = my_mps_ops.fused_add_rms_norm(x, r, None, EPS)
    assert_close(out, fused_reference(x, r, None, EPS)[0], dtype)


@pytest.mark.parametrize("sample", GRADIENT_SAMPLES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_residual_out", [True, False])
def test_fused_add_gradients(backend, dtype, use_residual_out, sample):
    n = sample.case[-1]
    x, w = sample_inputs(sample, dtype, backend.device, requires_grad=True)
    r = torch.randn(sample.case, dtype=dtype, device=backend.device, requires_grad=True)
    g_out = torch.randn(sample.case, dtype=dtype, device=backend.device)
    g_h = torch.randn(sample.case, dtype=dtype, device=backend.device)
    out, h = my_mps_ops.fused_add_rms_norm(x, r, w, EPS)
    loss = (out * g_out).sum() + ((h * g_h).sum() if use_residual_out else 0)
    loss.backward()
    x64, r64, w64 = float64_leaves(x, r, w)
    h64 = x64 + r64
    loss64 = (reference(h64, w64, EPS) * float64(g_out)).sum() + ((h64 * float64(g_h)).sum() if use_residual_out else 0)
    loss64.backward()
    tol = grad_tol(dtype, n)
    torch.testing.assert_close(x.grad.cpu().double(), x64.grad.cpu(), **tol)
    torch.testing.assert_close(r.grad.cpu().double(), r64.grad.cpu(), **tol)
    torch.testing.assert_close(w.grad.cpu().double(), w64.grad.cpu(), **grad_tol(dtype, n, x.numel() // max(n, 1)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_weight_of_a_narrow_input(backend, dtype):
    # As F.rms_norm: a float32 weight with a float16/bfloat16 input (e.g. under
    # autocast) gives an output in the input's dtype and a float32 grad_weight;
    # fused_add_rms_norm likewise.
    n = 300
    x = torch.randn(4, n, device=backend.device).to(dtype).requires_grad_()
    r = torch.randn(4, n, device=backend.device).to(dtype).requires_grad_()
    w = torch.randn(n, device=backend.device, requires_grad=True)
    g = torch.randn(4, n, device=backend.device).to(dtype)
    out = my_mps_ops.rms_norm(x, w, 1e-6)
    assert out.dtype == dtype
    assert_close(out, reference(x, w, 1e-6), dtype)
    out.backward(g)
    assert w.grad.dtype == torch.float32 and x.grad.dtype == dtype
    ref_dx, ref_dw = reference_grads(x, w, 1e-6, g)
    tol = grad_tol(dtype, n)
    torch.testing.assert_close(x.grad.cpu().double(), ref_dx.cpu(), **tol)
    torch.testing.assert_close(w.grad.cpu().double(), ref_dw.cpu(), **tol)

    w.grad = None
    out, h = my_mps_ops.fused_add_rms_norm(x, r, w, 1e-6)
    assert out.dtype == h.dtype == dtype
    ref_out, ref_h = fused_reference(x.detach(), r.detach(), w.detach(), 1e-6)
    assert torch.equal(h.detach().cpu(), ref_h.cpu())
    assert_close(out, ref_out, dtype)
    out.backward(g)
    h64 = ref_h.cpu().double()
    _, ref_dw = reference_grads(h64, w, 1e-6, g)
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad.cpu().double(), ref_dw.cpu(), **tol)


def test_float32_weight_opcheck():
    x = torch.randn(4, 40).bfloat16().requires_grad_()
    w = torch.randn(40, requires_grad=True)
    g = torch.randn(4, 40).bfloat16()
    torch.library.opcheck(ops.rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(ops.rms_norm_backward.default, (g, x.detach(), w.detach(), 1e-6, [True, True]))
    torch.library.opcheck(ops.fused_add_rms_norm.default, (x, x.detach().clone().requires_grad_(), w, 1e-6))


def test_module_under_cpu_autocast_matches_torch():
    assert_matches_torch_under_cpu_autocast(my_mps_ops.nn.RMSNorm(32, eps=1e-6), torch.nn.RMSNorm(32, eps=1e-6))


@pytest.mark.parametrize("sample", feeding(SAMPLES, GRADCHECK), ids=str)
def test_fused_add_gradcheck_float64(sample):
    x, w = sample_inputs(sample, torch.float64, "cpu", requires_grad=True)
    r = torch.randn(sample.case, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: my_mps_ops.fused_add_rms_norm(a, b, c, 1e-5), (x, r, w))


@pytest.mark.parametrize("sample", feeding(SAMPLES, OPCHECK), ids=str)
def test_fused_add_opcheck(sample):
    xf, wf = sample_inputs(sample, torch.float32, "cpu", requires_grad=True)
    rf = torch.randn(sample.case, requires_grad=True)
    torch.library.opcheck(ops.fused_add_rms_norm.default, (xf, rf, wf, 1e-6))
    g = torch.randn(sample.case)
    torch.library.opcheck(ops.fused_add_rms_norm_backward.default,
                          (g, g.clone(), xf.detach(), wf.detach(), 1e-6, [True, True]))
    torch.library.opcheck(ops.fused_add_rms_norm_backward.default, (g, None, xf.detach(), None, 1e-6, [True, False]))


def test_fused_add_bad_inputs_and_zero_size():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="residual must have the shape of x"):
        my_mps_ops.fused_add_rms_norm(x, torch.randn(4, 9), None, 1e-6)
    with pytest.raises(RuntimeError, match="residual must be float32, float16 or bfloat16"):
        my_mps_ops.fused_add_rms_norm(x, torch.ones(4, 8, dtype=torch.int64), None, 1e-6)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        my_mps_ops.fused_add_rms_norm(x, x, torch.randn(3), 1e-6)
    e = torch.randn(0, 8, requires_grad=True)
    out, h = my_mps_ops.fused_add_rms_norm(e, e, None, 1e-6)
    assert out.shape == h.shape == (0, 8)
