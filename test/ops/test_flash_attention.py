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


def visible_mask(q_len, kv_len, causal, window=(-1, -1)):
    """Boolean [L, S] mask of the keys each query sees: query i at a = i + S - L
    sees a - left .. a + right (-1 unbounded), causal capping right at 0."""
    left, right = window
    if causal:
        right = 0
    aligned = torch.arange(q_len)[:, None] + (kv_len - q_len)
    key = torch.arange(kv_len)[None, :]
    mask = torch.ones(q_len, kv_len, dtype=torch.bool)
    if left >= 0:
        mask &= key >= aligned - left
    if right >= 0:
        mask &= key <= aligned + right
    return mask


def masked_rows(q_len, kv_len, causal, window=(-1, -1)):
    """Query rows that see no key (causal with L > S, or a window past the keys)."""
    return ~visible_mask(q_len, kv_len, causal, window).any(-1)


def explicit_attention(q, k, v, causal, scale=None, window=(-1, -1), softcap=0.0, sinks=None):
    """(out, lse) of attention written out, differentiable, in the inputs' dtype:
    scores = scale q k^T, capped, masked, a sink column per head in the softmax
    denominator (no value); rows that see nothing give 0 and lse -inf (the sink)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = scale * q @ k.transpose(-1, -2)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible_mask(q.shape[2], k.shape[2], causal, window), -math.inf)
    if sinks is not None:
        scores = torch.cat([scores, sinks.view(1, -1, 1, 1).expand(*scores.shape[:3], 1)], -1)
    lse = torch.logsumexp(scores, -1)
    empty = lse.detach().isneginf()[..., None]
    probs = torch.softmax(scores.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    return probs[..., :k.shape[2]] @ v, lse


def reference(q, k, v, causal, scale=None, window=(-1, -1), softcap=0.0, sinks=None):
    """float64 attention with k/v heads repeated, the bottom-right mask (and
    window), softcap and sinks; rows that see no key are 0 (SDPA gives NaN there)."""
    sinks = None if sinks is None else sinks.detach().cpu().double()
    q64, k64, v64 = (t.detach().cpu().double() for t in (q, k, v))
    return explicit_attention(q64, k64, v64, causal, scale, window, softcap, sinks)[0]


def reference_lse(q, k, causal, scale=None, window=(-1, -1), softcap=0.0, sinks=None):
    sinks = None if sinks is None else sinks.detach().cpu().double()
    q64, k64 = q.detach().cpu().double(), k.detach().cpu().double()
    return explicit_attention(q64, k64, k64, causal, scale, window, softcap, sinks)[1]


def reference_grads(q, k, v, causal, grad_out, scale=None, window=(-1, -1), softcap=0.0, sinks=None):
    """Gradients of q, k, v (and sinks, when given) through the float64 reference
    (k/v heads summed over their group)."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    if sinks is not None:
        leaves.append(sinks.detach().cpu().double().requires_grad_())
    out = explicit_attention(*leaves[:3], causal, scale, window, softcap, leaves[3] if sinks is not None else None)[0]
    out.backward(grad_out.detach().cpu().double())
    return [t.grad for t in leaves]


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

def attn(batch, q_heads, kv_heads, q_len, kv_len, head_dim, causal, scale=None, seed=0, dtypes=(), also=(),
         window=(-1, -1), softcap=0.0, sinks=False):
    """A sample: q of (batch, q_heads, q_len, head_dim), k and v of (batch,
    kv_heads, kv_len, head_dim), sinks (q_heads,) when `sinks`; the gradient of
    the output is drawn with seed + 1."""
    return Sample((batch, q_heads, kv_heads, q_len, kv_len, head_dim, causal, scale, seed, window, softcap, sinks),
                  also, dtypes)


def sample_id(sample):
    batch, q_heads, kv_heads, q_len, kv_len, head_dim, causal, scale, _, window, softcap, sinks = sample.case
    return "b{}_h{}-{}_L{}_S{}_d{}_{}{}{}{}{}".format(
        batch, q_heads, kv_heads, q_len, kv_len, head_dim, "causal" if causal else "full",
        "" if scale is None else f"_scale{scale}", "" if window == (-1, -1) else "_win{}_{}".format(*window),
        f"_cap{softcap}" if softcap else "", "_sinks" if sinks else "")


