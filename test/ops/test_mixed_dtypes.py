"""Inputs of different float dtypes, as autocast leaves them (bfloat16
activations, a float32 residual stream): swiglu/geglu and fused_add_rms_norm
promote as the composite they fuse does (silu(gate) * up, x + residual) and
return each gradient in its input's dtype; flash_attention refuses mixed q/k/v
as scaled_dot_product_attention does (under autocast both cast them)."""

import pytest
import torch
import torch.nn.functional as F

import my_mps_ops

PAIRS = [(torch.bfloat16, torch.float32), (torch.float32, torch.float16), (torch.float16, torch.bfloat16)]


def _leaves(shape, dtypes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(d).requires_grad_() for d in dtypes]


@pytest.mark.parametrize("dtypes", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}".replace("torch.", ""))
@pytest.mark.parametrize("op", ["swiglu", "geglu"])
def test_glu_promotes_like_the_composite(backend, op, dtypes):
    gate, up = _leaves((5, 40), dtypes, 0)
    gate_d, up_d = (t.detach().to(backend.device).requires_grad_() for t in (gate, up))
    ours = my_mps_ops.ops.swiglu(gate_d, up_d) if op == "swiglu" else my_mps_ops.ops.geglu(gate_d, up_d, "tanh")
    act = F.silu if op == "swiglu" else (lambda t: F.gelu(t, approximate="tanh"))
    theirs = act(gate) * up
    assert ours.dtype == theirs.dtype
    ref = act(gate.detach().double()) * up.detach().double()
    tol = dict(atol=2e-2, rtol=2e-2) if ours.dtype != torch.float32 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.cpu().double(), ref, **tol)
    g_gate, g_up = torch.autograd.grad(ours.float().sum(), (gate_d, up_d))
    assert (g_gate.dtype, g_up.dtype) == dtypes
    r_gate, r_up = torch.autograd.grad(theirs.float().sum(), (gate, up))
    torch.testing.assert_close(g_gate.cpu().double(), r_gate.double(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(g_up.cpu().double(), r_up.double(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtypes", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}".replace("torch.", ""))
def test_fused_add_rms_norm_promotes_like_the_composite(backend, dtypes):
    x, residual = _leaves((4, 48), dtypes, 1)
    weight = torch.randn(48, generator=torch.Generator().manual_seed(2)).requires_grad_()
    xd, rd, wd = (t.detach().to(backend.device).requires_grad_() for t in (x, residual, weight))
    out, h = my_mps_ops.ops.fused_add_rms_norm(xd, rd, wd, 1e-6)
    h_ref = x + residual
    out_ref = F.rms_norm(h_ref, (48,), weight, 1e-6)
    assert (out.dtype, h.dtype) == (out_ref.dtype, h_ref.dtype)
    tol = dict(atol=2e-2, rtol=2e-2) if h.dtype != torch.float32 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.cpu(), h_ref.detach(), **tol)
    torch.testing.assert_close(out.cpu().double(), F.rms_norm(h_ref.detach().double(), (48,),
                                                              weight.detach().double(), 1e-6), **tol)
    grads = torch.autograd.grad(out.float().sum() + h.float().square().sum(), (xd, rd, wd))
    assert tuple(g.dtype for g in grads) == (*dtypes, torch.float32)
    refs = torch.autograd.grad(out_ref.float().sum() + h_ref.float().square().sum(), (x, residual, weight))
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g.cpu().double(), r.double(), atol=5e-2, rtol=5e-2)


def test_mixed_dtypes_compile_with_the_promoted_dtype():
    gate, up = torch.randn(3, 16, dtype=torch.bfloat16), torch.randn(3, 16)
    compiled = torch.compile(lambda g, u: my_mps_ops.ops.swiglu(g, u), backend="aot_eager", fullgraph=True)
    assert compiled(gate, up).dtype == torch.float32
    x, r = torch.randn(3, 16, dtype=torch.bfloat16), torch.randn(3, 16)
    fused = torch.compile(lambda a, b: my_mps_ops.ops.fused_add_rms_norm(a, b, None, 1e-6), backend="aot_eager",
                          fullgraph=True)
    assert [t.dtype for t in fused(x, r)] == [torch.float32, torch.float32]


def test_flash_attention_refuses_mixed_dtypes_like_sdpa():
    q = torch.randn(1, 2, 5, 32, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 5, 32)
    with pytest.raises(RuntimeError, match="same dtype"):
        F.scaled_dot_product_attention(q, k, k)
    with pytest.raises(RuntimeError, match="k must have the same dtype as q"):
        my_mps_ops.ops.flash_attention(q, k, k)
