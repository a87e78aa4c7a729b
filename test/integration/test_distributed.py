"""my_mps_ops composes with PyTorch's distributed engine: two processes on
this machine (gloo, CPU) training the tiny Llama with DDP and with FSDP2
(`fully_shard`), with and without activation checkpointing, match one process
on the same global batch: losses, every gradient at every step, and the
trained weights. One torchrun launch runs every configuration
(examples/distributed/train_tiny_llama.py, the README's example)."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from support import ROOT, env_importing_this_package

EXAMPLE = os.path.join(ROOT, "examples", "distributed", "train_tiny_llama.py")
pytestmark = pytest.mark.skipif(not os.path.exists(EXAMPLE), reason="needs examples/ from the source checkout")

RUNS = ["ddp:fused", "ddp:patched", "fsdp2:fused", "ddp:fused:checkpoint", "fsdp2:patched:checkpoint"]
# Different summation orders (the gradient all-reduce, half-batch matmuls):
# float32 rounding, not a different result.
TOL = dict(atol=2e-6, rtol=1e-5)


def _example():
    spec = importlib.util.spec_from_file_location("train_tiny_llama_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch without gloo")
    out = tmp_path_factory.mktemp("distributed") / "results.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", EXAMPLE,
           "--out", str(out), "--matrix", *RUNS]
    child = subprocess.run(cmd, env=env_importing_this_package(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-6000:]
    return torch.load(out)


@pytest.mark.parametrize("run", RUNS)
def test_two_processes_match_one(run, two_process_results):
    parallel, kind, *flags = run.split(":")
    expected = _example().train("none", kind, "checkpoint" in flags)
    got = two_process_results[run]
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(expected["losses"]), **TOL)
    assert got["losses"][-1] < got["losses"][0]  # it trains
    for step, (g, e) in enumerate(zip(got["grads"], expected["grads"])):
        assert g.keys() == e.keys()
        for name in e:
            torch.testing.assert_close(g[name], e[name], **TOL, msg=lambda m: f"step {step} grad {name}: {m}")
    for name in expected["params"]:
        torch.testing.assert_close(got["params"][name], expected["params"][name], **TOL, msg=name)


def _grads(model, tokens):
    model.zero_grad(set_to_none=True)
    loss = model.loss(tokens)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["fused", "patched"])
def test_activation_checkpointing_gives_the_same_gradients(backend, kind):
    # Recomputing a block in the backward pass runs the same kernels on the
    # same inputs: bitwise the same loss and gradients. On the emulator the
    # recomputation takes the Metal path too (the backward runs inside the block).
    example = _example()
    plain, checkpointed = example.build_model(kind, False), example.build_model(kind, True)
    tokens = torch.randint(0, example.CFG.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    loss_a, grads_a = _grads(plain, tokens)
    loss_b, grads_b = _grads(checkpointed, tokens)
    torch.testing.assert_close(loss_b, loss_a, atol=0, rtol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=0, rtol=0, msg=name)