def sample_inputs(sample, dtype, device, requires_grad=False):
    """flash_attention's arguments: (q, k, v, causal, scale, window_left,
    window_right, softcap, sinks)."""
    batch, q_heads, kv_heads, q_len, kv_len, head_dim, causal, scale, seed, window, softcap, sinks = sample.case
    q, k, v = inputs(batch, q_heads, kv_heads, q_len, kv_len, head_dim, dtype, device, requires_grad, seed)
    sink = None
    if sinks:  # logits around a row's log-sum-exp, so that the sink takes a real share
        gen = torch.Generator().manual_seed(seed + 2)
        sink = (torch.randn(q_heads, generator=gen, dtype=torch.float64) + math.log(kv_len + 1)).to(device, dtype)
        sink.requires_grad_(requires_grad)
    return q, k, v, causal, scale, window[0], window[1], softcap, sink


def options(args):
    """The reference functions' keyword arguments for flash_attention's arguments."""
    _, _, _, causal, scale, left, right, softcap, sinks = args
    return dict(causal=causal, scale=scale, window=(left, right), softcap=softcap, sinks=sinks)


def sample_grad_out(sample, out):
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(sample.case[8] + 1)).to(out)


def leaves_of(args):
    """q, k, v and sinks (when given): the tensors that get gradients."""
    return [t for t in (args[0], args[1], args[2], args[8]) if t is not None]


