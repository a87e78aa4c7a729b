"""my_mps_ops.flash_attention_decode: new tokens against a preallocated KV cache with per-sequence
lengths (garbage, NaN, past them), against F.scaled_dot_product_attention with the equivalent explicit
mask in float64; GQA, windows, softcap, sinks; registrations, compile, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import my_mps_ops

ops = torch.ops.my_mps_ops
HEAD_DIMS = [32, 64, 80, 96, 128, 256]
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2.5e-2, rtol=2.5e-2),
}


def cache_mask(seqlens, q_len, cache_len, causal=True, window_left=-1):
    """[batch, 1, q_len, cache_len] boolean: query i of sequence b (at a = i + len_b - q_len) sees
    valid key j (j < len_b) iff j <= a when causal and j >= a - window_left when bounded."""
    lens = seqlens.long().cpu()[:, None, None]
    a = torch.arange(q_len)[None, :, None] + lens - q_len
    key = torch.arange(cache_len)[None, None, :]
    mask = key < lens
    if causal:
        mask = mask & (key <= a)
    if window_left >= 0:
        mask = mask & (key >= a - window_left)
    return mask[:, None]


def make_case(batch, q_heads, kv_heads, q_len, cache_len, seqlens, head_dim, dtype=torch.float64, device="cpu",
              seed=0, garbage=math.nan):
    """q and a cache whose rows past each sequence's length hold `garbage`."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, q_len, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, cache_len, head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, cache_len, head_dim, generator=gen, dtype=torch.float64)
    lens = torch.tensor(seqlens)
    invalid = torch.arange(cache_len)[None, :] >= lens[:, None]
    k[invalid[:, None, :, None].expand_as(k)] = garbage
    v[invalid[:, None, :, None].expand_as(v)] = garbage
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)] + [lens.to(device)]


def reference(q, k, v, seqlens, causal=True, scale=None, window_left=-1, softcap=0.0, sinks=None):
    """(out, lse) in float64: SDPA with the explicit cache mask (and K/V heads repeated) when there is no
    softcap or sink, the same attention written out otherwise; garbage rows zeroed first (masked
    keys must not matter), rows that see no key 0."""
    q, k, v = (t.detach().cpu().double() for t in (q, k, v))
    mask = cache_mask(seqlens, q.shape[2], k.shape[2], causal, window_left)
    valid = (torch.arange(k.shape[2])[None, :] < seqlens.long().cpu()[:, None])[:, None, :, None]
    k, v = k.where(valid, 0.0), v.where(valid, 0.0)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = scale * q @ k.transpose(-1, -2)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, -math.inf)
    if sinks is not None:
        scores = torch.cat([scores, sinks.detach().cpu().double().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)], -1)
    lse = torch.logsumexp(scores, -1)
    seen = mask.any(-1, keepdim=True)
    if softcap or sinks is not None:
        probs = torch.softmax(scores.masked_fill(lse.isneginf()[..., None], 0.0), -1)[..., :k.shape[2]]
        out = (probs @ v).where(seen, 0.0)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).where(seen, 0.0)
    return out, lse


def check(q, k, v, seqlens, dtype=torch.float64, **kw):
    out, lse = ops.flash_attention_decode(q, k, v, seqlens, kw.get("causal", True), kw.get("scale"),
                                          kw.get("window_left", -1), kw.get("softcap", 0.0), kw.get("sinks"))
    ref_out, ref_lse = reference(q, k, v, seqlens, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.shape == q.shape[:3]
    assert not out.isnan().any()
    tol = TOL[dtype]
    torch.testing.assert_close(out.cpu().double(), ref_out, **tol)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, **tol)


# float64 on the CPU kernels: every head dim, q_len 1 / 4 / 16, GQA, MQA and MHA, lengths long enough
# for several key chunks, a sequence shorter than another, NaN past every length.
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("q_len", [1, 4, 16])
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_float64_against_sdpa(head_dim, q_len, causal):
    q, k, v, lens = make_case(2, 8, 2, q_len, 1200, [1100, 37], head_dim, seed=head_dim + q_len)
    check(q, k, v, lens, causal=causal)


@pytest.mark.parametrize("heads", [(4, 4), (6, 1), (32, 8)])
def test_cpu_float64_head_groupings(heads):
    q, k, v, lens = make_case(3, heads[0], heads[1], 2, 700, [700, 300, 2], 64, seed=1)
    check(q, k, v, lens, causal=True)


def test_cpu_result_does_not_depend_on_the_thread_count():
    """The key chunks come from the shapes, not the thread count: values right, and bitwise the same on 1, 2
    and 7 threads."""
    q, k, v, lens = make_case(1, 4, 1, 3, 4096, [4000], 128, seed=3)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 7):
            torch.set_num_threads(threads)
            check(q, k, v, lens, causal=True)
            results.append(ops.flash_attention_decode(q.float(), k.float(), v.float(), lens))
    finally:
        torch.set_num_threads(previous)
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])


