"""The Linux compile check of the Objective-C++ sources passes on the real
files and fails on planted mistakes (so it can fail)."""

import glob
import os

import pytest

import check_objc_compile as objc

pytestmark = pytest.mark.skipif(objc.clang() is None, reason="clang++ not installed (CI installs Debian's clang)")

PRELUDE = """
#include <ATen/mps/MPSStream.h>
#include <Foundation/Foundation.h>
#include <Metal/Metal.h>
void encode(id<MTLComputeCommandEncoder> encoder, id<MTLBuffer> buffer, id<MTLComputePipelineState> state) {
  float eps = 1e-6f;
"""


def snippet(body: str) -> str:
    return PRELUDE + body + "\n}\n"


def test_every_mm_file_compiles():
    files = sorted(glob.glob(os.path.join(objc.ROOT, "csrc", "mps", "*.mm")))
    assert files, "no Objective-C++ sources found"
    for f in files:
        code, err = objc.check(f)
        assert code == 0, f"{f}:\n{err}"


def test_correct_snippet_compiles():
    code, err = objc.check_snippet(snippet("""
  [encoder setComputePipelineState:state];
  [encoder setBuffer:buffer offset:16 atIndex:0];
  [encoder setBytes:&eps length:sizeof(eps) atIndex:1];
  [encoder dispatchThreadgroups:MTLSizeMake(4, 1, 1) threadsPerThreadgroup:MTLSizeMake(256, 1, 1)];
  at::mps::getCurrentMPSStream()->commandEncoder();
"""))
    assert code == 0, err


def test_misspelled_selector_fails():
    code, err = objc.check_snippet(snippet("[encoder setBufer:buffer offset:0 atIndex:0];"))
    assert code != 0
    assert "setBufer:offset:atIndex:" in err


def test_wrong_argument_type_fails():
    code, err = objc.check_snippet(snippet("[encoder setBuffer:eps offset:0 atIndex:0];"))
    assert code != 0
    assert "id<MTLBuffer>" in err.replace(" _Nullable", "") or "MTLBuffer" in err


def test_wrong_struct_argument_fails():
    code, err = objc.check_snippet(snippet("[encoder dispatchThreads:4 threadsPerThreadgroup:MTLSizeMake(1, 1, 1)];"))
    assert code != 0
    assert "MTLSize" in err


def test_unknown_property_fails():
    code, err = objc.check_snippet(snippet("NSUInteger n = state.maxThreadsPerThreadgroup; (void)n;"))
    assert code != 0
    assert "maxThreadsPerThreadgroup" in err
