"""Benchmarks every my_mps_ops op against PyTorch on each available device.

    python benchmarks/bench_ops.py [--quick] [--ops rms_norm,...] [--devices cpu,mps]
    python benchmarks/bench_ops.py --plot-only benchmarks/results/results.json

Ops register cases in benchmarks/cases_*.py as a list CASES of dicts:
op, shapes (and optional quick_shapes, device_shapes {device: shapes}), dtypes, make_inputs(shape, dtype, device),
ours(*inputs), baselines {name: f(*inputs)}, grad_inputs (indices needing grad for
forward+backward), optional targets [(shape, dtype, mode, baseline, min_speedup)] and
memory_targets [(shape, dtype, mode, baseline, max_peak_ratio)].

With --model CHIP (e.g. "M1 Max", "M4 Pro"; see my_mps_ops/emulator/apple_gpus.json)
every row also gets projected columns for that Apple GPU, computed on the Metal
emulator (nothing measured on a Mac): our launches are run under
my_mps_ops.emulator.profile() (counted device bytes vs the compulsory minimum,
coalescing, bank conflicts), PyTorch's composite is recorded as aten ops, and
both go through one roofline model (my_mps_ops/emulator/projection.py) to a
projected time and a projected ratio. Profiling is slow, so each case may give
emulator-sized `model_shapes` {shape: smaller shape}: only dimensions along
which the work is independent (rows, batch, heads) are reduced, and counts are
scaled back by the ratio of element counts. --model-only skips the timings.
The projections also go to results/projection.{csv,md} and a roofline chart
roofline.png (one point per kernel).

Times are medians of repeated runs after warm-up, in one process; speedups are
ratios from the same run. Forward+backward runs the forward and out.backward(grad)
with a gradient made once before timing (see make_runner). Peak memory is measured on one further call of each
implementation (see peak_memory_mb). Writes benchmarks/results/results.{csv,json,md} and the
charts speedups.png and peak_memory.png (benchmarks/bench_charts.py; --plot-only RESULTS redraws
them from a saved results file). MPS rows appear only when run on a Mac.
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
    """Peak memory allocated above what existed before one call of fn
    (my_mps_ops.memory.peak_allocated_mb: the profiler's allocation records on
    cpu, the driver's allocation growth on mps)."""
    from my_mps_ops.memory import peak_allocated_mb

    return peak_allocated_mb(fn, device)


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


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def model_columns(case, shape, dtype, mode, model) -> dict:
    """Projected columns of one op, shape, dtype and mode on `model`'s chip (see the module's
    docstring), with "baselines" {name: columns} and "kernels" [per launch]; None when the case
    gives model_shapes without this shape."""
    from my_mps_ops.emulator import profile
    from my_mps_ops.emulator.projection import AtenRecorder
    from my_mps_ops.testing import metal_emulation

    if "model_shapes" in case and tuple(shape) not in case["model_shapes"]:
        return None  # too slow to profile at this shape: no emulator-sized stand-in given
    mshape = tuple(case.get("model_shapes", {}).get(tuple(shape), shape))
    scale = _numel(shape) / _numel(mshape)
    half = dtype in (torch.float16, torch.bfloat16)
    backward = mode == "fwd+bwd"
    torch.manual_seed(0)
    inputs = case["make_inputs"](mshape, dtype, "cpu")
    with metal_emulation():
        run = make_runner(case["ours"], inputs, case["grad_inputs"], backward)
        with profile() as prof, AtenRecorder() as rec:
            run()
    launches = prof.launches
    moved = sum(l.bytes_moved for l in launches) * scale
    compulsory = sum(l.compulsory_bytes for l in launches) * scale
    flops = sum(l.mma_flops for l in launches) * scale
    segs = sum(s.segments for l in launches for s in l.device_sites())
    need = sum(s.min_segments for l in launches for s in l.device_sites())
    # Our launches plus the aten ops around them (e.g. an add of two outputs), one model.
    ours_s = (sum(model.time(l.bytes_moved * scale, l.mma_flops * scale, 1, half) for l in launches) +
              sum(model.time(op.bytes * scale, op.flops * scale, 1, half) for op in rec.ops))
    kernels = []
    for l in launches:
        t = model.time(l.bytes_moved * scale, l.mma_flops * scale, 1, half)
        roof = max(model.memory_time(l.compulsory_bytes * scale), model.compute_time(l.mma_flops * scale, half))
        kernels.append(dict(kernel=l.kernel, intensity=l.mma_flops / max(l.compulsory_bytes, 1),
                            fraction=roof / t, bytes_ratio=l.bytes_ratio,
                            coalescing=l.coalescing if l.coalescing is not None else float("nan"),
                            bank_conflicts=l.bank_conflicts * scale, barriers_per_thread=l.barriers_per_thread,
                            threadgroup_bytes=l.threadgroup_memory_bytes, mma_flops=l.mma_flops * scale,
                            threadgroups_per_core=l.threadgroups_per_core(model.chip.threadgroup_memory_per_core)))
    out = dict(model_shape="x".join(map(str, mshape)), model_scale=scale, ours_launches=len(launches),
               ours_aten_ops=len(rec.ops), ours_bytes_mb=moved / 2**20, compulsory_mb=compulsory / 2**20,
               ours_bytes_ratio=moved / compulsory if compulsory else float("nan"),
               ours_coalescing=need / segs if segs else float("nan"),
               ours_bank_conflicts=sum(l.bank_conflicts for l in launches) * scale,
               ours_gflop=flops / 1e9, ours_proj_us=ours_s * 1e6, baselines={}, kernels=kernels)
    for name, fn in case["baselines"].items():
        torch.manual_seed(0)
        inputs = case["make_inputs"](mshape, dtype, "cpu")
        run = make_runner(fn, inputs, case["grad_inputs"], backward)
        with AtenRecorder() as theirs:
            run()
        t = model.aten_time([type(op)(op.name, op.input_bytes * scale, op.output_bytes * scale, op.flops * scale)
                             for op in theirs.ops], half)
        out["baselines"][name] = dict(composite_ops=len(theirs.ops), composite_bytes_mb=theirs.bytes * scale / 2**20,
                                      composite_proj_us=t * 1e6, proj_ratio=t / ours_s)
    return out


MODEL_COLUMNS = ["model_shape", "model_scale", "ours_launches", "ours_bytes_mb", "compulsory_mb", "ours_bytes_ratio",
                 "ours_coalescing", "ours_bank_conflicts", "ours_gflop", "ours_proj_us", "composite_ops",
                 "composite_bytes_mb", "composite_proj_us", "proj_ratio"]


def roofline_chart(points, model, path) -> None:
    """Arithmetic intensity (counted FLOPs per compulsory byte) vs the fraction of the roof the
    projected time reaches, one point per kernel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 0.01
    fig, ax = plt.subplots(figsize=(10, 6))
    unique = {}
    for p in points:  # one point per kernel, dtype and shape (a kernel runs in fwd and in fwd+bwd alike)
        unique.setdefault((p["kernel"], p["dtype"], p["shape"]), p)
    for p in unique.values():
        x = max(p["intensity"], floor)
        ax.scatter(x, p["fraction"], s=18)
        ax.annotate(f"{p['kernel']} {p['shape']}", (x, p["fraction"]), fontsize=5,
                    xytext=(3, 2), textcoords="offset points")
    ax.axvline(model.ridge(False), color="grey", linestyle="--", linewidth=0.8)
    ax.text(model.ridge(False), 1.02, "ridge (FP32)", fontsize=7, color="grey")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.1)
    ax.set_xlabel(f"arithmetic intensity: counted simdgroup_matrix FLOPs per compulsory byte "
                  f"(kernels without any at {floor})")
    ax.set_ylabel("fraction of the roof (roofline time of compulsory bytes / projected time)")
    ax.set_title("PROJECTED, not measured: " + model.describe(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def projection_table(rows, kernel_points, model) -> None:
    """results/projection.md and .csv: the projected columns, with the model's assumptions above them."""
    lines = [f"PROJECTED, not measured ({model.describe()}). Projected time = max(bytes / (bandwidth x fraction), "
             "FLOPs / peak) + overhead per dispatch; ours: device bytes all threads load and store, counted on the "
             "Metal emulator; composite: each aten op reads its inputs and writes its outputs once. Counts from the "
             "model shape, scaled to the shape by element count.", "",
             "| op | dtype | shape (model shape) | mode | vs | ours bytes / compulsory | coalescing | bank conflicts "
             "| projected ours (us) | projected composite (us) | composite ops | projected ratio |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "ours_proj_us" not in r:
            continue
        lines.append(f"| {r['op']} | {r['dtype']} | {r['shape']} ({r['model_shape']}) | {r['mode']} | {r['baseline']} | "
                     f"{r['ours_bytes_ratio']:.2f} | {100 * r['ours_coalescing']:.0f}% | {r['ours_bank_conflicts']:.0f} | "
                     f"{r['ours_proj_us']:.1f} | {r['composite_proj_us']:.1f} | {r['composite_ops']} | "
                     f"{r['proj_ratio']:.2f}x |")
    lines += ["", "Per kernel (ours):", "",
              "| op | dtype | shape | mode | kernel | bytes / compulsory | coalescing | bank conflicts | barriers/thread "
              "| threadgroup B | threadgroups/core by its memory | GFLOP (MMA) | fraction of roof |",
              "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in kernel_points:
        lines.append(f"| {k['op']} | {k['dtype']} | {k['shape']} | {k['mode']} | {k['kernel']} | {k['bytes_ratio']:.2f} | "
                     f"{100 * k['coalescing']:.0f}% | {k['bank_conflicts']:.0f} | {k['barriers_per_thread']:g} | "
                     f"{k['threadgroup_bytes']} | "
                     f"{'-' if not k['threadgroup_bytes'] else k['threadgroups_per_core'] or 'unknown'} | "
                     f"{k['mma_flops'] / 1e9:.3f} | {k['fraction']:.2f} |")
    with open(os.path.join(RESULTS, "projection.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(RESULTS, "projection_kernels.csv"), "w", newline="") as f:
        if kernel_points:
            w = csv.DictWriter(f, fieldnames=list(kernel_points[0]))
            w.writeheader()
            w.writerows(kernel_points)
    print("\n".join(lines))


def _charts():
    """benchmarks/bench_charts.py, found next to this file however this one was loaded."""
    spec = importlib.util.spec_from_file_location("bench_charts", os.path.join(HERE, "bench_charts.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    p.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    p.add_argument("--devices", default="", help="comma-separated devices (default: cpu, and mps when available)")
    p.add_argument("--model", default="", help="an Apple GPU (e.g. 'M1 Max'): add projected columns from the emulator")
    p.add_argument("--model-only", action="store_true", help="with --model: projections only, no timings")
    p.add_argument("--bandwidth-fraction", type=float, default=None, help="achievable fraction of the bandwidth")
    p.add_argument("--dispatch-us", type=float, default=None, help="assumed overhead per dispatch, microseconds")
    p.add_argument("--plot-only", metavar="RESULTS", default="",
                   help="no benchmark: redraw the charts from a results.json, .csv or .md into its directory")
    args = p.parse_args(argv)
    if args.plot_only:
        _charts().plot_results(args.plot_only)
        return 0
    model = None
    if args.model:
        from my_mps_ops.emulator.projection import Model, find_chip

        model = Model(find_chip(args.model), args.bandwidth_fraction, args.dispatch_us)
        print(model.describe(), flush=True)
    elif args.model_only:
        p.error("--model-only needs --model")
    kernel_points = []

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
                        projected = None
                        if model is not None and device == "cpu":
                            projected = model_columns(case, shape, dtype, mode, model)
                        if projected is not None:
                            for k in projected["kernels"]:
                                kernel_points.append(dict(k, op=case["op"], dtype=str(dtype)[6:], mode=mode,
                                                          shape="x".join(map(str, shape))))
                            print(f"{case['op']:<12} {str(dtype)[6:]:<9} {str(shape):<18} {mode:<8} projected: ours "
                                  f"{projected['ours_proj_us']:.1f} us (bytes {projected['ours_bytes_ratio']:.2f}x "
                                  f"compulsory, coalescing {100 * projected['ours_coalescing']:.0f}%) " +
                                  "  ".join(f"{n} {b['composite_proj_us']:.1f} us ({b['proj_ratio']:.2f}x)"
                                            for n, b in projected["baselines"].items()), flush=True)
                        if args.model_only:
                            timings, peaks = {}, {}
                            names = list(case["baselines"])
                        else:
                            impls = {"my_mps_ops": case["ours"], **case["baselines"]}
                            runners = {name: make_runner(fn, inputs, case["grad_inputs"], mode == "fwd+bwd")
                                       for name, fn in impls.items()}
                            timings = time_fns(runners, device)
                            peaks = {name: peak_memory_mb(run, device) for name, run in runners.items()}
                            names = [n for n in timings if n != "my_mps_ops"]
                        for name in names:
                            row = dict(op=case["op"], device=device, dtype=str(dtype).replace("torch.", ""),
                                       shape="x".join(map(str, shape)), mode=mode, baseline=name)
                            if timings:
                                t = timings[name]
                                row.update(ours_ms=timings["my_mps_ops"] * 1e3, baseline_ms=t * 1e3,
                                           speedup=t / timings["my_mps_ops"], ours_peak_mb=peaks["my_mps_ops"],
                                           baseline_peak_mb=peaks[name])
                            if projected is not None:
                                row.update({k: v for k, v in projected.items() if k not in ("baselines", "kernels")})
                                row.update(projected["baselines"][name])
                                row["model"] = model.chip.name
                            rows.append(row)
                        if timings:
                            print(f"{case['op']:<12} {device:<4} {str(dtype)[6:]:<9} {str(shape):<18} {mode:<8} " +
                                  "  ".join(f"{n} {v * 1e3:8.2f} ms {peaks[n]:7.0f} MB" for n, v in timings.items()),
                                  flush=True)

    os.makedirs(RESULTS, exist_ok=True)
    header = ["op", "device", "dtype", "shape", "mode", "baseline", "ours_ms", "baseline_ms", "speedup",
              "ours_peak_mb", "baseline_peak_mb"]
    if model is not None:
        header += ["model"] + MODEL_COLUMNS
    with open(os.path.join(RESULTS, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(RESULTS, "results.json"), "w") as f:
        json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(),
                       thp_mem_alloc_enable=os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
                       projection=model.describe() if model is not None else None,
                       kernels=kernel_points, rows=rows), f, indent=1)
    if model is not None:
        projection_table(rows, kernel_points, model)
        try:
            roofline_chart(kernel_points, model, os.path.join(RESULTS, "roofline.png"))
        except ImportError:
            pass
    if args.model_only:
        return 0
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
        _charts().write_charts(rows, RESULTS)
    except ImportError:
        print("matplotlib not installed: no charts written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
