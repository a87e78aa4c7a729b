"""my_mps_ops.flash_attention: values and gradients against F.scaled_dot_product_attention,
grouped-query heads, bottom-right causal masks, registrations, compile, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import my_mps_ops
from support import COMPILE, GRADCHECK, OPCHECK, Sample, assert_compiled_matches_eager, feeding

ops = torch.ops.my_mps_ops
HEAD_DIMS = [32, 64, 80, 96, 128, 256]
LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)

# Output tolerance per dtype against a float64 reference computed from the same
# (rounded) inputs; gradients get GRAD_FACTOR times more (they sum over the
# sequence and pass through two more roundings of the inputs' products).
OUT_TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2.5e-2, rtol=2.5e-2),
}
GRAD_FACTOR = 5


def lower_right_mask(q_len, kv_len):
    """Boolean [L, S] mask, True where query i sees key j: j <= i + (S - L)."""
    return torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)


def masked_rows(q_len, kv_len, causal):
    """Query rows that see no key (causal with L > S)."""
    if not causal:
        return torch.zeros(q_len, dtype=torch.bool)
    return torch.arange(q_len) + (kv_len - q_len) < 0


def reference(q, k, v, causal, scale=None):
    """float64 F.scaled_dot_product_attention with k/v heads repeated and an explicit
    bottom-right mask; rows that see no key are 0 (SDPA gives NaN there)."""
    q64, k64, v64 = (t.detach().cpu().double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k64, v64 = k64.repeat_interleave(group, 1), v64.repeat_interleave(group, 1)
    q_len, kv_len = q.shape[2], k.shape[2]
    mask = lower_right_mask(q_len, kv_len) if causal else None
    out = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=mask, scale=scale)
    return out.masked_fill(masked_rows(q_len, kv_len, causal)[:, None], 0.0)


def reference_lse(q, k, causal, scale=None):
    q64, k64 = q.detach().cpu().double(), k.detach().cpu().double()
    k64 = k64.repeat_interleave(q.shape[1] // k.shape[1], 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = scale * q64 @ k64.transpose(-1, -2)
    if causal:
        scores = scores.masked_fill(~lower_right_mask(q.shape[2], k.shape[2]), -math.inf)
    return torch.logsumexp(scores, -1)


def reference_grads(q, k, v, causal, grad_out, scale=None):
    """Gradients of q, k, v through float64 SDPA (k/v heads summed over their group)."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    q64, k64, v64 = leaves
    group = q.shape[1] // k.shape[1]
    mask = lower_right_mask(q.shape[2], k.shape[2]) if causal else None
    out = F.scaled_dot_product_attention(q64, k64.repeat_interleave(group, 1), v64.repeat_interleave(group, 1),
                                         attn_mask=mask, scale=scale)
    keep = ~masked_rows(q.shape[2], k.shape[2], causal)[:, None]
    (out * keep).nan_to_num(0.0).backward(grad_out.detach().cpu().double())
    return [t.grad.nan_to_num(0.0) for t in leaves]


def inputs(batch, q_heads, kv_heads, q_len, kv_len, head_dim, dtype, device, requires_grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda heads, n: torch.randn(batch, heads, n, head_dim, generator=gen, dtype=torch.float64).to(
        device=device, dtype=dtype).requires_grad_(requires_grad)
    return make(q_heads, q_len), make(kv_heads, kv_len), make(kv_heads, kv_len)


def assert_close(actual, expected, dtype, factor=1):
    tol = {key: value * factor for key, value in OUT_TOL[dtype].items()}
    # Gradients are not O(1): scale the absolute tolerance by the reference's size.
    tol["atol"] *= max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.detach().cpu().double(), expected, **tol)


# ---------------------------------------------------------------- the sample inputs

def attn(batch, q_heads, kv_heads, q_len, kv_len, head_dim, causal, scale=None, seed=0, dtypes=(), also=()):
    """A sample: q of (batch, q_heads, q_len, head_dim), k and v of (batch,
    kv_heads, kv_len, head_dim); the gradient of the output is drawn with seed + 1."""
    return Sample((batch, q_heads, kv_heads, q_len, kv_len, head_dim, causal, scale, seed), also, dtypes)


def sample_id(sample):
    batch, q_heads, kv_heads, q_len, kv_len, head_dim, causal, scale, _ = sample.case
    return "b{}_h{}-{}_L{}_S{}_d{}_{}{}".format(batch, q_heads, kv_heads, q_len, kv_len, head_dim,
                                                "causal" if causal else "full",
                                                "" if scale is None else f"_scale{scale}")