@pytest.mark.parametrize("opts", [
    dict(window_left=100), dict(window_left=0), dict(window_left=5000), dict(window_left=7, causal=False),
    dict(softcap=2.0, scale=0.5), dict(sinks=True), dict(sinks=True, causal=False),
    dict(window_left=50, softcap=3.0, sinks=True, scale=0.3),
], ids=str)
def test_cpu_float64_options(opts):
    q, k, v, lens = make_case(2, 6, 2, 5, 900, [850, 60], 64, seed=4)
    opts = dict(opts)
    if opts.pop("sinks", False):
        opts["sinks"] = torch.randn(6, generator=torch.Generator().manual_seed(9), dtype=torch.float64) + 4.0
    check(q, k, v, lens, **opts)


def test_cpu_rows_that_see_no_key():
    """A sequence shorter than q_len (causal), or empty: those rows are 0, lse -inf (the sink with sinks)."""
    q, k, v, lens = make_case(3, 2, 1, 6, 40, [3, 0, 40], 32, seed=5)
    check(q, k, v, lens)
    sinks = torch.tensor([0.5, -1.0], dtype=torch.float64)
    check(q, k, v, lens, sinks=sinks)
    out, lse = ops.flash_attention_decode(q, k, v, lens, True, None, -1, 0.0, sinks)
    assert (out[1] == 0).all() and torch.equal(lse[1], sinks.view(2, 1).expand(2, 6))


def test_int32_lengths_and_strided_cache():
    """int32 cache_seqlens; a cache held as (batch, cache_len, heads, dim) and viewed transposed (rows of
    head_dim contiguous, heads interleaved), and a cache sliced from a longer one."""
    q, k, v, lens = make_case(2, 4, 2, 2, 100, [90, 10], 64, seed=6)
    check(q, k, v, lens.int())
    kt, vt = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    check(q, kt, vt, lens)
    big_k = torch.cat([k, torch.full_like(k, math.nan)], 2)
    big_v = torch.cat([v, torch.full_like(v, math.nan)], 2)
    check(q, big_k[:, :, :100], big_v[:, :, :100], lens)


def test_matches_flash_attention_on_the_valid_slice():
    """Same numbers as flash_attention (causal bottom-right) on each sequence's valid keys."""
    q, k, v, lens = make_case(2, 8, 2, 4, 300, [250, 17], 128, dtype=torch.float32, seed=7)
    out = my_mps_ops.flash_attention_decode(q, k, v, lens)
    for b, n in enumerate(lens.tolist()):
        expected = my_mps_ops.flash_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], causal=True)
        torch.testing.assert_close(out[b:b + 1], expected, atol=1e-5, rtol=1e-5)


# Every backend (the metal_emulator runs the shaders), small sizes.
BACKEND_CASES = [
    # (batch, q_heads, kv_heads, q_len, cache_len, seqlens, head_dim, options)
    (2, 4, 2, 1, 80, [70, 5], 64, {}),
    (1, 4, 1, 3, 100, [100], 128, dict(causal=False)),
    (2, 2, 2, 4, 72, [40, 3], 80, dict(window_left=9, softcap=2.0, sinks=True)),
]


