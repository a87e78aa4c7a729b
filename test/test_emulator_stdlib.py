"""Tests of the emulator's Metal standard library header (my_mps_ops/emulator/include).

Each test compiles a small C++17 program shaped like translated Metal code (`using namespace
metal;`, address-space keywords already erased) with g++ against the header, runs it, and checks
what it prints against values computed by hand or independently in Python. No build of the
extension is needed: only g++.
"""

import math
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

INCLUDE_DIR = Path(__file__).resolve().parents[1] / "my_mps_ops" / "emulator" / "include"
GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(GXX is None, reason="needs g++")

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


# Layout -----------------------------------------------------------------------------------


def test_vector_sizes_and_alignment_follow_metal(tmp_path):
    v = run_program(
        tmp_path,
        r"""
        out("float2_size", sizeof(float2)); out("float2_align", alignof(float2));
        out("float3_size", sizeof(float3)); out("float3_align", alignof(float3));
        out("float4_size", sizeof(float4)); out("float4_align", alignof(float4));
        out("half3_size", sizeof(half3)); out("half3_align", alignof(half3));
        out("char3_size", sizeof(char3)); out("bool3_size", sizeof(bool3));
        out("long3_size", sizeof(long3)); out("ulong2_size", sizeof(ulong2));
        out("uint3_size", sizeof(uint3)); out("ushort2_size", sizeof(ushort2));
        out("bfloat4_size", sizeof(bfloat4)); out("bfloat_size", sizeof(bfloat));
        out("half_size", sizeof(half)); out("long_size", sizeof(long));
        out("packed_float3_size", sizeof(packed_float3)); out("packed_float3_align", alignof(packed_float3));
        out("packed_half3_size", sizeof(packed_half3)); out("packed_uchar3_size", sizeof(packed_uchar3));
        out("S_size", sizeof(S)); out("S_b_offset", offsetof(S, b));
        out("P_size", sizeof(P)); out("P_b_offset", offsetof(P, b));
        """,
        globals_src="#include <cstddef>\nstruct S { float a; float3 b; };\nstruct P { float a; packed_float3 b; };\n",
    )
    assert (v["float2_size"], v["float2_align"]) == (8, 8)
    assert (v["float3_size"], v["float3_align"]) == (16, 16)
    assert (v["float4_size"], v["float4_align"]) == (16, 16)
    assert (v["half3_size"], v["half3_align"]) == (8, 8)
    assert (v["char3_size"], v["bool3_size"]) == (4, 4)
    assert (v["long3_size"], v["ulong2_size"]) == (32, 16)
    assert (v["uint3_size"], v["ushort2_size"]) == (16, 4)
    assert (v["bfloat4_size"], v["bfloat_size"], v["half_size"], v["long_size"]) == (8, 2, 2, 8)
    assert (v["packed_float3_size"], v["packed_float3_align"]) == (12, 4)
    assert (v["packed_half3_size"], v["packed_uchar3_size"]) == (6, 3)
    # A float3 member starts on a 16-byte boundary; a packed_float3 right after the float.
    assert (v["S_size"], v["S_b_offset"]) == (32, 16)
    assert (v["P_size"], v["P_b_offset"]) == (16, 4)


# half ------------------------------------------------------------------------------------


def test_half_rounds_after_every_operation(tmp_path):
    v = run_program(
        tmp_path,
        r"""
        half count = half(0.0f);
        for (int i = 0; i < 3000; ++i) count += half(1.0f);   // stalls at 2048: 2048 + 1 ties to even
        out("count", count);
        out("small_add", half(1.0f) + half(0.0004f));
        out("tie_2049", half(2049.0f));
        out("tie_2051", half(2051.0f));
        out("point1_bits", as_type<ushort>(half(0.1f)));
        half big = half(65504.0f);
        out("overflow_is_inf", isinf(big + half(32.0f)));
        out("mul", half(1.1f) * half(1.1f));
        float f = half(0.1f);   // half -> float is exact
        out("to_float", f);
        half mixed = half(3.0f) * 2;  // integer operand converts to half
        out("mixed", mixed);
        out("sqrt_half", sqrt(half(2.0f)));
        out("exp_half", exp(half(1.0f)));
        """,
    )
    assert v["count"] == 2048.0
    assert v["small_add"] == 1.0
    assert v["tie_2049"] == 2048.0 and v["tie_2051"] == 2052.0
    assert v["point1_bits"] == 0x2E66
    assert v["overflow_is_inf"] == 1
    assert v["mul"] == to_half(to_half(1.1) * to_half(1.1))
    assert v["to_float"] == to_half(0.1)
    assert v["mixed"] == 6.0
    assert v["sqrt_half"] == to_half(math.sqrt(2.0)) == 1.4140625
    assert v["exp_half"] == to_half(math.e)


# bfloat -----------------------------------------------------------------------------------


def test_bfloat_rounds_to_nearest_even(tmp_path):
    cases = {
        "one": 1.0,
        "tie_down": 1.0 + 2.0**-8,  # halfway between 1.0 (even) and 1.0078125
        "tie_up": 1.0078125 + 2.0**-8,  # halfway between 1.0078125 (odd) and 1.015625
        "above_tie": 1.0 + 2.0**-8 + 2.0**-20,
        "point1": 0.1,
        "neg": -3.14159,
        "big": 3.0e38,
        "tiny": 1.0e-39,  # subnormal float
    }
    body = "\n".join(f'out("{k}", (unsigned)bfloat({float(x)!r}f).bits);' for k, x in cases.items())
    body += r"""
        out("inf", (unsigned)bfloat(INFINITY).bits);
        out("ninf", (unsigned)bfloat(-INFINITY).bits);
        out("nan_is_nan", isnan(float(bfloat(NAN))));
        out("max_overflows", (unsigned)bfloat(3.4028235e38f).bits);
        """
    v = run_program(tmp_path, body)
    for k, x in cases.items():
        assert v[k] == bfloat_bits(x), k
    assert v["one"] == 0x3F80 and v["tie_down"] == 0x3F80 and v["tie_up"] == 0x3F82
    assert v["above_tie"] == 0x3F81 and v["point1"] == 0x3DCD
    assert v["inf"] == 0x7F80 and v["ninf"] == 0xFF80
    assert v["nan_is_nan"] == 1
    assert v["max_overflows"] == 0x7F80  # float max rounds up past bfloat max


def test_bfloat_arithmetic_conversions_and_comparisons(tmp_path):
    v = run_program(
        tmp_path,
        r"""
        bfloat a = 1.0f;                 // implicit from float, as `T x = 0;` in templates needs
        bfloat b = bfloat(0.00390625f);  // 2^-8
        bfloat s = a + b;                // 1 + 2^-8 ties to even: 1.0
        out("sum", s);
        out("sum_type_is_bfloat", std::is_same<decltype(a + b), bfloat>::value);
        out("with_float_type_is_float", std::is_same<decltype(a + 1.0f), float>::value);
        out("with_int_type_is_bfloat", std::is_same<decltype(a * 3), bfloat>::value);
        out("with_float", a + 0.00390625f);   // computed in float: exact
        bfloat c = 3.0f;
        c *= 1.1f;                             // 3.3000002 -> bfloat
        out("compound", c);
        out("neg_bits", (unsigned)(-c).bits);
        out("lt", bfloat(2.0f) < bfloat(3.0f));
        out("eq_float", bfloat(0.5f) == 0.5f);
        out("ne", bfloat(0.1f) != 0.1f);
        float f = c;                           // implicit to float
        out("to_float", f);
        int i = int(bfloat(7.9f));
        out("to_int", i);
        bfloat4 v4 = bfloat4(1.0f, 2.0f, 3.0f, 4.0f);
        bfloat4 w4 = v4 * bfloat(1.5f) + 1;
        out("vec_w", w4.w);
        float4 f4 = float4(v4);
        out("vec_conv", f4.z);
        out("limits_max", numeric_limits<bfloat>::max());
        out("limits_eps", numeric_limits<bfloat>::epsilon());
        """,
    )
    assert v["sum"] == 1.0
    assert v["sum_type_is_bfloat"] == 1 and v["with_float_type_is_float"] == 1 and v["with_int_type_is_bfloat"] == 1
    assert v["with_float"] == 1.00390625
    assert v["compound"] == bfloat_value(bfloat_bits(to_float32(3.0 * to_float32(1.1))))
    assert v["neg_bits"] == bfloat_bits(-v["compound"])
    assert v["lt"] == 1 and v["eq_float"] == 1 and v["ne"] == 1
    assert v["to_float"] == v["compound"]
    assert v["to_int"] == int(bfloat_value(bfloat_bits(7.9)))  # 7.875 -> 7
    assert v["vec_w"] == 7.0 and v["vec_conv"] == 3.0
    assert v["limits_max"] == bfloat_value(0x7F7F) and v["limits_eps"] == 2.0**-7


# Vectors and swizzles -----------------------------------------------------------------------


def test_vector_constructors_and_conversions(tmp_path):
    v = run_program(
        tmp_path,
        r"""
        float4 p(1.0f, 2.0f, 3.0f, 4.0f);
        float4 a = float4(__mtl::swizzle<0, 1>(p), 0, 1);      // float4(v.xy, 0, 1)
        float4 b = float4(__mtl::swizzle<2, 1, 0>(p), 9.0f);   // float4(float3, float)
        float4 c = float4(5.0f, __mtl::swizzle<1, 2, 3>(p));   // float4(float, float3)
        float4 d = float4(float2(7, 8), float2(9, 10));
        float4 e = 2.5f;                                       // broadcast
        float3 f = float3(1);
        int4 g = int4(float4(1.7f, -1.7f, 2.5f, -0.2f));       // explicit conversion truncates
        half4 h = half4(float4(0.1f, 1.0f, 65504.0f, 1e6f));   // rounds to half (1e6 -> inf)
        packed_float3 pk = packed_float3(1.0f, 2.0f, 3.0f);
        float3 un = pk;                                         // packed -> aligned is implicit
        uint3 u(4u, 5u, 6u);
        ushort2 us = ushort2(65535, 2);
        float2 z = {};
        float4 list = {1, 2, 3, 4};
        out("a", a.x * 1000 + a.y * 100 + a.z * 10 + a.w);
        out("b", b.x * 1000 + b.y * 100 + b.z * 10 + b.w);
        out("c", c.x * 1000 + c.y * 100 + c.z * 10 + c.w);
        out("d", d.x * 1000 + d.y * 100 + d.z * 10 + d.w);
        out("e", e.x + e.y + e.z + e.w);
        out("f", f.x + f.y + f.z);
        out("g0", g.x); out("g1", g.y); out("g2", g.z); out("g3", g.w);
        out("h0", h.x); out("h2", h.z); out("h3_inf", isinf(h.w));
        out("un", un.x * 100 + un.y * 10 + un.z);
        out("u", u.x * 100 + u.y * 10 + u[2]);
        out("us", us.x + us.y);
        out("z", z.x + z.y);
        out("list", list[0] + list[3]);
        """,
    )
    assert v["a"] == 1201 and v["b"] == 3219 and v["c"] == 5234 and v["d"] == 7000 + 800 + 90 + 10
    assert v["e"] == 10.0 and v["f"] == 3.0
    assert (v["g0"], v["g1"], v["g2"], v["g3"]) == (1, -1, 2, 0)
    assert v["h0"] == to_half(0.1) and v["h2"] == 65504.0 and v["h3_inf"] == 1
    assert v["un"] == 123 and v["u"] == 456 and v["us"] == 65537 and v["z"] == 0 and v["list"] == 5