def sample_inputs(sample, dtype, device, requires_grad=False):
    """(q, k, v, causal, scale): flash_attention's arguments."""
    batch, q_heads, kv_heads, q_len, kv_len, head_dim, causal, scale, seed = sample.case
    q, k, v = inputs(batch, q_heads, kv_heads, q_len, kv_len, head_dim, dtype, device, requires_grad, seed)
    return q, k, v, causal, scale


def sample_grad_out(sample, out):
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(sample.case[-1] + 1)).to(out)


FLOAT64 = (torch.float64,)
# One list for the value and gradient tests (float64 against SDPA on the CPU
# kernels; float32, float16 and bfloat16 on every backend) and, where marked,
# gradcheck, opcheck and torch.compile (two lengths: one dynamic graph serves
# both).
SAMPLES = (
    # float64: every head dim, causal and not; GQA and MQA, L < S and L > S
    # (causal then leaves rows with no key).
    [attn(2, q_heads, kv_heads, q_len, kv_len, head_dim, causal, dtypes=FLOAT64)
     for q_heads, kv_heads, q_len, kv_len in [(2, 2, 37, 37), (4, 2, 33, 70), (4, 1, 70, 45), (3, 3, 64, 64)]
     for head_dim in HEAD_DIMS for causal in (False, True)]
    + [attn(1, 4, 2, 11, 13, 32, causal, dtypes=FLOAT64, also=(GRADCHECK,)) for causal in (False, True)]
    + [attn(1, 2, 1, 9, 5, 32, causal, scale=0.3, dtypes=FLOAT64, also=(GRADCHECK,)) for causal in (False, True)]
    + [attn(1, 2, 2, 20, 30, 32, causal, scale=0.05, dtypes=FLOAT64) for causal in (False, True)]
    # Emulator-sized cases (seq 64..256, head_dim 64 and 128, causal and not, GQA).
    + [attn(1, 2, 1, 64, 64, 64, True, dtypes=LOW_PRECISION),
       attn(1, 2, 2, 70, 130, 64, False, dtypes=LOW_PRECISION),
       attn(1, 4, 2, 130, 97, 128, True, dtypes=LOW_PRECISION),  # L > S: rows 0..32 see no key
       attn(1, 2, 1, 65, 100, 128, False, dtypes=LOW_PRECISION),
       attn(1, 4, 2, 256, 256, 128, True, dtypes=LOW_PRECISION)]  # the largest emulator size
    # Small: one instantiation per head dim (the Metal tiles differ for 256).
    + [attn(2, 2, 1, *((27, 19) if causal else (19, 27)), head_dim, causal, seed=3, dtypes=(torch.float16,))
       for head_dim in HEAD_DIMS for causal in (False, True)]
    + [attn(2, 4, 2, 19, 23, 32, causal, dtypes=(torch.float32,), also=(OPCHECK,)) for causal in (False, True)]
    + [attn(2, 4, 2, seq, seq, 32, True, dtypes=(torch.float32,), also=(COMPILE,)) for seq in (17, 40)]
)
FLOAT64_SAMPLES = [s for s in SAMPLES if torch.float64 in s.dtypes]
BACKEND_SAMPLES = [pytest.param(s, dtype, id=f"{sample_id(s)}-{str(dtype)[6:]}")
                   for s in SAMPLES for dtype in s.dtypes if dtype != torch.float64]


@pytest.mark.parametrize("sample", FLOAT64_SAMPLES, ids=sample_id)
def test_forward_and_gradients_match_sdpa_float64(sample):
    q, k, v, causal, scale = sample_inputs(sample, torch.float64, "cpu", requires_grad=True)
    out, lse = ops.flash_attention(q, k, v, causal, scale)
    assert out.shape == q.shape and out.dtype == torch.float64 and out.is_contiguous()
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float64
    assert_close(out, reference(q, k, v, causal, scale), torch.float64)
    torch.testing.assert_close(lse, reference_lse(q, k, causal, scale), atol=1e-10, rtol=1e-10)
    grad_out = sample_grad_out(sample, out)
    out.backward(grad_out)
    for ours, expected in zip((q.grad, k.grad, v.grad), reference_grads(q, k, v, causal, grad_out, scale)):
        assert_close(ours, expected, torch.float64)


@pytest.mark.parametrize("sample", feeding(SAMPLES, GRADCHECK), ids=sample_id)
def test_gradcheck_float64(sample):
    q, k, v, causal, scale = sample_inputs(sample, torch.float64, "cpu", requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: my_mps_ops.flash_attention(a, b, c, causal, scale), (q, k, v))


def test_square_causal_equals_sdpa_is_causal():
    q, k, v = inputs(2, 2, 2, 50, 50, 64, torch.float64, "cpu")
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close(my_mps_ops.flash_attention(q, k, v, causal=True), expected, torch.float64)


