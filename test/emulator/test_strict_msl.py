"""The strict MSL front end (my_mps_ops.emulator.strict): what Apple's Metal
compiler rejects is rejected, each rule with a snippet that must fail and a
control that must pass; every shader in shaders/ and every valid kernel of
the emulator tests pass.

The snippets of each kind are checked in one clang run (each in a namespace
of its own, on known lines): a rejection counts only where its snippet is.
strict.py is loaded alone (importing my_mps_ops would import torch and the
extension, which the check does not need).
"""

import ast
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_strict():
    # The strict.py of the my_mps_ops this run tests (the checkout's, or an
    # installed wheel's), loaded alone: it needs no compiled extension.
    package = Path(importlib.util.find_spec("my_mps_ops").origin).parent
    spec = importlib.util.spec_from_file_location("my_mps_ops_emulator_strict", package / "emulator" / "strict.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


strict = _load_strict()
pytestmark = pytest.mark.skipif(strict.find_clang() is None, reason="needs clang 14 or newer")

PRELUDE = "#include <metal_stdlib>\nusing namespace metal;\n"

# (case id, snippet Apple's compiler rejects, what the error says, a control it accepts)
CASES = [
    # MSL keywords and built-in type names cannot name declarations.
    ("member_named_half", "struct S { uint n, half; };", r"'half' is an MSL type name",
     "struct S { uint n, half_dim; };"),
    ("variable_named_half", "inline uint f() { uint half = 2; return half; }", r"'half' is an MSL type name",
     "inline uint f() { uint half_n = 2; return half_n; }"),
    ("member_named_bfloat", "struct S { float bfloat; };", r"'bfloat' is an MSL type name",
     "struct S { bfloat b; };"),
    ("variable_named_float4", "inline float f() { float float4 = 1.0f; return float4; }",
     r"'float4' is an MSL type name", "inline float f() { float4 v = float4(1.0f); return v.x; }"),
    ("parameter_named_uchar2", "inline uint f(uint uchar2) { return uchar2; }", r"'uchar2' is an MSL type name",
     "inline uint f(uchar2 v) { return v.x; }"),
    ("member_named_half2x2", "struct S { float half2x2; };", r"'half2x2' is an MSL type name",
     "struct S { half2x2 m; };"),
    ("struct_named_packed_float3", "struct packed_float3 { float x, y, z; };",
     r"'packed_float3' is an MSL type name", "struct Packed { packed_float3 v; };"),
    ("variable_named_kernel", "inline int f() { int kernel = 1; return kernel; }", r"error",
     "inline int f() { int kernels = 1; return kernels; }"),
    ("variable_named_vertex", "inline int f() { int vertex = 1; return vertex; }", r"error",
     "inline int f() { int vertex_id = 1; return vertex_id; }"),
    ("variable_named_fragment", "inline int f() { int fragment = 1; return fragment; }", r"error",
     "inline int f() { int fragments = 1; return fragments; }"),
    ("member_named_device", "struct S { int device; };", r"error", "struct S { int device_id; };"),
    ("member_named_threadgroup", "struct S { int threadgroup; };", r"error", "struct S { int group; };"),
    ("variable_named_constant", "inline int f() { int constant = 1; return constant; }", r"error",
     "inline int f() { const int c = 1; return c; }"),
    ("variable_named_thread", "inline int f() { int thread = 1; return thread; }", r"error",
     "inline int f() { int thread_id = 1; return thread_id; }"),
    # Address spaces: conversions between them, constant memory, kernel arguments.
    ("device_pointer_to_threadgroup_parameter",
     "inline void g(threadgroup float* t) { t[0] = 1.0f; }\ninline void f(device float* d) { g(d); }",
     r"cannot pass pointer to address space 'device' as a pointer to address space 'threadgroup'",
     "inline void g(threadgroup float* t) { t[0] = 1.0f; }\ninline void f(threadgroup float* t) { g(t); }"),
    ("threadgroup_pointer_to_device_parameter",
     "inline void g(device float* d) { d[0] = 1.0f; }\ninline void f(threadgroup float* t) { g(t); }",
     r"address space 'threadgroup' as a pointer to address space 'device'",
     "inline void g(device float* d) { d[0] = 1.0f; }\ninline void f(device float* d) { g(d + 1); }"),
    ("constant_pointer_to_device_parameter",
     "inline float g(device const float* d) { return d[0]; }\ninline float f(constant float* c) { return g(c); }",
     r"address space 'constant' as a pointer to address space 'device'",
     "inline float g(constant float* c) { return c[0]; }\ninline float f(constant float* c) { return g(c); }"),
    ("device_pointer_to_thread_parameter",
     "inline void g(thread float* p) { *p = 1.0f; }\ninline void f(device float* d) { g(d); }",
     r"address space 'device' as a pointer to address space 'thread'",
     "inline void g(thread float* p) { *p = 1.0f; }\ninline void f() { float x; g(&x); }"),
    ("device_pointer_to_unqualified_parameter",
     "inline void g(float* p) { *p = 1.0f; }\ninline void f(device float* d) { g(d); }",
     r"address space 'device' as a pointer to address space 'thread'",
     "inline void g(float* p) { *p = 1.0f; }\ninline void f() { float x; g(&x); }"),
    ("write_through_constant_pointer", "inline void f(constant float* c) { c[0] = 1.0f; }",
     r"read-only variable is not assignable", "inline void f(device float* d) { d[0] = 1.0f; }"),
    ("write_through_constant_reference", "struct P { uint n; };\ninline void f(constant P& p) { p.n = 1; }",
     r"read-only|const-qualified", "struct P { uint n; };\ninline uint f(constant P& p) { P q = p; return q.n + p.n; }"),
    ("kernel_pointer_without_address_space",
     "kernel void k(float* out, uint i [[thread_position_in_grid]]) { out[i] = 1.0f; }",
     r"parameter 'out' is a pointer or reference without an address space",
     "kernel void k(device float* out, uint i [[thread_position_in_grid]]) { out[i] = 1.0f; }"),
    ("kernel_reference_without_address_space",
     "kernel void k(device float* out, const uint& n, uint i [[thread_position_in_grid]]) { out[i] = n; }",
     r"parameter 'n' is a pointer or reference without an address space",
     "kernel void k(device float* out, constant uint& n, uint i [[thread_position_in_grid]]) { out[i] = n; }"),
    ("kernel_thread_pointer",
     "kernel void k(thread float* out, uint i [[thread_position_in_grid]]) { out[i] = 1.0f; }",
     r"parameter 'out' is in the thread address space",
     "kernel void k(threadgroup float* scratch [[threadgroup(0)]], uint i [[thread_index_in_threadgroup]]) "
     "{ scratch[i] = 1.0f; }"),
    ("kernel_scalar_without_attribute", "kernel void k(device float* out, float v) { out[0] = v; }",
     r"parameter 'v' is passed by value", "kernel void k(device float* out, constant float& v) { out[0] = v; }"),
    ("kernel_builtin_of_wrong_type",
     "kernel void k(device float* out, float i [[thread_position_in_grid]]) { out[0] = i; }",
     r"\[\[thread_position_in_grid\]\] parameter 'i' has type 'float'",
     "kernel void k(device float* out, ushort2 i [[thread_position_in_grid]]) { out[0] = i.x; }"),
    ("kernel_position_and_size_of_other_widths",
     "kernel void k(device float* out, uint2 pos [[thread_position_in_grid]], "
     "uint3 size [[threads_per_threadgroup]]) { out[pos.x] = size.x; }",
     r"\[\[threads_per_threadgroup\]\] parameter 'size' is a 3-component vector but \[\[thread_position_in_grid\]\]",
     "kernel void k(device float* out, uint2 pos [[thread_position_in_grid]], ushort2 size [[threads_per_threadgroup]], "
     "uint lid [[thread_index_in_threadgroup]]) { out[pos.x] = size.x + lid; }"),
    ("kernel_unknown_attribute",
     "kernel void k(device float* out, uint i [[thread_positon_in_grid]]) { out[i] = 1.0f; }",
     r"unknown attribute \[\[thread_positon_in_grid\]\]",
     "kernel void k(device float* out, uint i [[thread_position_in_grid]]) { out[i] = 1.0f; }"),
    ("threadgroup_attribute_on_a_device_pointer",
     "kernel void k(device float* t [[threadgroup(0)]], uint i [[thread_index_in_threadgroup]]) { t[i] = 1.0f; }",
     r"\[\[threadgroup\(n\)\]\] parameter 't' must point to threadgroup memory",
     "kernel void k(threadgroup float* t [[threadgroup(0)]], uint i [[thread_index_in_threadgroup]]) { t[i] = 1.0f; }"),
    ("buffer_attribute_on_a_threadgroup_pointer",
     "kernel void k(threadgroup float* t [[buffer(0)]], uint i [[thread_index_in_threadgroup]]) { t[i] = 1.0f; }",
     r"\[\[buffer\(n\)\]\] parameter 't' must point to device or constant memory",
     "using index_t = uint;\nkernel void k(device float* t [[buffer(0)]], index_t i [[thread_index_in_threadgroup]]) "
     "{ t[i] = 1.0f; }"),
    ("kernel_returning_a_value", "kernel float k(device float* out) { return out[0]; }", r"must return void",
     "kernel void k(device float* out) { out[0] = 0.0f; }"),
    ("program_scope_variable_outside_constant", "float g_scale = 2.0f;",
     r"program scope variable must reside in constant address space", "constant float g_scale = 2.0f;"),
    ("program_scope_threadgroup_variable", "threadgroup float g_tile[32];",
     r"program scope variable must reside in constant address space",
     "kernel void k(device float* out, uint i [[thread_index_in_threadgroup]]) {\n"
     "  threadgroup float tile[32];\n  tile[i] = 1.0f;\n  out[i] = tile[31 - i];\n}"),
    # C++ features MSL does not have.
    ("double_variable", "inline float f(float x) { double d = x; return float(d); }", r"MSL has no double",
     "inline float f(float x) { float d = x * 2.0; return d; }"),
    ("double_parameter", "inline float f(double x) { return float(x); }", r"MSL has no double",
     "inline float f(float x) { return x; }"),
    ("function_pointer", "inline float sq(float x) { return x * x; }\ninline float f(float x) { "
     "float (*fp)(float) = sq; return fp(x); }", r"pointers to functions are not allowed",
     "inline float sq(float x) { return x * x; }\ninline float f(float x) { return sq(x); }"),
    # A function pointer type is accepted as a template parameter or a parameter (a function bound at compile
    # time where the code is inlined: MLX's fft passes its radix codelets so, PyTorch's c10/metal/atomic.h its
    # operations), not as a variable or member.
    ("function_pointer_alias_variable",
     "template <typename T> using Fn = void (*)(thread vec<T, 2>*);\n"
     "template <typename T> inline void neg(thread vec<T, 2>* x) { x[0] = -x[0]; }\n"
     "inline void f(thread float2* x) { Fn<float> p = neg<float>; p(x); }",
     r"pointers to functions are not allowed",
     "template <typename T> using Fn = void (*)(thread vec<T, 2>*);\n"
     "template <typename T> inline void neg(thread vec<T, 2>* x) { x[0] = -x[0]; }\n"
     "template <typename T, Fn<T> op> inline void apply(thread vec<T, 2>* x) { op(x); }\n"
     "inline void f(thread float2* x) { apply<float, neg<float>>(x); }"),
    ("function_pointer_member",
     "inline float sq(float x) { return x * x; }\nstruct Op { float (*fn)(float); };\n"
     "inline float f(float x) { Op op{sq}; return op.fn(x); }",
     r"pointers to functions are not allowed",
     # a function pointer parameter of an inlined helper (c10/metal/atomic.h's form)
     "inline float sq(float x) { return x * x; }\n"
     "inline float apply(float x, float (*op)(float)) { return op(x); }\n"
     "inline float f(float x) { return apply(x, sq); }"),
    # A function as a function-pointer template argument: a function template's bare name deduces its
    # arguments from the parameter's type (PyTorch's Quantized.metal); a function of another signature is no
    # valid argument.
    ("function_template_argument_of_another_signature",
     "template <typename T> float2 get(constant T* p, uint2 i) { return float2(float(p[i.x]), 0.0f); }\n"
     "template <typename T, float2 (*op)(constant T*, uint2)> float apply(constant T* p) { return op(p, 0).x; }\n"
     "kernel void k(constant int* p, device float* out) { out[0] = apply<int, get<float>>(p); }",
     r"no matching function for call to 'apply'",
     "template <typename T> float2 get(constant T* p, uint2 i) { return float2(float(p[i.x]), 0.0f); }\n"
     "template <typename T, float2 (*op)(constant T*, uint2)> float apply(constant T* p) { return op(p, 0).x; }\n"
     "kernel void k(constant int* p, device float* out) { out[0] = apply<int, get>(p); }"),
    # `vec<T, N>` deduces T, as Apple's vec is an ext vector type (a function template's parameter, a
    # partial specialization); a vector of another width does not match.
    ("vec_deduction_of_another_width",
     "template <typename T> inline T first(vec<T, 2> v) { return v.x; }\n"
     "inline float f(float3 v) { return first(v); }",
     r"no matching function for call to 'first'",
     "template <typename T> inline T first(vec<T, 2> v) { return v.x; }\n"
     "template <typename S> struct Lane { using type = S; };\n"
     "template <typename T> struct Lane<vec<T, 2>> { using type = T; };\n"
     "inline float f(float2 v, half2 h) { typename Lane<float2>::type a = first(v); "
     "typename Lane<half2>::type b = first(h); return a + float(b); }"),
    ("virtual_function", "struct B { virtual float f() const { return 0.0f; } };",
     r"virtual functions are not supported", "struct B { float f() const { return 0.0f; } };"),
    ("throw", "inline float f(float x) { if (x < 0.0f) throw 1; return x; }", r"exceptions",
     "inline float f(float x) { return x < 0.0f ? 0.0f : x; }"),
    ("try_catch", "inline float f(float x) { try { return x; } catch (...) { return 0.0f; } }", r"exceptions",
     "inline float f(float x) { return x; }"),
    ("new_delete", "struct S { int v; };\ninline int f() { S* s = new S; int v = s->v; delete s; return v; }",
     r"'default new' is not supported", "struct S { int v; };\ninline int f() { S s{3}; return s.v; }"),
    ("direct_recursion", "inline uint fact(uint n) { return n <= 1 ? 1 : n * fact(n - 1); }",
     r"recursive call of 'fact'", "inline uint fact(uint n) { uint r = 1; for (uint k = 2; k <= n; ++k) "
     "r *= k; return r; }"),
    ("goto", "inline int f(int x) {\n  if (x < 0) goto done;\n  x += 1;\ndone:\n  return x;\n}",
     r"goto is not supported", "inline int f(int x) {\n  if (x >= 0) x += 1;\n  return x;\n}"),
    # The Metal standard library: unknown functions, wrong overloads, exact parameter types.
    ("unknown_function_erf", "inline float f(float x) { return erf(x); }", r"use of undeclared identifier 'erf'",
     "inline float f(float x) { return exp(-x * x); }"),
    ("simd_sum_of_a_pointer", "inline float f(device float* p) { return simd_sum(p); }",
     r"no matching function for call to 'simd_sum'", "inline float f(device float* p) { return simd_sum(p[0]); }"),
    ("simd_shuffle_of_a_struct", "struct P { float a; };\ninline P f(P p, ushort l) { return simd_shuffle(p, l); }",
     r"no matching function for call to 'simd_shuffle'",
     "struct P { float a; };\ninline P f(P p, ushort l) { p.a = simd_shuffle(p.a, l); return p; }"),
    ("simd_and_of_a_float", "inline float f(float x) { return simd_and(x); }",
     r"(no matching function for|ambiguous) call to 'simd_and'|call to 'simd_and' is ambiguous",
     "inline uint f(uint x) { return simd_and(x); }"),
    ("simdgroup_load_with_a_vector_stride",
     "inline void f(threadgroup float* t) { simdgroup_float8x8 m; simdgroup_load(m, t, uint2(8, 8)); }",
     r"no matching function for call to 'simdgroup_load'",
     "inline void f(threadgroup float* t) { simdgroup_float8x8 m; simdgroup_load(m, t, 8, ulong2(0, 0), true); }"),
    ("simdgroup_load_from_thread_memory",
     "inline void f() { float t[64]; simdgroup_float8x8 m; simdgroup_load(m, t, 8); }",
     r"no matching function for call to 'simdgroup_load'",
     "inline void f(device const float* t) { simdgroup_float8x8 m; simdgroup_load(m, t, 8); }"),
    ("simdgroup_load_of_another_element_type",
     "inline void f(threadgroup half* t) { simdgroup_float8x8 m; simdgroup_load(m, t, 8); }",
     r"no matching function for call to 'simdgroup_load'",
     "inline void f(threadgroup half* t) { simdgroup_half8x8 m; simdgroup_load(m, t, 8); }"),
    ("simdgroup_multiply_accumulate_without_accumulator",
     "inline void f(simdgroup_float8x8 a, simdgroup_float8x8 b) { simdgroup_float8x8 d; "
     "simdgroup_multiply_accumulate(d, a, b); }",
     r"no matching function for call to 'simdgroup_multiply_accumulate'",
     "inline void f(simdgroup_half8x8 a, simdgroup_half8x8 b) { simdgroup_float8x8 d = "
     "make_filled_simdgroup_matrix<float, 8>(0.0f); simdgroup_multiply_accumulate(d, a, b, d); }"),
    ("simdgroup_multiply_accumulate_of_a_scalar",
     "inline void f(simdgroup_float8x8 a, float s) { simdgroup_float8x8 d; "
     "simdgroup_multiply_accumulate(d, a, s, d); }",
     r"no matching function for call to 'simdgroup_multiply_accumulate'",
     "inline void f(simdgroup_float8x8 a) { simdgroup_float8x8 d(1.0f); simdgroup_multiply(d, a, a); }"),
    ("threadgroup_barrier_without_flags", "inline void f() { threadgroup_barrier(); }",
     r"no matching function for call to 'threadgroup_barrier'",
     "inline void f() { threadgroup_barrier(mem_flags::mem_threadgroup | mem_flags::mem_device); }"),
    ("atomic_on_a_plain_pointer",
     "inline void f(device uint* p) { atomic_fetch_add_explicit(p, 1u, memory_order_relaxed); }",
     r"no matching function for call to 'atomic_fetch_add_explicit'",
     "inline void f(device atomic_uint* p) { atomic_fetch_add_explicit(p, 1u, memory_order_relaxed); }"),
    ("atomic_fetch_and_of_a_float",
     "inline void f(device atomic_float* p) { atomic_fetch_and_explicit(p, 1.0f, memory_order_relaxed); }",
     r"no matching function for call to 'atomic_fetch_and_explicit'",
     "inline void f(device atomic_float* p) { atomic_fetch_add_explicit(p, 1.0f, memory_order_relaxed); }"),
    ("atomic_thread_local", "inline void f() { atomic_int a; atomic_store_explicit(&a, 1, memory_order_relaxed); }",
     r"no matching function for call to 'atomic_store_explicit'",
     "kernel void k(device uint* out, uint i [[thread_index_in_threadgroup]]) {\n"
     "  threadgroup atomic_uint count;\n  atomic_store_explicit(&count, 0u, memory_order_relaxed);\n"
     "  out[i] = atomic_load_explicit(&count, memory_order_relaxed);\n}"),
    ("math_of_an_integer_pointer", "inline float f(device int* p) { return sqrt(p); }",
     r"no matching function for call to 'sqrt'", "inline float f(device int* p) { return sqrt(float(p[0])); }"),
    ("precise_exp_of_half_vector_returning_wrong_width",
     "inline half4 f(half4 x) { return fast::exp(x); }", r"no (viable|matching)",
     "inline float4 f(float4 x) { return fast::exp(x); }"),
    ("clamp_of_mixed_vectors", "inline float4 f(float4 x, float3 lo) { return clamp(x, lo, 1.0f); }",
     r"no matching function for call to 'clamp'",
     "inline float4 f(float4 x) { return clamp(x, 0.0f, 1.0f) + saturate(x) + mix(x, x, 0.5f); }"),
    ("dot_of_mixed_widths", "inline float f(float4 a, float3 b) { return dot(a, b); }",
     r"no matching function for call to 'dot'", "inline float f(float4 a, float3 b) { return dot(a.xyz, b); }"),
    ("as_type_of_another_size", "inline uint f(half h) { return as_type<uint>(h); }",
     r"no matching function for call to 'as_type'",
     "inline ushort f(half h) { return as_type<ushort>(h) + as_type<ushort>(bfloat(1.0f)); }"),
    ("vector_constructor_with_too_few_elements", "inline float4 f(float3 v) { return float4(v); }",
     r"no vector constructor for these arguments", "inline float4 f(float3 v) { return float4(v, 1.0f); }"),
    ("vector_constructor_with_too_many_elements", "inline float2 f(float2 a, float b) { return float2(a, b); }",
     r"no vector constructor for these arguments", "inline float2 f(float2 a, float b) { return float2(a.x, b); }"),
    ("implicit_vector_conversion", "inline float4 f(half4 h) { float4 v = h; return v; }",
     r"cannot initialize|incompatible", "inline float4 f(half4 h) { float4 v = float4(h); return v; }"),
    ("implicit_float_to_bfloat", "inline void f(device bfloat* out, float x) { out[0] = x; }",
     r"no viable overloaded '='|bfloat", "inline void f(device bfloat* out, float x) { out[0] = bfloat(x); }"),
    ("implicit_float_to_bfloat_initialization", "inline bfloat f(float x) { bfloat b = x * 2.0f; return b; }",
     r"no viable conversion from 'float' to 'thread bfloat'",
     "inline bfloat f(float x) { bfloat b = bfloat(x * 2.0f); return b; }"),
    ("bfloat_template_result_from_float",
     "template <typename T> inline T scale(T x, float s) { return float(x) * s; }\n"
     "inline bfloat f(bfloat x) { return scale(x, 2.0f); }",
     r"no viable conversion from returned value of type 'float' to function return type 'bfloat'",
     "template <typename T> inline T scale(T x, float s) { return T(float(x) * s); }\n"
     "inline bfloat f(bfloat x) { return scale(x, 2.0f); }"),
]

# Rejected while preprocessing: one clang run each.
PREPROCESSOR_CASES = [
    ("include_vector", "#include <vector>\n", r"'vector' file not found \(MSL has no C or C\+\+ standard library"),
    ("include_cmath", "#include <cmath>\n", r"'cmath' file not found"),
]

# Accepted idioms of MSL that the rewriting must keep working (templated kernels and their
# instantiation forms, swizzles, constant copies, conditionals of class types...).
IDIOMS = r"""
struct Shape { uint rows; uint cols; };
struct Acc { float m; float s; };
inline Acc combine(Acc a, Acc b) { return Acc{max(a.m, b.m), a.s + b.s}; }
template <typename T>
inline T pick(T a, T b, bool c) { return c ? a : b + a; }
inline float half_way(int i, int n, float a) { return i < n / 2 ? a : a - static_cast<float>(n - i); }
template <typename T>
kernel void idioms(device const T* x [[buffer(0)]], device T* y [[buffer(1)]], constant Shape& s [[buffer(2)]],
                   threadgroup float* scratch [[threadgroup(0)]], uint2 tid [[thread_position_in_grid]],
                   uint lane [[thread_index_in_simdgroup]], uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float partials[32];
  Shape local_shape = s;
  Acc acc = combine(Acc{1.0f, 2.0f}, Acc{-INFINITY, 0.0f});
  const ulong row = tid.y;
  const float v = float(x[row * local_shape.cols + tid.x]);
  float4 q = float4(v, float2(1.0f, 2.0f), 3.0f);
  q.xy = q.zw * 2.0f;
  partials[sg] = simd_sum(v) + acc.s + q.x;
  scratch[lane] = partials[0];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[row * s.cols + tid.x] = pick(T(v), x[0], lane > 3);
  uint3 idx = {tid.x, tid.y, 0};
  half4 h4 = half4(x[0]) * 0.5f;  // the scalar converts to the element type
  int2 p(1, 2);
  y[0] = T(float(idx.x + p.y) + precise::exp(v) + fast::tanh(v) + metal::precise::rsqrt(v) + fma(v, v, v));
}
template [[host_name("idioms_float")]] kernel void idioms<float>(device const float*, device float*, constant Shape&,
                                                                  threadgroup float*, uint2, uint, uint);
template [[host_name("idioms_half")]] [[kernel]] decltype(idioms<half>) idioms<half>;
template [[host_name("idioms_bfloat")]] [[kernel]] decltype(idioms<bfloat>) idioms<bfloat>;
"""


def _combined(snippets):
    """PRELUDE + each snippet in a namespace of its own; returns (source, {id: (first line, last line)})."""
    lines = PRELUDE.splitlines()
    spans = {}
    for case_id, snippet in snippets:
        lines.append(f"namespace case_{case_id} {{")
        first = len(lines) + 1
        lines.extend(snippet.splitlines())
        spans[case_id] = (first, len(lines))
        lines.append("}")
    return "\n".join(lines) + "\n", spans


def _errors_by_case(snippets, name):
    source, spans = _combined(snippets)
    try:
        strict.check_msl(source, name)
    except strict.MSLStrictError as e:
        errors = e.errors
    else:
        errors = []
    found = {case_id: [] for case_id, _ in snippets}
    stray = []
    for d in errors:
        owner = [c for c, (a, b) in spans.items() if d.path == name and a <= d.line <= b]
        (found[owner[0]] if owner else stray).append(d)
    return found, stray


@pytest.fixture(scope="module")
def rejected():
    return _errors_by_case([(c, bad) for c, bad, _, _ in CASES], "rejected.metal")


@pytest.fixture(scope="module")
def controls():
    return _errors_by_case([(c, good) for c, _, _, good in CASES], "controls.metal")


@pytest.mark.parametrize("case_id,pattern", [(c, p) for c, _, p, _ in CASES], ids=[c for c, *_ in CASES])
def test_rejected(rejected, case_id, pattern):
    found, stray = rejected
    messages = [str(d) for d in found[case_id]]
    assert messages, f"{case_id}: accepted, but Apple's compiler rejects it"
    assert any(re.search(pattern, m) for m in messages), f"{case_id}: rejected for another reason:\n" + \
        "\n".join(messages)
    assert not stray, "errors outside every snippet:\n" + "\n".join(map(str, stray))


@pytest.mark.parametrize("case_id", [c for c, *_ in CASES])
def test_control_accepted(controls, case_id):
    found, stray = controls
    assert not found[case_id], f"{case_id}: the control was rejected:\n" + "\n".join(map(str, found[case_id]))
    assert not stray, "errors outside every snippet:\n" + "\n".join(map(str, stray))


@pytest.mark.parametrize("case_id,source,pattern", PREPROCESSOR_CASES, ids=[c for c, *_ in PREPROCESSOR_CASES])
def test_rejected_while_preprocessing(case_id, source, pattern):
    with pytest.raises(strict.MSLStrictError, match=pattern) as info:
        strict.check_msl(source + PRELUDE, f"{case_id}.metal")
    assert str(info.value).count(f"{case_id}.metal:1:10:") == 1


def test_idioms_accepted():
    strict.check_msl(PRELUDE + IDIOMS, "idioms.metal")


# Minimal reproductions (written here) of the two forms of MLX's kernels the front end once refused:
# fft.metal's radix codelets passed as function-pointer template arguments (through an alias template,
# one instantiation of them meeting a `float * half2` that OpenCL alone refuses), its lane type deduced by
# a partial specialization on `vec<T, 2>` and a threadgroup `vec<T, 2>` array; steel_attention's
# `vec<U, N>` member alias template deducing U in a function template's parameter.
MLX_FORMS = """
template <typename T> using Codelet = void (*)(thread vec<T, 2>*, thread vec<T, 2>*);
template <typename T> METAL_FUNC void radix2(thread vec<T, 2>* x, thread vec<T, 2>* y) {
  y[0] = x[0] + x[1];
  y[1] = x[0] - 0.5 * x[1];
}
template <typename T, int radix, Codelet<T> codelet>
METAL_FUNC void butterfly(thread vec<T, 2>* x, thread vec<T, 2>* y) { codelet(x, y); }
template <typename S> struct LaneOf { using type = S; };
template <typename T> struct LaneOf<vec<T, 2>> { using type = T; };
template <typename In> struct Reader {
  using lane_T = typename LaneOf<In>::type;
  using complex_T = vec<lane_T, 2>;
  complex_T conj(complex_T v) const thread { return complex_T(v.x, -v.y); }
};
template <typename In, int N>
kernel void fft_like(device const In* in [[buffer(0)]], device In* out [[buffer(1)]],
                     uint i [[thread_position_in_grid]]) {
  using T = typename LaneOf<In>::type;
  threadgroup vec<T, 2> shared[N];
  thread Reader<In> reader;
  vec<T, 2> x[2] = {in[0], in[1]}, y[2];
  butterfly<T, 2, radix2<T>>(x, y);
  butterfly<T, 2, radix2<T>>(y, x);
  shared[i % N] = reader.conj(x[0]);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[i] = shared[0];
}
template [[host_name("fft_like_float2")]] [[kernel]] decltype(fft_like<float2, 16>) fft_like<float2, 16>;
template [[host_name("fft_like_half2")]] [[kernel]] decltype(fft_like<half2, 16>) fft_like<half2, 16>;

template <typename T, int N> struct Frag {
  typedef vec<T, N> frag_type;
  template <typename U> using dtype_frag_t = typename metal::vec<U, N>;
  template <typename A, typename B>
  METAL_FUNC static void mma(thread frag_type& d, thread dtype_frag_t<A>& a, thread dtype_frag_t<B>& b) {
    d = frag_type(a) * frag_type(b);
  }
};
kernel void mma_like(device float2* out [[buffer(0)]], device const half2* h [[buffer(1)]],
                     uint i [[thread_position_in_grid]]) {
  float2 d, a = out[0], b = out[1];
  half2 c = h[0];
  Frag<float, 2>::mma(d, a, b);
  Frag<float, 2>::mma(d, a, c);
  out[i] = d;
}
"""


def test_mlx_forms_accepted():
    strict.check_msl(PRELUDE + MLX_FORMS, "mlx_forms.metal")


# PyTorch's forms (written here): a function-pointer template parameter returning a vector, bound to a
# function template's bare name too (Quantized.metal), a constant array's data() (GridSampler.metal) and a bfloat scale times a float4
# (Quantized.metal), all of which Apple's compiler builds.
PYTORCH_FORMS = """
template <typename T> float2 scale_zero(constant T* p, uint2 i) { return float2(float(p[i.x]), 0.0f); }
template <typename T, float2 (*get)(constant T*, uint2)>
kernel void with_getter(constant T* a [[buffer(0)]], device float* out [[buffer(1)]],
                        uint i [[thread_position_in_grid]]) {
  out[i] = get(a, uint2(i, 0)).x;
}
template [[host_name("with_getter_float")]] kernel void with_getter<float, scale_zero<float>>(
    constant float*, device float*, uint);
template [[host_name("with_getter_half")]] kernel void with_getter<half, scale_zero>(
    constant half*, device float*, uint);
template <int N> struct Params { array<int, N> sizes; };
kernel void pytorch_like(constant Params<3>& params [[buffer(0)]], constant bfloat* scale [[buffer(1)]],
                         device float4* out [[buffer(2)]], uint i [[thread_position_in_grid]]) {
  auto sizes = params.sizes.data();
  const bfloat s = scale[0];
  out[i] = s * float4(float(sizes[0]), float(sizes[1]), float(sizes[2]), 1.0f) + s;
}
"""


def test_pytorch_forms_accepted():
    strict.check_msl(PRELUDE + PYTORCH_FORMS, "pytorch_forms.metal")


# More of PyTorch's forms, which Apple's compiler builds: a static member function template of an
# operations struct as a function-pointer template argument (Indexing.metal's IndexReduceOp), `&pos[0]` of
# a thread metal::array as a thread pointer (Scatter.metal), `void kernel f` (SpecialOps.metal), a functor
# ending in a private section default-constructed, an array parameter whose element type is deduced beside
# a by-value one and numeric_limits<long>::infinity() (ScanKernel.metal), an integer expression beside a
# bfloat in `?:` (GridSampler3D.metal), two kernel templates of one name (FusedOptimizerOps.metal).
PYTORCH_FORMS_2 = """
struct ReduceOps {
  template <typename T>
  static T amax(T a, T b) { return max(a, b); }
  template <typename T>
  static T sum(T a, T b) { return a + b; }
};
template <typename T, T (*Op)(T, T)>
kernel void reduce_into(device T* x [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  x[i] = Op(x[i], T(1));
}
template [[host_name("reduce_into_amax_float")]] kernel void reduce_into<float, ReduceOps::amax<float>>(
    device float* x [[buffer(0)]], uint i [[thread_position_in_grid]]);
struct Twice {  // (named as a type: stays a struct)
  static float apply(float x) { return 2 * x; }
};
template <typename F>
inline float call_apply(float x) { return F::apply(x); }
kernel void twice(device float* x [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  x[i] = call_apply<Twice>(x[i]);
}

inline long offset_of(thread long pos[4], constant long* strides) { return pos[0] * strides[0]; }
template <typename T, int N>
inline void fill(T values[N], T init) { for (int k = 0; k < N; k++) values[k] = init; }
template <typename T>
struct MinOp {
  static constexpr constant T init = is_floating_point_v<T> ? numeric_limits<T>::infinity()
                                                            : numeric_limits<T>::max();
  T operator()(T a, T b) { return a < b ? a : b; }
 private:
  int unused_;
};
template <typename T>
T clip(T c, long size) { return c < 0 ? 0 : c > size - 1 ? size - 1 : c; }

template <typename T>
void kernel gather_like(device T* out [[buffer(0)]], constant long* strides [[buffer(1)]],
                        uint i [[thread_position_in_grid]]) {
  ::metal::array<long, 4> pos;
  pos[0] = i;
  T v[2];
  fill<T, 2>(v, MinOp<T>::init);
  MinOp<T> op;
  out[offset_of(&pos[0], strides)] = clip(op(v[0], T(3)), 2);
}
template [[host_name("gather_like_bfloat")]] void kernel gather_like<bfloat>(device bfloat*, constant long*, uint);
template [[host_name("gather_like_long")]] void kernel gather_like<long>(device long*, constant long*, uint);

template <typename T> struct Wide { using type = T; };
template <> struct Wide<half2> { using type = float2; };
template <typename T> using wide_t = typename Wide<T>::type;
template <typename T>
kernel void step(device T* p [[buffer(0)]], constant float& lr [[buffer(1)]], uint i [[thread_position_in_grid]]) {
  wide_t<T> s = wide_t<T>(p[i]);  // (half2 to float2, ReplicationPad.metal)
  s += static_cast<wide_t<T>>(p[i]);
  p[i] = static_cast<T>(s) - T(lr);
}
template <typename T>
kernel void step(device T* p [[buffer(0)]], device T* m [[buffer(1)]], constant float& lr [[buffer(2)]],
                 uint i [[thread_position_in_grid]]) {
  p[i] -= T(lr) * m[i];
}
template [[host_name("step_half2")]] kernel void step<half2>(device half2*, constant float&, uint);
template [[host_name("step_half")]] kernel void step<half>(device half*, constant float&, uint);
template [[host_name("step_momentum_half")]] kernel void step<half>(device half*, device half*, constant float&, uint);
"""


def test_pytorch_forms_2_accepted():
    strict.check_msl(PRELUDE + PYTORCH_FORMS_2, "pytorch_forms_2.metal")



# PyTorch's ReduceOps.metal and LinearAlgebra.metal: kernels taking a template template parameter
# (`template <typename> class OpFn`: its `class` heads no class body), threadgroup variables with an
# initializer and several threadgroup declarators in one statement.
PYTORCH_FORMS_3 = r"""
template <typename T> struct MaxOp { T operator()(T a, T b) const { return max(a, b); } };
template <template <typename> class OpFn, typename TA>
struct Ops { static TA apply(TA a, TA b) { return OpFn<TA>()(a, b); } };
template <template <typename> class OpFn, typename TI, typename TO>
kernel void reduce_pairs(constant TI* in [[buffer(0)]], device TO* out [[buffer(1)]],
                         uint i [[thread_position_in_grid]], uint l [[thread_index_in_threadgroup]]) {
  threadgroup uint32_t flag = 0;
  threadgroup float a[4] = {0}, b[4];
  threadgroup TO c[2], d[2] = {};
  if (l == 0) flag = 1;
  a[l % 4] = b[l % 4] = float(in[i]);
  c[l % 2] = d[l % 2] = TO(flag);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[i] = Ops<OpFn, TO>::apply(TO(a[l % 4] + b[l % 4]), c[0] + d[1]);
}
template [[host_name("reduce_pairs_float")]] kernel void reduce_pairs<MaxOp, float, float>(
    constant float*, device float*, uint, uint);
"""


def test_pytorch_forms_3_accepted():
    strict.check_msl(PRELUDE + PYTORCH_FORMS_3, "pytorch_forms_3.metal")


def test_static_cast_between_vector_lengths_rejected():
    # static_cast converts a vector to another of its length (element-wise), not of another length.
    src = PRELUDE + """
template <typename T> struct Wide { using type = float2; };
template <typename T> using wide_t = typename Wide<T>::type;
template <typename T> float2 widen(T h) { return static_cast<wide_t<T>>(h); }
kernel void k(device float2* out [[buffer(0)]], uint i [[thread_position_in_grid]]) { out[i] = widen(half3(1.0h)); }
"""
    with pytest.raises(strict.MSLStrictError, match=r"error"):
        strict.check_msl(src, "vector_lengths.metal")


def test_thread_array_element_is_a_thread_pointer():
    # `&pos[0]` of a thread array is a thread pointer, not a device one.
    src = PRELUDE + """
inline long first(device long* p) { return p[0]; }
kernel void k(device long* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  ::metal::array<long, 4> pos;
  pos[0] = i;
  out[i] = first(&pos[0]);
}
"""
    with pytest.raises(strict.MSLStrictError, match=r"no matching function for call to 'first'"):
        strict.check_msl(src, "thread_array.metal")


def test_errors_name_the_metal_line_and_column():
    source = PRELUDE + "kernel void k(device float* out, uint i [[thread_position_in_grid]]) {\n" \
                       "  out[i] = undefined_name;\n}\n"
    with pytest.raises(strict.MSLStrictError) as info:
        strict.check_msl(source, "where.metal")
    assert "where.metal:4:12: error: use of undeclared identifier 'undefined_name'" in str(info.value)
    assert isinstance(info.value, RuntimeError)


def test_headers_from_include_dirs_and_the_metal_version(tmp_path):
    (tmp_path / "shared.h").write_text(
        "#pragma once\n#ifdef __METAL__\n#define SPACE constant\n#else\n#define SPACE\n#endif\n"
        "#if __METAL_VERSION__ < 300\n#error old\n#endif\n"
        "struct Params { uint n; uint half_n; };\n"
        "inline uint twice(uint x) { return 2 * x; }\n"
        "struct Bad { float half; };\n")
    source = PRELUDE + '#include "shared.h"\n' \
        "kernel void k(device uint* out, SPACE Params& p, uint i [[thread_position_in_grid]]) {\n" \
        "  out[i] = twice(p.n);\n}\n"
    with pytest.raises(strict.MSLStrictError) as info:
        strict.check_msl(source, "uses_header.metal", [str(tmp_path)])
    assert re.search(r"shared\.h:12:20: error: 'half' is an MSL type name", str(info.value)), str(info.value)
    (tmp_path / "shared.h").write_text((tmp_path / "shared.h").read_text().replace("float half;", "float h;"))
    strict.check_msl(source, "uses_header.metal", [str(tmp_path)])


SHADERS = sorted((ROOT / "shaders").glob("*.metal"))


# Every shipped shader, with the headers it shares with the host.
@pytest.mark.skipif(not SHADERS, reason="no shaders/ here (an installed package's run: test_embedded_shader_passes)")
@pytest.mark.parametrize("path", SHADERS, ids=[p.name for p in SHADERS])
def test_shader_passes(path):
    strict.check_msl(path.read_text(), f"shaders/{path.name}", [str(ROOT / "shaders" / "include")])


def _embedded_shader_names():
    import my_mps_ops

    return sorted(my_mps_ops._C.embedded_shaders())


# What the binary ships: each shader as compiled in (its includes inlined).
@pytest.mark.parametrize("name", _embedded_shader_names())
def test_embedded_shader_passes(name):
    import my_mps_ops

    strict.check_msl(my_mps_ops._C.embedded_shaders()[name], f"{name}.metal")


def _emulator_test_kernels():
    """MSL sources of the emulator's tests: string constants holding `#include <metal_stdlib>` and a kernel."""
    sources = []
    for path in sorted((ROOT / "test").rglob("test_emulator*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    "#include <metal_stdlib>" in node.value and "kernel" in node.value:
                sources.append((f"{path.name}:{node.lineno}", node.value))
    return sources


# Deliberately invalid (compile error tests: an undefined name, a threadgroup declaration that mixes a pointer
# in, which both front ends refuse) or needing a header the test writes itself.
_NOT_VALID_ALONE = ("undefined_name", '#include "', "threadgroup float acc = 0.0f, *p = &acc;")


@pytest.mark.parametrize("where,source", [s for s in _emulator_test_kernels()
                                          if not any(m in s[1] for m in _NOT_VALID_ALONE)],
                         ids=[w for w, s in _emulator_test_kernels() if not any(m in s for m in _NOT_VALID_ALONE)])
def test_emulator_test_kernel_passes(where, source):
    strict.check_msl(source, where)


def test_cli(tmp_path, capsys):
    good = tmp_path / "good.metal"
    good.write_text(PRELUDE + "kernel void k(device float* x, uint i [[thread_position_in_grid]]) { x[i] = 1.0f; }\n")
    bad = tmp_path / "bad.metal"
    bad.write_text(PRELUDE + "struct S { float half; };\n")
    assert strict.main([str(good)]) == 0
    assert strict.main([str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.metal:3:18: error: 'half' is an MSL type name" in err
