"""Every copy of the CPU loops computes the same results.

On x86-64 the hot loops have a baseline copy (the code that non-x86 CPUs, Apple
Silicon included, run), an AVX2 copy and an AVX-512 copy, picked at run time;
a machine only runs its best one. MY_MPS_OPS_CPU_ISA caps the choice, so here
the op test files' CPU cases run again in a subprocess with each lower copy.
"""

import os
import platform
import subprocess
import sys

import pytest

import my_mps_ops
from support import ROOT, env_importing_this_package

HERE = os.path.dirname(os.path.abspath(__file__))
OP_TESTS = ["test_glu.py", "test_cross_entropy.py", "test_layer_norm.py", "test_rms_norm.py", "test_rotary.py",
            "test_flash_attention.py", "test_quantized_linear.py", "test_attention_decode.py",
            "test_flash_attention_varlen.py"]
# The CPU kernels' value tests; gradcheck (float64, scalar loops), opcheck and
# torch.compile do not depend on which copy runs.
CPU_CASES = "cpu and not compile and not gradcheck and not opcheck"
X86 = platform.machine().lower() in ("x86_64", "amd64")


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _isa_in_subprocess(value):
    env = env_importing_this_package(MY_MPS_OPS_CPU_ISA=value)
    return subprocess.run([sys.executable, "-c", "import my_mps_ops; print(my_mps_ops._C.cpu_isa())"], env=env,
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(not X86 or not sys.platform.startswith("linux"), reason="x86-64 Linux (reads /proc/cpuinfo)")
def test_default_runs_the_best_copy_this_cpu_has():
    flags = _cpu_flags()
    expected = ("avx512" if "avx512f" in flags else "avx2") if {"avx2", "fma"} <= flags else "baseline"
    assert _isa_in_subprocess("") == expected


@pytest.mark.skipif(not X86, reason="the AVX copies exist on x86-64 only")
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_op_cpu_tests_pass_on_each_lower_copy(isa):
    best = _isa_in_subprocess("")
    order = ["baseline", "avx2", "avx512"]
    if order.index(best) < order.index(isa):
        pytest.skip(f"this CPU's best copy is {best}")
    assert _isa_in_subprocess(isa) == isa
    env = env_importing_this_package(MY_MPS_OPS_CPU_ISA=isa)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", CPU_CASES,
                             *[os.path.join(HERE, name) for name in OP_TESTS]], env=env, capture_output=True,
                            text=True, cwd=ROOT)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    assert result.returncode == 0, f"MY_MPS_OPS_CPU_ISA={isa}: {summary}\n{result.stdout[-4000:]}"
    assert " passed" in summary and "failed" not in summary, summary


def test_unknown_cap_is_refused():
    if not X86:
        pytest.skip("the cap is read by the x86-64 dispatch only")
    env = env_importing_this_package(MY_MPS_OPS_CPU_ISA="sse9")
    result = subprocess.run([sys.executable, "-c", "import my_mps_ops; my_mps_ops._C.cpu_isa()"], env=env,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "MY_MPS_OPS_CPU_ISA must be baseline, avx2 or avx512" in result.stderr
