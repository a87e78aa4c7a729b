"""How the extension is built, where it changes what users get."""

import os
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


def _torch_ships_libomp():
    torch_dir = torch.__path__[0]
    return (getattr(torch._C, "has_openmp", False) and
            os.path.exists(os.path.join(torch_dir, "include", "omp.h")) and
            os.path.exists(os.path.join(torch_dir, "lib", "libomp.dylib")))


@pytest.mark.skipif(sys.platform != "darwin" or not _torch_ships_libomp(),
                    reason="macOS with a torch wheel that ships omp.h and libomp.dylib")
@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm")
def test_cpu_kernels_are_compiled_with_openmp_on_macos():
    # setup.py builds with -Xclang -fopenmp against torch's own libomp there:
    # parallel regions call __kmpc_fork_call (Mach-O adds a leading underscore).
    symbols = subprocess.run(["nm", "-u", my_mps_ops._C.__file__], capture_output=True, text=True,
                             check=True).stdout
    assert "__kmpc_fork_call" in symbols