FLOAT64 = (torch.float64,)
# One list for the value and gradient tests (float64 against the explicit
# reference on the CPU kernels; float32, float16 and bfloat16 on every backend)
# and, where marked, gradcheck, opcheck and torch.compile (two lengths: one
# dynamic graph serves both).
SAMPLES = (
    # float64: every head dim, causal and not; GQA and MQA, L < S and L > S
    # (causal then leaves rows with no key).
    [attn(2, q_heads, kv_heads, q_len, kv_len, head_dim, causal, dtypes=FLOAT64)
     for q_heads, kv_heads, q_len, kv_len in [(2, 2, 37, 37), (4, 2, 33, 70), (4, 1, 70, 45), (3, 3, 64, 64)]
     for head_dim in HEAD_DIMS for causal in (False, True)]
    + [attn(1, 4, 2, 11, 13, 32, causal, dtypes=FLOAT64, also=(GRADCHECK,)) for causal in (False, True)]
    + [attn(1, 2, 1, 9, 5, 32, causal, scale=0.3, dtypes=FLOAT64, also=(GRADCHECK,)) for causal in (False, True)]
    + [attn(1, 2, 2, 20, 30, 32, causal, scale=0.05, dtypes=FLOAT64) for causal in (False, True)]
    # float64, each option alone: windows (sliding, two-sided, one-sided, wider
    # than the keys), softcap, sinks; key blocks are 64 on the CPU, so lengths
    # past 64 skip blocks.
    + [attn(2, 4, 2, q_len, kv_len, 64, causal, window=window, dtypes=FLOAT64)
       for q_len, kv_len in [(37, 37), (70, 150), (150, 70)]
       for causal, window in [(True, (6, -1)), (False, (5, 3)), (False, (-1, 4)), (False, (20, -1)),
                              (True, (200, 7)), (False, (0, 0))]]
    + [attn(2, 4, 2, 33, 70, head_dim, causal, scale=0.5, softcap=2.0, dtypes=FLOAT64)
       for head_dim in (64, 128) for causal in (False, True)]
    + [attn(2, 4, 1, q_len, kv_len, 64, causal, sinks=True, dtypes=FLOAT64)
       for q_len, kv_len in [(37, 37), (70, 45)] for causal in (False, True)]
    # float64, combined (window + causal + softcap + sinks + GQA) in every head
    # dim, odd lengths, L != S.
    + [attn(1, 6, 2, q_len, kv_len, head_dim, True, window=(10, -1), softcap=3.0, sinks=True, seed=5, dtypes=FLOAT64)
       for head_dim in HEAD_DIMS for q_len, kv_len in [(45, 77), (77, 45)]]
    # Rows that see no key: a (0, 0) window past the keys (L > S: rows 0..10),
    # with a sink (out 0, lse = sink, no NaN anywhere).
    + [attn(1, 2, 1, 20, 9, 32, False, window=(0, 0), sinks=sinks, dtypes=FLOAT64) for sinks in (False, True)]
    + [attn(1, 4, 2, 11, 13, 32, causal, window=window, softcap=1.5, sinks=True, scale=0.6, dtypes=FLOAT64,
            also=(GRADCHECK,))
       for causal, window in [(True, (3, -1)), (False, (2, 1))]]
    + [attn(1, 2, 1, 15, 6, 32, False, window=(1, 0), sinks=True, dtypes=FLOAT64, also=(GRADCHECK,))]
    # Emulator-sized cases (seq 64..256, head_dim 64 and 128, causal and not, GQA).
    + [attn(1, 2, 1, 64, 64, 64, True, dtypes=LOW_PRECISION),
       attn(1, 2, 2, 70, 130, 64, False, dtypes=LOW_PRECISION),
       attn(1, 4, 2, 130, 97, 128, True, dtypes=LOW_PRECISION),  # L > S: rows 0..32 see no key
       attn(1, 2, 1, 65, 100, 128, False, dtypes=LOW_PRECISION),
       attn(1, 4, 2, 256, 256, 128, True, dtypes=LOW_PRECISION)]  # the largest emulator size
    # Emulator-sized options: a sliding window that skips key blocks (the Metal
    # forward's blocks are 32 keys for head_dim <= 128), a two-sided window
    # with rows that see nothing, softcap, sinks, and all of them with GQA.
    + [attn(1, 2, 1, 70, 90, 64, True, window=(9, -1), dtypes=LOW_PRECISION),
       attn(1, 2, 2, 40, 23, 64, False, window=(2, 3), sinks=True, dtypes=LOW_PRECISION),
       attn(1, 2, 1, 33, 47, 64, False, scale=0.5, softcap=2.0, dtypes=LOW_PRECISION),
       attn(1, 4, 2, 45, 70, 128, True, window=(12, -1), softcap=5.0, sinks=True, dtypes=LOW_PRECISION)]
    # Small: one instantiation per head dim (the Metal tiles differ for 256),
    # plain and with every option.
    + [attn(2, 2, 1, *((27, 19) if causal else (19, 27)), head_dim, causal, seed=3, dtypes=(torch.float16,))
       for head_dim in HEAD_DIMS for causal in (False, True)]
    + [attn(1, 4, 2, 21, 35, head_dim, True, window=(7, -1), softcap=4.0, sinks=True, seed=4, dtypes=(torch.float16,))
       for head_dim in HEAD_DIMS]
    + [attn(2, 4, 2, 19, 23, 32, causal, dtypes=(torch.float32,), also=(OPCHECK,)) for causal in (False, True)]
    + [attn(2, 4, 2, 19, 23, 32, True, window=(4, -1), softcap=2.5, sinks=True, dtypes=(torch.float32,),
            also=(OPCHECK,))]
    + [attn(2, 4, 2, seq, seq, 32, True, dtypes=(torch.float32,), also=(COMPILE,)) for seq in (17, 40)]
    + [attn(2, 4, 2, seq, seq, 32, True, window=(5, -1), softcap=3.0, sinks=True, dtypes=(torch.float32,),
            also=(COMPILE,)) for seq in (17, 40)]
)
FLOAT64_SAMPLES = [s for s in SAMPLES if torch.float64 in s.dtypes]
BACKEND_SAMPLES = [pytest.param(s, dtype, id=f"{sample_id(s)}-{str(dtype)[6:]}")
                   for s in SAMPLES for dtype in s.dtypes if dtype != torch.float64]


@pytest.mark.parametrize("sample", FLOAT64_SAMPLES, ids=sample_id)
def test_forward_and_gradients_match_the_reference_float64(sample):
    args = sample_inputs(sample, torch.float64, "cpu", requires_grad=True)
    q, k, v = args[:3]
    out, lse = ops.flash_attention(*args)
    assert out.shape == q.shape and out.dtype == torch.float64 and out.is_contiguous()
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float64
    assert_close(out, reference(q, k, v, **options(args)), torch.float64)
    torch.testing.assert_close(lse, reference_lse(q, k, **options(args)), atol=1e-10, rtol=1e-10)
    grad_out = sample_grad_out(sample, out)
    out.backward(grad_out)
    leaves = leaves_of(args)
    expected = reference_grads(q, k, v, grad_out=grad_out, **options(args))
    assert len(expected) == len(leaves)
    for ours, ref in zip((t.grad for t in leaves), expected):
        assert torch.isfinite(ours).all()
        assert_close(ours, ref, torch.float64)


