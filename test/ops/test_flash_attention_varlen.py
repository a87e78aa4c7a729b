"""my_mps_ops.flash_attention_varlen: packed sequences of different lengths.
Values and gradients against the float64 reference of each sequence alone, equality
with the dense op run per sequence, registrations, compile, errors."""

import math

import pytest
import torch

import my_mps_ops
from support import COMPILE, GRADCHECK, OPCHECK, Sample, assert_compiled_matches_eager, feeding
from test_flash_attention import GRAD_FACTOR, OUT_TOL, explicit_attention

ops = torch.ops.my_mps_ops
LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)
FLOAT64 = (torch.float64,)


def assert_close(actual, expected, dtype, factor=1):
    tol = {key: value * factor for key, value in OUT_TOL[dtype].items()}
    tol["atol"] *= max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().cpu().double(), expected, **tol)


# ---------------------------------------------------------------- the sample inputs

def varlen(q_lens, kv_lens, q_heads, kv_heads, head_dim, causal, scale=None, seed=0, dtypes=(), also=(),
           window=(-1, -1), softcap=0.0, sinks=False):
    """A sample: sequences of q lengths q_lens and k/v lengths kv_lens, packed."""
    return Sample((tuple(q_lens), tuple(kv_lens), q_heads, kv_heads, head_dim, causal, scale, seed, window, softcap,
                   sinks), also, dtypes)


def sample_id(sample):
    q_lens, kv_lens, q_heads, kv_heads, head_dim, causal, scale, _, window, softcap, sinks = sample.case
    return "L{}_S{}_h{}-{}_d{}_{}{}{}{}{}".format(
        "-".join(map(str, q_lens)), "-".join(map(str, kv_lens)), q_heads, kv_heads, head_dim,
        "causal" if causal else "full", "" if scale is None else f"_scale{scale}",
        "" if window == (-1, -1) else "_win{}_{}".format(*window), f"_cap{softcap}" if softcap else "",
        "_sinks" if sinks else "")


def cu_of(lengths, device):
    return torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)


def sample_inputs(sample, dtype, device, requires_grad=False):
    """flash_attention_varlen's arguments: (q, k, v, cu_seqlens_q, cu_seqlens_k,
    max_seqlen_q, max_seqlen_k, causal, scale, window_left, window_right, softcap, sinks)."""
    q_lens, kv_lens, q_heads, kv_heads, head_dim, causal, scale, seed, window, softcap, sinks = sample.case
    gen = torch.Generator().manual_seed(seed)
    make = lambda total, heads: torch.randn(total, heads, head_dim, generator=gen, dtype=torch.float64).to(
        device=device, dtype=dtype).requires_grad_(requires_grad)
    q, k, v = make(sum(q_lens), q_heads), make(sum(kv_lens), kv_heads), make(sum(kv_lens), kv_heads)
    sink = None
    if sinks:
        sink = (torch.randn(q_heads, generator=gen, dtype=torch.float64) + 2.0).to(device, dtype)
        sink.requires_grad_(requires_grad)
    return (q, k, v, cu_of(q_lens, device), cu_of(kv_lens, device), max(q_lens, default=0),
            max(kv_lens, default=0), causal, scale, window[0], window[1], softcap, sink)


def sequences(args):
    """Per sequence: (q, k, v) as dense (1, heads, len, head_dim) views of the packed tensors."""
    q, k, v, cu_q, cu_k = args[:5]
    cu_q, cu_k = cu_q.tolist(), cu_k.tolist()
    dense = lambda t, a, b: t[a:b].transpose(0, 1).unsqueeze(0)
    return [(dense(q, cu_q[b], cu_q[b + 1]), dense(k, cu_k[b], cu_k[b + 1]), dense(v, cu_k[b], cu_k[b + 1]))
            for b in range(len(cu_q) - 1)]


def dense_options(args):
    """flash_attention's option arguments (causal .. sinks) for varlen's arguments."""
    return args[7:]


def reference(args):
    """(out, lse) in float64, each sequence alone through the explicit reference:
    out (total_q, heads, head_dim), lse (heads, total_q)."""
    causal, scale, left, right, softcap, sinks = dense_options(args)
    sinks = None if sinks is None else sinks.detach().cpu().double()
    outs, lses = [], []
    for q, k, v in sequences(args):
        q, k, v = (t.detach().cpu().double() for t in (q, k, v))
        out, lse = explicit_attention(q, k, v, causal, scale, (left, right), softcap, sinks)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)


