"""my_mps_ops.swiglu / geglu: values, gradients, registrations, compile, errors."""

import pytest
import torch
import torch.nn.functional as F

import my_mps_ops
from support import (COMPILE, GRADCHECK, OPCHECK, TOLERANCES, Sample, assert_close, assert_compiled_matches_eager,
                     assert_double_backward_raises, feeding, float64, float64_leaves, scaled_tolerance)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ops = torch.ops.my_mps_ops


def act(g, kind):
    if kind == "swiglu":
        return F.silu(g)
    return F.gelu(g, approximate=kind.split("_")[1])


def run(kind, gate, up):
    if kind == "swiglu":
        return my_mps_ops.swiglu(gate, up)
    return my_mps_ops.geglu(gate, up, kind.split("_")[1])


KINDS = ["swiglu", "geglu_none", "geglu_tanh"]

# The shapes of gate and up: one list for the value and gradient tests (every
# backend, dtype and kind) and, where marked, gradcheck, opcheck and
# torch.compile (two sizes of one rank: one dynamic graph serves both).
SAMPLES = [
    Sample((1,), also=(GRADCHECK,)),
    Sample((3, 5), also=(GRADCHECK,)),
    Sample((3, 11), also=(GRADCHECK,)),
    Sample((3, 24), also=(GRADCHECK, COMPILE)),
    Sample((7, 24), also=(GRADCHECK, COMPILE)),
    Sample((4, 3, 10), also=(GRADCHECK, OPCHECK)),
    Sample((6, 131)),
    Sample((2, 7, 33)),
    Sample((4, 1000)),
]


def sample_inputs(sample, dtype, device, requires_grad=False):
    """(gate, up); gate spread over the activations' curved range."""
    gate = (torch.randn(sample.case, dtype=dtype, device=device) * 3).requires_grad_(requires_grad)
    up = torch.randn(sample.case, dtype=dtype, device=device, requires_grad=requires_grad)
    return gate, up


@pytest.mark.parametrize("sample", SAMPLES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_values(backend, kind, dtype, sample):
    g, u = sample_inputs(sample, dtype, backend.device)
    expected = act(float64(g), kind) * float64(u)
    assert_close(run(kind, g, u), expected, dtype)


@pytest.mark.parametrize("sample", SAMPLES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_gradients(backend, kind, dtype, sample):
    g, u = sample_inputs(sample, dtype, backend.device, requires_grad=True)
    dy = torch.randn(sample.case, dtype=dtype, device=backend.device)
    run(kind, g, u).backward(dy)
    g64, u64 = float64_leaves(g, u)
    (act(g64, kind) * u64).backward(float64(dy))
    tol = scaled_tolerance(dtype, 2)
    torch.testing.assert_close(g.grad.cpu().double(), g64.grad, **tol)
    torch.testing.assert_close(u.grad.cpu().double(), u64.grad, **tol)


@pytest.mark.parametrize("sample", feeding(SAMPLES, GRADCHECK), ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind, sample):
    g, u = sample_inputs(sample, torch.float64, "cpu", requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: run(kind, a, b), (g, u))


@pytest.mark.parametrize("sample", feeding(SAMPLES, OPCHECK), ids=str)
def test_opcheck(sample):
    g, u = sample_inputs(sample, torch.float32, "cpu", requires_grad=True)
    dy = torch.randn(sample.case)
    torch.library.opcheck(ops.swiglu.default, (g, u))
    torch.library.opcheck(ops.swiglu_backward.default, (dy, g.detach(), u.detach()))
    for approximate in ("none", "tanh"):
        torch.library.opcheck(ops.geglu.default, (g, u, approximate))
        torch.library.opcheck(ops.geglu_backward.default, (dy, g.detach(), u.detach(), approximate))


def test_torch_compile_forward_backward():
    def both_activations(gate, up):
        return my_mps_ops.swiglu(gate, up).sum(-1) + my_mps_ops.geglu(gate, up, "tanh").sum(-1)

    samples = [sample_inputs(s, torch.float32, "cpu", requires_grad=True) for s in feeding(SAMPLES, COMPILE)]
    assert_compiled_matches_eager(both_activations, samples, grad_tol=dict(atol=1e-4, rtol=1e-4))


@pytest.mark.parametrize("kind", KINDS)
def test_large_outputs_streamed_cpu(kind):
    # float32 outputs of 16 MiB or more take the CPU kernel's streaming-store
    # path; an odd size puts each thread's chunk at an unaligned start.
    n = (16 << 20) // 4 + 4099
    g = torch.randn(n) * 3
    u = torch.randn(n)
    dy = torch.randn(n)
    gr, ur = g.clone().requires_grad_(), u.clone().requires_grad_()
    out = run(kind, gr, ur)
    out.backward(dy)
    g64, u64 = g.double().requires_grad_(), u.double().requires_grad_()
    expected = act(g64, kind) * u64
    expected.backward(dy.double())
    tol = dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.double(), expected.detach(), **tol)
    torch.testing.assert_close(gr.grad.double(), g64.grad, **tol)
    torch.testing.assert_close(ur.grad.double(), u64.grad, **tol)


def test_geglu_tanh_keeps_its_digits_in_the_tails(backend):
    # gelu_tanh(x) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): the
    # float64 reference in that form (0.5 x (1 + tanh(u)) cancels to 0 in the
    # negative tail even in float64). float32 must keep relative accuracy where
    # gelu is tiny, and its gradient an absolute error far below the old
    # 1 + tanh(u) form's (~2e-6 here).
    g = torch.linspace(-9, 9, 20001, device=backend.device)
    gr = g.clone().requires_grad_()
    out = my_mps_ops.geglu(gr, torch.ones_like(g), "tanh")
    out.backward(torch.ones_like(g))
    g64 = g.cpu().double().requires_grad_()
    ref = g64 * torch.sigmoid(2 * 0.7978845608028654 * (g64 + 0.044715 * g64 ** 3))
    ref.backward(torch.ones_like(g64))
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), rtol=3e-5, atol=1e-30)
    torch.testing.assert_close(gr.grad.cpu().double(), g64.grad, rtol=3e-5, atol=5e-7)


