"""AOTInductor: a model using my_mps_ops ops, exported and compiled ahead of
time, then loaded and run in a fresh process that imported my_mps_ops."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import my_mps_ops

DEVICES = ["cpu", "mps"]


class NormMLP(torch.nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.up = torch.nn.Linear(dim, 2 * dim)
        self.norm = my_mps_ops.nn.RMSNorm(2 * dim, eps=1e-6)
        self.down = torch.nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.down(self.norm(self.up(x)).relu())


@pytest.mark.parametrize("device", DEVICES)
def test_aoti_package_runs_in_fresh_process(device, tmp_path):
    if device == "mps" and not torch.backends.mps.is_available():
        pytest.skip("no MPS device here (needs an Apple GPU)")
    torch.manual_seed(0)
    model = NormMLP().to(device).eval()
    x = torch.randn(5, 32, device=device)
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    assert any("my_mps_ops.rms_norm" in str(node.target) for node in exported.graph.nodes)
    package = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "model.pt2"))

    x2 = torch.randn(9, 32, device=device)  # another batch size: dynamic shape
    torch.save({"x": x.cpu(), "x2": x2.cpu()}, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = {"x": model(x).cpu(), "x2": model(x2).cpu()}
    script = textwrap.dedent(f"""
        import torch
        import my_mps_ops  # registers the ops the package calls
        runner = torch._inductor.aoti_load_package({package!r})
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        out = {{k: runner(v.to({device!r})).cpu() for k, v in inputs.items()}}
        torch.save(out, {str(tmp_path / "out.pt")!r})
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=600)
    got = torch.load(tmp_path / "out.pt")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-5)