def reference_grads(args, grad_out):
    """float64 gradients of q, k, v (and sinks) through the per-sequence reference."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in args[:3]]
    sinks = args[12]
    sink_leaf = None if sinks is None else sinks.detach().cpu().double().requires_grad_()
    ref_args = (*leaves, args[3].cpu(), args[4].cpu(), *args[5:12], sink_leaf)
    causal, scale, left, right, softcap, _ = dense_options(ref_args)
    outs = [explicit_attention(q, k, v, causal, scale, (left, right), softcap, sink_leaf)[0][0].transpose(0, 1)
            for q, k, v in sequences(ref_args)]
    torch.cat(outs, 0).backward(grad_out.detach().cpu().double())
    return [t.grad for t in leaves] + ([] if sink_leaf is None else [sink_leaf.grad])


def leaves_of(args):
    return [t for t in (args[0], args[1], args[2], args[12]) if t is not None]


def sample_grad_out(sample, out):
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(sample.case[7] + 1)).to(out)


# Lengths: several sequences, some of length 0 and 1, q lengths != k lengths
# (both ways: causal then leaves rows with no key), longer than the CPU's
# 32-query / 64-key blocks and the Metal's 32-row blocks.
MIXED = ((5, 0, 1, 70, 33), (9, 3, 1, 40, 0))
SAMPLES = (
    [varlen(q_lens, kv_lens, q_heads, kv_heads, head_dim, causal, dtypes=FLOAT64)
     for q_lens, kv_lens in [MIXED, ((37, 37, 37), (37, 37, 37)), ((1,), (1,))]
     for q_heads, kv_heads, head_dim in [(4, 2, 32), (3, 3, 64), (4, 1, 128)]
     for causal in (False, True)]
    + [varlen(*MIXED, 4, 2, 64, causal, window=window, dtypes=FLOAT64)
       for causal, window in [(True, (6, -1)), (False, (5, 3)), (False, (0, 0)), (True, (200, 7))]]
    + [varlen(*MIXED, 4, 2, 64, causal, scale=0.5, softcap=2.0, dtypes=FLOAT64) for causal in (False, True)]
    + [varlen(*MIXED, 4, 1, 64, causal, sinks=True, dtypes=FLOAT64) for causal in (False, True)]
    + [varlen((12, 0, 20, 7), (30, 4, 9, 0), 6, 2, 80, True, window=(10, -1), softcap=3.0, sinks=True, seed=5,
              dtypes=FLOAT64)]
    + [varlen(*MIXED, 4, 2, 96, causal, dtypes=FLOAT64) for causal in (False, True)]
    + [varlen((3, 1, 6), (5, 2, 4), 4, 2, 32, causal, window=(2, 1), softcap=1.5, sinks=True, scale=0.6,
              dtypes=FLOAT64, also=(GRADCHECK,)) for causal in (False, True)]
    # Emulator-sized: one mixed batch plain and with every option, one head dim
    # with the smaller Metal tiles (256).
    + [varlen((5, 0, 1, 40, 33), (9, 3, 1, 40, 0), 4, 2, 64, causal, dtypes=LOW_PRECISION)
       for causal in (False, True)]
    + [varlen((5, 0, 1, 40, 33), (9, 3, 1, 40, 0), 4, 2, 64, True, window=(7, -1), softcap=4.0, sinks=True,
              dtypes=LOW_PRECISION)]
    + [varlen((3, 20), (20, 3), 2, 1, 256, True, seed=3, dtypes=(torch.float16,))]
    + [varlen((7, 0, 19), (11, 5, 19), 4, 2, 32, causal, dtypes=(torch.float32,), also=(OPCHECK,))
       for causal in (False, True)]
    + [varlen((7, 0, 19), (11, 5, 19), 4, 2, 32, True, window=(4, -1), softcap=2.5, sinks=True,
              dtypes=(torch.float32,), also=(OPCHECK,))]
    + [varlen(q_lens, q_lens, 4, 2, 32, True, dtypes=(torch.float32,), also=(COMPILE,))
       for q_lens in [(17, 5), (40, 3, 9)]]
    + [varlen(q_lens, q_lens, 4, 2, 32, True, window=(5, -1), softcap=3.0, sinks=True, dtypes=(torch.float32,),
              also=(COMPILE,)) for q_lens in [(17, 5), (40, 3, 9)]]
)
FLOAT64_SAMPLES = [s for s in SAMPLES if torch.float64 in s.dtypes]
BACKEND_SAMPLES = [pytest.param(s, dtype, id=f"{sample_id(s)}-{str(dtype)[6:]}")
                   for s in SAMPLES for dtype in s.dtypes if dtype != torch.float64]


def check_against_reference(sample, dtype, device, factor=1):
    args = sample_inputs(sample, dtype, device, requires_grad=True)
    q = args[0]
    out, lse = ops.flash_attention_varlen(*args)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (q.shape[1], q.shape[0])
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected_out, expected_lse = reference(args)
    assert_close(out, expected_out, dtype)
    lse_tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(lse.cpu().double(), expected_lse, atol=lse_tol, rtol=lse_tol)
    grad_out = sample_grad_out(sample, out)
    out.backward(grad_out)
    leaves = leaves_of(args)
    expected = reference_grads(args, grad_out)
    assert len(expected) == len(leaves)
    for name, t, ref in zip(["q", "k", "v", "sinks"], leaves, expected):
        assert t.grad.dtype == dtype and t.grad.shape == ref.shape, name
        assert torch.isfinite(t.grad).all(), name
        assert_close(t.grad, ref, dtype, factor)


@pytest.mark.parametrize("sample", FLOAT64_SAMPLES, ids=sample_id)
def test_forward_and_gradients_match_the_reference_float64(sample):
    check_against_reference(sample, torch.float64, "cpu")


@pytest.mark.parametrize("sample,dtype", BACKEND_SAMPLES)
def test_forward_backward(backend, sample, dtype):
    check_against_reference(sample, dtype, backend.device, GRAD_FACTOR)


@pytest.mark.parametrize("sample", FLOAT64_SAMPLES[::4], ids=sample_id)
def test_equals_the_dense_op_per_sequence(sample):
    """Bit for bit in float64 on the CPU kernels: each sequence is the dense op's
    problem at an offset (same blocks, same order of sums)."""
    args = sample_inputs(sample, torch.float64, "cpu", requires_grad=True)
    out, lse = ops.flash_attention_varlen(*args)
    grad_out = sample_grad_out(sample, out)
    out.backward(grad_out)
    cu_q = args[3].tolist()
    leaves = leaves_of(args)
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    dense_grads = [torch.zeros_like(t) for t in leaves]
    for b, (q, k, v) in enumerate(sequences(args)):
        d_out, d_lse = ops.flash_attention(q, k, v, *dense_options(args))
        rows = slice(cu_q[b], cu_q[b + 1])
        assert torch.equal(out[rows].detach(), d_out[0].transpose(0, 1).detach())
        assert torch.equal(lse[:, rows], d_lse[0])
        d_out.backward(grad_out[rows].transpose(0, 1).unsqueeze(0))
    for ours, t in zip(grads, leaves):
        torch.testing.assert_close(ours, t.grad, atol=1e-12, rtol=1e-12)


def test_equals_the_dense_op_on_the_emulator():
    """The Metal kernels read each sequence at its offsets: the same results as
    the dense Metal launch of each sequence alone."""
    from my_mps_ops.testing import metal_emulation

    sample = varlen((5, 0, 33), (9, 3, 40), 4, 2, 64, True, window=(7, -1), sinks=True)
    args = sample_inputs(sample, torch.float32, "cpu", requires_grad=True)
    with metal_emulation():
        out, lse = ops.flash_attention_varlen(*args)
        cu_q = args[3].tolist()
        for b, (q, k, v) in enumerate(sequences(args)):
            d_out, d_lse = ops.flash_attention(q, k, v, *dense_options(args))
            rows = slice(cu_q[b], cu_q[b + 1])
            torch.testing.assert_close(out[rows], d_out[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(lse[:, rows], d_lse[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("sample", feeding(SAMPLES, GRADCHECK), ids=sample_id)
def test_gradcheck_float64(sample):
    args = sample_inputs(sample, torch.float64, "cpu", requires_grad=True)
    rest = args[3:12]

    def f(q, k, v, sinks):
        return ops.flash_attention_varlen(q, k, v, *rest, sinks)[0]

    assert torch.autograd.gradcheck(f, tuple(leaves_of(args)))


def test_dense_batch_is_the_equal_length_case():
    q, k, v = (torch.randn(3, 4, 20, 32, dtype=torch.float64) for _ in range(3))
    dense, dense_lse = ops.flash_attention(q, k, v, True)
    packed = lambda t: t.transpose(1, 2).reshape(-1, 4, 32)
    cu = torch.arange(0, 61, 20, dtype=torch.int32)
    out, lse = ops.flash_attention_varlen(packed(q), packed(k), packed(v), cu, cu, 20, 20, True)
    assert torch.equal(out, packed(dense))
    assert torch.equal(lse, dense_lse.transpose(0, 1).reshape(4, -1))


def test_python_api():
    args = sample_inputs(varlen((3, 5), (4, 6), 4, 2, 32, True), torch.float64, "cpu")
    sinks = torch.randn(4, dtype=torch.float64)
    out, lse = my_mps_ops.flash_attention_varlen(*args[:7], True, 0.3, window=(2, -1), softcap=1.5, sinks=sinks,
                                                 return_lse=True)
    expected = ops.flash_attention_varlen(*args[:7], True, 0.3, 2, -1, 1.5, sinks)
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])
    plain = my_mps_ops.flash_attention_varlen(*args[:7])
    assert torch.equal(plain, ops.flash_attention_varlen(*args[:7])[0])


def test_max_seqlen_may_exceed_the_longest_sequence(backend):
    args = list(sample_inputs(varlen((5, 9), (7, 3), 2, 1, 64, True), torch.float32, backend.device))
    out = ops.flash_attention_varlen(*args)[0]
    args[5], args[6] = 100, 70
    torch.testing.assert_close(ops.flash_attention_varlen(*args)[0], out, atol=0, rtol=0)


@pytest.mark.parametrize("lengths", [((), ()), ((0, 0), (3, 2)), ((2, 3), (0, 0))])
def test_empty_sides(backend, lengths):
    """No sequence, no query, or no key at all: zeros, lse -inf (the sinks'
    logits), zero gradients, no launch past an empty buffer."""
    q_lens, kv_lens = lengths
    args = sample_inputs(varlen(q_lens, kv_lens, 2, 1, 32, True, sinks=True), torch.float32, backend.device,
                         requires_grad=True)
    out, lse = ops.flash_attention_varlen(*args)
    assert out.shape == args[0].shape and torch.all(out.cpu() == 0)
    assert torch.equal(lse.cpu(), args[12].detach().cpu()[:, None].expand(lse.shape))
    out.sum().backward()
    for t in leaves_of(args):
        assert t.grad.shape == t.shape and torch.all(t.grad.cpu() == 0)


def test_only_requested_gradients():
    args = sample_inputs(varlen((3, 5), (4, 6), 2, 1, 32, True), torch.float64, "cpu")
    k = args[1].requires_grad_()
    ops.flash_attention_varlen(*args)[0].sum().backward()
    assert args[0].grad is None and args[2].grad is None
    expected = reference_grads(args, torch.ones(args[0].shape, dtype=torch.float64))[1]
    assert_close(k.grad, expected, torch.float64)


def test_double_backward_raises():
    args = sample_inputs(varlen((3, 5), (4, 6), 2, 1, 32, True), torch.float64, "cpu", requires_grad=True)
    (gq,) = torch.autograd.grad(ops.flash_attention_varlen(*args)[0].sum(), args[0], create_graph=True)
    with pytest.raises(RuntimeError):
        gq.sum().backward()


def test_torch_func_grad_runs_the_composite():
    """Under torch.func.grad the op runs the dense composite per sequence: the
    same gradient as autograd through the kernels."""
    args = sample_inputs(varlen((3, 0, 5), (4, 2, 6), 4, 2, 32, True, window=(2, -1), softcap=2.0, sinks=True),
                         torch.float64, "cpu")
    rest = args[1:]
    g = torch.func.grad(lambda q: ops.flash_attention_varlen(q, *rest)[0].square().sum())(args[0])
    q = args[0].clone().requires_grad_()
    ops.flash_attention_varlen(q, *rest)[0].square().sum().backward()
    torch.testing.assert_close(g, q.grad, atol=1e-10, rtol=1e-10)


def test_autocast_runs_in_the_lower_precision():
    args = sample_inputs(varlen((3, 5), (4, 6), 2, 1, 32, True), torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.flash_attention_varlen(*args)[0]
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("sample", feeding(SAMPLES, OPCHECK), ids=sample_id)
def test_opcheck(sample):
    args = sample_inputs(sample, torch.float32, "cpu", requires_grad=True)
    torch.library.opcheck(ops.flash_attention_varlen.default, args)
    detached = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    out, lse = ops.flash_attention_varlen(*detached)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(ops.flash_attention_varlen_backward.default,
                          (grad_out, *detached[:3], out, lse, *detached[3:]))


def test_torch_compile_forward_backward():
    samples = [sample_inputs(s, torch.float32, "cpu", requires_grad=True) for s in feeding(SAMPLES, COMPILE)]

    def fn(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, left, right, softcap, sinks):
        return my_mps_ops.flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale,
                                                 window=(left, right), softcap=softcap, sinks=sinks)

    plain = [args for args in samples if args[12] is None]
    with_options = [args for args in samples if args[12] is not None]
    assert plain and with_options
    for group in (plain, with_options):
        assert_compiled_matches_eager(fn, group)


def test_bad_inputs_raise_clear_errors():
    q, k, v = torch.randn(8, 4, 64), torch.randn(10, 2, 64), torch.randn(10, 2, 64)
    cu_q, cu_k = torch.tensor([0, 3, 8], dtype=torch.int32), torch.tensor([0, 4, 10], dtype=torch.int32)
    f = ops.flash_attention_varlen
    with pytest.raises(RuntimeError, match="cu_seqlens_q must be int32, got Long"):
        f(q, k, v, cu_q.long(), cu_k, 5, 6)
    with pytest.raises(RuntimeError, match="cu_seqlens_k must be on the same device as q"):
        f(q, k, v, cu_q, cu_k.to("meta"), 5, 6)
    with pytest.raises(RuntimeError, match=r"cu_seqlens_q must have shape \(batch \+ 1,\)"):
        f(q, k, v, cu_q[None], cu_k, 5, 6)
    with pytest.raises(RuntimeError, match="must have the same length"):
        f(q, k, v, cu_q[:2], cu_k, 5, 6)
    with pytest.raises(RuntimeError, match=r"cu_seqlens_q\[0\] must be 0, got 1"):
        f(q, k, v, torch.tensor([1, 3, 8], dtype=torch.int32), cu_k, 5, 6)
    with pytest.raises(RuntimeError, match="cu_seqlens_k must be non-decreasing"):
        f(q, k, v, cu_q, torch.tensor([0, 11, 10], dtype=torch.int32), 5, 11)
    with pytest.raises(RuntimeError, match="last entry of cu_seqlens_q must be the total number of rows 8, got 7"):
        f(q, k, v, torch.tensor([0, 3, 7], dtype=torch.int32), cu_k, 5, 6)
    with pytest.raises(RuntimeError, match="sequence 1 has length 5 .cu_seqlens_q. but max_seqlen_q is 4"):
        f(q, k, v, cu_q, cu_k, 4, 6)
    with pytest.raises(RuntimeError, match="max_seqlen_q and max_seqlen_k must be >= 0"):
        f(q, k, v, cu_q, cu_k, -1, 6)
    with pytest.raises(RuntimeError, match="q must have 3 dimensions"):
        f(q[None], k, v, cu_q, cu_k, 5, 6)
    with pytest.raises(RuntimeError, match="k/v heads must divide the number of q heads"):
        f(q, torch.randn(10, 3, 64), torch.randn(10, 3, 64), cu_q, cu_k, 5, 6)
    with pytest.raises(RuntimeError, match="v must have the shape of k"):
        f(q, k, v[:9], cu_q, cu_k, 5, 6)
    with pytest.raises(RuntimeError, match="head_dim 48 is not supported"):
        f(torch.randn(8, 4, 48), torch.randn(10, 2, 48), torch.randn(10, 2, 48), cu_q, cu_k, 5, 6)
    with pytest.raises(RuntimeError, match=r"sinks must have shape \(q heads,\)"):
        f(q, k, v, cu_q, cu_k, 5, 6, sinks=torch.zeros(2))
    out, lse = f(q, k, v, cu_q, cu_k, 5, 6)
    with pytest.raises(RuntimeError, match=r"lse must have shape \(q heads, total_q\)"):
        ops.flash_attention_varlen_backward(out, q, k, v, out, lse.t(), cu_q, cu_k, 5, 6, False, None)
