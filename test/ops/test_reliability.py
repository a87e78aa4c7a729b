"""Determinism, thread safety and memory of every op, forward and backward, on
the CPU kernels and on the Metal path through the emulator:

- the same inputs give bitwise the same outputs and gradients run after run,
  and whatever the number of CPU threads (torch.set_num_threads);
- several Python threads calling every op at once get bitwise what a serial
  run gets;
- a long loop of forward+backward calls does not grow the process's memory
  beyond a bound.
"""

import itertools
import threading
from contextlib import nullcontext

import pytest
import torch

import my_mps_ops

PATHS = ["cpu", "metal_emulator"]


def path_context(path):
    if path == "cpu":
        return nullcontext()
    from my_mps_ops.testing import metal_emulation

    return metal_emulation()


def _randn(gen, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).requires_grad_()


# Each case: inputs from a seed, then the op's outputs and the gradients of
# every differentiable input for a fixed output gradient. Shapes large enough
# that the CPU loops split rows and columns over threads (and the weight
# gradients' partial sums over row chunks).
def case_rms_norm(gen):
    x, w = _randn(gen, 300, 257), _randn(gen, 257)
    return my_mps_ops.rms_norm(x, w, 1e-6), [x, w]


def case_fused_add_rms_norm(gen):
    x, r, w = _randn(gen, 300, 257), _randn(gen, 300, 257), _randn(gen, 257)
    out, res = my_mps_ops.fused_add_rms_norm(x, r, w, 1e-6)
    return out * 1.0 + res * 0.5, [x, r, w]


def case_layer_norm(gen):
    x, w, b = _randn(gen, 300, 257), _randn(gen, 257), _randn(gen, 257)
    return my_mps_ops.layer_norm(x, w, b, 1e-5), [x, w, b]


def case_swiglu(gen):
    g, u = _randn(gen, 200, 513), _randn(gen, 200, 513)
    return my_mps_ops.swiglu(g, u), [g, u]


def case_geglu(gen):
    g, u = _randn(gen, 200, 513), _randn(gen, 200, 513)
    return my_mps_ops.geglu(g, u, "tanh"), [g, u]


def case_cross_entropy(gen):
    logits = _randn(gen, 200, 1000, scale=3.0)
    target = torch.randint(0, 1000, (200,), generator=gen)
    target[::7] = -100
    return my_mps_ops.cross_entropy(logits, target, -100, 0.1, "mean"), [logits]


def case_linear_cross_entropy(gen):
    h, w, b = _randn(gen, 150, 64), _randn(gen, 500, 64, scale=0.1), _randn(gen, 500)
    target = torch.randint(0, 500, (150,), generator=gen)
    return my_mps_ops.linear_cross_entropy(h, w, target, b, -100, 0.1, "mean", 30.0, 1e-4), [h, w, b]


def _quantized_linear(gen, bits, group_size, mode):
    # The codes are fixed inputs (the weight is frozen): gradients of x and bias.
    x, bias = _randn(gen, 150, 256), _randn(gen, 300)
    qweight, scales, biases = my_mps_ops.quantize(torch.randn(300, 256, generator=gen) * 0.06, bits, group_size, mode)
    return my_mps_ops.quantized_linear(x, qweight, scales, biases, bias, bits, group_size, mode), [x, bias]


def case_quantized_linear(gen):
    # 3 bits: codes straddle the uint32 words
    return _quantized_linear(gen, 3, 32, "affine")


def case_quantized_linear_nf4(gen):
    return _quantized_linear(gen, 4, 64, "nf4")


def case_flash_attention(gen):
    q, k, v = _randn(gen, 2, 4, 70, 64), _randn(gen, 2, 2, 90, 64), _randn(gen, 2, 2, 90, 64)
    return my_mps_ops.flash_attention(q, k, v, True, None), [q, k, v]


def case_flash_attention_varlen(gen):
    lens_q, lens_k = [37, 0, 64, 5], [50, 3, 64, 9]
    q, k, v = _randn(gen, sum(lens_q), 4, 64), _randn(gen, sum(lens_k), 2, 64), _randn(gen, sum(lens_k), 2, 64)
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32) for lens in (lens_q, lens_k))
    return my_mps_ops.flash_attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), True), [q, k, v]


