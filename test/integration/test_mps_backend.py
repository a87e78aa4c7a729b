"""The MPS backend on a real Apple GPU: rms_norm on mps vs the CPU kernels and a
float64 reference, the shared encoder across ops, views with storage offsets,
memory over 10,000 calls, and concurrent Python threads.

Every test needs an mps device and is skipped elsewhere (never deleted: CI on
Linux has no GPU, the Metal kernels' logic is covered there by the emulator).
"""

import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from support import env_importing_this_package

MPS_AVAILABLE = torch.backends.mps.is_available()
requires_mps = pytest.mark.skipif(not MPS_AVAILABLE, reason="needs an Apple GPU (torch.backends.mps.is_available() is False)")
pytestmark = requires_mps

# Devices under test; each result is compared with the CPU kernel and float64.
GPU_DEVICES = [pytest.param("mps", id="mps")]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [
    (1, 8),
    (5, 3),  # rows shorter than a vector load
    (3, 1001),  # odd length: vector loads plus a tail
    (64, 4096),
    (2, 3, 257),  # leading dimensions are rows
    (2, 20000),  # longer than one pass of a threadgroup: the looped kernel
]
EPS = 1e-6


@pytest.fixture(scope="module")
def ops():
    import my_mps_ops

    return my_mps_ops


def rms_norm_backward(grad_out, x, weight, eps, mask=(True, True)):
    return torch.ops.my_mps_ops.rms_norm_backward(grad_out, x, weight, eps, list(mask))


def reference_rms_norm(x, weight, eps):
    """float64 composite: x * rsqrt(mean(x^2, -1) + eps) * weight."""
    x64 = x.detach().double()
    y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    return y * weight.detach().double() if weight is not None else y


def reference_backward(grad_out, x, weight, eps):
    """(grad_input, grad_weight) in float64 by autograd through the composite."""
    x64 = x.detach().cpu().double().requires_grad_(True)
    w64 = weight.detach().cpu().double().requires_grad_(True) if weight is not None else None
    y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    if w64 is not None:
        y = y * w64
    y.backward(grad_out.detach().cpu().double())
    return x64.grad, (w64.grad if w64 is not None else None)


def tolerance(dtype):
    """(rtol, atol) for one result in `dtype` vs the exact value: float32
    accumulates rounding over the row; half types round the output (and may
    round one intermediate), so two units in the last place."""
    if dtype == torch.float32:
        return 2e-5, 2e-5
    eps = torch.finfo(dtype).eps
    return 2 * eps, 2 * eps


def assert_matches(actual, expected64, dtype, scale=1.0):
    """actual (any device, `dtype`) against a float64 value; atol scaled by
    the magnitude of the result (sums of many terms cancel)."""
    assert actual.dtype == dtype
    rtol, atol = tolerance(dtype)
    torch.testing.assert_close(actual.detach().cpu().double(), expected64.detach().cpu().double(),
                               rtol=rtol, atol=atol * scale)


