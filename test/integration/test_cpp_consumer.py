"""A C++ consumer (examples/cpp/): an AOTInductor package of the tiny Llama
calling our ops, loaded and run by a CMake-built program linking LibTorch from
the installed torch and the installed my_mps_ops's op library, with no Python
running; its logits match the eager model's (the README's three commands)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import my_mps_ops
from support import ROOT, env_importing_this_package

EXAMPLE = os.path.join(ROOT, "examples", "cpp")


@pytest.mark.skipif(not os.path.isdir(EXAMPLE), reason="needs examples/ from the source checkout")
@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_cpp_program_runs_the_aoti_package(tmp_path):
    env = env_importing_this_package()
    run = dict(env=env, capture_output=True, text=True, timeout=900)
    export = subprocess.run([sys.executable, os.path.join(EXAMPLE, "export_tiny_llama.py"), str(tmp_path)], **run)
    assert export.returncode == 0, export.stderr[-4000:]
    for op in ("flash_attention", "rms_norm", "rotary_embedding_qk", "swiglu"):
        assert f"my_mps_ops.{op}.default" in export.stdout  # the package calls our ops
    build = tmp_path / "build"
    configure = subprocess.run(["cmake", "-S", EXAMPLE, "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                                f"-DMY_MPS_OPS_LIBRARY={my_mps_ops._C.__file__}", f"-DPython3_EXECUTABLE={sys.executable}"],
                               **run)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    compiled = subprocess.run(["cmake", "--build", str(build)], **run)
    assert compiled.returncode == 0, compiled.stdout[-5000:] + compiled.stderr[-3000:]
    program = subprocess.run([str(build / "run_tiny_llama"), str(tmp_path / "tiny_llama.pt2"),
                              str(tmp_path / "reference.pt")], **run)
    assert program.returncode == 0, program.stdout + program.stderr[-3000:]
    assert "match" in program.stdout and "MISMATCH" not in program.stdout, program.stdout
