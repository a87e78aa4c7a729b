"""Charts of bench_ops.py's results: speed-up and peak memory, one panel per op.

    python benchmarks/bench_charts.py benchmarks/results/results.json [--out DIR]
    python benchmarks/bench_ops.py --plot-only benchmarks/results/results.json   # the same

Reads results.json, results.csv or results.md (as bench_ops.py writes them; the
Markdown table may sit inside a longer document) and writes
speedups.png and peak_memory.png next to the results file (or into --out),
without running any benchmark.

speedups.png: one panel per op and shape (and device, when several were run);
a group of bars per baseline; in each group one bar per dtype (colour) and mode
(plain: forward, hatched: forward+backward). The speed-up axis is logarithmic,
so 2x faster and 2x slower are the same distance from the 1x line.

peak_memory.png: the same panels; a group per dtype and mode; one bar for
my_mps_ops and one per baseline. Rows without peak memory (e.g. from
--model-only) are left out and counted in the title.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

SPEEDUP_FILE = "speedups.png"
MEMORY_FILE = "peak_memory.png"
NUMERIC = ("ours_ms", "baseline_ms", "speedup", "ours_peak_mb", "baseline_peak_mb")
MODES = ("fwd", "fwd+bwd")
MODE_LABEL = {"fwd": "forward", "fwd+bwd": "forward+backward"}
# Per dtype (matplotlib tab10 colours); the mode is told apart by hatching, not colour.
DTYPE_COLOURS = {"float32": "#1f77b4", "bfloat16": "#ff7f0e", "float16": "#2ca02c", "float64": "#9467bd"}
OTHER_COLOURS = ["#8c564b", "#e377c2", "#7f7f7f", "#17becf"]
OURS_COLOUR = "#1f77b4"
BASELINE_COLOURS = ["#ff7f0e", "#7f7f7f", "#2ca02c", "#d62728"]
DPI = 100
WIDTH_IN = 16.0  # 1600 px at DPI
MIN_WIDTH_IN = 8.0  # room for the title and the legend above a single panel


MD_COLUMNS = ("op", "device", "dtype", "shape", "mode", "baseline") + NUMERIC


def _markdown_rows(path: str) -> List[dict]:
    """The rows of a results.md table (or one copied into a document): the cells in
    bench_ops.py's column order, "x" after the speed-up; other lines are skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not line.startswith("|") or len(cells) != len(MD_COLUMNS):
                continue
            try:
                numbers = [float(c.rstrip("x")) for c in cells[6:]]
            except ValueError:  # the header and the alignment row
                continue
            rows.append(dict(zip(MD_COLUMNS, cells[:6] + numbers)))
    return rows


def load_rows(path: str) -> List[dict]:
    """bench_ops.py's rows from results.json, results.csv or results.md; numbers as
    floats, a missing or empty measurement as absent."""
    if path.endswith(".json"):
        with open(path) as f:
            rows = json.load(f)["rows"]
    elif path.endswith(".md"):
        rows = _markdown_rows(path)
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        r = dict(r)
        for k in NUMERIC:
            v = r.get(k)
            if v is None or v == "":
                r.pop(k, None)
            else:
                r[k] = float(v)
        out.append(r)
    return out


def _ordered(values) -> list:
    seen = {}
    for v in values:
        seen.setdefault(v, None)
    return list(seen)


def _panels(rows: Sequence[dict]) -> Tuple[List[Tuple[str, str, str]], bool]:
    """(op, device, shape) panel keys in the results' order, and whether the device needs naming."""
    keys = _ordered((r["op"], r["device"], r["shape"]) for r in rows)
    return keys, len({k[1] for k in keys}) > 1


def _grid(n: int) -> Tuple[int, int]:
    cols = 1 if n == 1 else 2 if n <= 4 else 3
    return math.ceil(n / cols), cols