def test_vector_operators(tmp_path):
    v = run_program(
        tmp_path,
        r"""
        int4 a(7, -8, 9, 10), b(2, 3, 4, 5);
        int4 s = a + b, m = a * b, q = a / b, r = a % b;
        int4 sh = b << 2, shr = a >> 1, andv = a & b, orv = a | b, xo = a ^ b, nt = ~b, ng = -a;
        int4 bs = 10 - b, sb = b * 3;                 // scalar on either side
        uint2 wrap = uint2(0u, 1u) - 1u;              // unsigned wrap-around
        ushort2 us = ushort2(65535, 1) + ushort2(1, 1);  // computed then truncated to ushort
        float4 fv(1, 2, 3, 4);
        fv += 1.0f; fv *= float4(2, 2, 2, 0.5f); fv -= 1; fv /= 2;
        bool4 lt = a < b, ge = a >= 9, eq = a == int4(7, 0, 9, 0);
        bool4 nb = !lt;
        bool4 land = lt && eq, lor = lt || eq;
        for (int i = 0; i < 4; ++i) {
          char k[8];
          std::snprintf(k, 8, "s%d", i); out(k, s[i]);
          std::snprintf(k, 8, "m%d", i); out(k, m[i]);
          std::snprintf(k, 8, "q%d", i); out(k, q[i]);
          std::snprintf(k, 8, "r%d", i); out(k, r[i]);
          std::snprintf(k, 8, "sh%d", i); out(k, sh[i]);
          std::snprintf(k, 8, "shr%d", i); out(k, shr[i]);
          std::snprintf(k, 8, "and%d", i); out(k, andv[i]);
          std::snprintf(k, 8, "or%d", i); out(k, orv[i]);
          std::snprintf(k, 8, "xo%d", i); out(k, xo[i]);
          std::snprintf(k, 8, "nt%d", i); out(k, nt[i]);
          std::snprintf(k, 8, "ng%d", i); out(k, ng[i]);
          std::snprintf(k, 8, "bs%d", i); out(k, bs[i]);
          std::snprintf(k, 8, "sb%d", i); out(k, sb[i]);
          std::snprintf(k, 8, "fv%d", i); out(k, fv[i]);
          std::snprintf(k, 8, "lt%d", i); out(k, lt[i]);
          std::snprintf(k, 8, "ge%d", i); out(k, ge[i]);
          std::snprintf(k, 8, "eq%d", i); out(k, eq[i]);
          std::snprintf(k, 8, "nb%d", i); out(k, nb[i]);
          std::snprintf(k, 8, "la%d", i); out(k, land[i]);
          std::snprintf(k, 8, "lo%d", i); out(k, lor[i]);
        }
        out("wrap0", wrap.x); out("wrap1", wrap.y);
        out("us0", us.x); out("us1", us.y);
        out("all_ge", all(ge)); out("any_ge", any(ge)); out("all_true", all(bool3(true)));
        out("any_false", any(bool2(false)));
        """,
    )
    a, b = [7, -8, 9, 10], [2, 3, 4, 5]
    fv = [((x + 1) * w - 1) / 2 for x, w in zip([1, 2, 3, 4], [2, 2, 2, 0.5])]
    for i in range(4):
        # C/Metal integer division and remainder truncate toward zero.
        assert v[f"s{i}"] == a[i] + b[i] and v[f"m{i}"] == a[i] * b[i]
        assert v[f"q{i}"] == int(a[i] / b[i]) and v[f"r{i}"] == a[i] - int(a[i] / b[i]) * b[i]
        assert v[f"sh{i}"] == b[i] << 2 and v[f"shr{i}"] == a[i] >> 1
        assert v[f"and{i}"] == a[i] & b[i] and v[f"or{i}"] == a[i] | b[i] and v[f"xo{i}"] == a[i] ^ b[i]
        assert v[f"nt{i}"] == ~b[i] and v[f"ng{i}"] == -a[i]
        assert v[f"bs{i}"] == 10 - b[i] and v[f"sb{i}"] == 3 * b[i]
        assert v[f"fv{i}"] == fv[i]
        assert v[f"lt{i}"] == int(a[i] < b[i]) and v[f"ge{i}"] == int(a[i] >= 9)
        assert v[f"nb{i}"] == int(not a[i] < b[i])
    assert [v[f"eq{i}"] for i in range(4)] == [1, 0, 1, 0]
    assert [v[f"la{i}"] for i in range(4)] == [0, 0, 0, 0]
    assert [v[f"lo{i}"] for i in range(4)] == [1, 1, 1, 0]
    assert v["wrap0"] == 2**32 - 1 and v["wrap1"] == 0
    assert v["us0"] == 0 and v["us1"] == 2
    assert v["all_ge"] == 0 and v["any_ge"] == 1 and v["all_true"] == 1 and v["any_false"] == 0


def test_swizzle_read_and_write(tmp_path):
    v = run_program(
        tmp_path,
        r"""
        float4 p(1.0f, 2.0f, 3.0f, 4.0f);
        float3 zyx = __mtl::swizzle<2, 1, 0>(p);
        float4 xxyy = __mtl::swizzle<0, 0, 1, 1>(p);
        float w = __mtl::swizzle<3>(p);                        // one component: the scalar
        const packed_float3 pk = packed_float3(5.0f, 6.0f, 7.0f);
        float2 pk_zx = __mtl::swizzle<2, 0>(pk);               // packed and const inputs
        float2 rv = __mtl::swizzle<1, 0>(p + 10.0f);           // rvalue input
        float4 s4 = __mtl::swizzle<0, 0, 0, 0>(2.0f);          // scalar.xxxx
        float4 q = p;
        __mtl::swizzle_ref<3, 0>(q) = float2(40.0f, 10.0f);    // q.wx = ...
        __mtl::swizzle_ref<1, 2>(q) += float2(0.5f, 0.25f);   // q.yz += ...
        __mtl::swizzle_ref<0, 1, 2>(q) *= 2.0f;               // q.xyz *= scalar
        __mtl::swizzle_ref<2>(q) -= 1.0f;                     // q.z -= ...
        float4 t = p;
        __mtl::swizzle_ref<0, 1>(t) = __mtl::swizzle<1, 0>(t); // t.xy = t.yx
        __mtl::swizzle_ref<2, 3>(t) /= float2(3.0f, 4.0f);
        float2 conv = __mtl::swizzle_ref<0, 3>(q);             // proxy reads as a vector
        packed_float4 pq = packed_float4(1.0f, 2.0f, 3.0f, 4.0f);
        __mtl::swizzle_ref<3, 2, 1, 0>(pq) = float4(p);          // write into a packed vector
        out("zyx", zyx.x * 100 + zyx.y * 10 + zyx.z);
        out("xxyy", xxyy.x * 1000 + xxyy.y * 100 + xxyy.z * 10 + xxyy.w);
        out("w", w); out("pk_zx", pk_zx.x * 10 + pk_zx.y); out("rv", rv.x * 100 + rv.y);
        out("s4", s4.x + s4.y + s4.z + s4.w);
        out("q0", q.x); out("q1", q.y); out("q2", q.z); out("q3", q.w);
        out("t0", t.x); out("t1", t.y); out("t2", t.z); out("t3", t.w);
        out("conv", conv.x * 100 + conv.y);
        out("pq", pq.x * 1000 + pq.y * 100 + pq.z * 10 + pq.w);
        // proxies used as operands and in component lists read as their vector value
        float2 pa = __mtl::swizzle_ref<0, 1>(p) * 2.0f + __mtl::swizzle_ref<2, 3>(p);
        float4 pb = float4(__mtl::swizzle_ref<3, 2>(p), 0, 1);
        bool2 pc = __mtl::swizzle_ref<0, 1>(p) < float2(2, 2);
        float2 pd = 1.0f - __mtl::swizzle_ref<1, 0>(p);
        out("pa", pa.x * 10 + pa.y); out("pb", pb.x * 1000 + pb.y * 100 + pb.z * 10 + pb.w);
        out("pc", pc.x * 10 + pc.y); out("pd0", pd.x); out("pd1", pd.y);
        """,
    )
    assert v["zyx"] == 321 and v["xxyy"] == 1122 and v["w"] == 4.0
    assert v["pk_zx"] == 75 and v["rv"] == 1211 and v["s4"] == 8.0
    # q = (1,2,3,4) -> .wx = (40,10) -> (10,2,3,40) -> .yz += -> (10,2.5,3.25,40) -> .xyz *= 2 -> z -= 1
    assert (v["q0"], v["q1"], v["q2"], v["q3"]) == (20.0, 5.0, 5.5, 40.0)
    assert (v["t0"], v["t1"], v["t2"], v["t3"]) == (2.0, 1.0, to_float32(3.0 / 3.0), 1.0)
    assert v["conv"] == 20.0 * 100 + 40.0
    assert v["pq"] == 4321
    assert v["pa"] == 5 * 10 + 8 and v["pb"] == 4301 and v["pc"] == 10 and (v["pd0"], v["pd1"]) == (-1.0, 0.0)


def test_swizzle_out_of_range_is_a_compile_error(tmp_path):
    source = PRELUDE + "int main() { float2 v(1, 2); float r = __mtl::swizzle<2>(v); return int(r); }\n"
    proc, _ = compile_cpp(tmp_path, source)
    assert proc.returncode != 0
    assert "swizzle component out of range" in proc.stderr


# as_type ---------------------------------------------------------------------------------------


def test_as_type_reinterprets_bits(tmp_path):
    v = run_program(
        tmp_path,
        r"""
        out("one_bits", as_type<uint>(1.0f));
        out("pi", as_type<float>(0x40490FDBu));
        out("half2_bits", as_type<uint>(half2(half(1.0f), half(2.0f))));
        out("neg_int", as_type<int>(as_type<float>(0xFFFFFFFFu)));
        ushort2 parts = as_type<ushort2>(0x12345678u);
        out("lo", parts.x); out("hi", parts.y);
        float2 f2 = as_type<float2>(0x3F80000040000000ul);
        out("f2x", f2.x); out("f2y", f2.y);
        out("bf", as_type<ushort>(bfloat(-2.0f)));
        float3 f3 = float3(1.0f, 2.0f, 3.0f);
        uint4 u4 = as_type<uint4>(f3);   // float3 is 16 bytes, as uint4
        out("u4z", u4.z);
        """,
    )
    assert v["one_bits"] == 0x3F800000
    assert v["pi"] == struct.unpack("<f", struct.pack("<I", 0x40490FDB))[0]
    assert v["half2_bits"] == 0x40003C00
    assert v["neg_int"] == -1
    assert (v["lo"], v["hi"]) == (0x5678, 0x1234)
    assert (v["f2x"], v["f2y"]) == (2.0, 1.0)  # little endian: low word is .x
    assert v["bf"] == 0xC000
    assert v["u4z"] == 0x40400000


def test_as_type_size_mismatch_is_a_compile_error(tmp_path):
    source = PRELUDE + "int main() { return (int)as_type<uint>(half(1.0f)); }\n"
    proc, _ = compile_cpp(tmp_path, source)
    assert proc.returncode != 0
    assert "as_type<T>(x) requires sizeof(T) == sizeof(x)" in proc.stderr


