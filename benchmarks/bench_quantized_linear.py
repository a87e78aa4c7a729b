"""quantized_linear vs dequantize-then-matmul on this machine's CPU: forward
and backward (grad_x) times at decode shapes (1, 4, 8 rows) and a prefill
shape (512 rows) of a 4096 x 4096 weight, 4-bit affine (group 64) and nf4,
ratios from one run.

    python benchmarks/bench_quantized_linear.py            # rows 1, 4, 8, 512
    python benchmarks/bench_quantized_linear.py --quick    # 1024 x 1024, rows 1, 8, 64
    python benchmarks/bench_quantized_linear.py --threads 1

Columns: "ours" is my_mps_ops.quantized_linear (forward) and the
quantized_linear_backward op (grad_x = grad_out @ W); "composite" is
my_mps_ops.dequantize (Python tensor ops) then F.linear / a matmul, timed
together as the baseline the targets name; "matmul only" is F.linear / the
matmul with the float32 weight already expanded (what dequantize-then-matmul
costs if the expansion were free: the bar a fused kernel has to beat on
arithmetic alone). Ratios are the other implementation's time over ours (> 1:
ours is faster). Targets: forward >= 1.5x of the composite at decode shapes,
backward >= 1.0x. Each time is the best of several calls after a warm-up (on
a machine shared with other jobs the median measures the scheduler: a call of
a few ms that loses its core for a time slice takes 10-20 ms); the medians are
printed after the table.
"""

import argparse
import time

import torch
import torch.nn.functional as F

import my_mps_ops

ops = torch.ops.my_mps_ops


def best_time(fn, repeats, min_seconds=0.5):
    """(best, median) wall time of at least `repeats` calls after a warm-up,
    repeating for at least min_seconds."""
    fn()  # warm-up
    times = []
    start_all = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start_all < min_seconds and len(times) < 500):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[0], times[len(times) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_features = in_features = 1024 if args.quick else 4096
    row_counts = (1, 8, 64) if args.quick else (1, 4, 8, 512)
    formats = (("affine", 4, 64), ("nf4", 4, 64))
    print(f"quantized_linear, cpu float32, W {out_features} x {in_features}, best of >= {args.repeats} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads, CPU copy {my_mps_ops._C.cpu_isa()}; quantized_linear has baseline and avx2 copies)")
    print("| format | rows | pass | ours (ms) | composite (ms) | matmul only (ms) | vs composite | vs matmul only |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    medians = []
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=g) / in_features ** 0.5
    for mode, bits, group_size in formats:
        q, scales, biases = my_mps_ops.quantize(weight, bits, group_size, mode)
        w = my_mps_ops.dequantize(q, scales, biases, bits, group_size, mode, dtype=torch.float32)
        name = f"{mode} {bits}-bit g{group_size}" if mode == "affine" else mode
        for rows in row_counts:
            x = torch.randn(rows, in_features, generator=g)
            grad = torch.randn(rows, out_features, generator=g)
            cases = {
                "forward": (lambda: my_mps_ops.quantized_linear(x, q, scales, biases, None, bits, group_size, mode),
                            lambda: F.linear(x, my_mps_ops.dequantize(q, scales, biases, bits, group_size, mode,
                                                                      dtype=torch.float32)),
                            lambda: F.linear(x, w)),
                "grad_x": (lambda: ops.quantized_linear_backward(grad, q, scales, biases, group_size, bits, mode,
                                                                 False),
                           lambda: grad @ my_mps_ops.dequantize(q, scales, biases, bits, group_size, mode,
                                                                dtype=torch.float32),
                           lambda: grad @ w),
            }
            for pass_name, (ours, composite, matmul) in cases.items():
                t_ours, m_ours = best_time(ours, args.repeats)
                t_comp, m_comp = best_time(composite, 2, min_seconds=0.0)
                t_mm, m_mm = best_time(matmul, args.repeats)
                print(f"| {name} | {rows} | {pass_name} | {t_ours * 1e3:.2f} | {t_comp * 1e3:.1f} | "
                      f"{t_mm * 1e3:.2f} | {t_comp / t_ours:.1f}x | {t_mm / t_ours:.2f}x |", flush=True)
                medians.append(f"{name}, {rows} rows, {pass_name}: ours {m_ours * 1e3:.2f} ms, composite "
                               f"{m_comp * 1e3:.1f} ms, matmul only {m_mm * 1e3:.2f} ms")
    print("\nmedians:")
    for line in medians:
        print("  " + line)


if __name__ == "__main__":
    main()
