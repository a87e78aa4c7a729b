"""The emulator's Metal standard library: common, transcendental (plain, fast::,
precise::), vector, integer functions, numeric limits (programs built by stdlib_harness).
"""

import math
import struct

import pytest

from stdlib_harness import run_program, to_half, to_float32, bfloat_bits, bfloat_value, needs_gxx

pytestmark = needs_gxx


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