# Math -----------------------------------------------------------------------------------------


def test_common_functions(tmp_path):
    v = run_program(
        tmp_path,
        r"""
        out("clamp_lo", clamp(-2.0f, 0.0f, 1.0f)); out("clamp_hi", clamp(5.0f, 0, 1));
        out("clamp_int", clamp(-7, -3, 3)); out("clamp_uint", clamp(9u, 2u, 5u));
        out("saturate", saturate(1.5f)); out("saturate_neg", saturate(-0.5f));
        out("mix", mix(2.0f, 10.0f, 0.25f)); out("step0", step(1.0f, 0.5f)); out("step1", step(1.0f, 1.0f));
        out("smooth", smoothstep(0.0f, 2.0f, 0.5f)); out("smooth_hi", smoothstep(0.0f, 2.0f, 3.0f));
        out("sign_pos", sign(3.5f)); out("sign_neg", sign(-0.1f)); out("sign_zero", sign(0.0f));
        out("sign_nan", sign(NAN)); out("signbit_negzero", signbit(-0.0f));
        out("fract", fract(-1.25f)); out("fract_tiny", fract(-1e-10f));
        out("fmod", fmod(-7.5f, 2.0f));
        out("fmin_nan", fmin(NAN, 2.0f)); out("fmax_nan", fmax(3.0f, NAN)); out("max_nan", max(NAN, 4.0f));
        out("min_int", min(-3, 2)); out("max_uint", max(3u, 7u)); out("max_mixed", max(2.5f, 3));
        out("rint_25", rint(2.5f)); out("round_25", round(2.5f)); out("rint_m25", rint(-2.5f));
        out("round_m25", round(-2.5f)); out("trunc", trunc(-2.7f)); out("floor", floor(-2.5f)); out("ceil", ceil(-2.5f));
        out("copysign", copysign(3.0f, -0.0f)); out("abs_f", abs(-2.5f)); out("abs_i", abs(-9));
        out("fabs_h", fabs(half(-1.5f))); out("fma", fma(2.0f, 3.0f, 1.0f)); out("mad", mad(2.0f, 3.0f, 1.0f));
        out("isnan", isnan(NAN)); out("isinf", isinf(-INFINITY)); out("isfinite", isfinite(1.0f));
        out("isfinite_inf", isfinite(INFINITY));
        out("median3", median3(5.0f, 1.0f, 3.0f)); out("max3", max3(1, 9, 4)); out("min3", min3(2.0f, -1.0f, 0.0f));
        int e; float m = frexp(48.0f, e); out("frexp_m", m); out("frexp_e", e);
        out("ldexp", ldexp(0.75f, 6));
        float whole; float frac = modf(-3.75f, whole); out("modf_frac", frac); out("modf_whole", whole);
        float c; float s = sincos(0.5f, c); out("sincos_s", s); out("sincos_c", c);
        """,
    )
    assert v["clamp_lo"] == 0.0 and v["clamp_hi"] == 1.0 and v["clamp_int"] == -3 and v["clamp_uint"] == 5
    assert v["saturate"] == 1.0 and v["saturate_neg"] == 0.0
    assert v["mix"] == 4.0 and v["step0"] == 0.0 and v["step1"] == 1.0
    assert v["smooth"] == 0.15625 and v["smooth_hi"] == 1.0  # t=0.25: t*t*(3-2t)
    assert v["sign_pos"] == 1.0 and v["sign_neg"] == -1.0 and v["sign_zero"] == 0.0 and v["sign_nan"] == 0.0
    assert v["signbit_negzero"] == 1
    assert v["fract"] == 0.75
    assert v["fract_tiny"] == to_float32(1.0 - 2.0**-24)  # clamped below 1.0
    assert v["fmod"] == -1.5
    assert v["fmin_nan"] == 2.0 and v["fmax_nan"] == 3.0 and v["max_nan"] == 4.0
    assert v["min_int"] == -3 and v["max_uint"] == 7 and v["max_mixed"] == 3.0
    assert (v["rint_25"], v["round_25"], v["rint_m25"], v["round_m25"]) == (2.0, 3.0, -2.0, -3.0)
    assert (v["trunc"], v["floor"], v["ceil"]) == (-2.0, -3.0, -2.0)
    assert v["copysign"] == -3.0 and v["abs_f"] == 2.5 and v["abs_i"] == 9 and v["fabs_h"] == 1.5
    assert v["fma"] == 7.0 and v["mad"] == 7.0
    assert (v["isnan"], v["isinf"], v["isfinite"], v["isfinite_inf"]) == (1, 1, 1, 0)
    assert v["median3"] == 3.0 and v["max3"] == 9 and v["min3"] == -1.0
    assert (v["frexp_m"], v["frexp_e"]) == (0.75, 6) and v["ldexp"] == 48.0
    assert (v["modf_frac"], v["modf_whole"]) == (-0.75, -3.0)
    assert v["sincos_s"] == pytest.approx(math.sin(0.5), rel=1e-6)
    assert v["sincos_c"] == pytest.approx(math.cos(0.5), rel=1e-6)


TRANSCENDENTALS = {
    # name: (reference, arguments)
    "sqrt": (math.sqrt, [0.25, 2.0, 1e4]),
    "rsqrt": (lambda x: 1 / math.sqrt(x), [0.25, 2.0, 1e4]),
    "exp": (math.exp, [-3.0, 0.5, 10.0]),
    "exp2": (lambda x: 2.0**x, [-3.5, 0.5, 10.0]),
    "exp10": (lambda x: 10.0**x, [-2.0, 0.5, 3.0]),
    "log": (math.log, [0.1, 2.0, 1e4]),
    "log2": (math.log2, [0.1, 2.0, 1e4]),
    "log10": (math.log10, [0.1, 2.0, 1e4]),
    "sin": (math.sin, [-1.0, 0.5, 3.0]),
    "cos": (math.cos, [-1.0, 0.5, 3.0]),
    "tan": (math.tan, [-1.0, 0.5, 1.5]),
    "asin": (math.asin, [-0.9, 0.1, 0.5]),
    "acos": (math.acos, [-0.9, 0.1, 0.5]),
    "atan": (math.atan, [-10.0, 0.1, 3.0]),
    "sinh": (math.sinh, [-2.0, 0.1, 3.0]),
    "cosh": (math.cosh, [-2.0, 0.1, 3.0]),
    "tanh": (math.tanh, [-2.0, 0.1, 3.0]),
    "sinpi": (lambda x: math.sin(math.pi * x), [0.25, 0.5, 1.75]),
    "cospi": (lambda x: math.cos(math.pi * x), [0.25, 0.1, 1.75]),
}


@pytest.mark.parametrize("namespace", ["", "fast::", "precise::"])
def test_transcendentals_in_each_namespace(tmp_path, namespace):
    lines = []
    for name, (_, args) in TRANSCENDENTALS.items():
        for i, x in enumerate(args):
            lines.append(f'out("{name}_{i}", {namespace}{name}({x!r}f));')
            lines.append(f'out("{name}_h{i}", {namespace}{name}(half({x!r}f)));')
        # the vector form equals the scalar form component by component (volatile inputs: both
        # computed at run time, not one folded by the compiler)
        vec_args = ", ".join(f"{x!r}f" for x in args)
        lines.append(f"{{ volatile float in[3] = {{{vec_args}}}; float3 r = {namespace}{name}(float3(in[0], in[1], in[2]));")
        lines.append(f'  out("{name}_v", (double)(r.x == {namespace}{name}(float(in[0])) && '
                     f"r.y == {namespace}{name}(float(in[1])) && r.z == {namespace}{name}(float(in[2])))); }}")
    lines.append(f'out("pow", {namespace}pow(2.0f, 0.5f)); out("powr", {namespace}powr(3.0f, 2.0f));')
    lines.append(f'out("atan2", {namespace}atan2(1.0f, -1.0f));')
    v = run_program(tmp_path, "\n".join(lines))
    for name, (ref, args) in TRANSCENDENTALS.items():
        for i, x in enumerate(args):
            expected = ref(to_float32(x))
            # float: within a few ulp of the exact value (fast:: in Metal is looser; we are exact).
            assert v[f"{name}_{i}"] == pytest.approx(expected, rel=4e-7, abs=1e-7), (name, x)
            # half: computed in float and rounded once, so within half an ulp of half plus float error.
            expected_h = ref(to_half(x))
            assert v[f"{name}_h{i}"] == pytest.approx(expected_h, rel=2.0**-11 + 1e-6, abs=2.0**-24), (name, x)
        assert v[f"{name}_v"] == 1, name
    assert v["pow"] == pytest.approx(math.sqrt(2), rel=2e-7) and v["powr"] == 9.0
    assert v["atan2"] == pytest.approx(math.atan2(1, -1), rel=2e-7)


def test_select_and_vector_math(tmp_path):
    v = run_program(
        tmp_path,
        r"""
        float4 a(1, 2, 3, 4), b(10, 20, 30, 40);
        float4 s = select(a, b, bool4(true, false, false, true));
        float4 s_all = select(a, b, true);
        float sc = select(1.0f, 2.0f, false);
        int4 si = select(int4(-1), int4(7), int4(1, 2, 3, 4) > 2);
        float4 mx = max(a, 2.5f), mn = min(3.0f, a), cl = clamp(a, 1.5f, float4(2, 2, 5, 5));
        float4 mixv = mix(a, b, 0.5f);
        bool4 nan_mask = isnan(float4(NAN, 1, INFINITY, -NAN));
        float3 x(1, 0, 0), y(0, 1, 0);
        float3 z = cross(x, y);
        half3 hn = normalize(half3(half(3.0f), half(0.0f), half(4.0f)));
        out("s", s.x * 1000 + s.y * 100 + s.z * 10 + s.w);
        out("s_all", s_all.x); out("sc", sc);
        out("si", si.x * 1000 + si.y * 100 + si.z * 10 + si.w);
        out("mx", mx.x + mx.y + mx.z + mx.w); out("mn", mn.x + mn.y + mn.z + mn.w);
        out("cl", cl.x * 1000 + cl.y * 100 + cl.z * 10 + cl.w);
        out("mixv", mixv.w);
        out("nan_mask", nan_mask.x * 1000 + nan_mask.y * 100 + nan_mask.z * 10 + nan_mask.w);
        out("dot", dot(a, b)); out("dot_h", dot(half2(half(1.5f), half(2.0f)), half2(half(2.0f), half(4.0f))));
        out("z", z.z); out("len", length(float3(2, 3, 6))); out("len2", length_squared(float2(3, 4)));
        out("dist", distance(float2(1, 1), float2(4, 5)));
        float2 n = normalize(float2(3, 4)); out("n0", n.x); out("n1", n.y);
        out("hn0", hn.x); out("hn2", hn.z);
        float4 sq = sqrt(float4(4, 9, 16, 25)); out("sq", sq.x + sq.y + sq.z + sq.w);
        int3 ab = abs(int3(-1, 2, -3)); out("ab", ab.x + ab.y + ab.z);
        float3 refl = reflect(float3(1, -1, 0), float3(0, 1, 0)); out("refl_y", refl.y); out("refl_x", refl.x);
        float3 ff = faceforward(float3(0, 1, 0), float3(0, -1, 0), float3(0, 1, 0)); out("ff", ff.y);
        float3 rf = refract(float3(0.6f, -0.8f, 0), float3(0, 1, 0), 1.0f); out("rf_x", rf.x); out("rf_y", rf.y);
        bool2 nb = not(bool2(true, false)); out("not0", nb.x); out("not1", nb.y);   // Metal's not()
        out("divide", divide(1.0f, 4.0f)); out("fast_divide", fast::divide(3.0f, 2.0f));
        """,
    )
    assert v["s"] == 10 * 1000 + 200 + 30 + 40
    assert v["s_all"] == 10.0 and v["sc"] == 1.0
    assert v["si"] == -1000 - 100 + 70 + 7
    assert v["mx"] == 2.5 + 2.5 + 3 + 4 and v["mn"] == 1 + 2 + 3 + 3
    assert v["cl"] == 1500 + 200 + 30 + 4
    assert v["mixv"] == 22.0 and v["nan_mask"] == 1001
    assert v["dot"] == 300.0 and v["dot_h"] == 11.0
    assert v["z"] == 1.0 and v["len"] == 7.0 and v["len2"] == 25.0 and v["dist"] == 5.0
    assert v["n0"] == pytest.approx(0.6, rel=1e-7) and v["n1"] == pytest.approx(0.8, rel=1e-7)
    assert v["hn0"] == to_half(0.6) and v["hn2"] == to_half(0.8)
    assert v["sq"] == 14.0 and v["ab"] == 6
    assert (v["refl_x"], v["refl_y"], v["ff"]) == (1.0, 1.0, 1.0)
    assert v["rf_x"] == pytest.approx(0.6, rel=1e-6) and v["rf_y"] == pytest.approx(-0.8, rel=1e-6)  # eta 1: unbent
    assert (v["not0"], v["not1"], v["divide"], v["fast_divide"]) == (0, 1, 0.25, 1.5)


