"""Benchmarks every my_mps_ops op against PyTorch on each available device.

    python benchmarks/bench_ops.py [--quick] [--ops rms_norm,...] [--devices cpu,mps]

Ops register cases in benchmarks/cases_*.py as a list CASES of dicts:
op, shapes (and optional quick_shapes, device_shapes {device: shapes}), dtypes, make_inputs(shape, dtype, device),
ours(*inputs), baselines {name: f(*inputs)}, grad_inputs (indices needing grad for
forward+backward), optional targets [(shape, dtype, mode, baseline, min_speedup)] and
memory_targets [(shape, dtype, mode, baseline, max_peak_ratio)].

Times are medians of repeated runs after warm-up, in one process; speedups are
ratios from the same run. Forward+backward runs the forward and out.backward(grad)
with a gradient made once before timing (see make_runner). Peak memory is measured on one further call of each
implementation (see peak_memory_mb). Writes benchmarks/results/results.{csv,json,md} and a
bar chart speedups.png. MPS rows appear only when run on a Mac.
"""

from __future__ import annotations

import argparse
import csv
import glob
import importlib.util
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def load_cases():
    cases = []
    for path in sorted(glob.glob(os.path.join(HERE, "cases_*.py"))):
        spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cases += module.CASES
    return cases


def sync(device):
    if device == "mps":
        torch.mps.synchronize()


def time_fns(fns, device, min_rounds=5, budget_s=3.0, max_rounds=50):
    """Median time of each fn in fns (a dict), measured in interleaved rounds.

    Each round runs every fn once, so a slow spell of a shared machine lands on
    all implementations alike instead of on whichever was being timed then."""
    for fn in fns.values():
        fn()
        fn()
    sync(device)
    times = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - start < budget_s and rounds < max_rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_memory_mb(fn, device):
    """Peak memory allocated above what existed before one call of fn.

    CPU: the PyTorch profiler's allocation records (every allocation and free,
    in order; the running sum's maximum). MPS: growth of the driver's
    allocation after emptying the cache (the caching allocator keeps the peak's
    blocks until the next empty_cache, so this is the high-water mark)."""
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


