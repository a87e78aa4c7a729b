"""The Linux syntax check of the Objective-C++ sources (test/objc/check_objc_compile.py).

The real csrc/**/*.mm files must pass; deliberately broken snippets must
fail with clang's diagnostic, proving the check catches a misspelled
selector, a wrong argument type, and calls to APIs the code must not use.
Needs clang++ (Debian/Ubuntu package `clang`) and torch's headers; skipped
only when clang is missing.
"""

import glob
import os
import sys

import pytest

from support import HAS_SOURCE_TREE

if not HAS_SOURCE_TREE:
    pytest.skip("checks csrc/**/*.mm: needs the source checkout", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import check_objc_compile as checker  # noqa: E402

CLANG = checker.find_clang()
pytestmark = pytest.mark.skipif(CLANG is None, reason="clang++ is not installed (apt-get install clang)")

# The headers the executor includes; the snippets see the same declarations.
PRELUDE = """
#include "metal/launch.h"
#include <ATen/mps/MPSStream.h>
#include <Metal/Metal.h>
"""


def compile_snippet(tmp_path, body, name="snippet.mm", sdk=checker.NEWEST_SDK):
    path = tmp_path / name
    path.write_text(PRELUDE + body)
    return checker.check_file(str(path), CLANG, sdk=sdk)


@pytest.mark.parametrize("sdk", checker.SDK_GENERATIONS)
def test_every_mm_file_passes(sdk):
    sources = checker.default_sources()
    assert sources, "no csrc/**/*.mm files found"
    for source in sources:
        result = checker.check_file(source, CLANG, sdk=sdk)
        assert result.returncode == 0, f"{source} (macOS {sdk} SDK):\n{result.stderr}"
        assert result.stderr == ""


# MTLCompileOptions.mathMode exists only in the macOS 15 SDK. A runtime
# @available check does not make it compile against a macOS 14 SDK.
MACOS15_PROPERTY_RUNTIME_CHECK_ONLY = """
void configure(MTLCompileOptions* options) {
  if (@available(macOS 15.0, *)) {
    options.mathMode = MTLMathModeSafe;
  }
}
"""
MACOS15_PROPERTY_COMPILE_TIME_GUARD = """
void configure(MTLCompileOptions* options) {
#if defined(__MAC_15_0) && __MAC_OS_X_VERSION_MAX_ALLOWED >= __MAC_15_0
  if (@available(macOS 15.0, *)) {
    options.mathMode = MTLMathModeSafe;
    options.mathFloatingPointFunctions = MTLMathFloatingPointFunctionsPrecise;
    return;
  }
#endif
  options.languageVersion = MTLLanguageVersion3_1;
}
"""


def test_macos15_api_without_compile_time_guard_fails_with_sdk14(tmp_path):
    result = compile_snippet(tmp_path, MACOS15_PROPERTY_RUNTIME_CHECK_ONLY, sdk=14)
    assert result.returncode != 0
    assert "property 'mathMode' not found on object of type 'MTLCompileOptions *'" in result.stderr
    # The same source is fine against the SDK that declares the property.
    result = compile_snippet(tmp_path, MACOS15_PROPERTY_RUNTIME_CHECK_ONLY, sdk=15)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("sdk", checker.SDK_GENERATIONS)
def test_macos15_api_behind_compile_time_guard_passes(tmp_path, sdk):
    result = compile_snippet(tmp_path, MACOS15_PROPERTY_COMPILE_TIME_GUARD, sdk=sdk)
    assert result.returncode == 0, result.stderr


def test_unknown_sdk_generation_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sdk must be one of"):
        compile_snippet(tmp_path, "", sdk=13)


def test_script_exit_status(capsys):
    assert checker.main([]) == 0
    assert "pass the syntax check" in capsys.readouterr().out


def test_correct_snippet_passes(tmp_path):
    # Control for the failing cases below: the same calls, spelled right.
    result = compile_snippet(tmp_path, """
void encode(at::mps::MPSStream* stream, id<MTLComputePipelineState> state, id<MTLBuffer> buffer) {
  id<MTLComputeCommandEncoder> encoder = stream->commandEncoder();
  [encoder setComputePipelineState:state];
  [encoder setBuffer:buffer offset:16 atIndex:0];
  uint32_t n = 4;
  [encoder setBytes:&n length:sizeof(n) atIndex:1];
  [encoder setThreadgroupMemoryLength:256 atIndex:0];
  [encoder dispatchThreadgroups:MTLSizeMake(8, 1, 1) threadsPerThreadgroup:MTLSizeMake(256, 1, 1)];
  [encoder dispatchThreads:MTLSizeMake(1000, 1, 1) threadsPerThreadgroup:MTLSizeMake(256, 1, 1)];
}
""")
    assert result.returncode == 0, result.stderr


SPECIALISE = """
id<MTLFunction> specialise(id<MTLLibrary> library, NSString* name, uint32_t simdgroups) {
  MTLFunctionConstantValues* values = [[MTLFunctionConstantValues alloc] init];
  [values setConstantValue:&simdgroups type:MTLDataTypeUInt atIndex:0];
  bool flag = true;
  [values setConstantValue:&flag type:MTLDataTypeBool withName:name];
  NSError* error = nil;
  id<MTLFunction> function = %s;
  [values release];
  return function;
}
"""


def test_function_constant_specialisation_passes(tmp_path):
    result = compile_snippet(tmp_path, SPECIALISE % "[library newFunctionWithName:name constantValues:values error:&error]")
    assert result.returncode == 0, result.stderr


def test_function_constant_specialisation_without_its_error_argument_fails(tmp_path):
    # newFunctionWithName:constantValues: (no error:) is not Apple's selector.
    result = compile_snippet(tmp_path, SPECIALISE % "[library newFunctionWithName:name constantValues:values]")
    assert result.returncode != 0
    assert "'-newFunctionWithName:constantValues:' not found" in result.stderr


def test_misspelled_selector_fails(tmp_path):
    result = compile_snippet(tmp_path, """
void encode(id<MTLComputeCommandEncoder> encoder, id<MTLBuffer> buffer) {
  [encoder setBufer:buffer offset:0 atIndex:0];
}
""")
    assert result.returncode != 0
    assert "instance method '-setBufer:offset:atIndex:' not found" in result.stderr
    assert "error:" in result.stderr


def test_misspelled_selector_is_only_a_warning_without_werror(tmp_path):
    # Why the check passes -Werror: plain clang accepts the typo.
    path = tmp_path / "typo.mm"
    path.write_text(PRELUDE + """
void encode(id<MTLComputeCommandEncoder> encoder, id<MTLBuffer> buffer) {
  [encoder setBufer:buffer offset:0 atIndex:0];
}
""")
    cmd = [c for c in checker.command(CLANG, str(path)) if not c.startswith("-Werror")]
    import subprocess

    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0
    assert "warning: instance method '-setBufer:offset:atIndex:' not found" in result.stderr


def test_int_passed_as_buffer_fails(tmp_path):
    result = compile_snippet(tmp_path, """
void encode(id<MTLComputeCommandEncoder> encoder) {
  int buffer = 3;
  [encoder setBuffer:buffer offset:0 atIndex:0];
}
""")
    assert result.returncode != 0
    assert "cannot initialize a parameter of type 'id<MTLBuffer> _Nullable' with an lvalue of type 'int'" in result.stderr


def test_wrong_protocol_passed_as_buffer_fails(tmp_path):
    result = compile_snippet(tmp_path, """
void encode(id<MTLComputeCommandEncoder> encoder, id<MTLLibrary> library) {
  [encoder setBuffer:library offset:0 atIndex:0];
}
""")
    assert result.returncode != 0
    assert "'id<MTLLibrary>'" in result.stderr and "id<MTLBuffer>" in result.stderr


def test_scalar_passed_as_grid_size_fails(tmp_path):
    result = compile_snippet(tmp_path, """
void encode(id<MTLComputeCommandEncoder> encoder) {
  [encoder dispatchThreads:64 threadsPerThreadgroup:MTLSizeMake(64, 1, 1)];
}
""")
    assert result.returncode != 0
    assert "no viable conversion from 'int' to 'MTLSize'" in result.stderr


def test_ending_the_shared_encoder_fails(tmp_path):
    # endEncoding is deliberately not declared: ending PyTorch's shared
    # encoder breaks every later kernel on the stream.
    result = compile_snippet(tmp_path, """
void encode(at::mps::MPSStream* stream) {
  [stream->commandEncoder() endEncoding];
}
""")
    assert result.returncode != 0
    assert "instance method '-endEncoding' not found" in result.stderr


def test_wrong_cpp_call_fails(tmp_path):
    # The C++ side is checked against PyTorch's real headers.
    result = compile_snippet(tmp_path, """
void encode(at::mps::MPSStream* stream) {
  stream->commandEncoder(0);
}
""")
    assert result.returncode != 0
    assert "too many arguments to function call" in result.stderr


def test_sdk_headers_say_what_they_are():
    headers = glob.glob(os.path.join(checker.SDK_DIR, "**", "*.h"), recursive=True)
    assert len(headers) >= 6
    for header in headers:
        with open(header) as f:
            first_lines = "".join(f.readline() for _ in range(3))
        assert first_lines.startswith("// "), header
        assert "declaration subset for the Linux syntax check" in first_lines.replace("\n// ", " "), header