def test_bfloat16_rounding_matches_pytorch_exactly_cpu():
    # For gate >= 20, silu(gate) == gate in float32, so swiglu's float32 result
    # is exactly gate * up and only the final rounding to bfloat16 remains:
    # the vectorised conversion must round like PyTorch's (to nearest even,
    # ties included) and keep inf, NaN and signed zeros.
    g = torch.Generator().manual_seed(0)
    gate = (20 + torch.rand(4099, generator=g) * 100).bfloat16()
    up = (torch.randn(4099, generator=g) * torch.logspace(-30, 30, 4099)).bfloat16()
    up[:6] = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1.0])
    out = my_mps_ops.swiglu(gate, up)
    expected = (gate.float() * up.float()).bfloat16()
    assert torch.equal(out.view(torch.int16)[3:], expected.view(torch.int16)[3:])
    assert out[0] == float("inf") and out[1] == float("-inf") and out[2].isnan()
    ties = ((gate.float() * up.float()).view(torch.int32) & 0xFFFF) == 0x8000
    assert ties.any()  # the data does exercise round-half-to-even


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_projection_halves_and_other_layouts(backend, kind, dtype):
    # gate and up as the two halves of one fused projection (chunk(2, -1):
    # rows of H elements, 2H apart), read in place on cpu; also a broadcast
    # (stride-0) up, a transposed (copied) gate, and gradients through them.
    h = 37
    gate_up = (torch.randn(3, 5, 2 * h, dtype=dtype, device=backend.device) * 3).requires_grad_()
    gate, up = gate_up.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    out = run(kind, gate, up)
    dy = torch.randn_like(out)
    out.backward(dy)
    (gu64,) = float64_leaves(gate_up)
    g64, u64 = gu64.chunk(2, dim=-1)
    expected = act(g64, kind) * u64
    expected.backward(float64(dy))
    assert_close(out, expected.detach(), dtype)
    tol = {k: v * 2 for k, v in TOLERANCES[dtype].items()}
    torch.testing.assert_close(gate_up.grad.cpu().double(), gu64.grad.cpu(), **tol)

    # The halves are read in place on every backend: no copy.
    with torch.profiler.profile() as prof:
        run(kind, gate.detach(), up.detach())
    assert not {e.name for e in prof.events()} & {"aten::copy_", "aten::contiguous", "aten::clone"}

    row = torch.randn(h, dtype=dtype, device=backend.device)
    wide = torch.randn(h, 4, dtype=dtype, device=backend.device).t()  # [4, h], stride (1, 4)
    assert_close(run(kind, wide, row.expand(4, h)), act(float64(wide), kind) * float64(row), dtype)
    # Leading dimensions that do not collapse into one row index (copied, then read).
    swapped = torch.randn(5, 3, 2 * h, dtype=dtype, device=backend.device).transpose(0, 1)
    g2, u2 = swapped.chunk(2, dim=-1)
    assert_close(run(kind, g2, u2), act(float64(g2), kind) * float64(u2), dtype)


def test_noncontiguous_and_zero_size(backend):
    base = torch.randn(8, 20, device=backend.device)
    g, u = base[:, ::2], base.t()[:10, :8].t()
    assert not g.is_contiguous() and not u.is_contiguous()
    assert_close(my_mps_ops.swiglu(g, u), F.silu(float64(g)) * float64(u), torch.float32)
    offset = torch.randn(30, device=backend.device)[5:17]
    assert_close(my_mps_ops.geglu(offset, offset), F.gelu(float64(offset)) * float64(offset), torch.float32)
    empty = torch.randn(0, 4, device=backend.device, requires_grad=True)
    out = my_mps_ops.swiglu(empty, empty)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert empty.grad.shape == (0, 4)


@pytest.mark.parametrize("kind", KINDS)
def test_double_backward_raises_naming_the_op(backend, kind):
    gate, up = (torch.randn(3, 8, device=backend.device, requires_grad=True) for _ in range(2))
    assert_double_backward_raises(lambda g, u: run(kind, g, u), (gate, up), "my_mps_ops." + kind.split("_")[0])


def test_bad_inputs_raise_naming_the_argument():
    g = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="up must have the shape of gate"):
        my_mps_ops.swiglu(g, torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="up must be float32, float16 or bfloat16"):
        my_mps_ops.swiglu(g, torch.ones(4, 8, dtype=torch.int64))  # mixed float dtypes promote (test_mixed_dtypes)
    with pytest.raises(RuntimeError, match="up must have the same dtype as gate"):
        ops.swiglu_backward(g, g, g.half())  # the backward takes what the forward saved
    with pytest.raises(RuntimeError, match="up must be on the same device as gate"):
        my_mps_ops.swiglu(g, torch.randn(4, 8, device="meta"))
    with pytest.raises(RuntimeError, match="gate must be float32, float16 or bfloat16"):
        my_mps_ops.geglu(torch.ones(4, dtype=torch.int64), torch.ones(4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match='approximate must be "none" or "tanh"'):
        my_mps_ops.geglu(g, g, "fast")
    with pytest.raises(RuntimeError, match="grad_out must have the shape of gate"):
        ops.swiglu_backward(torch.randn(3), g, g)
