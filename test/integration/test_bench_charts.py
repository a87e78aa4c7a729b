"""benchmarks/bench_charts.py (bench_ops.py's charts) drawn from a small synthetic
results table, as `bench_ops.py --plot-only` does from a saved run."""

import csv
import importlib.util
import json
import os
import struct

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not os.path.exists(os.path.join(ROOT, "benchmarks", "bench_charts.py")):
    pytest.skip("tests benchmarks/: needs the source checkout", allow_module_level=True)
pytest.importorskip("matplotlib")  # scripts/setup.sh installs it


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows():
    rows = []
    for op, baselines in (("rms_norm", ["F.rms_norm", "composite"]), ("swiglu", ["composite"])):
        for dtype in ("float32", "bfloat16"):
            for mode in ("fwd", "fwd+bwd"):
                for i, baseline in enumerate(baselines):
                    speedup = 0.8 + i + (mode == "fwd+bwd")  # below and above 1x
                    rows.append(dict(op=op, device="cpu", dtype=dtype, shape="64x128", mode=mode, baseline=baseline,
                                     ours_ms=1.0, baseline_ms=speedup, speedup=speedup, ours_peak_mb=2.0,
                                     baseline_peak_mb=4.0 + i))
    return rows


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.mark.parametrize("fmt", ["json", "csv", "md"])
def test_plot_only_writes_both_charts(tmp_path, fmt):
    rows = _rows()
    path = tmp_path / f"results.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(dict(rows=rows)))
    elif fmt == "md":  # the table bench_ops.py prints and writes to results.md
        path.write_text("| op | device | dtype | shape | mode | vs | ours (ms) | theirs (ms) | speedup | ours peak (MB) "
                        "| theirs peak (MB) |\n|---|---|---|---|---|---|---:|---:|---:|---:|---:|\n" +
                        "".join(f"| {r['op']} | {r['device']} | {r['dtype']} | {r['shape']} | {r['mode']} | "
                                f"{r['baseline']} | {r['ours_ms']:.2f} | {r['baseline_ms']:.2f} | {r['speedup']:.2f}x | "
                                f"{r['ours_peak_mb']:.0f} | {r['baseline_peak_mb']:.0f} |\n" for r in rows))
    else:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    assert len(_load("bench_charts").load_rows(str(path))) == len(rows)
    assert _load("bench_ops").main(["--plot-only", str(path)]) == 0
    for name in ("speedups.png", "peak_memory.png"):
        width, height = _png_size(tmp_path / name)
        assert 400 <= width <= 1600 and height >= 300, (name, width, height)


def test_rows_without_peak_memory(tmp_path):
    charts = _load("bench_charts")
    rows = _rows()
    for r in rows[:3]:
        del r["ours_peak_mb"], r["baseline_peak_mb"]
    written = charts.write_charts(rows, str(tmp_path))
    assert os.path.exists(written["speedup"]) and os.path.exists(written["memory"])
    # No timed row (e.g. a --model-only run): no chart rather than an empty one.
    bare = [{k: v for k, v in r.items() if k in ("op", "device", "dtype", "shape", "mode", "baseline")} for r in rows]
    assert charts.write_charts(bare, str(tmp_path / "none")) == dict(speedup=None, memory=None)
