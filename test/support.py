"""What the tests share: the sample-input lists' entries, float64 references'
inputs and tolerances, comparisons, and the torch.compile and subprocess
helpers. Importable from every test directory (pytest.ini puts test/ on the
path)."""

import os
import re
from dataclasses import dataclass

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Whether the tests run against an installed wheel from a copy of test/
# outside the checkout (scripts/run_installed_tests.sh): then ROOT holds only
# the tests, and tests of the source tree itself skip.
INSTALLED = os.environ.get("MY_MPS_OPS_TEST_INSTALLED") == "1"
HAS_SOURCE_TREE = os.path.isdir(os.path.join(ROOT, "csrc")) and os.path.isdir(os.path.join(ROOT, "shaders"))
needs_source_tree = pytest.mark.skipif(not HAS_SOURCE_TREE, reason="needs the source checkout (csrc/, shaders/, "
                                       "scripts/); this run tests an installed package from a copy of test/")


def forbid_reads_under(root):
    """From now on, opening, listing or running anything under `root` (or a
    child process whose arguments, working directory or PYTHONPATH name it)
    raises: proves an installed package reads nothing from the source tree.
    A Python audit hook: it sees Python-level file access and subprocesses
    (the emulator's compiler runs), not reads inside the C++ libraries, which
    read no files (the shaders are compiled in)."""
    import sys

    root = os.path.realpath(root)
    prefix = root + os.sep

    def under(path):
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str):
            return False
        if path == root or path.startswith(prefix) or prefix in path or path.endswith(root):
            return True
        return False

    def hook(event, args):
        if event in ("open", "os.listdir", "os.scandir", "os.chdir", "shutil.copyfile", "os.exec"):
            if args and under(args[0]):
                raise PermissionError(f"{event} under the source checkout {root}: {args[0]!r}")
        elif event == "subprocess.Popen":
            executable, argv, cwd, env = args
            names = [executable, cwd, *(argv if isinstance(argv, (list, tuple)) else [argv])]
            if env:
                names.append(env.get("PYTHONPATH") if isinstance(env, dict) else None)
            for name in names:
                if under(name) or (isinstance(name, str) and root in name):
                    raise PermissionError(f"a subprocess naming the source checkout {root}: {argv!r}")

    sys.addaudithook(hook)

# Tolerances against a float64 reference, per dtype (outputs rounded once).
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


# The costly kinds of test (about a second a call or more); a sample names
# those it feeds.
GRADCHECK, OPCHECK, COMPILE = "gradcheck", "opcheck", "compile"


@dataclass(frozen=True)
class Sample:
    """One entry of an op's sample-input list (SAMPLES in its test file).

    `case` is what the file's sample_inputs() builds the op's arguments from
    (shapes and options). Every sample feeds the value and gradient tests, on
    each backend, in each of `dtypes` (None: every dtype the file tests);
    `also` names the costly kinds of test it feeds besides (GRADCHECK in
    float64, OPCHECK and COMPILE in float32)."""

    case: tuple
    also: tuple = ()
    dtypes: tuple = None

    def __str__(self):  # the test id: e.g. 3x5 for a shape
        return "x".join(map(str, self.case)) if all(isinstance(c, int) for c in self.case) else \
            "-".join(map(str, self.case))


def feeding(samples, kind):
    """The samples that feed one costly kind of test."""
    chosen = [s for s in samples if kind in s.also]
    assert chosen, f"no sample feeds {kind}"
    return chosen


def float64(t):
    """A detached float64 cpu copy: references are computed there (MPS has no float64)."""
    return t.detach().cpu().double()


def float64_leaves(*tensors):
    """float64 cpu copies that require grad (None stays None), for reference gradients."""
    return [None if t is None else float64(t).requires_grad_() for t in tensors]


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


def assert_compiled_matches_eager(fn, samples, out_tol=None, grad_tol=None):
    """fn compiled with fullgraph=True and dynamic=True gives eager's result and
    the gradients of its sum with respect to each tensor argument that requires
    grad, for every sample (a tuple of fn's arguments); samples of one rank
    share one dynamic graph. Tolerances default to torch.testing's."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for args in samples:
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        eager, result = fn(*args), compiled(*args)
        torch.testing.assert_close(result, eager, **(out_tol or {}))
        if leaves:
            grads_eager = torch.autograd.grad(eager.sum(), leaves)
            grads_compiled = torch.autograd.grad(result.sum(), leaves)
            for ours, expected in zip(grads_compiled, grads_eager):
                torch.testing.assert_close(ours, expected, **(grad_tol or {}))


def assert_double_backward_raises(fn, inputs, op_name):
    """First-order gradients of fn(*inputs).square().sum() taken with
    create_graph=True equal those taken without; differentiating them again
    raises, naming the op (the backward ops have no derivative formula)."""
    plain = torch.autograd.grad(fn(*inputs).square().sum(), inputs)
    grads = torch.autograd.grad(fn(*inputs).square().sum(), inputs, create_graph=True)
    for ours, expected in zip(grads, plain):
        torch.testing.assert_close(ours, expected, atol=0, rtol=0)
        assert ours.requires_grad
    for g in grads:
        with pytest.raises(RuntimeError, match=re.escape(f"{op_name}: double backward is not supported")):
            torch.autograd.grad(g.sum(), inputs, allow_unused=True)


def env_importing_this_package(**variables):
    """os.environ plus `variables`, with PYTHONPATH leading to the my_mps_ops
    this process imported, so a child Python tests the same build."""
    import my_mps_ops

    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(my_mps_ops.__file__)))
    env = dict(os.environ, **variables)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    return env