@pytest.mark.parametrize("sample,dtype", BACKEND_SAMPLES)
def test_forward_backward(backend, sample, dtype):
    q, k, v, causal, scale = sample_inputs(sample, dtype, backend.device, requires_grad=True)
    out, lse = ops.flash_attention(q, k, v, causal, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.device == q.device
    assert_close(out, reference(q, k, v, causal, scale), dtype)
    expected_lse = reference_lse(q, k, causal, scale)
    torch.testing.assert_close(lse.cpu().double(), expected_lse, atol=1e-4, rtol=1e-4)
    grad_out = sample_grad_out(sample, out)
    out.backward(grad_out)
    expected = reference_grads(q, k, v, causal, grad_out, scale)
    for name, ours, ref in zip("qkv", (q.grad, k.grad, v.grad), expected):
        assert ours.dtype == dtype and ours.shape == ref.shape, name
        assert_close(ours, ref, dtype, GRAD_FACTOR)


def test_rows_without_keys_are_zero(backend):
    q, k, v = inputs(1, 2, 2, 40, 16, 64, torch.float32, backend.device, requires_grad=True)
    out, lse = ops.flash_attention(q, k, v, True)
    assert torch.all(out[:, :, :24].cpu() == 0) and torch.all(lse[:, :, :24].cpu() == -math.inf)
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 24:]).all()
    out.sum().backward()
    assert torch.all(q.grad[:, :, :24].cpu() == 0)
    assert all(torch.isfinite(g).all() for g in (q.grad, k.grad, v.grad))


def test_noncontiguous_inputs(backend):
    # (batch, seq, heads, head_dim) storage transposed to (batch, heads, seq, head_dim), with an offset.
    base = torch.randn(2, 41, 5, 64, device=backend.device)
    q = base[:, :, 1:5].transpose(1, 2)
    k = torch.randn(2, 30, 2, 64, device=backend.device).transpose(1, 2)
    v = torch.randn(2, 2, 64, 30, device=backend.device).transpose(2, 3)
    assert not q.is_contiguous() and q.storage_offset() > 0 and not v.is_contiguous()
    for causal in (False, True):
        assert_close(my_mps_ops.flash_attention(q, k, v, causal), reference(q, k, v, causal), torch.float32)


@pytest.mark.parametrize("sizes", [(0, 2, 1, 5, 7), (1, 2, 1, 0, 7), (1, 2, 1, 5, 0), (1, 0, 0, 3, 3)])
def test_zero_size(backend, sizes):
    batch, q_heads, kv_heads, q_len, kv_len = sizes
    q, k, v = inputs(batch, q_heads, kv_heads, q_len, kv_len, 32, torch.float32, backend.device, requires_grad=True)
    out, lse = ops.flash_attention(q, k, v, False)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert torch.all(out.cpu() == 0) and torch.all(lse.cpu() == -math.inf)
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and torch.all(t.grad.cpu() == 0)


def test_cpu_memory_is_linear_in_sequence_length():
    """Forward + backward at seq 2048 allocate far less than one [L, S] score matrix."""
    from torch.profiler import ProfilerActivity, profile

    seq, head_dim = 2048, 32
    q, k, v = inputs(1, 1, 1, seq, seq, head_dim, torch.float32, "cpu", requires_grad=True)
    grad_out = torch.randn(q.shape)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        my_mps_ops.flash_attention(q, k, v, causal=True).backward(grad_out)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    assert events, "the profiler recorded no allocation"
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    # out, delta and the three gradients are 256 KiB each (~1 MiB measured); the
    # composite attention's [L, S] float32 scores alone are 16 MiB (21 MiB peak).
    score_matrix_bytes = seq * seq * 4
    assert peak < score_matrix_bytes / 8, peak


def test_only_requested_gradients():
    q, k, v = inputs(1, 2, 1, 9, 12, 32, torch.float64, "cpu")
    k.requires_grad_()
    my_mps_ops.flash_attention(q, k, v, True).sum().backward()
    assert q.grad is None and v.grad is None
    expected = reference_grads(q, k, v, True, torch.ones(q.shape, dtype=torch.float64))[1]
    assert_close(k.grad, expected, torch.float64)


