"""AOTInductor and torch.export: a model using my_mps_ops ops, exported
(and compiled ahead of time), then loaded and run in a fresh process that
imported my_mps_ops; without that import loading fails, as the README says."""

import subprocess
import sys
import textwrap

import pytest
import torch

import my_mps_ops  # noqa: F401
from my_mps_ops.models import TinyLlama, TinyLlamaConfig
from support import env_importing_this_package

DEVICES = ["cpu", "mps"]
CFG = TinyLlamaConfig(vocab_size=64, dim=64, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=64)


@pytest.mark.parametrize("device", DEVICES)
def test_aoti_package_runs_in_fresh_process(device, tmp_path):
    if device == "mps" and not torch.backends.mps.is_available():
        pytest.skip("no MPS device here (needs an Apple GPU)")
    torch.manual_seed(0)
    model = TinyLlama(CFG, use_my_ops=True).to(device).eval()
    x = torch.randint(0, CFG.vocab_size, (2, 11), device=device)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(model, (x,), dynamic_shapes={"tokens": {0: batch}})
    targets = {str(node.target) for node in exported.graph.nodes}
    assert {"my_mps_ops.rms_norm.default", "my_mps_ops.swiglu.default", "my_mps_ops.flash_attention.default"} <= targets
    package = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "model.pt2"))

    x2 = torch.randint(0, CFG.vocab_size, (5, 11), device=device)  # another batch size: dynamic shape
    torch.save({"x": x.cpu(), "x2": x2.cpu()}, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = {"x": model(x).cpu(), "x2": model(x2).cpu()}
    # Loading fails until my_mps_ops is imported: torch's loader finds no schema
    # for our ops (its message, which cannot name the import; the README does).
    script = textwrap.dedent(f"""
        import sys
        import torch
        try:
            torch._inductor.aoti_load_package({package!r})
            sys.exit("loaded without import my_mps_ops")
        except RuntimeError as e:
            print("without the import:", e)
        import my_mps_ops  # registers the ops the package calls
        runner = torch._inductor.aoti_load_package({package!r})
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        out = {{k: runner(v.to({device!r})).cpu() for k, v in inputs.items()}}
        torch.save(out, {str(tmp_path / "out.pt")!r})
    """)
    child = subprocess.run([sys.executable, "-c", script], env=env_importing_this_package(), timeout=600,
                           capture_output=True, text=True)
    assert child.returncode == 0, child.stderr
    assert "without the import: Could not find schema for my_mps_ops::" in child.stdout
    got = torch.load(tmp_path / "out.pt")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-5)


def test_saved_exported_program_needs_the_import(tmp_path):
    # torch.export.load cannot resolve our ops until my_mps_ops is imported; its
    # error (torch's, which nothing on our side can change) names the op and
    # says to import the custom op first. One child process: load, fail,
    # import, load and run.
    class Block(torch.nn.Module):
        def forward(self, x, residual):
            h, r = my_mps_ops.fused_add_rms_norm(x, residual, None, 1e-6)
            return my_mps_ops.swiglu(h, r)

    x, residual = torch.randn(3, 16), torch.randn(3, 16)
    torch.export.save(torch.export.export(Block(), (x, residual)), tmp_path / "block.pt2")
    torch.save((x, residual), tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys
        import torch
        try:
            torch.export.load({str(tmp_path / "block.pt2")!r})
            sys.exit("loaded without import my_mps_ops")
        except RuntimeError as e:
            print("without the import:", e)
        import my_mps_ops
        program = torch.export.load({str(tmp_path / "block.pt2")!r})
        torch.save(program.module()(*torch.load({str(tmp_path / "inputs.pt")!r})), {str(tmp_path / "out.pt")!r})
    """)
    child = subprocess.run([sys.executable, "-c", script], env=env_importing_this_package(), timeout=120,
                           capture_output=True, text=True)
    assert child.returncode == 0, child.stderr
    assert "without the import: We ran into an error when deserializing" in child.stdout
    assert "failed to resolve torch.ops.my_mps_ops.fused_add_rms_norm.default" in child.stderr
    assert "Please import the custom op to register it before deserializing" in child.stderr
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), Block()(x, residual))
