"""The Linux half of `make mac-check` (scripts/mac_check.py): the JUnit reader,
the report writer and the refusal to run without an Apple GPU. The Mac half
(running the suite under Metal's validation layers) needs a Mac."""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not os.path.exists(os.path.join(ROOT, "scripts", "mac_check.py")):
    pytest.skip("tests scripts/mac_check.py: needs the source checkout", allow_module_level=True)
_spec = importlib.util.spec_from_file_location("mac_check", os.path.join(ROOT, "scripts", "mac_check.py"))
mac_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mac_check)

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5">
<testcase classname="test.ops.test_glu" name="test_value[mps-float32]" time="0.1"/>
<testcase classname="test.ops.test_glu" name="test_value[mps-float16]" time="0.1"/>
<testcase classname="test.ops.test_rms_norm" name="test_value[mps-bfloat16]" time="0.2">
  <failure message="AssertionError: Tensor-likes are not close!&#10;Mismatched elements: 3 / 64">trace</failure>
</testcase>
<testcase classname="test.ops.test_rotary" name="test_grad[mps]" time="0.2">
  <error message="RuntimeError: the Metal compiler rejected shader library 'rotary'">trace</error>
</testcase>
<testcase classname="test.ops.test_rotary" name="test_cpu_only" time="0.0">
  <skipped message="cpu only" type="pytest.skip">skipped</skipped>
</testcase>
</testsuite></testsuites>
"""


def test_parse_junit_counts_and_failures(tmp_path):
    path = tmp_path / "tests.xml"
    path.write_text(JUNIT)
    summary = mac_check.parse_junit(str(path))
    assert (summary["passed"], summary["failed"], summary["errors"], summary["skipped"]) == (2, 1, 1, 1)
    names = [name for name, _ in summary["failures"]]
    assert names == ["test.ops.test_rms_norm::test_value[mps-bfloat16]", "test.ops.test_rotary::test_grad[mps]"]
    assert summary["failures"][0][1].startswith("AssertionError: Tensor-likes are not close!")


def test_report_holds_environment_steps_tests_and_benchmark(tmp_path):
    path = tmp_path / "tests.xml"
    path.write_text(JUNIT)
    report = tmp_path / "report.md"
    env = {"chip": "Apple M3 Max", "macOS": "15.2", "Xcode": None}
    steps = [("tests", "python -m pytest test", 1, 612.4), ("benchmark", "python benchmarks/bench_ops.py", 0, 95.0)]
    table = "| op | shape | dtype | device | speedup |\n|---|---|---|---|---|\n| rms_norm | 4096x4096 | float16 | mps | 1.9 |"
    mac_check.write_report(str(report), env, mac_check.parse_junit(str(path)), table, steps)
    text = report.read_text()
    assert "| chip | Apple M3 Max |" in text and "| macOS | 15.2 |" in text and "| Xcode | unknown |" in text
    assert "| tests | `python -m pytest test` | 1 | 612 |" in text
    assert "2 passed, 1 failed, 1 errors, 1 skipped" in text
    # Only a failure's first line goes in the list.
    assert "- `test.ops.test_rms_norm::test_value[mps-bfloat16]`: AssertionError: Tensor-likes are not close!\n" in text
    assert "Mismatched elements" not in text
    assert "| rms_norm | 4096x4096 | float16 | mps | 1.9 |" in text


def test_report_without_results_says_so(tmp_path):
    report = tmp_path / "report.md"
    mac_check.write_report(str(report), {}, None, "", [])
    text = report.read_text()
    assert "No test results" in text and "No benchmark results." in text


def test_environment_names_this_machine():
    env = mac_check.collect_environment()
    assert env["python"] == sys.version.split()[0]
    assert env["machine"]
    assert env["torch"].startswith(__import__("torch").__version__.split("+")[0])


@pytest.mark.skipif(sys.platform == "darwin", reason="the refusal applies where there is no Mac")
def test_refuses_to_run_without_a_mac(capsys):
    assert mac_check.main([]) == 2
    assert "run it on a Mac" in capsys.readouterr().err
