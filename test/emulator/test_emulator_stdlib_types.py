"""The emulator's Metal standard library: scalar and vector type layout, half and
bfloat rounding, vectors and swizzles, as_type (programs built by stdlib_harness).
"""

import math
import struct

from stdlib_harness import (PRELUDE, bfloat_bits, bfloat_value, compile_cpp, needs_gxx, run_program, to_float32,
                            to_half)

pytestmark = needs_gxx


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