def make_inputs(shape, dtype, seed=0, with_weight=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    w = (torch.rand(shape[-1], generator=gen) * 2 + 0.5).to(dtype) if with_weight else None
    g = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    return x, w, g


@pytest.mark.parametrize("device", GPU_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no_weight"])
def test_forward_matches_cpu_kernel_and_reference(ops, device, dtype, shape, with_weight):
    x, w, _ = make_inputs(shape, dtype, with_weight=with_weight)
    out = ops.rms_norm(x.to(device), w.to(device) if w is not None else None, EPS)
    assert out.device.type == device and out.shape == x.shape and out.dtype == dtype
    cpu_out = ops.rms_norm(x, w, EPS)
    assert_matches(out, reference_rms_norm(x, w, EPS), dtype)
    rtol, atol = tolerance(dtype)
    torch.testing.assert_close(out.cpu(), cpu_out, rtol=2 * rtol, atol=2 * atol)


@pytest.mark.parametrize("device", GPU_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_matches_cpu_kernel_and_reference(ops, device, dtype, shape):
    x, w, g = make_inputs(shape, dtype, seed=1)
    grad_input, grad_weight = rms_norm_backward(g.to(device), x.to(device), w.to(device), EPS)
    cpu_grad_input, cpu_grad_weight = rms_norm_backward(g, x, w, EPS)
    ref_input, ref_weight = reference_backward(g, x, w, EPS)
    assert grad_input.device.type == device and grad_weight.device.type == device
    assert grad_input.shape == x.shape and grad_weight.shape == w.shape
    assert_matches(grad_input, ref_input, dtype, scale=ref_input.abs().max().item())
    assert_matches(grad_weight, ref_weight, dtype, scale=ref_weight.abs().max().item())
    rtol, atol = tolerance(dtype)
    torch.testing.assert_close(grad_input.cpu(), cpu_grad_input, rtol=2 * rtol,
                               atol=2 * atol * ref_input.abs().max().item())
    torch.testing.assert_close(grad_weight.cpu(), cpu_grad_weight, rtol=2 * rtol,
                               atol=2 * atol * ref_weight.abs().max().item())


@pytest.mark.parametrize("device", GPU_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_output_mask_and_no_weight(ops, device, dtype):
    x, w, g = make_inputs((7, 300), dtype, seed=2)
    ref_input, _ = reference_backward(g, x, w, EPS)
    grad_input, grad_weight = rms_norm_backward(g.to(device), x.to(device), w.to(device), EPS, (True, False))
    assert_matches(grad_input, ref_input, dtype, scale=ref_input.abs().max().item())
    assert grad_weight.numel() == 0

    ref_input_nw, _ = reference_backward(g, x, None, EPS)
    grad_input, grad_weight = rms_norm_backward(g.to(device), x.to(device), None, EPS, (True, True))
    assert_matches(grad_input, ref_input_nw, dtype, scale=ref_input_nw.abs().max().item())
    assert grad_weight.numel() == 0


@pytest.mark.parametrize("device", GPU_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autograd_on_device(ops, device, dtype):
    x, w, g = make_inputs((6, 513), dtype, seed=3)
    xd = x.to(device).requires_grad_(True)
    wd = w.to(device).requires_grad_(True)
    ops.rms_norm(xd, wd, EPS).backward(g.to(device))
    ref_input, ref_weight = reference_backward(g, x, w, EPS)
    assert_matches(xd.grad, ref_input, dtype, scale=ref_input.abs().max().item())
    assert_matches(wd.grad, ref_weight, dtype, scale=ref_weight.abs().max().item())


@pytest.mark.parametrize("device", GPU_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_input(ops, device, dtype):
    x = torch.empty(0, 64, dtype=dtype, device=device)
    w = torch.ones(64, dtype=dtype, device=device)
    out = ops.rms_norm(x, w, EPS)
    assert out.shape == (0, 64) and out.device.type == device


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_many_ops_in_a_row_without_synchronize(ops, device):
    # Our kernels and PyTorch's own (MPSGraph and Metal) interleave on the
    # stream's shared encoder/command buffer; only the final .cpu() waits.
    x, w, g = make_inputs((32, 1024), torch.float32, seed=4)
    m = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(5)) / 32
    xd, wd, md = x.to(device), w.to(device), m.to(device)
    steps = 25
    for _ in range(steps):
        xd = ops.rms_norm(xd, wd, EPS) * 1.5 + 0.25
        xd = xd @ md
        xd = ops.rms_norm(xd, None, EPS).relu() - 0.1
    gi, gw = rms_norm_backward(g.to(device), xd, wd, EPS)
    total = gi.sum() + gw.sum()

    xc = x.double()
    for _ in range(steps):
        xc = reference_rms_norm(xc, w, EPS) * 1.5 + 0.25
        xc = xc @ m.double()
        xc = reference_rms_norm(xc, None, EPS).relu() - 0.1
    ref_gi, ref_gw = reference_backward(g, xc, w, EPS)
    # One .cpu() at the end; float32 drift over 75 ops stays well below 1e-3.
    torch.testing.assert_close(xd.cpu().double(), xc, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gi.cpu().double(), ref_gi, rtol=1e-3, atol=1e-3 * ref_gi.abs().max().item())
    torch.testing.assert_close(gw.cpu().double(), ref_gw, rtol=1e-3, atol=1e-3 * ref_gw.abs().max().item())
    torch.testing.assert_close(total.cpu().double(), ref_gi.sum() + ref_gw.sum(), rtol=1e-3,
                               atol=1e-3 * (ref_gi.abs().sum() + ref_gw.abs().sum()).item())


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_results_consumed_before_synchronize_are_ordered(ops, device):
    # Write then read the same buffer many times: a reordering or a missing
    # dependency between our dispatches and PyTorch's copy kernels shows up.
    x, w, _ = make_inputs((16, 512), torch.float32, seed=6)
    xc = x.double()  # before the loop: the loop overwrites xd in place
    xd, wd = x.to(device), w.to(device)
    outs = []
    for i in range(50):
        y = ops.rms_norm(xd, wd, EPS)
        xd.copy_(y * 0.5 + i)  # PyTorch kernel overwrites our input for the next call
        outs.append(y)
    for i, y in enumerate(outs):
        yc = reference_rms_norm(xc, w, EPS)
        torch.testing.assert_close(y.cpu().double(), yc, rtol=2e-5, atol=2e-5)
        xc = (yc * 0.5 + i).float().double()


@pytest.mark.parametrize("device", GPU_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_views_with_storage_offsets(ops, device, dtype):
    hidden = 515  # odd: offsets below are not multiples of a vector width
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(40 * hidden + 7, generator=gen).to(dtype).to(device)
    w_base = (torch.rand(2 * hidden, generator=gen) + 0.5).to(dtype).to(device)

    cases = {
        # contiguous rows starting 3 elements into the storage
        "offset_contiguous": base[3:3 + 6 * hidden].view(6, hidden),
        # every other row, starting one row in: strided and offset
        "offset_strided_rows": base[hidden + 1:hidden + 1 + 20 * hidden].view(20, hidden)[::2],
        # a column window of a wider matrix: row stride larger than the row
        "column_window": base[: 12 * (hidden + 5)].view(12, hidden + 5)[:, 5:],
    }
    w = w_base[1:hidden + 1]  # weight view with an odd offset
    assert w.storage_offset() == 1
    for name, x in cases.items():
        assert x.storage_offset() != 0 or not x.is_contiguous(), name
        out = ops.rms_norm(x, w, EPS)
        assert_matches(out, reference_rms_norm(x.cpu(), w.cpu(), EPS), dtype)
        g = torch.randn(x.shape, generator=gen).to(dtype).to(device)
        g_view = torch.cat([torch.zeros(1, hidden, dtype=dtype, device=device), g])[1:]  # offset grad_out
        assert g_view.storage_offset() == hidden
        gi, gw = rms_norm_backward(g_view, x, w, EPS)
        ref_input, ref_weight = reference_backward(g_view.cpu(), x.cpu(), w.cpu(), EPS)
        assert_matches(gi, ref_input, dtype, scale=ref_input.abs().max().item())
        assert_matches(gw, ref_weight, dtype, scale=ref_weight.abs().max().item())
    # The inputs were only read.
    assert torch.equal(base.cpu(), torch.randn(40 * hidden + 7, generator=torch.Generator().manual_seed(7)).to(dtype))


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_output_into_a_view_of_a_larger_buffer_leaves_the_rest(ops, device):
    # Outputs allocated by the op never alias the input; a result copied into
    # a slice leaves its neighbours untouched.
    x, w, _ = make_inputs((8, 1000), torch.float32, seed=8)
    big = torch.full((10, 1000), -7.0, device=device)
    big[1:9] = ops.rms_norm(x.to(device), w.to(device), EPS)
    big_cpu = big.cpu()
    assert torch.all(big_cpu[0] == -7.0) and torch.all(big_cpu[9] == -7.0)
    assert_matches(big_cpu[1:9], reference_rms_norm(x, w, EPS), torch.float32)


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_ten_thousand_calls_do_not_grow_memory(ops, device):
    x, w, g = make_inputs((64, 1024), torch.float16, seed=9)
    xd, wd, gd = x.to(device), w.to(device), g.to(device)
    for _ in range(200):  # warm up: pipelines compiled, allocator pools filled
        ops.rms_norm(xd, wd, EPS)
        rms_norm_backward(gd, xd, wd, EPS)
    torch.mps.synchronize()
    driver_before = torch.mps.driver_allocated_memory()
    current_before = torch.mps.current_allocated_memory()
    last = None
    for i in range(10_000):
        last = ops.rms_norm(xd, wd, EPS)
        if i % 10 == 0:
            rms_norm_backward(gd, xd, wd, EPS)
        if i % 1000 == 999:
            torch.mps.synchronize()
    torch.mps.synchronize()
    assert_matches(last, reference_rms_norm(x, w, EPS), torch.float16)
    del last
    torch.mps.synchronize()
    growth = torch.mps.driver_allocated_memory() - driver_before
    # One output is 128 KB; anything growing per call (10,000 calls) would
    # show up as hundreds of MB.
    assert growth <= 32 * 1024 * 1024, f"driver memory grew by {growth / 2**20:.1f} MB over 10,000 calls"
    assert torch.mps.current_allocated_memory() == current_before


def _thread_worker(ops, device, dtype, shape, seed, iterations, barrier, results, errors, index):
    try:
        x, w, g = make_inputs(shape, dtype, seed=seed)
        xd, wd, gd = x.to(device), w.to(device), g.to(device)
        barrier.wait()
        outs = []
        for _ in range(iterations):
            outs.append(ops.rms_norm(xd, wd, EPS))
            gi, gw = rms_norm_backward(gd, xd, wd, EPS)
        results[index] = (x, w, g, [o.cpu() for o in outs[-3:]], gi.cpu(), gw.cpu())
    except BaseException as e:  # reported by the main thread
        errors.append(e)


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_two_python_threads_concurrently(ops, device):
    configs = [(torch.float32, (33, 2048), 10), (torch.bfloat16, (17, 3000), 11)]
    barrier = threading.Barrier(len(configs))
    results, errors = [None] * len(configs), []
    threads = [
        threading.Thread(target=_thread_worker,
                         args=(ops, device, dtype, shape, seed, 200, barrier, results, errors, i))
        for i, (dtype, shape, seed) in enumerate(configs)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung (deadlock on the MPS queue?)"
    assert not errors, errors
    for (dtype, _, _), (x, w, g, outs, gi, gw) in zip(configs, results):
        expected = reference_rms_norm(x, w, EPS)
        for out in outs:
            assert_matches(out, expected, dtype)
        ref_input, ref_weight = reference_backward(g, x, w, EPS)
        assert_matches(gi, ref_input, dtype, scale=ref_input.abs().max().item())
        assert_matches(gw, ref_weight, dtype, scale=ref_weight.abs().max().item())


def test_concurrent_first_calls_in_a_fresh_process(ops):
    # The library and pipeline caches start empty only in a new process: four
    # threads make their first calls at once (same and different kernels).
    script = textwrap.dedent("""
        import threading, torch, my_mps_ops
        barrier = threading.Barrier(4)
        errors, outs = [], {}
        def work(i, dtype):
            try:
                x = torch.randn(8, 4096, device="mps").to(dtype)
                w = torch.ones(4096, device="mps", dtype=dtype)
                barrier.wait()
                y = my_mps_ops.rms_norm(x, w, 1e-6).cpu().double()
                xc = x.cpu().double()  # mps has no float64
                ref = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + 1e-6)
                outs[i] = (y - ref).abs().max().item()
            except BaseException as e:
                errors.append(repr(e))
        dtypes = [torch.float32, torch.float32, torch.float16, torch.bfloat16]
        threads = [threading.Thread(target=work, args=(i, d)) for i, d in enumerate(dtypes)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert not errors, errors
        assert len(outs) == 4 and max(outs.values()) < 0.05, outs
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=env_importing_this_package())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_mixed_devices_raise_a_clear_error(ops, device):
    x = torch.randn(4, 64, device=device)
    w = torch.ones(64)  # cpu
    with pytest.raises(RuntimeError, match=r"(?i)device"):
        ops.rms_norm(x, w, EPS)
    with pytest.raises(RuntimeError, match=r"(?i)device"):
        rms_norm_backward(torch.randn(4, 64), x, None, EPS)
