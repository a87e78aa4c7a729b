"""Every Metal launch sizes its threadgroups from the pipeline's
maxTotalThreadsPerThreadgroup (pipeline_info), never a fixed count: with the
emulator's pipelines reporting fewer threads, as a GPU may for a kernel with high
register use, each op still gives the CPU kernels' results, or says clearly that
its kernel cannot run."""

import pytest
import torch
import torch.nn.functional as F

import my_mps_ops
from my_mps_ops.emulator import pipeline_thread_limit
from my_mps_ops.testing import metal_emulation


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


def test_flash_attention_says_its_kernel_needs_more_threads_than_the_pipeline_allows():
    q = torch.randn(1, 2, 9, 32)
    with metal_emulation(), pipeline_thread_limit(64):
        with pytest.raises(RuntimeError, match=r"flash_attention_forward_float_32' needs threadgroups of 128 "
                                               r"threads but its pipeline allows 64"):
            my_mps_ops.ops.flash_attention(q, q, q, causal=True)
    with metal_emulation():  # the limit is restored
        torch.testing.assert_close(my_mps_ops.ops.flash_attention(q, q, q, causal=True),
                                   F.scaled_dot_product_attention(q, q, q, is_causal=True), atol=1e-5, rtol=1e-5)


def test_the_limit_is_checked():
    with pytest.raises(RuntimeError, match="multiple of 32"):
        with pipeline_thread_limit(48):
            pass