def make_runner(fn, inputs, grad_inputs, backward):
    if not backward:
        def forward():
            with torch.no_grad():
                fn(*inputs)
        return forward
    leaves = [t.detach().requires_grad_(i in grad_inputs) if t.is_floating_point() else t
              for i, t in enumerate(inputs)]

    def first_output():
        out = fn(*leaves)
        return out[0] if isinstance(out, (tuple, list)) else out

    # The upstream gradient is an input of the backward, made before timing like
    # the forward inputs (in training it comes from the layers above). Made inside
    # the timed call it would add one fresh output-sized allocation and fill to
    # every implementation alike; the same seed gives every implementation the
    # same values.
    with torch.no_grad():
        like = first_output()
    generator = torch.Generator(device=like.device).manual_seed(1)
    grad_out = torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)
    del like

    def forward_backward():
        first_output().backward(grad_out)
        for t in leaves:
            t.grad = None
    return forward_backward


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    p.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    p.add_argument("--devices", default="", help="comma-separated devices (default: cpu, and mps when available)")
    args = p.parse_args(argv)

    import my_mps_ops  # noqa: F401

    devices = args.devices.split(",") if args.devices else ["cpu"] + (["mps"] if torch.backends.mps.is_available() else [])
    wanted = set(filter(None, args.ops.split(",")))
    rows = []
    for case in load_cases():
        if wanted and case["op"] not in wanted:
            continue
        for device in devices:
            if args.quick:
                shapes = case.get("quick_shapes", case["shapes"][:1])
            else:  # a case may give other sizes per device (e.g. longer sequences on mps)
                shapes = case.get("device_shapes", {}).get(device, case["shapes"])
            for dtype in case["dtypes"]:
                for shape in shapes:
                    torch.manual_seed(0)
                    inputs = case["make_inputs"](shape, dtype, device)
                    for mode in ("fwd", "fwd+bwd"):
                        impls = {"my_mps_ops": case["ours"], **case["baselines"]}
                        runners = {name: make_runner(fn, inputs, case["grad_inputs"], mode == "fwd+bwd")
                                   for name, fn in impls.items()}
                        timings = time_fns(runners, device)
                        peaks = {name: peak_memory_mb(run, device) for name, run in runners.items()}
                        for name, t in timings.items():
                            if name == "my_mps_ops":
                                continue
                            rows.append(dict(op=case["op"], device=device, dtype=str(dtype).replace("torch.", ""),
                                             shape="x".join(map(str, shape)), mode=mode, baseline=name,
                                             ours_ms=timings["my_mps_ops"] * 1e3, baseline_ms=t * 1e3,
                                             speedup=t / timings["my_mps_ops"], ours_peak_mb=peaks["my_mps_ops"],
                                             baseline_peak_mb=peaks[name]))
                        print(f"{case['op']:<12} {device:<4} {str(dtype)[6:]:<9} {str(shape):<18} {mode:<8} " +
                              "  ".join(f"{n} {v * 1e3:8.2f} ms {peaks[n]:7.0f} MB" for n, v in timings.items()),
                              flush=True)

    os.makedirs(RESULTS, exist_ok=True)
    header = ["op", "device", "dtype", "shape", "mode", "baseline", "ours_ms", "baseline_ms", "speedup",
              "ours_peak_mb", "baseline_peak_mb"]
    with open(os.path.join(RESULTS, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(RESULTS, "results.json"), "w") as f:
        json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(),
                       thp_mem_alloc_enable=os.environ.get("THP_MEM_ALLOC_ENABLE", ""), rows=rows), f, indent=1)
    table = ["| op | device | dtype | shape | mode | vs | ours (ms) | theirs (ms) | speedup "
             "| ours peak (MB) | theirs peak (MB) |",
             "|---|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    table += [f"| {r['op']} | {r['device']} | {r['dtype']} | {r['shape']} | {r['mode']} | {r['baseline']} | "
              f"{r['ours_ms']:.2f} | {r['baseline_ms']:.2f} | {r['speedup']:.2f}x | "
              f"{r['ours_peak_mb']:.0f} | {r['baseline_peak_mb']:.0f} |" for r in rows]
    with open(os.path.join(RESULTS, "results.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, huge pages for PyTorch allocations: "
          f"{'on' if os.environ.get('THP_MEM_ALLOC_ENABLE') == '1' else 'off'} (THP_MEM_ALLOC_ENABLE)")
    print("\n".join(table))

    print("\nTargets (cpu, from this run):")
    for case in load_cases():
        for shape, dtype, mode, baseline, minimum in case.get("targets", []):
            match = [r for r in rows if r["op"] == case["op"] and r["device"] == "cpu" and r["mode"] == mode and
                     r["baseline"] == baseline and r["shape"] == "x".join(map(str, shape)) and
                     r["dtype"] == str(dtype).replace("torch.", "")]
            for r in match:
                verdict = "met" if r["speedup"] >= minimum else "NOT met"
                print(f"  {case['op']} {r['shape']} {r['dtype']} {mode} vs {baseline}: {r['speedup']:.2f}x "
                      f"(target >= {minimum}x) {verdict}")
        for shape, dtype, mode, baseline, max_ratio in case.get("memory_targets", []):
            match = [r for r in rows if r["op"] == case["op"] and r["device"] == "cpu" and r["mode"] == mode and
                     r["baseline"] == baseline and r["shape"] == "x".join(map(str, shape)) and
                     r["dtype"] == str(dtype).replace("torch.", "")]
            for r in match:
                ratio = r["ours_peak_mb"] / max(r["baseline_peak_mb"], 1e-9)
                verdict = "met" if ratio <= max_ratio else "NOT met"
                print(f"  {case['op']} {r['shape']} {r['dtype']} {mode} peak memory vs {baseline}: "
                      f"{r['ours_peak_mb']:.0f} / {r['baseline_peak_mb']:.0f} MB = {ratio:.2f} "
                      f"(target <= {max_ratio}) {verdict}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = [f"{r['op']}\n{r['device']} {r['dtype']}\n{r['shape']} {r['mode']}\nvs {r['baseline']}" for r in rows]
        fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.7), 5))
        ax.bar(range(len(rows)), [r["speedup"] for r in rows])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
        ax.set_ylabel("speedup of my_mps_ops (x)")
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, "speedups.png"), dpi=100)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