def test_integer_functions(tmp_path):
    v = run_program(
        tmp_path,
        r"""
        out("pop_u", popcount(0xF0F0u)); out("pop_neg", popcount(-1)); out("pop_uc", popcount(uchar(0x81)));
        out("clz_u", clz(1u)); out("clz_0", clz(0u)); out("clz_us", clz(ushort(0x00FF))); out("clz_uc", clz(uchar(1)));
        out("clz_l", clz(1ul)); out("ctz_u", ctz(8u)); out("ctz_0", ctz(0u)); out("ctz_s", ctz(short(-32768)));
        out("mulhi_u", mul_hi(0x80000000u, 6u)); out("mulhi_i", mul_hi(-2, 0x40000000));
        out("mulhi_ul", mul_hi(0xFFFFFFFFFFFFFFFFul, 0xFFFFFFFFFFFFFFFFul));
        out("rot", rotate(0x80000001u, 1u)); out("rot_uc", rotate(uchar(0x81), uchar(4)));
        out("rot_0", rotate(0x12345678u, 32u));
        out("addsat_uc", addsat(uchar(250), uchar(10))); out("addsat_c", addsat(char(100), char(100)));
        out("addsat_cn", addsat(char(-100), char(-100))); out("addsat_i", addsat(0x7FFFFFF0, 0x100));
        out("subsat_u", subsat(3u, 5u)); out("subsat_s", subsat(short(-30000), short(10000)));
        out("absdiff", absdiff(-5, 7)); out("hadd", hadd(0xFFFFFFFFu, 0xFFFFFFFDu)); out("rhadd", rhadd(3, 4));
        out("rev", reverse_bits(0x00000001u)); out("extract", extract_bits(0xABCDu, 4u, 8u));
        out("extract_s", extract_bits(int(0xF0), 4u, 4u)); out("insert", insert_bits(0xFFFFu, 0x0u, 4u, 8u));
        uint4 p4 = popcount(uint4(0, 1, 3, 0xFFFFFFFF)); out("pop_v", p4.x + p4.y + p4.z + p4.w);
        out("abs_c", abs(char(-5)));
        out("imax", numeric_limits<int>::max()); out("imin", numeric_limits<int>::min());
        out("usmax", numeric_limits<ushort>::max()); out("cmin", numeric_limits<char>::min());
        out("ulmax", numeric_limits<ulong>::max()); out("lmin", numeric_limits<long>::lowest());
        """,
    )
    assert v["pop_u"] == 8 and v["pop_neg"] == 32 and v["pop_uc"] == 2
    assert v["clz_u"] == 31 and v["clz_0"] == 32 and v["clz_us"] == 8 and v["clz_uc"] == 7 and v["clz_l"] == 63
    assert v["ctz_u"] == 3 and v["ctz_0"] == 32 and v["ctz_s"] == 15
    assert v["mulhi_u"] == (0x80000000 * 6) >> 32
    assert v["mulhi_i"] == (-2 * 0x40000000) >> 32  # Python >> floors like an arithmetic shift
    assert v["mulhi_ul"] == ((2**64 - 1) ** 2) >> 64
    assert v["rot"] == 0x00000003 and v["rot_uc"] == 0x18 and v["rot_0"] == 0x12345678
    assert v["addsat_uc"] == 255 and v["addsat_c"] == 127 and v["addsat_cn"] == -128
    assert v["addsat_i"] == 2**31 - 1 and v["subsat_u"] == 0 and v["subsat_s"] == -32768
    assert v["absdiff"] == 12 and v["hadd"] == (0xFFFFFFFF + 0xFFFFFFFD) >> 1 and v["rhadd"] == 4
    assert v["rev"] == 0x80000000 and v["extract"] == 0xBC and v["extract_s"] == -1 and v["insert"] == 0xF00F
    assert v["pop_v"] == 0 + 1 + 2 + 32 and v["abs_c"] == 5
    assert v["imax"] == 2**31 - 1 and v["imin"] == -(2**31) and v["usmax"] == 65535 and v["cmin"] == -128
    assert v["ulmax"] == 2**64 - 1 and v["lmin"] == -(2**63)


def test_numeric_limits_and_constants(tmp_path):
    v = run_program(
        tmp_path,
        r"""
        out("fmax", numeric_limits<float>::max()); out("flowest", numeric_limits<float>::lowest());
        out("fmin", numeric_limits<float>::min()); out("feps", numeric_limits<float>::epsilon());
        out("finf", isinf(numeric_limits<float>::infinity())); out("fnan", isnan(numeric_limits<float>::quiet_NaN()));
        out("hmax", numeric_limits<half>::max()); out("hlowest", numeric_limits<half>::lowest());
        out("hmin", numeric_limits<half>::min()); out("heps", numeric_limits<half>::epsilon());
        out("hinf", isinf(numeric_limits<half>::infinity())); out("hnan", isnan(numeric_limits<half>::quiet_NaN()));
        out("bmin", numeric_limits<bfloat>::min()); out("blowest", numeric_limits<bfloat>::lowest());
        out("INF", isinf(INFINITY)); out("NAN_", isnan(NAN)); out("HUGE", isinf(HUGE_VALF));
        out("MAXFLOAT", MAXFLOAT); out("FLT_MAX", FLT_MAX); out("FLT_MIN", FLT_MIN); out("FLT_EPS", FLT_EPSILON);
        out("HALF_MAX", HALF_MAX); out("HALF_MIN", HALF_MIN); out("HALF_EPS", HALF_EPSILON);
        out("PI", M_PI_F); out("PI_H", M_PI_H); out("PI_BF", M_PI_BF); out("HUGE_BF", isinf(float(HUGE_VALBF))); out("E", M_E_F); out("LN2", M_LN2_F); out("SQRT2", M_SQRT2_F);
        out("kMax", kMax); out("INT_MAX_", INT_MAX); out("UINT_MAX_", UINT_MAX); out("CHAR_BIT_", CHAR_BIT);
        """,
        globals_src="const float kMax = numeric_limits<float>::max();  // usable in constant initializers\n",
    )
    flt_max = struct.unpack("<f", struct.pack("<I", 0x7F7FFFFF))[0]
    assert v["fmax"] == flt_max == v["MAXFLOAT"] == v["FLT_MAX"] == v["kMax"] and v["flowest"] == -flt_max
    assert v["fmin"] == 2.0**-126 == v["FLT_MIN"] and v["feps"] == 2.0**-23 == v["FLT_EPS"]
    assert v["finf"] == 1 and v["fnan"] == 1 and v["hinf"] == 1 and v["hnan"] == 1
    assert v["hmax"] == 65504.0 == v["HALF_MAX"] and v["hlowest"] == -65504.0
    assert v["hmin"] == 2.0**-14 == v["HALF_MIN"] and v["heps"] == 2.0**-10 == v["HALF_EPS"]
    assert v["bmin"] == 2.0**-126 and v["blowest"] == -bfloat_value(0x7F7F)
    assert v["INF"] == 1 and v["NAN_"] == 1 and v["HUGE"] == 1
    assert v["PI"] == to_float32(math.pi) and v["PI_H"] == to_half(math.pi)
    assert v["PI_BF"] == bfloat_value(bfloat_bits(math.pi)) and v["HUGE_BF"] == 1
    assert v["E"] == to_float32(math.e) and v["LN2"] == to_float32(math.log(2)) and v["SQRT2"] == to_float32(math.sqrt(2))
    assert v["INT_MAX_"] == 2**31 - 1 and v["UINT_MAX_"] == 2**32 - 1 and v["CHAR_BIT_"] == 8


def test_cmath_included_later_does_not_conflict(tmp_path):
    # The runtime or user code may include <cmath> after the prelude: the constants must not be
    # redefined differently (-Werror) and the calls must still resolve to the Metal functions.
    v = run_program(
        tmp_path,
        r"""
        out("sqrt_f", sqrt(2.0f)); out("abs_i", abs(-3)); out("abs_f", abs(-2.5f));
        out("max_f", max(1.0f, 2.0f)); out("inf", isinf(INFINITY)); out("pow", pow(2.0f, 3.0f));
        out("sqrt_h", sqrt(half(2.0f))); out("round", round(2.5f));
        """,
        globals_src="#include <cmath>\n#include <cstdlib>\n",
    )
    assert v["sqrt_f"] == to_float32(math.sqrt(2)) and v["abs_i"] == 3 and v["abs_f"] == 2.5
    assert v["max_f"] == 2.0 and v["inf"] == 1 and v["pow"] == 8.0
    assert v["sqrt_h"] == 1.4140625 and v["round"] == 3.0


# Code shaped like translated kernels ---------------------------------------------------------------


KERNEL_IDIOMS = r"""
// What the translator produces from typical templated MSL (address spaces erased).
template <typename T>
void rms_norm_row(const T* x, const T* w, T* out, const uint& n, float eps, uint tid) {
  float acc = 0;
  for (uint i = 0; i < n; ++i) acc += float(x[i]) * float(x[i]);
  float inv = metal::precise::rsqrt(acc / n + eps);
  T scale = static_cast<T>(inv);
  T zero = 0;
  for (uint i = tid; i < n; ++i) {
    T y = x[i] * scale * w[i];
    out[i] = max(y, zero) + T(0);
  }
}
template void rms_norm_row<float>(const float*, const float*, float*, const uint&, float, uint);
template void rms_norm_row<half>(const half*, const half*, half*, const uint&, float, uint);
template void rms_norm_row<bfloat>(const bfloat*, const bfloat*, bfloat*, const uint&, float, uint);

void vec4_kernel(const float* in, half* out, uint gid) {
  const float4 v = reinterpret_cast<const float4*>(in)[gid];
  float4 r = select(float4(0), v, v > 0.0f);           // relu
  r = clamp(r, 0, 6) + fast::tanh(float4(0));
  reinterpret_cast<half4*>(out)[gid] = half4(r);
  uint3 pos = uint3(gid, 0, 0);
  out[0] = half(float(pos.x) + float(__mtl::swizzle<1, 2>(pos).x));
}
"""


