"""Every Metal launch sizes its threadgroups from the pipeline's
maxTotalThreadsPerThreadgroup (pipeline_info), never a fixed count: with the
emulator's pipelines reporting fewer threads, as a GPU may for a kernel with high
register use, each op still gives the CPU kernels' results: flash_attention,
whose tiles are built around its simdgroups, runs a pipeline specialised (by
function constant) with fewer of them."""

import pytest
import torch
import torch.nn.functional as F

import my_mps_ops
from my_mps_ops import _emulator
from my_mps_ops.emulator import pipeline_thread_limit, race_check
from my_mps_ops.testing import metal_emulation, specialised_libraries


def _ops(x, w, gate, up, logits, target, cos, sin):
    return {
        "rms_norm": my_mps_ops.ops.rms_norm(x, w, 1e-6),
        "fused_add_rms_norm": my_mps_ops.ops.fused_add_rms_norm(x, x * 0.5, w, 1e-6)[0],
        "layer_norm": my_mps_ops.ops.layer_norm(x, w, w * 0.1, 1e-5),
        "swiglu": my_mps_ops.ops.swiglu(gate, up),
        "geglu": my_mps_ops.ops.geglu(gate, up, "tanh"),
        "cross_entropy": my_mps_ops.ops.cross_entropy(logits, target, reduction="none"),
        "rotary": my_mps_ops.ops.rotary_embedding(gate.reshape(2, 5, 3, 100)[..., :64], cos, sin),
    }


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3000, generator=g, requires_grad=True)
    w = torch.randn(3000, generator=g, requires_grad=True)
    gate = torch.randn(30, 100, generator=g, requires_grad=True)
    up = torch.randn(30, 100, generator=g, requires_grad=True)
    logits = torch.randn(4, 5000, generator=g, requires_grad=True)
    target = torch.randint(0, 5000, (4,), generator=g)
    angles = torch.randn(5, 32, generator=g, dtype=torch.float64)
    return x, w, gate, up, logits, target, angles.cos().float(), angles.sin().float()


@pytest.mark.parametrize("limit", [32, 64, 96])
def test_every_op_follows_the_pipeline_thread_limit(limit):
    inputs = _inputs()
    expected = _ops(*inputs)
    with metal_emulation(), pipeline_thread_limit(limit):
        got = _ops(*inputs)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol=2e-5, rtol=2e-5, msg=name)
            leaves = [t for t in inputs if t.requires_grad]
            grads = torch.autograd.grad(got[name].sum(), leaves, allow_unused=True)
            ref = torch.autograd.grad(expected[name].sum(), leaves, allow_unused=True, retain_graph=True)
            for a, b in zip(grads, ref):
                if b is not None:
                    torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4, msg=name + " grad")


# (batch, q_heads, kv_heads, q_len, kv_len, head_dim, causal): lengths that are
# no multiple of any threadgroup's rows; grouped-query heads; head_dim 256
# prefers 2 simdgroups, the others 4.
FLASH_CASES = [
    (1, 4, 2, 13, 19, 32, True),
    (2, 2, 2, 21, 10, 64, False),
    (1, 2, 1, 9, 17, 128, True),
    (1, 2, 1, 11, 7, 256, True),
]


def _flash(q, k, v, causal, grad_out):
    out = my_mps_ops.ops.flash_attention(q, k, v, causal=causal)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


@pytest.mark.parametrize("limit", [32, 64, 96])
@pytest.mark.parametrize("case", FLASH_CASES, ids=lambda c: f"b{c[0]}h{c[1]}kv{c[2]}q{c[3]}k{c[4]}d{c[5]}"
                         + ("causal" if c[6] else ""))
def test_flash_attention_runs_fewer_simdgroups_when_the_pipeline_allows_fewer_threads(limit, case):
    """The forward and both backward kernels run with as many simdgroups as the
    pipeline allows (a pipeline specialised by function constant), giving the
    CPU kernel's output and gradients."""
    batch, q_heads, kv_heads, q_len, kv_len, d, causal = case
    g = torch.Generator().manual_seed(d + limit)
    q = torch.randn(batch, q_heads, q_len, d, generator=g, requires_grad=True)
    k = torch.randn(batch, kv_heads, kv_len, d, generator=g, requires_grad=True)
    v = torch.randn(batch, kv_heads, kv_len, d, generator=g, requires_grad=True)
    grad_out = torch.randn(batch, q_heads, q_len, d, generator=g)
    expected = _flash(q, k, v, causal, grad_out)
    with metal_emulation(), pipeline_thread_limit(limit):
        got = _flash(q, k, v, causal, grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4, msg=name)
    # The launches asked for the specialisation with the simdgroups the limit allows.
    simdgroups = min(limit // 32, 2 if d > 128 else 4)
    if simdgroups < (2 if d > 128 else 4):
        assert f"flash_attention{{0:uint={simdgroups}}}" in specialised_libraries()


def test_flash_attention_takes_the_kernels_as_written_when_the_pipeline_allows():
    q = torch.randn(1, 2, 9, 32)
    before = set(specialised_libraries())
    runs = _emulator.runs_on_this_thread()
    with metal_emulation():
        torch.testing.assert_close(my_mps_ops.ops.flash_attention(q, q, q, causal=True),
                                   F.scaled_dot_product_attention(q, q, q, is_causal=True), atol=1e-5, rtol=1e-5)
    assert _emulator.runs_on_this_thread() == runs + 1
    assert set(specialised_libraries()) == before


def test_flash_attention_with_fewer_simdgroups_is_race_free():
    """The specialised kernels' barriers, under the race check (the op tests
    run the kernels as written under it)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 10, 32, generator=g, requires_grad=True)
    k = torch.randn(1, 1, 12, 32, generator=g, requires_grad=True)
    v = torch.randn(1, 1, 12, 32, generator=g, requires_grad=True)
    grad_out = torch.randn(1, 2, 10, 32, generator=g)
    expected = _flash(q, k, v, True, grad_out)
    with metal_emulation(), race_check(), pipeline_thread_limit(64):
        got = _flash(q, k, v, True, grad_out)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


def test_the_limit_is_checked():
    with pytest.raises(RuntimeError, match="multiple of 32"):
        with pipeline_thread_limit(48):
            pass
