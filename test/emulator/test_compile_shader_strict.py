"""compile_shader(strict=...): the emulator's g++ build accepts MSL that Apple's
compiler rejects; the strict front end rejects it first, naming the line."""

import pytest
import torch

from my_mps_ops.emulator import compile_shader, strict

pytestmark = pytest.mark.skipif(strict.find_clang() is None, reason="the strict front end needs clang")

# `half` is a type name in MSL: Apple's compiler rejects it as a member name.
MEMBER_NAMED_HALF = """
#include <metal_stdlib>
using namespace metal;
struct Shape { uint half; };
kernel void fill(device float* out [[buffer(0)]], constant Shape& shape [[buffer(1)]],
                 uint i [[thread_position_in_grid]]) {
  out[i] = float(shape.half);
}
"""


def test_strict_rejects_what_gpp_accepts():
    lib = compile_shader(MEMBER_NAMED_HALF, strict=False)
    out = torch.zeros(4)
    lib.fill(out, torch.tensor([3], dtype=torch.int32), threads=4, group_size=4)
    assert out.tolist() == [3.0] * 4
    with pytest.raises(strict.MSLStrictError, match=r"\.metal:4:\d+: error: 'half' is an MSL type name"):
        compile_shader(MEMBER_NAMED_HALF, strict=True)


def test_strict_default_follows_the_environment(monkeypatch):
    monkeypatch.setenv("MY_MPS_OPS_EMULATOR_STRICT", "1")
    with pytest.raises(strict.MSLStrictError):
        compile_shader(MEMBER_NAMED_HALF)
    monkeypatch.setenv("MY_MPS_OPS_EMULATOR_STRICT", "0")
    compile_shader(MEMBER_NAMED_HALF)
