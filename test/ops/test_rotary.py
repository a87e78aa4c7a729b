"""my_mps_ops.rotary_embedding(_qk): NeoX and GPT-J styles, partial rotary,
both layouts, per-batch tables; gradients, registrations, compile, errors."""

import pytest
import torch

import my_mps_ops
from support import (COMPILE, GRADCHECK, OPCHECK, TOLERANCES, Sample, assert_close, assert_compiled_matches_eager,
                     assert_double_backward_raises, feeding, float64_leaves)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ops = torch.ops.my_mps_ops


def tables(seq, half, batch=None, device="cpu", dtype=torch.float32):
    inv = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float64) / half))
    pos = torch.arange(seq, dtype=torch.float64)
    ang = torch.outer(pos, inv)
    if batch is not None:  # per-batch positions (e.g. packed sequences)
        ang = torch.stack([ang + b * 0.37 for b in range(batch)])
    return ang.cos().to(dtype).to(device), ang.sin().to(dtype).to(device)


def reference(x, cos, sin, interleaved, seq_dim):
    """float64 composite on the cpu (differentiable): torch.cat / rotate_half style."""
    x = x.cpu().double()
    c, s = cos.cpu().double(), sin.cpu().double()
    if c.dim() == 2:
        c, s = c[None], s[None]
    # to [batch, seq, 1, half] or [batch, 1, seq, half]
    c, s = (c[:, :, None], s[:, :, None]) if seq_dim == 1 else (c[:, None], s[:, None])
    half = c.shape[-1]
    rot, rest = x[..., :2 * half], x[..., 2 * half:]
    if interleaved:
        x0, x1 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2)
    else:
        x0, x1 = rot[..., :half], rot[..., half:]
        out = torch.cat((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1)
    return torch.cat((out, rest), dim=-1)


def rope(interleaved, seq_dim, head_dim, half, per_batch=False, batch=2, seq=7, heads=3, also=()):
    """A sample: x of (batch, seq, heads, head_dim) (seq_dim 1) or (batch, heads,
    seq, head_dim) (seq_dim 2), rotating its first 2 * half features."""
    return Sample((interleaved, seq_dim, batch, seq, heads, head_dim, half, per_batch), also)


def sample_id(sample):
    interleaved, seq_dim, batch, seq, heads, head_dim, half, per_batch = sample.case
    return "{}_seqdim{}_b{}s{}h{}d{}_half{}{}".format("gptj" if interleaved else "neox", seq_dim, batch, seq, heads,
                                                      head_dim, half, "_per_batch" if per_batch else "")


# One list for the forward and backward tests (every backend and dtype) and,
# where marked, gradcheck, opcheck and torch.compile (two sequence lengths: one
# dynamic graph serves both). NeoX and GPT-J styles, both layouts, partial
# rotary, per-batch tables.
SAMPLES = [
    rope(False, 1, 64, 32), rope(True, 1, 64, 32), rope(False, 2, 64, 32), rope(True, 2, 48, 16),
    rope(False, 1, 80, 16, per_batch=True), rope(False, 2, 6, 1, per_batch=True),
    rope(True, 1, 8, 3, batch=1, seq=3, heads=2, also=(GRADCHECK,)),
    rope(False, 1, 8, 3, batch=1, seq=3, heads=2, also=(OPCHECK,)),
    rope(False, 1, 8, 4, seq=3, heads=2, also=(COMPILE,)),
    rope(False, 1, 8, 4, seq=6, heads=2, also=(COMPILE,)),
]


def sample_inputs(sample, dtype, device, requires_grad=False, table_dtype=torch.float32):
    """(x, cos, sin, interleaved, seq_dim): rotary_embedding's arguments."""
    interleaved, seq_dim, batch, seq, heads, head_dim, half, per_batch = sample.case
    shape = (batch, seq, heads, head_dim) if seq_dim == 1 else (batch, heads, seq, head_dim)
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=requires_grad)
    cos, sin = tables(seq, half, batch if per_batch else None, device, table_dtype)
    return x, cos, sin, interleaved, seq_dim


