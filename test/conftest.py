"""Shared fixtures: every op test runs on each backend.

- cpu: the native C++ kernels.
- metal_emulator: the op's Metal path (the same launch descriptions the MPS
  backend encodes) run on CPU tensors by the Metal emulator.
- mps: the Apple GPU; skipped (never deleted) where none is present.

Helpers the tests import (references, tolerances, compile and opcheck
checks) live in support.py.
"""

import os
from dataclasses import dataclass

# Every kernel the tests compile with my_mps_ops.emulator.compile_shader is
# first checked by the strict MSL front end (what Apple's compiler rejects and
# g++ accepts fails here too); the shipped shaders are checked by
# test/emulator/test_strict_msl.py. Needs clang, which scripts/setup.sh installs.
os.environ.setdefault("MY_MPS_OPS_EMULATOR_STRICT", "1")

import pytest
import torch

import my_mps_ops  # noqa: F401  registers the ops

# Testing an installed wheel (scripts/run_installed_tests.sh): the package
# must be the installed one, and nothing may touch the source checkout.
if os.environ.get("MY_MPS_OPS_TEST_INSTALLED") == "1":
    from support import forbid_reads_under

    _forbidden = os.environ.get("MY_MPS_OPS_TEST_FORBID_ROOT")
    _package = os.path.dirname(os.path.abspath(my_mps_ops.__file__))
    if _forbidden and os.path.commonpath([_package, os.path.abspath(_forbidden)]) == os.path.abspath(_forbidden):
        raise RuntimeError(f"MY_MPS_OPS_TEST_INSTALLED=1 but my_mps_ops was imported from the checkout: {_package}")
    if _forbidden:
        forbid_reads_under(_forbidden)

BACKENDS = ["cpu", "metal_emulator", "mps"]


@dataclass
class Backend:
    name: str
    device: str


@pytest.fixture(params=BACKENDS)
def backend(request):
    name = request.param
    if name == "mps":
        if not torch.backends.mps.is_available():
            pytest.skip("no MPS device here (needs an Apple GPU)")
        yield Backend(name, "mps")
    elif name == "metal_emulator":
        from my_mps_ops.emulator import race_check
        from my_mps_ops.testing import metal_emulation

        # Every op test on the emulator runs under the race check (a missing
        # barrier gives the right answer here and a wrong one on a GPU);
        # MY_MPS_OPS_TEST_RACE_CHECK=0 turns it off for a quicker local run.
        with metal_emulation(), race_check(os.environ.get("MY_MPS_OPS_TEST_RACE_CHECK", "1") != "0"):
            yield Backend(name, "cpu")
    else:
        yield Backend(name, "cpu")
