"""torch.func over the ops. vmap runs through PyTorch's per-sample fallback;
grad, vjp, jacrev, jvp and hessian run each op as the PyTorch composite it
stands for (functorch refuses C++ autograd Functions; README, torch.func), so
their values equal the composite's, to any order of differentiation."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, hessian, jacrev, jvp, vjp, vmap

import my_mps_ops
import my_mps_ops.testing

ops = torch.ops.my_mps_ops
G = torch.Generator().manual_seed(0)
W = torch.randn(16, generator=G, dtype=torch.float64)
B = torch.randn(16, generator=G, dtype=torch.float64)
TARGET = torch.tensor([3, 0, 15, 7])
COS, SIN = torch.randn(4, 4, generator=G, dtype=torch.float64), torch.randn(4, 4, generator=G, dtype=torch.float64)


def bottom_right_causal(q_len, kv_len):
    return torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)


def attention(x, causal):  # x [4, 16] -> q [1, 2, 4, 32], k/v [1, 1, 3, 32] (GQA, shorter keys)
    q = x.reshape(1, 2, 2, 16).repeat(1, 1, 2, 2)
    kv = x[:3].reshape(1, 1, 3, 16).repeat(1, 1, 1, 2)
    return q, kv, kv.flip(-1)


def attention_reference(q, k, v, scale, window_left=-1, softcap=0.0, sinks=None):
    # softmax(scale q k^T) v with k/v heads repeated (GQA) and the causal mask
    # aligned bottom-right (a window of window_left + 1 keys when >= 0), scores
    # capped by softcap, a sink logit per head in the denominator; a row that
    # sees no key (nor a sink) gives 0. (SDPA's CPU kernel has no forward-mode
    # derivative, so jvp needs the math form.)
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    q_len, kv_len = q.shape[2], k.shape[2]
    sees = bottom_right_causal(q_len, kv_len)
    if window_left >= 0:
        sees &= torch.arange(kv_len)[None, :] >= torch.arange(q_len)[:, None] + (kv_len - q_len) - window_left
    scores = q @ k.transpose(-2, -1) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~sees, float("-inf"))
    if sinks is not None:  # every row has the sink: no empty row
        scores = torch.cat([scores, sinks.view(1, -1, 1, 1).expand(*scores.shape[:3], 1)], -1)
        return torch.softmax(scores, -1)[..., :kv_len] @ v
    empty = ~sees.any(-1, keepdim=True)
    return torch.where(empty, 0.0, torch.softmax(scores.masked_fill(empty, 0.0), -1)) @ v


def neox(x, cos, sin):  # x [1, seq, heads, dim], tables [seq, pairs]
    pairs = cos.shape[-1]
    c, s = cos[None, :, None], sin[None, :, None]
    x1, x2, rest = x[..., :pairs], x[..., pairs:2 * pairs], x[..., 2 * pairs:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], -1)


def gptj(x, cos, sin):
    pairs = cos.shape[-1]
    c, s = cos[None, :, None], sin[None, :, None]
    x1, x2 = x[..., 0:2 * pairs:2], x[..., 1:2 * pairs:2]
    rotated = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], -1).flatten(-2)
    return torch.cat([rotated, x[..., 2 * pairs:]], -1)


def as_rotary_input(x):  # [4, 16] -> [1, seq 4, heads 2, dim 8]
    return x.reshape(1, 4, 2, 8)


# name: (ours(x), PyTorch composite(x)) for x [4, 16] float64; scalar-valued
# losses are taken as out.square().sum() so that second derivatives are not 0.
CASES = {
    "rms_norm": (lambda x: ops.rms_norm(x, W, 1e-6), lambda x: F.rms_norm(x, (16,), W, 1e-6)),
    "fused_add_rms_norm": (lambda x: ops.fused_add_rms_norm(x, x.flip(0), W, 1e-6)[0] + x.sin(),
                           lambda x: F.rms_norm(x + x.flip(0), (16,), W, 1e-6) + x.sin()),
    "layer_norm": (lambda x: ops.layer_norm(x, W, B, 1e-5), lambda x: F.layer_norm(x, (16,), W, B, 1e-5)),
    "swiglu": (lambda x: ops.swiglu(x, x.flip(-1)), lambda x: F.silu(x) * x.flip(-1)),
    "geglu": (lambda x: ops.geglu(x, x.flip(-1), "tanh"), lambda x: F.gelu(x, approximate="tanh") * x.flip(-1)),
    "cross_entropy": (lambda x: ops.cross_entropy(x, TARGET, -100, 0.1, "mean")[0],
                      lambda x: F.cross_entropy(x, TARGET, label_smoothing=0.1)),
    "flash_attention": (lambda x: ops.flash_attention(*attention(x, True), True, 0.3)[0],
                        lambda x: attention_reference(*attention(x, True), scale=0.3)),
    # a window of 2 keys, softcap and sinks that depend on x (their gradient flows too)
    "flash_attention_options": (
        lambda x: ops.flash_attention(*attention(x, True), True, 0.3, 1, -1, 0.8, x[0, :2] * 2)[0],
        lambda x: attention_reference(*attention(x, True), scale=0.3, window_left=1, softcap=0.8, sinks=x[0, :2] * 2)),
    "rotary_embedding": (lambda x: ops.rotary_embedding(as_rotary_input(x), COS, SIN, False, 1),
                         lambda x: neox(as_rotary_input(x), COS, SIN)),
    "rotary_embedding_qk": (lambda x: ops.rotary_embedding_qk(as_rotary_input(x), as_rotary_input(x.flip(0)), COS,
                                                              SIN, True, 1)[1],
                            lambda x: gptj(as_rotary_input(x.flip(0)), COS, SIN)),
}


def x_input():
    return torch.randn(4, 16, generator=G, dtype=torch.float64)


def loss_of(f):
    return lambda x: f(x).square().sum()


@pytest.mark.parametrize("name", list(CASES))
def test_vmap_matches_the_pytorch_composite(name):
    ours, theirs = CASES[name]
    xs = torch.randn(3, 4, 16, generator=G, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's "no batching rule" performance warning
        torch.testing.assert_close(vmap(ours)(xs), vmap(theirs)(xs))


@pytest.mark.parametrize("name", list(CASES))
def test_grad_vjp_jacrev_jvp_match_the_composite(name):
    ours, theirs = CASES[name]
    x = x_input()
    torch.testing.assert_close(grad(loss_of(ours))(x), grad(loss_of(theirs))(x))
    out, pullback = vjp(ours, x)
    ref_out, ref_pullback = vjp(theirs, x)
    cotangent = torch.randn(out.shape, generator=G, dtype=torch.float64)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(pullback(cotangent), ref_pullback(cotangent))
    torch.testing.assert_close(jacrev(ours)(x), jacrev(theirs)(x))
    tangent = torch.randn(x.shape, generator=G, dtype=torch.float64)
    torch.testing.assert_close(jvp(ours, (x,), (tangent,)), jvp(theirs, (x,), (tangent,)))


@pytest.mark.parametrize("name", ["rms_norm", "layer_norm", "swiglu", "cross_entropy", "flash_attention",
                                  "flash_attention_options"])
def test_hessian_matches_the_composite(name):
    ours, theirs = CASES[name]
    x = x_input()[:2, :8].clone() if not name.startswith("flash_attention") else x_input()
    if name in ("rms_norm", "layer_norm"):
        ours, theirs = (lambda x: ops.rms_norm(x, None, 1e-6), lambda x: F.rms_norm(x, (8,), None, 1e-6)) \
            if name == "rms_norm" else (lambda x: ops.layer_norm(x, None, None, 1e-5),
                                        lambda x: F.layer_norm(x, (8,), None, None, 1e-5))
    elif name == "cross_entropy":
        ours = lambda x: ops.cross_entropy(x, TARGET[:2] % 8, -100, 0.0, "sum")[0]  # noqa: E731
        theirs = lambda x: F.cross_entropy(x, TARGET[:2] % 8, reduction="sum")  # noqa: E731
    torch.testing.assert_close(hessian(loss_of(ours))(x), hessian(loss_of(theirs))(x))


def test_grad_under_the_metal_emulator_runs_the_composite():
    # The transform never reaches a kernel: the same values with emulation on.
    ours, theirs = CASES["rms_norm"]
    x = x_input().float()
    f = lambda t: ops.rms_norm(t, W.float(), 1e-6).square().sum()  # noqa: E731
    with my_mps_ops.testing.metal_emulation():
        got = grad(f)(x)
    torch.testing.assert_close(got, grad(lambda t: F.rms_norm(t, (16,), W.float(), 1e-6).square().sum())(x))


def test_checks_still_name_the_op_under_grad():
    with pytest.raises(RuntimeError, match="my_mps_ops.rms_norm"):
        grad(lambda t: ops.rms_norm(t, torch.ones(3, dtype=torch.float64), 1e-6).sum())(x_input())
    with pytest.raises(RuntimeError, match="my_mps_ops.flash_attention"):
        grad(lambda t: ops.flash_attention(*(t.reshape(1, 1, 4, 16),) * 3, False, None)[0].sum())(x_input())


def test_plain_autograd_still_uses_the_fused_backward():
    # Outside torch.func the graph node is our autograd Function, not the composite's.
    x = x_input().requires_grad_()
    out = ops.rms_norm(x, W, 1e-6)
    assert "RMSNormFunction" in out.grad_fn.name()
