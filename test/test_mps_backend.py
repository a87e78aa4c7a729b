"""The MPS backend on an Apple GPU. Skipped (never deleted) where no MPS
device exists; run `make test` on a Mac to exercise it."""

import threading

import pytest
import torch

import my_mps_ops
from conftest import TOLERANCES

pytestmark = pytest.mark.skipif(not torch.backends.mps.is_available(), reason="no MPS device here (needs an Apple GPU)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ops = torch.ops.my_mps_ops


def reference(x, w, eps):
    x64 = x.double().cpu()
    y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    return y * w.double().cpu() if w is not None else y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 127, 4096, 8191, 65536])
def test_forward_and_backward_match_cpu(dtype, n):
    x = torch.randn(4, n, dtype=dtype)
    w = torch.randn(n, dtype=dtype)
    g = torch.randn(4, n, dtype=dtype)
    out_mps = my_mps_ops.rms_norm(x.to("mps"), w.to("mps"), 1e-6)
    torch.testing.assert_close(out_mps.cpu().double(), reference(x, w, 1e-6), **TOLERANCES[dtype])
    dx_mps, dw_mps = ops.rms_norm_backward(g.to("mps"), x.to("mps"), w.to("mps"), 1e-6, [True, True])
    dx_cpu, dw_cpu = ops.rms_norm_backward(g, x, w, 1e-6, [True, True])
    tol = {k: v * 4 for k, v in TOLERANCES[dtype].items()}
    torch.testing.assert_close(dx_mps.cpu().double(), dx_cpu.double(), **tol)
    torch.testing.assert_close(dw_mps.cpu().double(), dw_cpu.double(), **tol)


def test_many_ops_in_a_row_without_synchronize():
    # Our kernels share PyTorch's command encoder with its own ops.
    x = torch.randn(64, 512, device="mps")
    w = torch.randn(512, device="mps")
    y = x
    expected = x.cpu()
    for _ in range(20):
        y = my_mps_ops.rms_norm(y * 1.5 + 0.1, w, 1e-5)
        expected = reference(expected * 1.5 + 0.1, w, 1e-5).float()
    torch.testing.assert_close(y.cpu(), expected, atol=1e-3, rtol=1e-3)


def test_views_with_storage_offsets():
    base = torch.randn(10, 300, device="mps")
    view = base[2:, 7:263]
    w = torch.randn(300, device="mps")[10:266]
    torch.testing.assert_close(my_mps_ops.rms_norm(view, w, 1e-6).cpu().double(), reference(view, w, 1e-6),
                               **TOLERANCES[torch.float32])


def test_repeated_calls_do_not_grow_memory():
    x = torch.randn(32, 1024, device="mps")
    w = torch.randn(1024, device="mps")
    for _ in range(100):
        my_mps_ops.rms_norm(x, w, 1e-6)
    torch.mps.synchronize()
    before = torch.mps.driver_allocated_memory()
    for _ in range(10_000):
        my_mps_ops.rms_norm(x, w, 1e-6)
    torch.mps.synchronize()
    assert torch.mps.driver_allocated_memory() - before <= 64 * 2**20


def test_two_threads_concurrently():
    errors = []

    def work(seed):
        try:
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn(16, 777, generator=gen)
            w = torch.randn(777, generator=gen)
            for _ in range(200):
                out = my_mps_ops.rms_norm(x.to("mps"), w.to("mps"), 1e-6).cpu()
            torch.testing.assert_close(out.double(), reference(x, w, 1e-6), **TOLERANCES[torch.float32])
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_cpu_tensor_reaching_mps_kernel_is_rejected():
    with pytest.raises(RuntimeError, match="same device"):
        my_mps_ops.rms_norm(torch.randn(2, 8, device="mps"), torch.randn(8), 1e-6)
