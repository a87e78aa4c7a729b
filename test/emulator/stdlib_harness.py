"""Harness of the tests of the emulator's Metal standard library header
(my_mps_ops/emulator/include).

Each test compiles a small C++17 program shaped like translated Metal code
(`using namespace metal;`, address-space keywords already erased) with g++
against the header, runs it, and checks what it prints against values computed
by hand or independently in Python. No build of the extension is needed: only
g++.
"""

import math
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

INCLUDE_DIR = Path(__file__).resolve().parents[2] / "my_mps_ops" / "emulator" / "include"
GXX = shutil.which("g++")
needs_gxx = pytest.mark.skipif(GXX is None, reason="needs g++")

# Every program gets these output helpers: `out("name", value)` prints one "name value" line.
PRELUDE = r"""
#include "metal_stdlib.h"
#include <cstdio>
#include <cinttypes>
static inline void out(const char* k, double v) { std::printf("%s %.17g\n", k, v); }
static inline void out(const char* k, float v) { std::printf("%s %.17g\n", k, (double)v); }
static inline void out(const char* k, metal::half v) { std::printf("%s %.17g\n", k, (double)(float)v); }
static inline void out(const char* k, metal::bfloat v) { std::printf("%s %.17g\n", k, (double)(float)v); }
static inline void out(const char* k, long long v) { std::printf("%s %lld\n", k, v); }
static inline void out(const char* k, unsigned long long v) { std::printf("%s %llu\n", k, v); }
static inline void out(const char* k, long v) { out(k, (long long)v); }
static inline void out(const char* k, unsigned long v) { out(k, (unsigned long long)v); }
static inline void out(const char* k, int v) { out(k, (long long)v); }
static inline void out(const char* k, unsigned v) { out(k, (unsigned long long)v); }
static inline void out(const char* k, short v) { out(k, (long long)v); }
static inline void out(const char* k, unsigned short v) { out(k, (unsigned long long)v); }
static inline void out(const char* k, signed char v) { out(k, (long long)v); }
static inline void out(const char* k, char v) { out(k, (long long)v); }
static inline void out(const char* k, unsigned char v) { out(k, (unsigned long long)v); }
static inline void out(const char* k, bool v) { out(k, (long long)v); }
using namespace metal;
"""

FLAGS = ["-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{INCLUDE_DIR}"]


def compile_cpp(tmp_path, source, extra_flags=(), name="prog"):
    src = tmp_path / f"{name}.cpp"
    src.write_text(source)
    exe = tmp_path / name
    proc = subprocess.run([GXX, *FLAGS, *extra_flags, str(src), "-o", str(exe)], capture_output=True, text=True)
    return proc, exe


def run_program(tmp_path, body, globals_src="", extra_flags=()):
    """Compiles PRELUDE + globals_src + main(){body}, runs it, returns {name: value}."""
    source = PRELUDE + globals_src + "\nint main() {\n" + body + "\nreturn 0;\n}\n"
    proc, exe = compile_cpp(tmp_path, source, extra_flags)
    assert proc.returncode == 0, f"compile failed:\n{proc.stderr[:6000]}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    values = {}
    for line in run.stdout.splitlines():
        key, value = line.split(" ", 1)
        assert key not in values, f"duplicate output key {key}"
        values[key] = float(value) if any(c in value for c in ".en") else int(value)
    return values


# Independent references -------------------------------------------------------------------


def to_half(x):
    """Round a Python float to IEEE half (round to nearest even) via struct's 'e' format."""
    try:
        return struct.unpack("<e", struct.pack("<e", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def to_float32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def bfloat_bits(x):
    """bfloat bits of float32(x), rounding the dropped 16 bits to nearest even (by hand)."""
    u = struct.unpack("<I", struct.pack("<f", x))[0]
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return (u >> 16) | 0x40
    upper, lower = u >> 16, u & 0xFFFF
    if lower > 0x8000 or (lower == 0x8000 and upper & 1):
        upper += 1
    return upper & 0xFFFF


def bfloat_value(bits):
    return struct.unpack("<f", struct.pack("<I", bits << 16))[0]
