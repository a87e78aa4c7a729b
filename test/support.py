"""What the tests share: tolerances against float64 references, comparisons,
and the torch.compile and subprocess helpers. Importable from every test
directory (pytest.ini puts test/ on the path)."""

import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tolerances against a float64 reference, per dtype (outputs rounded once).
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def scaled_tolerance(dtype, factor):
    """TOLERANCES[dtype] times factor (results that sum or round more)."""
    return {k: v * factor for k, v in TOLERANCES[dtype].items()}


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


def env_importing_this_package(**variables):
    """os.environ plus `variables`, with PYTHONPATH leading to the my_mps_ops
    this process imported, so a child Python tests the same build."""
    import my_mps_ops

    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(my_mps_ops.__file__)))
    env = dict(os.environ, **variables)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    return env