@pytest.mark.parametrize("sample", feeding(SAMPLES, GRADCHECK), ids=sample_id)
def test_gradcheck_float64(sample):
    args = sample_inputs(sample, torch.float64, "cpu", requires_grad=True)
    _, _, _, causal, scale, left, right, softcap, sinks = args
    leaves = leaves_of(args)

    def f(q, k, v, *rest):
        return my_mps_ops.flash_attention(q, k, v, causal, scale, window=(left, right), softcap=softcap,
                                          sinks=rest[0] if rest else None)

    assert torch.autograd.gradcheck(f, tuple(leaves))


def test_square_causal_equals_sdpa_is_causal():
    q, k, v = inputs(2, 2, 2, 50, 50, 64, torch.float64, "cpu")
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close(my_mps_ops.flash_attention(q, k, v, causal=True), expected, torch.float64)


@pytest.mark.parametrize("causal", [False, True])
def test_the_explicit_reference_is_sdpa(causal):
    """Without the options, the explicit float64 reference is SDPA with the
    bottom-right mask (its fully masked rows, NaN in SDPA, aside)."""
    q, k, v = inputs(1, 4, 2, 30, 21, 64, torch.float64, "cpu")
    group = 2
    sdpa = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                          attn_mask=lower_right_mask(30, 21) if causal else None)
    ours = reference(q, k, v, causal)
    keep = ~masked_rows(30, 21, causal)
    torch.testing.assert_close(ours[:, :, keep], sdpa[:, :, keep])
    assert torch.all(ours[:, :, ~keep] == 0)
    # A sliding window of w tokens is SDPA with the banded mask.
    band = lower_right_mask(30, 21) & ~lower_right_mask(30, 21).tril(21 - 30 - 5)
    sdpa_band = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                               attn_mask=band)
    keep = band.any(-1)
    torch.testing.assert_close(reference(q, k, v, True, window=(4, -1))[:, :, keep], sdpa_band[:, :, keep])


@pytest.mark.parametrize("sample,dtype", BACKEND_SAMPLES)
def test_forward_backward(backend, sample, dtype):
    args = sample_inputs(sample, dtype, backend.device, requires_grad=True)
    q, k, v = args[:3]
    out, lse = ops.flash_attention(*args)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.device == q.device
    assert_close(out, reference(q, k, v, **options(args)), dtype)
    expected_lse = reference_lse(q, k, **options(args))
    torch.testing.assert_close(lse.cpu().double(), expected_lse, atol=1e-4, rtol=1e-4)
    grad_out = sample_grad_out(sample, out)
    out.backward(grad_out)
    leaves = leaves_of(args)
    expected = reference_grads(q, k, v, grad_out=grad_out, **options(args))
    for name, ours, ref in zip(["q", "k", "v", "sinks"], (t.grad for t in leaves), expected):
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


@pytest.mark.parametrize("with_sinks", [False, True])
def test_rows_outside_the_window_are_zero(backend, with_sinks):
    """A window (0, 0) with L > S: rows 0..23 sit before the first key and see
    nothing. Their output is 0, lse -inf (the sink's logit with sinks), and no
    gradient is NaN; the sink of such a row takes the whole softmax and gets no
    gradient from it (its output is constant 0)."""
    q, k, v = inputs(1, 2, 1, 40, 16, 64, torch.float32, backend.device, requires_grad=True)
    sinks = torch.tensor([0.5, -1.0], device=backend.device, requires_grad=True) if with_sinks else None
    out, lse = ops.flash_attention(q, k, v, False, None, 0, 0, 0.0, sinks)
    assert torch.all(out[:, :, :24].cpu() == 0) and torch.isfinite(out).all()
    expected_lse = torch.tensor([0.5, -1.0])[:, None].expand(2, 24) if with_sinks else torch.full((2, 24), -math.inf)
    assert torch.equal(lse[0, :, :24].cpu(), expected_lse) and torch.isfinite(lse[:, :, 24:]).all()
    out.square().sum().backward()
    assert torch.all(q.grad[:, :, :24].cpu() == 0)
    grads = [q.grad, k.grad, v.grad] + ([sinks.grad] if with_sinks else [])
    assert all(torch.isfinite(g).all() for g in grads)
    expected = reference_grads(q, k, v, grad_out=2 * out.detach(), causal=False, window=(0, 0), sinks=sinks)
    for ours, ref in zip(grads, expected):
        assert_close(ours, ref, torch.float32, GRAD_FACTOR)


