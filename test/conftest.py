"""Shared fixtures: every op test runs on each backend.

- cpu: the native C++ kernels.
- metal_emulator: the op's Metal path (the same launch descriptions the MPS
  backend encodes) run on CPU tensors by the Metal emulator.
- mps: the Apple GPU; skipped (never deleted) where none is present.
"""

import contextlib
from dataclasses import dataclass

import pytest
import torch

import my_mps_ops  # noqa: F401  registers the ops

BACKENDS = ["cpu", "metal_emulator", "mps"]

# Tolerances against a float64 reference, per dtype (outputs rounded once).
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


@dataclass
class Backend:
    name: str
    device: str

    @property
    def emulated(self) -> bool:
        return self.name == "metal_emulator"


def mps_available() -> bool:
    return torch.backends.mps.is_available()


@pytest.fixture(params=BACKENDS)
def backend(request):
    name = request.param
    if name == "mps":
        if not mps_available():
            pytest.skip("no MPS device here (needs an Apple GPU)")
        yield Backend(name, "mps")
    elif name == "metal_emulator":
        from my_mps_ops.testing import metal_emulation

        with metal_emulation():
            yield Backend(name, "cpu")
    else:
        yield Backend(name, "cpu")


@contextlib.contextmanager
def no_emulation():
    """Runs a block on the native CPU kernels even inside metal_emulation()."""
    from my_mps_ops import _C

    was = _C.metal_emulation_enabled()
    _C.set_metal_emulation(False)
    try:
        yield
    finally:
        _C.set_metal_emulation(was)


def assert_close(actual, expected, dtype=None):
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), **tol)


def assert_matches_torch_under_cpu_autocast(ours, theirs, features=32):
    """A norm module of ours and torch's twin, same float32 weight, fed a Linear
    layer's output under CPU autocast (bfloat16 input, float32 parameters):
    same dtype out, values within bfloat16 tolerance."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(features, features)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(features))
        theirs.weight.copy_(ours.weight)
    x = torch.randn(4, features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)
        a, b = ours(h), theirs(h)
    assert a.dtype == b.dtype == torch.bfloat16
    assert_close(a, b.double(), torch.bfloat16)