def _figure(n: int, panel_height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = _grid(n)
    width = min(WIDTH_IN, max(MIN_WIDTH_IN, 5.4 * cols))
    fig, axes = plt.subplots(rows, cols, figsize=(width, panel_height * rows + 1.0), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def _header(fig, title: str, legend_handles=None) -> None:
    """A figure-wide legend row (if any), then the title wrapped to the figure's width, then the panels."""
    import textwrap

    height = fig.get_figheight()
    top = 0.05  # inches from the top edge
    if legend_handles:
        fig.legend(handles=legend_handles, loc="upper center", ncol=len(legend_handles), fontsize=10,
                   frameon=False, bbox_to_anchor=(0.5, 1 - top / height))
        top += 0.35
    lines = textwrap.wrap(title, int(fig.get_figwidth() * 9))  # about 9 characters per inch at 13 pt
    # fig.text, not suptitle: tight_layout would make room for a suptitle a second time inside rect.
    text = fig.text(0.5, 1 - top / height, "\n".join(lines), fontsize=13, ha="center", va="top")
    fig.canvas.draw()
    bottom = text.get_window_extent().y0 / fig.dpi  # inches from the bottom edge
    fig.tight_layout(rect=(0, 0, 1, (bottom - 0.05) / height))


def _dtype_colour(dtype: str, dtypes: Sequence[str]) -> str:
    if dtype in DTYPE_COLOURS:
        return DTYPE_COLOURS[dtype]
    extra = [d for d in dtypes if d not in DTYPE_COLOURS]
    return OTHER_COLOURS[extra.index(dtype) % len(OTHER_COLOURS)]


def _panel_title(op: str, device: str, shape: str, name_device: bool) -> str:
    return f"{op}  {shape}" + (f"  ({device})" if name_device else "")


def _speedup_ticks(lo: float, hi: float) -> List[float]:
    candidates = [0.1, 0.2, 0.5, 1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000]
    return [t for t in candidates if lo <= t <= hi]


def _speedup_label(s: float) -> str:
    # Two decimals below 1.1x, where one would print 0.96 and 1.04 alike as "1.0".
    return f"{s:.2f}" if s < 1.1 else f"{s:.1f}" if s < 9.95 else f"{s:.0f}"


def speedup_chart(rows: Sequence[dict], path: str) -> Optional[str]:
    """Grouped log-scale speed-up bars, one panel per op; returns path, or None without timed rows."""
    rows = [r for r in rows if "speedup" in r and r["speedup"] > 0]
    if not rows:
        return None
    from matplotlib.patches import Patch
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    panels, name_device = _panels(rows)
    dtypes = _ordered(r["dtype"] for r in rows)
    plt, fig, axes = _figure(len(panels), 3.4)
    values = [r["speedup"] for r in rows]
    lo = min(0.5, min(values) / 1.3)
    hi = max(2.0, max(values) * 1.6)  # room for the value written above the tallest bar
    ticks = _speedup_ticks(lo, hi)
    for ax, (op, device, shape) in zip(axes, panels):
        mine = [r for r in rows if (r["op"], r["device"], r["shape"]) == (op, device, shape)]
        groups = _ordered(r["baseline"] for r in mine)
        bars = [(d, m) for d in dtypes for m in MODES if any(r["dtype"] == d and r["mode"] == m for r in mine)]
        width = 0.8 / len(bars)
        for g, baseline in enumerate(groups):
            for b, (dtype, mode) in enumerate(bars):
                match = [r for r in mine if (r["baseline"], r["dtype"], r["mode"]) == (baseline, dtype, mode)]
                if not match:
                    continue
                s = match[0]["speedup"]
                x = g - 0.4 + width * (b + 0.5)
                # Bars start at 1x: above it faster, below it slower.
                ax.bar(x, s - 1, bottom=1, width=width * 0.92, color=_dtype_colour(dtype, dtypes),
                       hatch="///" if mode == "fwd+bwd" else None, edgecolor="white", linewidth=0)
                ax.text(x, s * (1.04 if s >= 1 else 0.96), _speedup_label(s),
                        ha="center", va="bottom" if s >= 1 else "top", fontsize=8)
        ax.axhline(1.0, color="black", linewidth=1.2)
        ax.set_yscale("log")
        ax.set_ylim(lo, hi)
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.grid(axis="y", color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"vs {b}" for b in groups], fontsize=10)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.tick_params(axis="y", labelsize=9)
        ax.set_title(_panel_title(op, device, shape, name_device), fontsize=11)
    for ax in axes[::_grid(len(panels))[1]]:
        ax.set_ylabel("speed-up (x, log)", fontsize=10)
    handles = [Patch(facecolor=_dtype_colour(d, dtypes), label=d) for d in dtypes]
    handles += [Patch(facecolor="#bbbbbb", hatch="///" if m == "fwd+bwd" else None, edgecolor="white",
                      label=MODE_LABEL[m]) for m in MODES]
    _header(fig, "my_mps_ops speed-up over PyTorch (their time / our time; above 1x: faster)", handles)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def memory_chart(rows: Sequence[dict], path: str) -> Optional[str]:
    """Peak memory of my_mps_ops and each baseline, one panel per op; returns path, or None without
    rows that record it."""
    have = [r for r in rows if "ours_peak_mb" in r and "baseline_peak_mb" in r]
    if not have:
        return None
    from matplotlib.patches import Patch

    panels, name_device = _panels(have)
    plt, fig, axes = _figure(len(panels), 3.2)
    all_baselines = _ordered(r["baseline"] for r in have)
    for ax, (op, device, shape) in zip(axes, panels):
        mine = [r for r in have if (r["op"], r["device"], r["shape"]) == (op, device, shape)]
        groups = _ordered((r["dtype"], r["mode"]) for r in mine)
        baselines = _ordered(r["baseline"] for r in mine)
        series = [("ours", None)] + [(b, b) for b in baselines]
        width = 0.8 / len(series)
        top = 0.0
        for g, (dtype, mode) in enumerate(groups):
            match = [r for r in mine if (r["dtype"], r["mode"]) == (dtype, mode)]
            for b, (name, baseline) in enumerate(series):
                if baseline is None:
                    mb = match[0]["ours_peak_mb"]  # the same measurement in every baseline's row
                    colour = OURS_COLOUR
                else:
                    found = [r for r in match if r["baseline"] == baseline]
                    if not found:
                        continue
                    mb = found[0]["baseline_peak_mb"]
                    colour = BASELINE_COLOURS[all_baselines.index(baseline) % len(BASELINE_COLOURS)]
                x = g - 0.4 + width * (b + 0.5)
                ax.bar(x, mb, width=width * 0.92, color=colour)
                ax.text(x, mb, f"{mb:.0f}" if mb >= 10 else f"{mb:.2g}", ha="center", va="bottom", fontsize=8)
                top = max(top, mb)
        ax.set_ylim(0, top * 1.4 if top > 0 else 1)  # headroom for the legend row
        ax.grid(axis="y", color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{d}\n{m}" for d, m in groups], fontsize=10)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.tick_params(axis="y", labelsize=9)
        ax.set_title(_panel_title(op, device, shape, name_device), fontsize=11)
        ax.legend(handles=[Patch(facecolor=OURS_COLOUR if b is None else
                                 BASELINE_COLOURS[all_baselines.index(b) % len(BASELINE_COLOURS)],
                                 label=n) for n, b in series],
                  fontsize=8, loc="upper left", ncol=len(series), frameon=False, handlelength=1.2,
                  columnspacing=1.0)
    for ax in axes[::_grid(len(panels))[1]]:
        ax.set_ylabel("peak memory (MB)", fontsize=10)
    title = "Peak memory allocated during one call, MB (ours: my_mps_ops; the others: PyTorch; lower is better)"
    if len(have) < len(rows):
        title += f" - {len(rows) - len(have)} of {len(rows)} result rows record none and are not shown"
    _header(fig, title)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def write_charts(rows: Sequence[dict], out_dir: str) -> Dict[str, Optional[str]]:
    """Both charts into out_dir; {"speedup": path or None, "memory": path or None}."""
    os.makedirs(out_dir, exist_ok=True)
    return dict(speedup=speedup_chart(rows, os.path.join(out_dir, SPEEDUP_FILE)),
                memory=memory_chart(rows, os.path.join(out_dir, MEMORY_FILE)))


def plot_results(results: str, out_dir: Optional[str] = None) -> Dict[str, Optional[str]]:
    written = write_charts(load_rows(results), out_dir or os.path.dirname(os.path.abspath(results)))
    for kind, path in written.items():
        print(f"{kind}: {path}" if path else f"{kind}: no rows with that measurement, no chart")
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="results.json, .csv or .md written by bench_ops.py")
    p.add_argument("--out", default=None, help="directory for the PNGs (default: the results file's)")
    args = p.parse_args(argv)
    plot_results(args.results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