def test_key_blocks_outside_every_window_are_skipped(backend):
    """Keys no query sees are never read: NaN in them (whole key blocks on
    every path) leaves the outputs and every gradient finite, and their k/v
    gradients 0. A kernel that multiplied a masked block's V by zero
    probabilities would give NaN."""
    q, k, v = inputs(1, 2, 1, 64, 512, 64, torch.float32, backend.device)
    k[:, :, :384] = math.nan
    v[:, :, :384] = math.nan
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    sinks = torch.zeros(2, device=backend.device, requires_grad=True)
    # query i (at i + 448) sees keys i + 433 .. i + 448
    out = my_mps_ops.flash_attention(q, k, v, True, window=(15, -1), softcap=3.0, sinks=sinks)
    assert torch.isfinite(out).all()
    q_ref, k_ref, v_ref = (t.detach()[:, :, 384:] if t is not q else t.detach() for t in (q, k, v))
    expected = reference(q_ref, k_ref, v_ref, True, None, (15, -1), 3.0, sinks)
    assert_close(out, expected, torch.float32)
    out.sum().backward()
    assert all(torch.isfinite(g).all() for g in (q.grad, k.grad, v.grad, sinks.grad))
    assert torch.all(k.grad[:, :, :384].cpu() == 0) and torch.all(v.grad[:, :, :384].cpu() == 0)


def test_window_wider_than_the_sequences_is_no_window(backend):
    q, k, v = inputs(1, 2, 1, 30, 45, 64, torch.float32, backend.device)
    for causal in (False, True):
        plain = my_mps_ops.flash_attention(q, k, v, causal)
        for window in [(45, 30), (10**12, 10**12), (2**40, -1)]:
            torch.testing.assert_close(my_mps_ops.flash_attention(q, k, v, causal, window=window), plain)


def test_python_api_maps_its_options():
    q, k, v = inputs(1, 4, 2, 9, 12, 32, torch.float64, "cpu")
    sinks = torch.randn(4, dtype=torch.float64)
    out = my_mps_ops.flash_attention(q, k, v, True, 0.3, window=(2, 5), softcap=1.5, sinks=sinks)
    expected, _ = ops.flash_attention(q, k, v, True, 0.3, 2, 5, 1.5, sinks)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    # with causal the right bound is min(right, 0)
    torch.testing.assert_close(out, my_mps_ops.flash_attention(q, k, v, True, 0.3, window=(2, -1), softcap=1.5,
                                                               sinks=sinks), atol=0, rtol=0)
    # defaults: no window, no softcap, no sinks; old positional calls still work
    plain = my_mps_ops.flash_attention(q, k, v, True, 0.3, window=None, softcap=None, sinks=None)
    torch.testing.assert_close(plain, ops.flash_attention(q, k, v, True, 0.3)[0], atol=0, rtol=0)
    torch.testing.assert_close(plain, my_mps_ops.flash_attention(q, k, v, True, 0.3, window=(-1, -1), softcap=0.0))
    out, lse = ops.flash_attention(q, k, v, True, 0.3)
    grads = ops.flash_attention_backward(torch.ones_like(out), q, k, v, out, lse, True, 0.3)
    assert len(grads) == 4 and grads[3].shape == (0,)


def test_only_the_sinks_gradient():
    q, k, v = inputs(1, 4, 2, 9, 12, 32, torch.float64, "cpu")
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    out = my_mps_ops.flash_attention(q, k, v, True, window=(3, -1), softcap=2.0, sinks=sinks)
    out.backward(torch.ones_like(out))
    expected = reference_grads(q, k, v, grad_out=torch.ones_like(out), causal=True, window=(3, -1), softcap=2.0,
                               sinks=sinks)[3]
    assert_close(sinks.grad, expected, torch.float64)