def test_double_backward_raises():
    q, k, v = inputs(1, 1, 1, 4, 4, 32, torch.float64, "cpu", requires_grad=True)
    (gq,) = torch.autograd.grad(my_mps_ops.flash_attention(q, k, v).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        gq.sum().backward()


@pytest.mark.parametrize("sample", feeding(SAMPLES, OPCHECK), ids=sample_id)
def test_opcheck(sample):
    q, k, v, causal, scale = sample_inputs(sample, torch.float32, "cpu", requires_grad=True)
    torch.library.opcheck(ops.flash_attention.default, (q, k, v, causal, scale))
    torch.library.opcheck(ops.flash_attention.default, (q, k, v), {"causal": causal, "scale": 0.2})
    out, lse = ops.flash_attention(q.detach(), k.detach(), v.detach(), causal, scale)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(ops.flash_attention_backward.default,
                          (grad_out, q.detach(), k.detach(), v.detach(), out, lse, causal, scale))


def test_torch_compile_forward_backward():
    samples = [sample_inputs(s, torch.float32, "cpu", requires_grad=True) for s in feeding(SAMPLES, COMPILE)]
    assert_compiled_matches_eager(lambda q, k, v, causal, scale: my_mps_ops.flash_attention(q, k, v, causal, scale),
                                  samples)


def test_torch_compile_attention_block():
    torch._dynamo.reset()

    class AttentionBlock(torch.nn.Module):
        def __init__(self, dim=128, heads=4, kv_heads=2):
            super().__init__()
            self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
            self.q_proj = torch.nn.Linear(dim, dim)
            self.kv_proj = torch.nn.Linear(dim, 2 * kv_heads * self.head_dim)
            self.out_proj = torch.nn.Linear(dim, dim)

        def forward(self, x):
            batch, seq, _ = x.shape
            q = self.q_proj(x).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
            k, v = self.kv_proj(x).view(batch, seq, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            attn = my_mps_ops.flash_attention(q, k, v, causal=True)
            return self.out_proj(attn.transpose(1, 2).reshape(batch, seq, -1))

    torch.manual_seed(0)
    eager = AttentionBlock()
    compiled_module = AttentionBlock()
    compiled_module.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_module, fullgraph=True, dynamic=True)
    for seq in (17, 40):  # two lengths: the dynamic graph must serve both
        x = torch.randn(2, seq, 128)
        out_e, out_c = eager(x), compiled(x)
        torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
        out_e.square().sum().backward()
        out_c.square().sum().backward()
        for pe, pc in zip(eager.parameters(), compiled_module.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, atol=1e-4, rtol=1e-4)
            pe.grad = pc.grad = None


def test_bad_inputs_raise_clear_errors():
    q, k, v = inputs(1, 4, 2, 8, 8, 64, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="k/v heads must divide the number of q heads"):
        my_mps_ops.flash_attention(q, torch.randn(1, 3, 8, 64), torch.randn(1, 3, 8, 64))
    with pytest.raises(RuntimeError, match="v must have as many heads as k"):
        my_mps_ops.flash_attention(q, k, torch.randn(1, 1, 8, 64))
    with pytest.raises(RuntimeError, match="head_dim 48 is not supported"):
        my_mps_ops.flash_attention(torch.randn(1, 1, 8, 48), torch.randn(1, 1, 8, 48), torch.randn(1, 1, 8, 48))
    with pytest.raises(RuntimeError, match="k head_dim must equal q head_dim"):
        my_mps_ops.flash_attention(q, torch.randn(1, 2, 8, 32), v)
    with pytest.raises(RuntimeError, match="k must have the same dtype as q"):
        my_mps_ops.flash_attention(q, k.half(), v)
    with pytest.raises(RuntimeError, match="v must have the same dtype as q"):
        my_mps_ops.flash_attention(q, k, v.bfloat16())
    with pytest.raises(RuntimeError, match="q must be float32, float16 or bfloat16"):
        my_mps_ops.flash_attention(q.int(), k.int(), v.int())
    with pytest.raises(RuntimeError, match="q must have 4 dimensions"):
        my_mps_ops.flash_attention(q[0], k, v)
    with pytest.raises(RuntimeError, match="same batch size"):
        my_mps_ops.flash_attention(q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1))
    with pytest.raises(RuntimeError, match="v must have the sequence length of k"):
        my_mps_ops.flash_attention(q, k, v[:, :, :5])
    with pytest.raises(RuntimeError, match="k must be on the same device as q"):
        my_mps_ops.flash_attention(q, k.to("meta"), v)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        my_mps_ops.flash_attention(q, k, v, scale=math.inf)
    out, lse = ops.flash_attention(q, k, v)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        ops.flash_attention_backward(out, q, k, v, out, lse[:, :, :4], False, None)
    with pytest.raises(RuntimeError, match="lse must be Float"):
        ops.flash_attention_backward(out, q, k, v, out, lse.double(), False, None)
    with pytest.raises(RuntimeError, match="grad_out must have the shape of q"):
        ops.flash_attention_backward(out[:, :, :4], q, k, v, out, lse, False, None)
