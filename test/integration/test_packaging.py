"""What an installation of my_mps_ops is: its version, `python -m my_mps_ops`
/ `my_mps_ops.info()`, and (run against an installed wheel by
scripts/run_installed_tests.sh) that the package holds what it reads at run
time and nothing of the source tree."""

import importlib.metadata
import io
import os
import re
import subprocess
import sys

import pytest
import torch

import my_mps_ops
from support import INSTALLED, env_importing_this_package

PACKAGE = os.path.dirname(os.path.abspath(my_mps_ops.__file__))


def test_version_is_single_sourced():
    from my_mps_ops._version import __version__

    assert my_mps_ops.__version__ == __version__
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)*", __version__)
    if INSTALLED:  # the installed distribution's metadata says the same
        assert importlib.metadata.version("my_mps_ops") == __version__


def test_info_reports_the_installation():
    out = io.StringIO()
    d = my_mps_ops.info(file=out)
    text = out.getvalue()
    assert d["my_mps_ops"] == my_mps_ops.__version__ and d["torch"] == torch.__version__
    assert d["cpu isa"] == my_mps_ops._C.cpu_isa() and d["cpu isa"] in ("baseline", "avx2", "avx512")
    assert d["mps compiled in"] is bool(my_mps_ops._C.built_with_mps) is (sys.platform == "darwin")
    assert set(d["embedded shaders"]) == set(my_mps_ops._C.embedded_shaders())
    assert d["emulator"]["ready"]  # the test machine has g++, Boost.Context and the package's headers
    for line in (f"my_mps_ops           {my_mps_ops.__version__}", f"torch                {torch.__version__}",
                 f"cpu isa              {d['cpu isa']}", f"mps compiled in      {d['mps compiled in']}",
                 "metal emulator       ready"):
        assert line in text, text


def test_python_dash_m_prints_info():
    out = subprocess.run([sys.executable, "-m", "my_mps_ops"], env=env_importing_this_package(), capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(PACKAGE)).stdout
    assert f"my_mps_ops           {my_mps_ops.__version__}" in out
    assert f"torch                {torch.__version__}" in out
    assert re.search(r"cpu isa +(baseline|avx2|avx512)", out)
    assert re.search(r"mps compiled in +(True|False)", out)
    assert re.search(r"metal emulator +ready", out)


def test_package_holds_what_it_reads_at_run_time():
    # The emulator compiles kernel libraries against include/ and the strict
    # front end reads strict_include/; both are package data.
    import importlib

    build = importlib.import_module("my_mps_ops.emulator.build")
    strict = importlib.import_module("my_mps_ops.emulator.strict")

    assert os.path.commonpath([build.INCLUDE_DIR, PACKAGE]) == PACKAGE
    for name in ("metal_runtime.h", "metal_runtime.cpp", "metal_race_check.cpp", "metal_stdlib.h"):
        assert os.path.isfile(os.path.join(build.INCLUDE_DIR, name)), name
    for name in ("metal_stdlib", "__metal_prelude"):
        assert os.path.isfile(os.path.join(strict.STRICT_INCLUDE_DIR, name)), name


@pytest.mark.skipif(not INSTALLED, reason="checks an installed wheel (scripts/run_installed_tests.sh)")
def test_installed_package_has_no_source_tree():
    files = [os.path.relpath(os.path.join(d, f), PACKAGE) for d, _, fs in os.walk(PACKAGE) for f in fs]
    assert not [f for f in files if f.endswith((".metal", ".mm")) or f.startswith(os.path.join("emulator", "host"))]
    assert not os.path.exists(os.path.join(os.path.dirname(PACKAGE), "shaders", "glu.metal"))
    assert my_mps_ops._C.embedded_shaders()  # the shaders are in the binary


def test_metal_path_runs_from_embedded_shaders():
    # The ops' Metal path through the emulator compiles the shaders compiled
    # into _C (no shaders/ directory is read).
    from my_mps_ops.testing import embedded_shaders_in_use, metal_emulation

    gate, up = torch.randn(3, 40), torch.randn(3, 40)
    with metal_emulation():
        assert embedded_shaders_in_use()
        out = my_mps_ops.swiglu(gate, up)
    torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up)