def test_kernel_idioms_compile_and_compute(tmp_path):
    v = run_program(
        tmp_path,
        r"""
        float xf[4] = {1, -2, 3, -4}, wf[4] = {1, 1, 1, 1}, of[4];
        uint n = 4;
        rms_norm_row<float>(xf, wf, of, n, 0.0f, 0);
        for (int i = 0; i < 4; ++i) { char k[8]; std::snprintf(k, 8, "f%d", i); out(k, of[i]); }
        half xh[4] = {half(1.0f), half(-2.0f), half(3.0f), half(-4.0f)}, wh[4], oh[4];
        bfloat xb[4] = {1.0f, -2.0f, 3.0f, -4.0f}, wb[4], ob[4];
        for (int i = 0; i < 4; ++i) { wh[i] = half(1.0f); wb[i] = 1.0f; }
        rms_norm_row<half>(xh, wh, oh, n, 0.0f, 0);
        rms_norm_row<bfloat>(xb, wb, ob, n, 0.0f, 0);
        out("h2", oh[2]); out("b2", ob[2]); out("h1", oh[1]);
        float in[8] = {-1, 0.5f, 7, 2, 0, 0, 0, 0};
        half o[8];
        vec4_kernel(in, o, 0);
        out("v1", o[1]); out("v2", o[2]); out("v3", o[3]); out("v0", o[0]);
        """,
        globals_src=KERNEL_IDIOMS,
    )
    inv = to_float32(1 / to_float32(math.sqrt(7.5)))  # 1.0f / sqrtf(30.0f / 4)
    assert v["f0"] == pytest.approx(1 * inv, rel=1e-7) and v["f1"] == 0.0
    assert v["f2"] == pytest.approx(3 * inv, rel=1e-7)
    assert v["h2"] == to_half(to_half(3.0) * to_half(inv)) and v["h1"] == 0.0
    assert v["b2"] == bfloat_value(bfloat_bits(3.0 * bfloat_value(bfloat_bits(inv))))
    assert v["v1"] == 0.5 and v["v2"] == 6.0 and v["v3"] == 2.0 and v["v0"] == 0.0


# Atomics -------------------------------------------------------------------------------------------


ATOMIC_WORKERS = r"""
#include <thread>
#include <vector>
struct Shared {
  uint counter; int signed_counter; float fsum; int imin; int imax; uint bits_or; uint bits_and; uint bits_xor;
  uint lock; long protected_count; uint exchanged; ulong wide;
};
// Each worker is one "thread" of a kernel working on device memory through atomic_* pointers.
static void worker(Shared* s, int id, int iterations) {
  atomic_uint* counter = reinterpret_cast<atomic_uint*>(&s->counter);
  volatile atomic_int* signed_counter = reinterpret_cast<volatile atomic_int*>(&s->signed_counter);
  atomic_float* fsum = reinterpret_cast<atomic_float*>(&s->fsum);
  atomic_int* imin = reinterpret_cast<atomic_int*>(&s->imin);
  atomic_int* imax = reinterpret_cast<atomic_int*>(&s->imax);
  atomic_uint* bor = reinterpret_cast<atomic_uint*>(&s->bits_or);
  atomic_uint* band = reinterpret_cast<atomic_uint*>(&s->bits_and);
  atomic_uint* bxor = reinterpret_cast<atomic_uint*>(&s->bits_xor);
  atomic_uint* lock = reinterpret_cast<atomic_uint*>(&s->lock);
  atomic_uint* ex = reinterpret_cast<atomic_uint*>(&s->exchanged);
  atomic_ulong* wide = reinterpret_cast<atomic_ulong*>(&s->wide);
  for (int i = 0; i < iterations; ++i) {
    atomic_fetch_add_explicit(counter, 1u, memory_order_relaxed);
    atomic_fetch_sub_explicit(signed_counter, 2, memory_order_relaxed);
    atomic_fetch_add_explicit(fsum, 0.5f, memory_order_relaxed);
    atomic_fetch_min_explicit(imin, id * 1000 - i, memory_order_relaxed);
    atomic_fetch_max_explicit(imax, id * 1000 + i, memory_order_relaxed);
    atomic_fetch_add_explicit(wide, 1ul << 32, memory_order_relaxed);
    // A spin lock from compare-exchange guards a plain read-modify-write.
    uint expected = 0;
    while (!atomic_compare_exchange_weak_explicit(lock, &expected, 1u, memory_order_relaxed, memory_order_relaxed)) {
      expected = 0;
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    s->protected_count = s->protected_count + 1;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    atomic_store_explicit(lock, 0u, memory_order_relaxed);
  }
  atomic_fetch_or_explicit(bor, 1u << id, memory_order_relaxed);
  atomic_fetch_and_explicit(band, ~(1u << id), memory_order_relaxed);
  for (int k = 0; k <= id; ++k) atomic_fetch_xor_explicit(bxor, 1u << id, memory_order_relaxed);
  atomic_exchange_explicit(ex, uint(id + 1), memory_order_relaxed);
}
"""


def test_atomics_from_several_threads(tmp_path):
    threads, iterations = 4, 20000
    v = run_program(
        tmp_path,
        rf"""
        Shared s{{}};
        s.imin = 1 << 30; s.imax = -(1 << 30); s.bits_and = 0xFFFFFFFFu;
        std::vector<std::thread> pool;
        for (int id = 0; id < {threads}; ++id) pool.emplace_back(worker, &s, id, {iterations});
        for (auto& t : pool) t.join();
        atomic_uint* counter = reinterpret_cast<atomic_uint*>(&s.counter);
        out("counter", atomic_load_explicit(counter, memory_order_relaxed));
        out("signed_counter", s.signed_counter); out("fsum", s.fsum);
        out("imin", s.imin); out("imax", s.imax);
        out("or", s.bits_or); out("and", s.bits_and); out("xor", s.bits_xor);
        out("protected", s.protected_count); out("lock", s.lock); out("wide", s.wide);
        out("exchanged_in_range", s.exchanged >= 1 && s.exchanged <= {threads});
        // compare-exchange: success stores desired; failure loads the current value into expected
        uint expected = 5;
        bool ok_fail = atomic_compare_exchange_weak_explicit(counter, &expected, 1u, memory_order_relaxed,
                                                             memory_order_relaxed);
        out("cas_fail", ok_fail); out("cas_expected", expected);
        bool ok = atomic_compare_exchange_weak_explicit(counter, &expected, 7u, memory_order_relaxed,
                                                        memory_order_relaxed);
        out("cas_ok", ok); out("after_cas", s.counter);
        out("old_from_exchange", atomic_exchange_explicit(counter, 11u, memory_order_relaxed));
        out("after_exchange", s.counter);
        atomic_int ai; atomic_store_explicit(&ai, -4, memory_order_relaxed);
        out("store_load", atomic_load_explicit(&ai, memory_order_relaxed));
        out("fetch_returns_old", atomic_fetch_add_explicit(&ai, 10, memory_order_relaxed));
        out("sizeof_atomic_uint", sizeof(atomic_uint)); out("sizeof_atomic_float", sizeof(atomic_float));
        // atomic_bool occupies 4 bytes in Metal
        uint flag_word = 0xFFFFFFFFu;
        atomic_bool* flag = reinterpret_cast<atomic_bool*>(&flag_word);
        atomic_store_explicit(flag, false, memory_order_relaxed);
        out("bool_word_after_store", flag_word);
        out("bool_exchange_old", atomic_exchange_explicit(flag, true, memory_order_relaxed));
        bool expected_flag = false;
        out("bool_cas", atomic_compare_exchange_weak_explicit(flag, &expected_flag, false, memory_order_relaxed,
                                                              memory_order_relaxed));
        out("bool_cas_expected", expected_flag); out("bool_load", atomic_load_explicit(flag, memory_order_relaxed));
        out("sizeof_atomic_bool", sizeof(atomic_bool));
        """,
        globals_src=ATOMIC_WORKERS,
        extra_flags=("-pthread",),
    )
    total = threads * iterations
    assert v["counter"] == total and v["signed_counter"] == -2 * total
    assert v["fsum"] == 0.5 * total  # every partial sum is exact in float, so no rounding
    assert v["imin"] == -(iterations - 1) and v["imax"] == (threads - 1) * 1000 + iterations - 1
    assert v["or"] == (1 << threads) - 1 and v["and"] == 0xFFFFFFFF & ~((1 << threads) - 1)
    # thread id xors its bit id+1 times: set for even ids
    assert v["xor"] == sum(1 << i for i in range(threads) if i % 2 == 0)
    assert v["protected"] == total and v["lock"] == 0 and v["wide"] == total << 32
    assert v["exchanged_in_range"] == 1
    assert v["cas_fail"] == 0 and v["cas_expected"] == total
    assert v["cas_ok"] == 1 and v["after_cas"] == 7
    assert v["old_from_exchange"] == 7 and v["after_exchange"] == 11
    assert v["store_load"] == -4 and v["fetch_returns_old"] == -4
    assert v["sizeof_atomic_uint"] == 4 and v["sizeof_atomic_float"] == 4
    assert v["bool_word_after_store"] == 0 and v["bool_exchange_old"] == 0
    assert v["bool_cas"] == 0 and v["bool_cas_expected"] == 1 and v["bool_load"] == 1
    assert v["sizeof_atomic_bool"] == 4


def test_mem_flags_and_memory_order(tmp_path):
    v = run_program(
        tmp_path,
        r"""
        mem_flags f = mem_flags::mem_threadgroup | mem_flags::mem_device;
        out("flags", (unsigned)f);
        out("has_tg", (unsigned)(f & mem_flags::mem_threadgroup) != 0);
        out("none", (unsigned)mem_flags::mem_none);
        out("relaxed", (int)memory_order_relaxed == __ATOMIC_RELAXED);
        atomic_thread_fence(mem_flags::mem_device, memory_order_seq_cst, thread_scope_device);
        """,
    )
    assert v["flags"] == 3 and v["has_tg"] == 1 and v["none"] == 0 and v["relaxed"] == 1


# simdgroup_matrix ------------------------------------------------------------------------------------


def matmul(a, b):
    return [[sum(a[r][k] * b[k][c] for k in range(8)) for c in range(8)] for r in range(8)]