def case_flash_attention_decode(gen):
    # Forward only (the op has no backward): no input gradients.
    q = torch.randn(2, 8, 3, 64, generator=gen)
    k, v = torch.randn(2, 2, 300, 64, generator=gen), torch.randn(2, 2, 300, 64, generator=gen)
    return my_mps_ops.flash_attention_decode(q, k, v, torch.tensor([300, 123])), []


def case_rotary(gen):
    x = _randn(gen, 3, 50, 4, 64)
    angles = torch.rand(50, 24, generator=gen) * 6
    return my_mps_ops.rotary_embedding(x, angles.cos(), angles.sin(), False, 1), [x]


def case_rotary_qk(gen):
    q, k = _randn(gen, 3, 4, 50, 64), _randn(gen, 3, 2, 50, 64)
    angles = torch.rand(3, 50, 32, generator=gen) * 6
    oq, ok = my_mps_ops.rotary_embedding_qk(q, k, angles.cos(), angles.sin(), True, 2)
    return oq.sum(-1) + ok.sum(-1).repeat_interleave(2, 1), [q, k]


CASES = {f.__name__[len("case_"):]: f for f in (case_rms_norm, case_fused_add_rms_norm, case_layer_norm, case_swiglu,
                                                case_geglu, case_cross_entropy, case_linear_cross_entropy,
                                                case_quantized_linear, case_quantized_linear_nf4,
                                                case_flash_attention, case_flash_attention_varlen,
                                                case_flash_attention_decode, case_rotary, case_rotary_qk)}


def run(name, path, seed=0):
    """Outputs and input gradients of one case, as a list of tensors."""
    gen = torch.Generator().manual_seed(seed)
    with path_context(path):
        out, inputs = CASES[name](gen)
        grad_out = torch.randn(out.shape, generator=gen)
        grads = torch.autograd.grad(out, inputs, grad_out) if inputs else ()
    return [out.detach()] + list(grads)


def assert_bitwise_equal(a, b, what):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y), \
            f"{what}: result {i} differs (max |diff| {(x.double() - y.double()).abs().max().item()})"


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(CASES))
def test_bitwise_deterministic_across_runs_and_thread_counts(name, path, restore_threads):
    threads = sorted({1, 2, 3, max(1, torch.get_num_threads())})
    torch.set_num_threads(threads[-1])
    first = run(name, path)
    assert_bitwise_equal(run(name, path), first, f"{name} on {path}, second run")
    for n in threads:
        torch.set_num_threads(n)
        assert_bitwise_equal(run(name, path), first, f"{name} on {path} with {n} threads")


@pytest.mark.parametrize("path", PATHS)
def test_concurrent_python_threads_match_serial(path):
    # Every op at once from 4 Python threads (each its own inputs; the Metal
    # path's setting is per thread, so each thread enters metal_emulation()),
    # twice over: bitwise what each gives run alone.
    jobs = [(name, seed) for seed in (1, 2) for name in CASES]
    serial = {job: run(job[0], path, job[1]) for job in jobs}
    results, errors = {}, []

    def worker(part):
        try:
            for job in part:
                results[job] = run(job[0], path, job[1])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(jobs[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for job in jobs:
        assert_bitwise_equal(results[job], serial[job], f"{job[0]} (seed {job[1]}) on {path} from a thread")


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="reads /proc (Linux)")
@pytest.mark.parametrize("path", PATHS)
def test_long_forward_backward_loop_does_not_grow_memory(path):
    # Warm up (allocator pools, the emulator's libraries), then many rounds of
    # every op forward and backward: the resident set may not grow by more than
    # a bound well below what leaking any round's tensors would take.
    rounds = 20 if path == "cpu" else 4
    for name in CASES:
        run(name, path)
    before = _rss_bytes()
    for i in range(rounds):
        for name in CASES:
            run(name, path, seed=i % 3)
    grown = _rss_bytes() - before
    per_round = sum(sum(t.numel() * t.element_size() for t in run(name, path)) for name in CASES)
    # A leak of one round's results every round would add rounds * per_round.
    bound = max(32 << 20, rounds * per_round // 4)
    assert grown < bound, f"resident memory grew by {grown >> 20} MB over {rounds} rounds (bound {bound >> 20} MB)"