@pytest.mark.parametrize("sample", SAMPLES, ids=sample_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_backward(backend, dtype, sample):
    x, cos, sin, interleaved, seq_dim = sample_inputs(sample, dtype, backend.device, requires_grad=True)
    out = my_mps_ops.rotary_embedding(x, cos, sin, interleaved, seq_dim)
    assert_close(out, reference(x.detach(), cos, sin, interleaved, seq_dim), dtype)
    g = torch.randn(x.shape, dtype=dtype, device=backend.device)
    out.backward(g)
    (x64,) = float64_leaves(x)
    reference(x64, cos, sin, interleaved, seq_dim).backward(g.cpu().double())
    torch.testing.assert_close(x.grad.cpu().double(), x64.grad.cpu(), **TOLERANCES[dtype])


@pytest.mark.parametrize("sample", SAMPLES, ids=sample_id)
def test_float64_keeps_float64_tables(sample):
    # float64 x rotates by its float64 cos/sin (the CPU kernels used to round
    # them to float32: errors of ~1e-8).
    x, cos, sin, interleaved, seq_dim = sample_inputs(sample, torch.float64, "cpu", True, table_dtype=torch.float64)
    out = my_mps_ops.rotary_embedding(x, cos, sin, interleaved, seq_dim)
    torch.testing.assert_close(out, reference(x.detach(), cos, sin, interleaved, seq_dim), atol=1e-12, rtol=1e-12)
    g = torch.randn_like(x)
    out.backward(g)
    (x64,) = float64_leaves(x)
    reference(x64, cos, sin, interleaved, seq_dim).backward(g)
    torch.testing.assert_close(x.grad, x64.grad, atol=1e-12, rtol=1e-12)
    qo, ko = my_mps_ops.rotary_embedding_qk(x.detach(), x.detach(), cos, sin, interleaved, seq_dim)
    torch.testing.assert_close(qo, out.detach(), atol=0, rtol=0)
    torch.testing.assert_close(ko, out.detach(), atol=0, rtol=0)


@pytest.mark.parametrize("sample", feeding(SAMPLES, GRADCHECK), ids=sample_id)
def test_gradcheck_float64(sample):
    x, cos, sin, interleaved, seq_dim = sample_inputs(sample, torch.float64, "cpu", requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: my_mps_ops.rotary_embedding(a, cos, sin, interleaved, seq_dim), (x,))


@pytest.mark.parametrize("sample", feeding(SAMPLES, OPCHECK), ids=sample_id)
def test_opcheck(sample):
    xf, cos, sin, interleaved, seq_dim = sample_inputs(sample, torch.float32, "cpu", requires_grad=True)
    torch.library.opcheck(ops.rotary_embedding.default, (xf, cos, sin, interleaved, seq_dim))
    # The backward ops in the other style.
    torch.library.opcheck(ops.rotary_embedding_backward.default, (xf.detach(), cos, sin, not interleaved, seq_dim))
    k = torch.randn(xf.shape[0], xf.shape[1], 1, xf.shape[3], requires_grad=True)  # one k head
    torch.library.opcheck(ops.rotary_embedding_qk.default, (xf, k, cos, sin, interleaved, seq_dim))
    torch.library.opcheck(ops.rotary_embedding_qk_backward.default,
                          (xf.detach(), k.detach(), cos, sin, not interleaved, seq_dim))


def test_torch_compile_forward_backward():
    samples = [sample_inputs(s, torch.float32, "cpu", requires_grad=True)[:3] for s in feeding(SAMPLES, COMPILE)]
    assert_compiled_matches_eager(lambda a, c, s: my_mps_ops.rotary_embedding(a, c, s).square(), samples)


@pytest.mark.parametrize("interleaved", [False, True])
def test_qk_in_one_launch_with_fewer_k_heads(backend, interleaved):
    q = torch.randn(2, 5, 4, 32, device=backend.device, requires_grad=True)
    k = torch.randn(2, 5, 2, 32, device=backend.device, requires_grad=True)
    cos, sin = tables(5, 16, device=backend.device)
    qo, ko = my_mps_ops.rotary_embedding_qk(q, k, cos, sin, interleaved)
    assert_close(qo, reference(q.detach(), cos, sin, interleaved, 1))
    assert_close(ko, reference(k.detach(), cos, sin, interleaved, 1))
    (qo.sum() * 2 + ko.square().sum()).backward()
    q64, k64 = float64_leaves(q, k)
    (reference(q64, cos, sin, interleaved, 1).sum() * 2 + reference(k64, cos, sin, interleaved, 1).square().sum()).backward()
    torch.testing.assert_close(q.grad.cpu().double(), q64.grad.cpu(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(k.grad.cpu().double(), k64.grad.cpu(), atol=1e-4, rtol=1e-4)
    # Only k used: q's gradient stays None.
    q.grad = k.grad = None
    my_mps_ops.rotary_embedding_qk(q, k, cos, sin, interleaved)[1].sum().backward()
    assert q.grad is None and k.grad is not None


def test_double_backward_raises_naming_the_op(backend):
    x = torch.randn(2, 5, 3, 16, device=backend.device, requires_grad=True)
    cos, sin = tables(5, 8, device=backend.device)
    assert_double_backward_raises(lambda a: my_mps_ops.rotary_embedding(a, cos, sin), (x,),
                                  "my_mps_ops.rotary_embedding")


def test_noncontiguous_and_zero_size(backend):
    x = torch.randn(2, 3, 5, 16, device=backend.device).transpose(1, 2)  # (2, 5, 3, 16), not contiguous
    cos, sin = tables(5, 8, device=backend.device)
    assert_close(my_mps_ops.rotary_embedding(x, cos, sin), reference(x, cos, sin, False, 1))
    e = torch.randn(0, 5, 3, 16, device=backend.device)
    assert my_mps_ops.rotary_embedding(e, cos, sin).shape == e.shape


def test_bad_inputs():
    x = torch.randn(2, 5, 3, 16)
    cos, sin = tables(5, 8)
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        my_mps_ops.rotary_embedding(x[0], cos, sin)
    with pytest.raises(RuntimeError, match="rotary dim .* exceeds head_dim"):
        my_mps_ops.rotary_embedding(x, *tables(5, 9))
    with pytest.raises(RuntimeError, match=r"cos must be \[seq, rotary_dim / 2\]"):
        my_mps_ops.rotary_embedding(x, *tables(4, 8))
    with pytest.raises(RuntimeError, match="seq_dim must be 1"):
        my_mps_ops.rotary_embedding(x, cos, sin, False, 3)
    with pytest.raises(RuntimeError, match="cos and sin receive no gradient"):
        my_mps_ops.rotary_embedding(x, cos.requires_grad_(), sin)
    with pytest.raises(RuntimeError, match="k must match q"):
        my_mps_ops.rotary_embedding_qk(x, torch.randn(2, 5, 3, 8), *tables(5, 4))


def test_rotary_module_matches_reference():
    rope = my_mps_ops.nn.RotaryEmbedding(16, max_seq_len=32)
    q, k = torch.randn(2, 9, 4, 24), torch.randn(2, 9, 2, 24)
    qo, ko = rope(q, k, offset=3)
    cos, sin = rope.cos[3:12], rope.sin[3:12]
    torch.testing.assert_close(qo.double(), reference(q, cos, sin, False, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ko.double(), reference(k, cos, sin, False, 1), atol=1e-5, rtol=1e-5)
    assert list(rope.state_dict()) == []


def test_rotary_module_grows_past_max_seq_len():
    # Positions past max_seq_len used to reach the op as a short table (an
    # error about cos's shape); the tables now grow, keeping the rows there are.
    small, large = my_mps_ops.nn.RotaryEmbedding(16, max_seq_len=8), my_mps_ops.nn.RotaryEmbedding(16, max_seq_len=64)
    first_rows = small.cos.clone()
    q, k = torch.randn(2, 6, 4, 24), torch.randn(2, 6, 2, 24)
    for offset in (5, 30):  # past the table; then past the grown one
        for ours, theirs in zip(small(q, k, offset=offset), large(q, k, offset=offset)):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    assert small.max_seq_len == 36 and torch.equal(small.cos[:8], first_rows)
    torch.testing.assert_close(small.cos, large.cos[:36], atol=1e-6, rtol=1e-6)
    assert list(small.state_dict()) == []
    with pytest.raises(ValueError, match="offset must be >= 0, got -1"):
        small(q, k, offset=-1)


def test_rotary_module_past_max_seq_len_under_compile_names_it():
    torch._dynamo.reset()
    rope = my_mps_ops.nn.RotaryEmbedding(16, max_seq_len=8)
    compiled = torch.compile(rope, fullgraph=True)
    q, k = torch.randn(1, 6, 2, 16), torch.randn(1, 6, 2, 16)
    torch.testing.assert_close(compiled(q, k, 2)[0], rope(q, k, 2)[0])
    with pytest.raises(Exception, match=r"offset \+ seq = 11 exceed max_seq_len = 8"):
        compiled(q, k, 5)