def test_simdgroup_matrix_float_multiply_accumulate(tmp_path):
    # A lives at origin (column 3, row 2) of a 12-column row-major buffer; B is read transposed
    # from a 8-column buffer; C is filled with 0.5. D = A*B + C is stored at origin (2, 1) of a
    # 10-column buffer, and transposed into others (with zero and non-zero origins).
    v = run_program(
        tmp_path,
        r"""
        float abuf[12 * 12], bbuf[64], dbuf[10 * 10], tbuf[64];
        for (int i = 0; i < 144; ++i) abuf[i] = float(i % 13) - 6.0f;
        for (int i = 0; i < 64; ++i) bbuf[i] = float((i * 7) % 11) * 0.25f;
        for (int i = 0; i < 100; ++i) dbuf[i] = -99.0f;
        simdgroup_float8x8 a, b, d;
        simdgroup_float8x8 c = make_filled_simdgroup_matrix<float, 8, 8>(0.5f);
        simdgroup_load(a, abuf, 12, ulong2(3, 2));
        simdgroup_load(b, bbuf, 8, 0, true);
        simdgroup_multiply_accumulate(d, a, b, c);
        simdgroup_store(d, dbuf, 10, ulong2(2, 1));
        simdgroup_store(d, tbuf, 8, ulong2(0), true);
        simdgroup_float8x8 p;
        simdgroup_multiply(p, a, b);
        simdgroup_float8x8 diag = simdgroup_float8x8(2.0f);
        simdgroup_float8x8 twice;
        simdgroup_multiply(twice, diag, a);        // diagonal 2: doubles every element of a
        simdgroup_multiply_accumulate(c, c, diag, c);   // destination aliasing its inputs
        // transposed load and store with non-zero origins (origin in the matrix's coordinates)
        float ebuf[10 * 10], ubuf[12 * 12];
        for (int i = 0; i < 100; ++i) ebuf[i] = float(i);
        for (int i = 0; i < 144; ++i) ubuf[i] = -7.0f;
        simdgroup_float8x8 e;
        simdgroup_load(e, ebuf, 10, ulong2(1, 2), true);
        simdgroup_store(d, ubuf, 12, ulong2(2, 1), true);
        for (int i = 0; i < 64; ++i) { char k[16]; std::snprintf(k, 16, "e%d", i); out(k, e.__elements[i / 8][i % 8]); }
        for (int i = 0; i < 144; ++i) { char k[16]; std::snprintf(k, 16, "u%d", i); out(k, ubuf[i]); }
        for (int i = 0; i < 100; ++i) { char k[16]; std::snprintf(k, 16, "d%d", i); out(k, dbuf[i]); }
        for (int i = 0; i < 64; ++i) { char k[16]; std::snprintf(k, 16, "t%d", i); out(k, tbuf[i]); }
        for (int i = 0; i < 64; ++i) { char k[16]; std::snprintf(k, 16, "p%d", i); out(k, p.__elements[i / 8][i % 8]); }
        for (int i = 0; i < 64; ++i) { char k[16]; std::snprintf(k, 16, "w%d", i); out(k, twice.__elements[i / 8][i % 8]); }
        out("alias", c.__elements[0][0]); out("alias_off", c.__elements[0][1]);
        """,
    )
    abuf = [float(i % 13) - 6.0 for i in range(144)]
    bbuf = [float((i * 7) % 11) * 0.25 for i in range(64)]
    A = [[abuf[(2 + r) * 12 + 3 + c] for c in range(8)] for r in range(8)]
    B = [[bbuf[c * 8 + r] for c in range(8)] for r in range(8)]  # transposed load
    P = matmul(A, B)
    D = [[P[r][c] + 0.5 for c in range(8)] for r in range(8)]  # exact: small multiples of 0.25
    for i in range(100):
        row, col = divmod(i, 10)
        inside = 1 <= row < 9 and 2 <= col < 10
        assert v[f"d{i}"] == (D[row - 1][col - 2] if inside else -99.0), i
    for i in range(64):
        r, c = divmod(i, 8)
        assert v[f"t{i}"] == D[c][r]
        assert v[f"p{i}"] == P[r][c]
        assert v[f"w{i}"] == 2 * A[r][c]
    assert v["alias"] == 0.5 * 2 + 0.5 and v["alias_off"] == 0.5 * 2 + 0.5
    # transposed: element (r, c) lives at memory row origin.x + c, memory column origin.y + r
    for i in range(64):
        r, c = divmod(i, 8)
        assert v[f"e{i}"] == (1 + c) * 10 + (2 + r)
    expected_u = [-7.0] * 144
    for r in range(8):
        for c in range(8):
            expected_u[(2 + c) * 12 + (1 + r)] = D[r][c]
    assert [v[f"u{i}"] for i in range(144)] == expected_u


def test_simdgroup_matrix_half_and_bfloat(tmp_path):
    v = run_program(
        tmp_path,
        r"""
        half ah[64], bh[64], oh[64];
        bfloat ab[64], bb[64], ob[64];
        for (int i = 0; i < 64; ++i) {
          ah[i] = half(0.1f * float(i % 9) - 0.3f); bh[i] = half(1.0f / float(1 + i % 5));
          ab[i] = bfloat(0.1f * float(i % 9) - 0.3f); bb[i] = bfloat(1.0f / float(1 + i % 5));
        }
        simdgroup_half8x8 a, b, d;
        simdgroup_load(a, ah); simdgroup_load(b, bh);
        simdgroup_multiply_accumulate(d, a, b, simdgroup_half8x8(0));
        simdgroup_store(d, oh);
        simdgroup_bfloat8x8 x, y, z;
        simdgroup_load(x, ab); simdgroup_load(y, bb);
        simdgroup_multiply(z, x, y);
        simdgroup_store(z, ob);
        for (int i = 0; i < 64; ++i) {
          char k[16];
          std::snprintf(k, 16, "h%d", i); out(k, oh[i]);
          std::snprintf(k, 16, "b%d", i); out(k, ob[i]);
        }
        """,
    )
    f32 = to_float32
    ah = [to_half(f32(f32(0.1 * (i % 9)) - 0.3)) for i in range(64)]
    bh = [to_half(f32(1.0 / (1 + i % 5))) for i in range(64)]
    ab = [bfloat_value(bfloat_bits(f32(f32(0.1 * (i % 9)) - 0.3))) for i in range(64)]
    bb = [bfloat_value(bfloat_bits(f32(1.0 / (1 + i % 5)))) for i in range(64)]

    def float_accumulated(a, b, r, c):
        # products and the running sum in float32, as the header documents
        s = 0.0
        for k in range(8):
            s = f32(s + f32(a[r * 8 + k] * b[k * 8 + c]))
        return s

    for i in range(64):
        r, c = divmod(i, 8)
        assert v[f"h{i}"] == to_half(float_accumulated(ah, bh, r, c)), i
        assert v[f"b{i}"] == bfloat_value(bfloat_bits(float_accumulated(ab, bb, r, c))), i


# Type traits, metal::array, relational functions, and library idioms ----------------------------------

LIBRARY_IDIOMS = r"""
// Patterns from shader libraries written against Metal's standard library (PyTorch's c10/metal
// style): metal:: type traits, metal::array, isunordered, templated helpers in a nested
// namespace named metal, sub-word atomics built from atomic<uint> compare-exchange.
namespace c10 { namespace metal {
template <typename T, unsigned N> using array = ::metal::array<T, N>;
template <typename T> ::metal::enable_if_t<::metal::is_floating_point_v<T>, T> max(T a, T b) {
  return ::metal::isunordered(a, b) ? NAN : ::metal::max(a, b);
}
template <typename U, typename V> using common_dtype = decltype(U(0) + V(0));
template <typename F, typename... Args>
using result_of = decltype(::metal::declval<F>()(::metal::declval<Args>()...));
template <typename T> constexpr bool is_complex_v = ::metal::is_same_v<T, float2> || ::metal::is_same_v<T, half2>;
template <typename T> static inline void atomic_add_subword(::metal::atomic<uint>* data, long offset, T value) {
  constexpr auto per_word = sizeof(uint) / sizeof(T);
  auto ptr = data + (offset / per_word);
  auto old = ::metal::atomic_load_explicit(ptr, ::metal::memory_order_relaxed);
  union { uint i; T t[per_word]; } val;
  do {
    val.i = old;
    val.t[offset & (per_word - 1)] += value;
  } while (!::metal::atomic_compare_exchange_weak_explicit(ptr, &old, val.i, ::metal::memory_order_relaxed,
                                                           ::metal::memory_order_relaxed));
}
}}  // namespace c10::metal
struct Square { float operator()(half x) const { return float(x) * float(x); } };
"""


def test_type_traits_array_relational_and_library_idioms(tmp_path):
    v = run_program(
        tmp_path,
        r"""
        out("fp_half", is_floating_point_v<half>); out("fp_bfloat", is_floating_point_v<bfloat>);
        out("fp_int", is_floating_point_v<int>); out("fp_float4", is_floating_point_v<float4>);
        out("int_bool", is_integral_v<bool>); out("int_uint", is_integral_v<uint>);
        out("scalar_half", is_scalar_v<half>); out("scalar_float4", is_scalar_v<float4>);
        out("vector_float4", is_vector_v<float4>); out("vector_float", is_vector_v<float>);
        out("signed_half", is_signed_v<half>); out("unsigned_uint", is_unsigned_v<uint>);
        out("elements3", vec_elements<float3>::value); out("elements1", vec_elements<float>::value);
        out("same", is_same_v<make_unsigned_t<int>, uint>);
        out("common_hf", is_same_v<c10::metal::common_dtype<half, float>, float>);
        out("common_bb", is_same_v<c10::metal::common_dtype<bfloat, bfloat>, bfloat>);
        out("common_bf", is_same_v<c10::metal::common_dtype<bfloat, float>, float>);
        out("result_of", is_same_v<c10::metal::result_of<Square, half>, float>);
        out("complex", c10::metal::is_complex_v<half2> && !c10::metal::is_complex_v<float>);
        c10::metal::array<float, 3> arr = {1.5f, 2.5f, 3.5f};
        float total = 0; for (float x : arr) total += x;
        out("arr_sum", total); out("arr_size", arr.size()); out("arr_1", arr[1]);
        out("nan_max", isnan(c10::metal::max(1.0f, NAN))); out("plain_max", c10::metal::max(half(1), half(2)));
        out("unord", isunordered(NAN, 1.0f)); out("ord", isordered(1.0f, 2.0f));
        out("gt", isgreater(2.0f, 1.0f)); out("gt_nan", isgreater(NAN, 1.0f)); out("le", islessequal(1.0f, 1.0f));
        out("lg", islessgreater(1.0f, 2.0f)); out("ne", isnotequal(NAN, NAN));
        bool4 uv = isunordered(float4(NAN, 1, 2, 3), 1.0f);
        out("unord_v", uv.x * 1000 + uv.y * 100 + uv.z * 10 + uv.w);
        uint words[2] = {0, 0};
        c10::metal::atomic_add_subword(reinterpret_cast<atomic_uint*>(words), 1, half(1.5f));
        c10::metal::atomic_add_subword(reinterpret_cast<atomic_uint*>(words), 1, half(0.25f));
        c10::metal::atomic_add_subword(reinterpret_cast<atomic_uint*>(words), 2, bfloat(2.0f));
        out("word0", words[0]); out("word1", words[1]);
        out("mulhi", mulhi(0x80000000u, 6u)); out("mul24", mul24(1000, 1000)); out("mad24", mad24(3, 4, 5));
        out("madhi", madhi(0x80000000u, 4u, 1u)); out("madsat", madsat(100000, 100000, 1) == INT_MAX);
        out("madsat_neg", madsat(-100000, 100000, 1) == INT_MIN); out("madsat_ok", madsat(7, 6, -2));
        out("fmax3", fmax3(1.0f, 5.0f, 3.0f)); out("fmedian3", fmedian3(1.0f, 5.0f, 3.0f)); out("ilogb", ilogb(48.0f));
        out("metal_version", __METAL_VERSION__);
        """,
        globals_src=LIBRARY_IDIOMS,
    )
    assert (v["fp_half"], v["fp_bfloat"], v["fp_int"], v["fp_float4"]) == (1, 1, 0, 0)
    assert (v["int_bool"], v["int_uint"], v["scalar_half"], v["scalar_float4"]) == (1, 1, 1, 0)
    assert (v["vector_float4"], v["vector_float"], v["signed_half"], v["unsigned_uint"]) == (1, 0, 1, 1)
    assert (v["elements3"], v["elements1"], v["same"]) == (3, 1, 1)
    assert (v["common_hf"], v["common_bb"], v["common_bf"], v["result_of"], v["complex"]) == (1, 1, 1, 1, 1)
    assert (v["arr_sum"], v["arr_size"], v["arr_1"]) == (7.5, 3, 2.5)
    assert v["nan_max"] == 1 and v["plain_max"] == 2.0
    assert (v["unord"], v["ord"], v["gt"], v["gt_nan"], v["le"], v["lg"], v["ne"]) == (1, 1, 1, 0, 1, 1, 1)
    assert v["unord_v"] == 1000
    # half 1.75 (0x3F00) in the upper 16 bits of word 0 (element 1); bfloat 2.0 (0x4000) low in word 1.
    assert v["word0"] == 0x3F000000 and v["word1"] == 0x4000
    assert v["mulhi"] == 3 and v["mul24"] == 1000000 and v["mad24"] == 17 and v["madhi"] == 3
    assert v["madsat"] == 1 and v["madsat_neg"] == 1 and v["madsat_ok"] == 40
    assert (v["fmax3"], v["fmedian3"], v["ilogb"]) == (5.0, 3.0, 5)
    assert v["metal_version"] >= 310