@pytest.mark.parametrize("case", BACKEND_CASES, ids=lambda c: f"b{c[0]}_h{c[1]}-{c[2]}_L{c[3]}_d{c[6]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_backends(backend, case, dtype):
    batch, q_heads, kv_heads, q_len, cache_len, seqlens, head_dim, opts = case
    q, k, v, lens = make_case(batch, q_heads, kv_heads, q_len, cache_len, seqlens, head_dim, dtype=dtype,
                              device=backend.device, seed=8)
    opts = dict(opts)
    if opts.pop("sinks", False):
        opts["sinks"] = torch.randn(q_heads, generator=torch.Generator().manual_seed(9)).to(backend.device, dtype) + 3
    check(q, k, v, lens, dtype=dtype, **opts)


def test_backend_head_dims(backend):
    for head_dim in HEAD_DIMS:
        q, k, v, lens = make_case(1, 2, 1, 2, 40, [33], head_dim, dtype=torch.float32, device=backend.device,
                                  seed=head_dim)
        check(q, k, v, lens, dtype=torch.float32)


def test_opcheck():
    q, k, v, lens = make_case(2, 4, 2, 3, 64, [50, 9], 64, dtype=torch.float32, garbage=0.0)
    torch.library.opcheck(ops.flash_attention_decode.default, (q, k, v, lens))
    torch.library.opcheck(ops.flash_attention_decode.default, (q, k, v, lens.int()),
                          {"causal": False, "scale": 0.2, "window_left": 10, "softcap": 3.0,
                           "sinks": torch.randn(4)})


def test_torch_compile_fullgraph_dynamic():
    torch._dynamo.reset()

    def fn(q, k, v, lens):
        return my_mps_ops.flash_attention_decode(q, k, v, lens, window_left=20) * 2

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for q_len, cache_len, lens in [(1, 64, [50, 9]), (4, 96, [96, 30])]:
        q, k, v, lens = make_case(2, 4, 2, q_len, cache_len, lens, 64, dtype=torch.float32)
        torch.testing.assert_close(compiled(q, k, v, lens), fn(q, k, v, lens))


def test_backward_raises():
    q, k, v, lens = make_case(1, 2, 1, 1, 16, [10], 32, garbage=0.0)
    q.requires_grad_()
    out = my_mps_ops.flash_attention_decode(q, k, v, lens)  # the forward runs
    with pytest.raises(RuntimeError, match="forward only"):
        out.sum().backward()


def test_bad_inputs_raise_clear_errors():
    q, k, v, lens = make_case(2, 4, 2, 1, 16, [10, 3], 64, garbage=0.0)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.flash_attention_decode(q, k, v, torch.tensor([17, 3]))
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.flash_attention_decode(q, k, v, torch.tensor([-1, 3]))
    with pytest.raises(RuntimeError, match="cache_seqlens must have shape"):
        ops.flash_attention_decode(q, k, v, torch.tensor([10]))
    with pytest.raises(RuntimeError, match="int32 or int64"):
        ops.flash_attention_decode(q, k, v, torch.tensor([10.0, 3.0]))
    with pytest.raises(RuntimeError, match="must divide"):
        ops.flash_attention_decode(q[:, :3], k, v, lens)
    with pytest.raises(RuntimeError, match="head_dim"):
        ops.flash_attention_decode(q[..., :48], k[..., :48], v[..., :48], lens)
    with pytest.raises(RuntimeError, match="same shape"):
        ops.flash_attention_decode(q, k, v[:, :, :8], lens)


@pytest.mark.parametrize("limit", [32, 96])
def test_metal_follows_the_pipeline_thread_limit(limit):
    """Threadgroups sized from the pipeline's maxTotalThreadsPerThreadgroup: with the emulator's pipelines
    allowing only `limit` threads (one or three SIMD groups) the kernels give the same values."""
    from my_mps_ops.emulator import pipeline_thread_limit, race_check
    from my_mps_ops.testing import metal_emulation

    q, k, v, lens = make_case(2, 6, 2, 2, 90, [90, 20], 64, dtype=torch.float32, seed=10)
    with metal_emulation(), race_check(), pipeline_thread_limit(limit):
        check(q, k, v, lens, dtype=torch.float32, window_left=30)


def test_cpu_autocast_runs_in_lower_precision():
    """Under torch.autocast, as scaled_dot_product_attention: a float32 q against a bfloat16 cache runs in
    bfloat16 (the cache is not copied), the same as calling it with q in bfloat16."""
    q, k, v, lens = make_case(2, 4, 2, 2, 64, [60, 9], 64, dtype=torch.float32, seed=11)
    k, v = k.bfloat16(), v.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = my_mps_ops.flash_attention_decode(q, k, v, lens)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, my_mps_ops.flash_attention_decode(q.bfloat16(), k, v, lens), atol=0, rtol=0)


def test_torch_export():
    class Decode(torch.nn.Module):
        def forward(self, q, k, v, lens):
            return my_mps_ops.flash_attention_decode(q, k, v, lens)

    q, k, v, lens = make_case(2, 4, 2, 1, 64, [50, 9], 64, dtype=torch.float32, garbage=0.0)
    exported = torch.export.export(Decode(), (q, k, v, lens))
    torch.testing.assert_close(exported.module()(q, k, v, lens), Decode()(q, k, v, lens))


def test_empty_inputs(backend):
    """No sequence, no new token, or an empty cache: shapes kept, rows that see nothing 0 with lse -inf."""
    for q_shape, k_shape, lens in [((0, 4, 1, 64), (0, 2, 8, 64), []), ((2, 4, 0, 64), (2, 2, 8, 64), [3, 8]),
                                   ((2, 4, 2, 64), (2, 2, 0, 64), [0, 0])]:
        q, k = torch.randn(q_shape, device=backend.device), torch.randn(k_shape, device=backend.device)
        out, lse = ops.flash_attention_decode(q, k, k, torch.tensor(lens, dtype=torch.long, device=backend.device))
        assert out.shape == q.shape and lse.shape == q.shape[:3]
        assert (out == 0).all() and lse.isneginf().all()
