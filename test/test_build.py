"""How the extension is built, where it changes what users get."""

import shutil
import subprocess
import sys

import pytest
import torch

import my_mps_ops


@pytest.mark.skipif(sys.platform != "linux" or not getattr(torch._C, "has_openmp", False),
                    reason="torch here does not use OpenMP (or not Linux)")
@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")
def test_cpu_kernels_are_compiled_with_openmp():
    # at::parallel_for only fans out when the calling file is compiled with
    # OpenMP; without -fopenmp every CPU kernel silently runs on one thread.
    # With it, the extension calls into libgomp (GOMP_parallel).
    symbols = subprocess.run(["nm", "-D", "--undefined-only", my_mps_ops._C.__file__], capture_output=True,
                             text=True, check=True).stdout
    assert "GOMP_parallel" in symbols
