"""Peak memory of one call, as the demo, the benchmarks and the memory tests
measure it."""

from __future__ import annotations

import torch


def peak_allocated_mb(fn, device: str = "cpu") -> float:
    """Memory allocated at the peak of one call of fn, above what existed
    before, in MiB. CPU: the PyTorch profiler's allocation records (every
    allocation and free, in order; the running sum's maximum). MPS: growth of
    the driver's allocation after emptying the cache (the caching allocator
    keeps the peak's blocks until the next empty_cache, so this is the
    high-water mark)."""
    if device == "mps":
        torch.mps.synchronize()
        torch.mps.empty_cache()
        base = torch.mps.driver_allocated_memory()
        fn()
        torch.mps.synchronize()
        return (torch.mps.driver_allocated_memory() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    current = peak = 0
    for _, nbytes in records:
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20