def test_sinks_keep_their_dtype_and_autocast_leaves_them():
    q, k, v = inputs(1, 2, 1, 9, 12, 32, torch.float32, "cpu")
    sinks = torch.randn(2, dtype=torch.float32, requires_grad=True)
    out = my_mps_ops.flash_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), True, sinks=sinks)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert sinks.grad.dtype == torch.float32 and torch.isfinite(sinks.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_autocast = my_mps_ops.flash_attention(q, k, v, True, sinks=sinks)
    torch.testing.assert_close(out_autocast, out)


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
    # with sinks: lse is the sink's logit, and the sinks' gradient 0
    sinks = torch.linspace(-1, 1, q_heads, device=backend.device).requires_grad_()
    out, lse = ops.flash_attention(q, k, v, True, None, 3, -1, 2.0, sinks)
    assert torch.all(out.cpu() == 0)
    assert torch.equal(lse.cpu(), sinks.detach().cpu()[:, None].expand(lse.shape))
    out.sum().backward()
    assert sinks.grad.shape == sinks.shape and torch.all(sinks.grad.cpu() == 0)


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
    args = sample_inputs(sample, torch.float32, "cpu", requires_grad=True)
    q, k, v = args[:3]
    torch.library.opcheck(ops.flash_attention.default, args)
    torch.library.opcheck(ops.flash_attention.default, (q, k, v), {"causal": args[3], "scale": 0.2})
    detached = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    out, lse = ops.flash_attention(*detached)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(ops.flash_attention_backward.default, (grad_out, *detached[:3], out, lse, *detached[3:]))


def test_torch_compile_forward_backward():
    samples = [sample_inputs(s, torch.float32, "cpu", requires_grad=True) for s in feeding(SAMPLES, COMPILE)]

    def fn(q, k, v, causal, scale, left, right, softcap, sinks):
        return my_mps_ops.flash_attention(q, k, v, causal, scale, window=(left, right), softcap=softcap, sinks=sinks)

    plain = [args for args in samples if args[8] is None]
    with_options = [args for args in samples if args[8] is not None]
    assert plain and with_options
    for group in (plain, with_options):  # one dynamic graph per set of options
        assert_compiled_matches_eager(fn, group)


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
    with pytest.raises(RuntimeError, match="window_left and window_right must be >= 0, or -1"):
        my_mps_ops.flash_attention(q, k, v, window=(-2, 0))
    with pytest.raises(RuntimeError, match="window_left and window_right must be >= 0, or -1"):
        my_mps_ops.flash_attention(q, k, v, window=(0, -3))
    with pytest.raises(RuntimeError, match="softcap must be finite and >= 0"):
        my_mps_ops.flash_attention(q, k, v, softcap=-1.0)
    with pytest.raises(RuntimeError, match="softcap must be finite and >= 0"):
        my_mps_ops.flash_attention(q, k, v, softcap=math.inf)
    with pytest.raises(RuntimeError, match=r"sinks must have shape \(q heads,\)"):
        my_mps_ops.flash_attention(q, k, v, sinks=torch.zeros(2))
    with pytest.raises(RuntimeError, match=r"sinks must have shape \(q heads,\)"):
        my_mps_ops.flash_attention(q, k, v, sinks=torch.zeros(1, 4))
    with pytest.raises(RuntimeError, match="sinks must be float32, float16 or bfloat16"):
        my_mps_ops.flash_attention(q, k, v, sinks=torch.zeros(4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="sinks must be on the same device as q"):
        my_mps_ops.flash_attention(q, k, v, sinks=torch.zeros(4, device="meta"))
    out, lse = ops.flash_attention(q, k, v)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        ops.flash_attention_backward(out, q, k, v, out, lse[:, :, :4], False, None)
    with pytest.raises(RuntimeError, match="lse must be Float"):
        ops.flash_attention_backward(out, q, k, v, out, lse.double(), False, None)
    with pytest.raises(RuntimeError, match="grad_out must have the shape of q"):
        ops.flash_attention_backward(out[:, :, :4], q, k, v, out, lse, False, None)