def test_header_compiles_alone_quickly_enough_to_matter(tmp_path):
    # Not a benchmark: a regression guard that the prelude stays cheap (measured ~0.05 s here;
    # <cmath> alone costs ~0.15 s). The bound is loose so that a loaded CI machine passes.
    import time

    src = tmp_path / "only_header.cpp"
    src.write_text('#include "metal_stdlib.h"\nusing namespace metal;\n')
    start = time.perf_counter()
    proc = subprocess.run([GXX, *FLAGS, "-c", str(src), "-o", str(tmp_path / "only_header.o")],
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 3.0, f"compiling the header alone took {elapsed:.2f} s"


# The same coverage at the MSL level, through my_mps_ops.emulator.compile_shader --------------------
# (skipped until the emulator's Python API is built in this tree)


def _compile_shader():
    try:
        from my_mps_ops.emulator import compile_shader
    except Exception as exc:  # not built yet, or no emulator in this build
        pytest.skip(f"my_mps_ops.emulator.compile_shader unavailable: {exc}")
    return compile_shader


MSL_SCALARS = r"""
#include <metal_stdlib>
using namespace metal;

kernel void half_bfloat_ops(device const float* x [[buffer(0)]],
                            device half* h [[buffer(1)]],
                            device bfloat* b [[buffer(2)]],
                            device half* counts [[buffer(3)]],
                            device uint* bits [[buffer(4)]],
                            uint i [[thread_position_in_grid]]) {
  h[i] = half(x[i]) * 3.0h + 1.0h;       // rounded to half after each operation
  b[i] = bfloat(x[i]);                    // round to nearest even
  half s = 0.0h;
  for (int k = 0; k < 3000; ++k) s += 1.0h;   // stalls at 2048
  counts[i] = s;
  bits[i] = as_type<uint>(x[i]);
}
"""


def test_msl_half_bfloat_and_as_type():
    torch = pytest.importorskip("torch")
    lib = _compile_shader()(MSL_SCALARS)
    x = torch.tensor([0.1, -1.7, 1.0 + 2.0**-8, 1.0078125 + 2.0**-8, 1000.3, 3.0e38, -0.0, 65504.0])
    n = x.numel()
    h = torch.empty(n, dtype=torch.float16)
    b = torch.empty(n, dtype=torch.bfloat16)
    counts = torch.empty(n, dtype=torch.float16)
    bits = torch.empty(n, dtype=torch.int32)
    lib.half_bfloat_ops(x, h, b, counts, bits, threads=n, group_size=n)
    expected_h = [to_half(to_half(to_half(v) * 3.0) + 1.0) for v in x.tolist()]
    assert h.float().tolist() == expected_h
    assert b.view(torch.int16).tolist() == x.bfloat16().view(torch.int16).tolist()  # torch rounds RNE too
    assert counts.float().tolist() == [2048.0] * n
    assert bits.tolist() == x.view(torch.int32).tolist()


MSL_VECTORS = r"""
#include <metal_stdlib>
using namespace metal;

struct Item {
  float a;
  float3 v;   // 16-byte aligned: offset 16, struct size 32
};

kernel void vector_ops(device const float4* in [[buffer(0)]],
                       device float4* out [[buffer(1)]],
                       device const packed_float3* p [[buffer(2)]],
                       device float* pout [[buffer(3)]],
                       device const Item* items [[buffer(4)]],
                       device float* iout [[buffer(5)]],
                       uint i [[thread_position_in_grid]]) {
  float4 v = in[i];
  float4 w = float4(v.zy, 0.0f, 1.0f);
  w.xw = v.wx;
  w.yz += float2(10.0f);
  out[i] = w;
  float3 q = p[i];
  pout[i] = q.x + 10.0f * q.y + 100.0f * q.z;
  iout[i] = items[i].a + items[i].v.z;
}

kernel void select_math(device const float* x [[buffer(0)]],
                        device float* out [[buffer(1)]],
                        uint i [[thread_position_in_grid]]) {
  float v = x[i];
  float4 s = select(float4(-1.0f), float4(v), float4(v) > float4(0.0f, 1.0f, 2.0f, 3.0f));
  out[i * 8 + 0] = s.x + s.y + s.z + s.w;
  out[i * 8 + 1] = clamp(v, 0.0f, 1.0f);
  out[i * 8 + 2] = fma(v, 2.0f, 1.0f);
  out[i * 8 + 3] = dot(float3(v, 1.0f, 2.0f), float3(1.0f, 2.0f, 3.0f));
  out[i * 8 + 4] = fast::exp(v);
  out[i * 8 + 5] = precise::tanh(v);
  out[i * 8 + 6] = rsqrt(abs(v) + 1.0f);
  out[i * 8 + 7] = fract(v);
}
"""


MSL_COLOUR_COMPONENTS = r"""
#include <metal_stdlib>
using namespace metal;
struct Params { float a; float r; };  // members named like colour components stay members
kernel void colours(const device float4* x, device float4* out, device half2* hout, constant Params& p,
                    uint i [[thread_position_in_grid]]) {
  float4 v = x[i];
  float4 o;
  o.r = v.a * p.a; o.g = v.b + p.r; o.b = v.g; o.a = v.r;
  half2 h = half2(v.xy);
  h.g += h.r;
  packed_float3 pk = packed_float3(v.xyz);
  o.x += pk.b - v.z;  // .b of a packed vector is its z
  out[i] = o;
  hout[i] = h;
}
"""


def test_msl_single_colour_components():
    # .r .g .b .a on vectors (reads and writes, float/half/packed), next to a
    # struct whose members are called a and r.
    torch = pytest.importorskip("torch")
    lib = _compile_shader()(MSL_COLOUR_COMPONENTS)
    x = torch.randn(40, 4)
    out = torch.empty(40, 4)
    hout = torch.empty(40, 2, dtype=torch.float16)
    lib.colours(x, out, hout, torch.tensor([2.0, 3.0]), threads=40, group_size=32)
    expected = torch.stack([x[:, 3] * 2, x[:, 2] + 3, x[:, 1], x[:, 0]], 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    h = x[:, :2].half()
    assert torch.equal(hout[:, 0], h[:, 0]) and torch.equal(hout[:, 1], (h[:, 1].float() + h[:, 0].float()).half())


def test_msl_vectors_swizzles_packed_and_struct_layout():
    torch = pytest.importorskip("torch")
    lib = _compile_shader()(MSL_VECTORS)
    n = 5
    vin = torch.arange(4 * n, dtype=torch.float32).reshape(n, 4)
    out = torch.empty(n, 4)
    p = torch.arange(3 * n, dtype=torch.float32)
    pout = torch.empty(n)
    items = torch.full((n, 8), -1.0)
    items[:, 0] = torch.arange(n, dtype=torch.float32)  # a
    items[:, 6] = 100.0 * torch.arange(n, dtype=torch.float32)  # v.z at float offset 4 + 2
    iout = torch.empty(n)
    lib.vector_ops(vin, out, p, pout, items, iout, threads=n, group_size=n)
    for i in range(n):
        x, y, z, w = vin[i].tolist()
        assert out[i].tolist() == [w, y + 10, 0.0 + 10, x]
        assert pout[i].item() == p[3 * i].item() + 10 * p[3 * i + 1].item() + 100 * p[3 * i + 2].item()
        assert iout[i].item() == i + 100.0 * i


def test_msl_select_and_math():
    torch = pytest.importorskip("torch")
    lib = _compile_shader()(MSL_VECTORS)
    x = torch.tensor([-1.5, 0.25, 1.5, 2.5, 3.75])
    n = x.numel()
    out = torch.empty(n * 8)
    lib.select_math(x, out, threads=n, group_size=n)
    out = out.reshape(n, 8)
    for i, v in enumerate(x.tolist()):
        row = out[i].tolist()
        assert row[0] == sum(v if v > t else -1.0 for t in (0.0, 1.0, 2.0, 3.0))
        assert row[1] == min(max(v, 0.0), 1.0) and row[2] == v * 2 + 1 and row[3] == v + 2 + 6
        assert row[4] == pytest.approx(math.exp(v), rel=1e-6)
        assert row[5] == pytest.approx(math.tanh(v), rel=1e-6)
        assert row[6] == pytest.approx(1 / math.sqrt(abs(v) + 1), rel=1e-6)
        assert row[7] == v - math.floor(v)


MSL_ATOMICS = r"""
#include <metal_stdlib>
using namespace metal;

kernel void atomics(device atomic_uint* counter [[buffer(0)]],
                    device atomic_float* fsum [[buffer(1)]],
                    device atomic_int* mx [[buffer(2)]],
                    device uint* per_group [[buffer(3)]],
                    device atomic_uint* cas_target [[buffer(4)]],
                    device uint* cas_won [[buffer(5)]],
                    uint i [[thread_position_in_grid]],
                    uint group [[threadgroup_position_in_grid]],
                    uint lid [[thread_index_in_threadgroup]]) {
  threadgroup atomic_uint local_count;
  if (lid == 0) atomic_store_explicit(&local_count, 0u, memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  atomic_fetch_add_explicit(counter, 1u, memory_order_relaxed);
  atomic_fetch_add_explicit(fsum, 0.5f, memory_order_relaxed);
  atomic_fetch_max_explicit(mx, int(i) * 3 - 100, memory_order_relaxed);
  atomic_fetch_add_explicit(&local_count, 1u, memory_order_relaxed);
  uint expected = 0u;
  if (atomic_compare_exchange_weak_explicit(cas_target, &expected, i + 1, memory_order_relaxed,
                                            memory_order_relaxed)) {
    cas_won[0] = i + 1;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (lid == 0) per_group[group] = atomic_load_explicit(&local_count, memory_order_relaxed);
}
"""


def test_msl_atomics_on_device_and_threadgroup_memory():
    torch = pytest.importorskip("torch")
    lib = _compile_shader()(MSL_ATOMICS)
    threads, group = 4096, 256
    counter = torch.zeros(1, dtype=torch.int32)
    fsum = torch.zeros(1)
    mx = torch.full((1,), -(2**31), dtype=torch.int32)
    per_group = torch.zeros(threads // group, dtype=torch.int32)
    cas_target = torch.zeros(1, dtype=torch.int32)
    cas_won = torch.zeros(1, dtype=torch.int32)
    lib.atomics(counter, fsum, mx, per_group, cas_target, cas_won, threads=threads, group_size=group)
    assert counter.item() == threads
    assert fsum.item() == 0.5 * threads
    assert mx.item() == (threads - 1) * 3 - 100
    assert per_group.tolist() == [group] * (threads // group)
    assert cas_target.item() != 0 and cas_won.item() == cas_target.item()  # exactly one thread won


MSL_SIMDGROUP_MATRIX = r"""
#include <metal_stdlib>
using namespace metal;

// C = A * B^T + 1 for one 8x8 tile, by one SIMD group.
template <typename T>
kernel void tile_mma(device const T* a [[buffer(0)]],
                     device const T* b [[buffer(1)]],
                     device T* c [[buffer(2)]],
                     uint lane [[thread_index_in_simdgroup]]) {
  simdgroup_matrix<T, 8, 8> ma, mb;
  simdgroup_matrix<T, 8, 8> mc = make_filled_simdgroup_matrix<T, 8, 8>(T(1));
  simdgroup_load(ma, a, 8);
  simdgroup_load(mb, b, 8, ulong2(0, 0), true);
  simdgroup_multiply_accumulate(mc, ma, mb, mc);
  simdgroup_store(mc, c, 8);
}
template [[host_name("tile_mma_float")]] kernel void tile_mma<float>(device const float*, device const float*, device float*, uint);
template [[host_name("tile_mma_half")]] kernel void tile_mma<half>(device const half*, device const half*, device half*, uint);
template [[host_name("tile_mma_bfloat")]] kernel void tile_mma<bfloat>(device const bfloat*, device const bfloat*, device bfloat*, uint);
"""


@pytest.mark.parametrize("dtype_name", ["float", "half", "bfloat"])
def test_msl_simdgroup_matrix_multiply_accumulate(dtype_name):
    torch = pytest.importorskip("torch")
    dtype = {"float": torch.float32, "half": torch.float16, "bfloat": torch.bfloat16}[dtype_name]
    lib = _compile_shader()(MSL_SIMDGROUP_MATRIX)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 8, generator=gen).to(dtype)
    b = torch.randn(8, 8, generator=gen).to(dtype)
    c = torch.empty(8, 8, dtype=dtype)
    getattr(lib, f"tile_mma_{dtype_name}")(a, b, c, threads=32, group_size=32)
    # float accumulation of the exactly-converted inputs, rounded once to the element type
    expected = (a.double() @ b.double().T + 1).to(dtype)
    tol = {"float": (1e-5, 1e-5), "half": (2e-3, 2e-3), "bfloat": (1.6e-2, 1.6e-2)}[dtype_name]
    torch.testing.assert_close(c, expected, rtol=tol[0], atol=tol[1])


LANE_HOOKS = r"""
// A stand-in for the runtime: 32 OS threads are the lanes of one SIMD group; the hooks the header
// declares weak are defined here as metal_runtime.h would define them.
#include <cstring>
#include <thread>
#include <mutex>
#include <condition_variable>
#include <vector>
struct LaneBarrier {
  std::mutex m; std::condition_variable cv; int count = 0, generation = 0;
  void wait() {
    std::unique_lock<std::mutex> l(m);
    int g = generation;
    if (++count == 32) { count = 0; ++generation; cv.notify_all(); }
    else cv.wait(l, [&] { return g != generation; });
  }
};
static LaneBarrier lane_barrier;
static unsigned char exchange_area[32 * 64];
namespace __mtl {
thread_local unsigned short current_lane;
unsigned short simdgroup_lane_id() { return current_lane; }
void simdgroup_allgather(const void* mine, void* all, unsigned long bytes) {
  std::memcpy(exchange_area + current_lane * bytes, mine, bytes);
  lane_barrier.wait();
  std::memcpy(all, exchange_area, 32 * bytes);
  lane_barrier.wait();
}
}  // namespace __mtl
// PyTorch-gemm style: whole loads, results read per lane through thread_elements().
void kernel_read(const float* a, const float* b, float* c, ushort lane) {
  simdgroup_float8x8 ma, mb, mc = simdgroup_float8x8(0);
  simdgroup_load(ma, a);
  simdgroup_load(mb, b);
  simdgroup_multiply_accumulate(mc, ma, mb, mc);
  const short q = lane / 4, fm = (q & 4) + ((lane / 2) % 4), fn = (q & 2) * 2 + (lane % 2) * 2;
  float2 e = mc.thread_elements();
  c[fm * 8 + fn] = e[0];
  c[fm * 8 + fn + 1] = mc.thread_elements()[1];
}
// MLX style: each lane writes its fragment, then the matrices are used whole (mixed precision).
void kernel_write(const half* a, const half* b, float* c, ushort lane) {
  simdgroup_half8x8 ma, mb;
  simdgroup_float8x8 mc = make_filled_simdgroup_matrix<float, 8, 8>(0.5f);
  const short q = lane / 4, fm = (q & 4) + ((lane / 2) % 4), fn = (q & 2) * 2 + (lane % 2) * 2;
  ma.thread_elements() = half2(a[fm * 8 + fn], a[fm * 8 + fn + 1]);
  mb.thread_elements()[0] = b[fm * 8 + fn];
  mb.thread_elements()[1] = b[fm * 8 + fn + 1];
  simdgroup_multiply_accumulate(mc, ma, mb, mc);
  simdgroup_store(mc, c);
}
"""


def test_simdgroup_matrix_thread_elements_with_runtime_hooks(tmp_path):
    v = run_program(
        tmp_path,
        r"""
        float a[64], b[64], c1[64] = {}, c2[64] = {};
        half ah[64], bh[64];
        for (int i = 0; i < 64; ++i) {
          a[i] = float(i % 7) - 3; b[i] = float(i % 5) * 0.5f; ah[i] = half(a[i]); bh[i] = half(b[i]);
        }
        std::vector<std::thread> lanes;
        for (int l = 0; l < 32; ++l)
          lanes.emplace_back([&, l] { __mtl::current_lane = l; kernel_read(a, b, c1, l); kernel_write(ah, bh, c2, l); });
        for (auto& t : lanes) t.join();
        for (int i = 0; i < 64; ++i) { char k[16]; std::snprintf(k, 16, "r%d", i); out(k, c1[i]); }
        for (int i = 0; i < 64; ++i) { char k[16]; std::snprintf(k, 16, "w%d", i); out(k, c2[i]); }
        """,
        globals_src=LANE_HOOKS,
        extra_flags=("-pthread",),
    )
    a = [[float(i % 7) - 3 for i in range(r * 8, r * 8 + 8)] for r in range(8)]
    b = [[float(i % 5) * 0.5 for i in range(r * 8, r * 8 + 8)] for r in range(8)]
    product = matmul(a, b)  # small multiples of 0.5: exact in float and half
    for i in range(64):
        r, c = divmod(i, 8)
        assert v[f"r{i}"] == product[r][c], i
        assert v[f"w{i}"] == product[r][c] + 0.5, i


def test_simdgroup_matrix_thread_elements_without_hooks_fails_clearly(tmp_path):
    source = PRELUDE + r"""
    int main() {
      simdgroup_float8x8 m = simdgroup_float8x8(1.0f);
      float2 e = m.thread_elements();
      return int(e.x);
    }
    """
    proc, exe = compile_cpp(tmp_path, source)
    assert proc.returncode == 0, proc.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode != 0
    assert "needs the runtime's lane hooks" in run.stderr


def test_matrix_types(tmp_path):
    v = run_program(
        tmp_path,
        r"""
        out("size3x3", sizeof(float3x3)); out("size4x4", sizeof(float4x4)); out("size2x3", sizeof(float2x3));
        out("size_h3x3", sizeof(half3x3));
        float2x2 id = float2x2(1.0f);
        float3x2 m = float3x2(float2(1, 2), float2(3, 4), float2(5, 6));     // 3 columns, 2 rows
        float2x3 t = transpose(m);                                           // 2 columns, 3 rows
        float2 mv = m * float3(1, 1, 1);                                     // 2 rows
        float3 vm = float2(1, 1) * m;                                        // 3 columns
        float2x2 mt = m * t;                                                 // (2x3)(3x2)
        float2x2 s = float2x2(1, 2, 3, 4);                                   // column-major scalars
        float2x2 sum = s + id * 2.0f;
        float4x4 big = float4x4(float4(2, 0, 0, 0), float4(1, 3, 0, 0), float4(0, 0, 1, 0), float4(5, 0, 0, 4));
        half2x2 h = half2x2(s);
        out("id01", id[0][1]); out("id11", id[1][1]);
        out("t10", t[1][0]); out("t02", t[0][2]);
        out("mv0", mv.x); out("mv1", mv.y);
        out("vm0", vm.x); out("vm1", vm.y); out("vm2", vm.z);
        out("mt00", mt[0][0]); out("mt01", mt[0][1]); out("mt10", mt[1][0]); out("mt11", mt[1][1]);
        out("s10", s[1][0]); out("sum00", sum[0][0]); out("sum11", sum[1][1]);
        out("det2", determinant(s)); out("det3", determinant(float3x3(float3(2, 0, 1), float3(1, 3, 2), float3(1, 1, 1))));
        out("det4", determinant(big)); out("h11", h[1][1]);
        """,
    )
    assert (v["size3x3"], v["size4x4"], v["size2x3"], v["size_h3x3"]) == (48, 64, 32, 24)
    assert (v["id01"], v["id11"]) == (0.0, 1.0)
    assert (v["t10"], v["t02"]) == (2.0, 5.0)  # t = rows of m as columns: t[1] = (2, 4, 6)
    assert (v["mv0"], v["mv1"]) == (9.0, 12.0)
    assert (v["vm0"], v["vm1"], v["vm2"]) == (3.0, 7.0, 11.0)
    # m * m^T with m = [[1, 3, 5], [2, 4, 6]]: [[35, 44], [44, 56]]
    assert (v["mt00"], v["mt01"], v["mt10"], v["mt11"]) == (35.0, 44.0, 44.0, 56.0)
    assert v["s10"] == 3.0 and v["sum00"] == 3.0 and v["sum11"] == 6.0
    assert v["det2"] == 1 * 4 - 3 * 2
    # columns (2,0,1), (1,3,2), (1,1,1): rows [[2,1,1],[0,3,1],[1,2,1]] -> 2*(3-2) - 1*(0-1) + 1*(0-3) = 0
    assert v["det3"] == 0.0
    # upper triangular after reading columns as given: rows [[2,1,0,5],[0,3,0,0],[0,0,1,0],[0,0,0,4]]
    assert v["det4"] == 2 * 3 * 1 * 4 and v["h11"] == 4.0
