#!/usr/bin/env python3
"""One command for the first Mac: everything we need from a real Apple GPU, in one report.

    make mac-check            # or: python scripts/mac_check.py [--report FILE] [--quick]

On macOS with an MPS device it
1. records the environment (chip, GPU core count, macOS, Xcode and Metal compiler versions, Python,
   torch, whether this build has the MPS backend);
2. runs the whole test suite with Metal's API validation and shader validation layers on
   (MTL_DEBUG_LAYER=1, MTL_SHADER_VALIDATION=1), so mps cases run on the GPU and misuse of the
   Metal API or out-of-bounds shader accesses fail loudly instead of passing silently;
3. runs the op benchmark on mps and cpu (validation layers off: they slow the GPU down);
4. writes one Markdown report (default mac_check_report.md) with all of it, the failures' first
   lines and the benchmark table, to attach as is.

Every step runs even if an earlier one failed; the exit status is non-zero if any did. Elsewhere it
refuses to run, since nothing here can stand in for the GPU (`--allow-non-mac` runs the same steps
anyway, for testing this script).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VALIDATION_ENV = {"MTL_DEBUG_LAYER": "1", "MTL_SHADER_VALIDATION": "1"}
# A failure's message in the report: enough to recognise it, not the whole traceback.
FAILURE_MESSAGE_CHARS = 400


def run_text(cmd, timeout=60):
    """stdout of cmd stripped, or None when it cannot run or fails."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def collect_environment():
    """What the report says about the machine; None where a value cannot be read."""
    env = {
        "date (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "chip": run_text(["sysctl", "-n", "machdep.cpu.brand_string"]),
        "macOS": run_text(["sw_vers", "-productVersion"]),
        "macOS build": run_text(["sw_vers", "-buildVersion"]),
        "Xcode": (run_text(["xcodebuild", "-version"]) or "").replace("\n", ", ") or None,
        "Metal compiler": (run_text(["xcrun", "-sdk", "macosx", "metal", "--version"]) or "").split("\n")[0] or None,
        "macOS SDK": run_text(["xcrun", "--sdk", "macosx", "--show-sdk-version"]),
        "python": sys.version.split()[0],
    }
    profile = run_text(["system_profiler", "SPDisplaysDataType"], timeout=120)
    if profile:
        for line in profile.splitlines():
            if "Total Number of Cores" in line:
                env["GPU cores"] = line.split(":", 1)[1].strip()
                break
    try:
        import torch

        env["torch"] = torch.__version__
        env["mps available"] = str(torch.backends.mps.is_available())
    except Exception as e:  # noqa: BLE001 - the report says what went wrong
        env["torch"] = f"cannot import: {e}"
    try:
        import my_mps_ops

        env["my_mps_ops built with MPS"] = str(bool(my_mps_ops._C.built_with_mps))
    except Exception as e:  # noqa: BLE001
        env["my_mps_ops"] = f"cannot import: {e}"
    return env


def parse_junit(path):
    """Counts and failures of a pytest --junitxml file."""
    summary = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        message = ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errors"
                message = (child.get("message") or child.text or "").strip()
                break
            if child.tag == "skipped":
                outcome = "skipped"
        summary[outcome] += 1
        if outcome in ("failed", "errors"):
            summary["failures"].append((name, message[:FAILURE_MESSAGE_CHARS]))
    return summary


def write_report(path, environment, tests, benchmark_markdown, steps):
    """The report file. tests: a parse_junit summary or None; steps: [(name, command, exit status, seconds)]."""
    lines = ["# my_mps_ops on a Mac: check report", ""]
    lines += ["## Environment", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value if value is not None else 'unknown'} |" for key, value in environment.items()]
    lines += ["", "## Steps", "", "| step | command | exit status | seconds |", "|---|---|---|---|"]
    lines += [f"| {name} | `{cmd}` | {status} | {seconds:.0f} |" for name, cmd, status, seconds in steps]
    lines += ["", "## Tests (MTL_DEBUG_LAYER=1, MTL_SHADER_VALIDATION=1)", ""]
    if tests is None:
        lines.append("No test results (the test step did not write its JUnit file).")
    else:
        lines.append(f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                     f"{tests['skipped']} skipped")
        if tests["failures"]:
            lines += ["", "### Failures", ""]
            for name, message in tests["failures"]:
                first = message.splitlines()[0] if message else ""
                lines.append(f"- `{name}`: {first}")
    lines += ["", "## Benchmark", ""]
    lines.append(benchmark_markdown.strip() if benchmark_markdown else "No benchmark results.")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def run_step(name, cmd, env_extra, steps):
    env = dict(os.environ, **env_extra)
    started = datetime.datetime.now()
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    status = subprocess.call(cmd, cwd=ROOT, env=env)
    steps.append((name, " ".join(cmd), status, (datetime.datetime.now() - started).total_seconds()))
    return status


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", default=os.path.join(ROOT, "mac_check_report.md"))
    parser.add_argument("--quick", action="store_true", help="benchmark fewer shapes")
    parser.add_argument("--allow-non-mac", action="store_true", help="run even where there is no Apple GPU")
    parser.add_argument("--pytest-args", default="", help="extra arguments for pytest (e.g. '-k rms_norm')")
    args = parser.parse_args(argv)

    if sys.platform != "darwin" and not args.allow_non_mac:
        print("mac_check: this runs the tests and benchmarks on an Apple GPU; run it on a Mac "
              "(--allow-non-mac to run the steps anyway)", file=sys.stderr)
        return 2

    work = os.path.join(ROOT, "build", "mac_check")
    os.makedirs(work, exist_ok=True)
    junit = os.path.join(work, "tests.xml")
    if os.path.exists(junit):
        os.remove(junit)
    steps = []
    run_step("tests", [sys.executable, "-m", "pytest", "test", "-q", "-ra", f"--junitxml={junit}",
                       *args.pytest_args.split()], VALIDATION_ENV, steps)
    devices = "mps,cpu" if sys.platform == "darwin" else "cpu"
    bench = [sys.executable, "benchmarks/bench_ops.py", "--devices", devices] + (["--quick"] if args.quick else [])
    run_step("benchmark", bench, {}, steps)

    tests = parse_junit(junit) if os.path.exists(junit) else None
    table_path = os.path.join(ROOT, "benchmarks", "results", "results.md")
    benchmark_markdown = open(table_path).read() if os.path.exists(table_path) else ""
    write_report(args.report, collect_environment(), tests, benchmark_markdown, steps)
    print(f"mac_check: report written to {args.report}")
    return 0 if all(status == 0 for _, _, status, _ in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
