"""Source forms of Metal code written elsewhere (libraries such as MLX and
PyTorch's MPS kernels), each in a minimal kernel of our own: instantiation
forms, Apple's builtins and macros, names outside namespace metal, overloads
on address spaces, function constants, threadgroup declarations.
"""

import pytest
import torch

from stdlib_harness import needs_gxx

pytestmark = needs_gxx


def _compile(source, **kw):
    try:
        from my_mps_ops.emulator import compile_shader
    except Exception as exc:  # not built in this tree
        pytest.skip(f"my_mps_ops.emulator.compile_shader unavailable: {exc}")
    return compile_shader(source, **kw)


INSTANTIATIONS = r"""
#include <metal_stdlib>
using namespace metal;

// A library-style kernel in a namespace, instantiated by its qualified name.
namespace lib {
template <typename T>
kernel void scale(device T* out [[buffer(0)]], constant T& k [[buffer(1)]],
                  uint i [[thread_position_in_grid]], uint l [[thread_index_in_threadgroup]]) {
  threadgroup T tile[8];
  tile[l % 8] = out[i];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[i] = tile[l % 8] * k;
}
}  // namespace lib
template [[host_name("scale_float")]] kernel void ::lib::scale<float>(
    device float*, constant float&, uint, uint);

// Attributes beside `kernel`, instantiated through decltype.
template <typename T, int N>
[[kernel, max_total_threads_per_threadgroup(N * 32)]] void add_n(
    device T* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  out[i] += T(N);
}
template [[host_name("add_3")]] [[kernel]] decltype(add_n<int, 3>) add_n<int, 3>;

// Declared first, defined below.
kernel void twice(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]);
kernel void twice(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) { out[i] *= 2.0f; }
"""


def test_qualified_decltype_and_declared_kernels():
    lib = _compile(INSTANTIATIONS)
    x = torch.arange(8, dtype=torch.float32)
    lib.scale_float(x, 3.0, threads=8, group_size=8)
    assert x.tolist() == [3.0 * i for i in range(8)]
    n = torch.zeros(5, dtype=torch.int32)
    lib.add_3(n)
    assert n.tolist() == [3] * 5
    y = torch.ones(4)
    lib.twice(y)
    assert y.tolist() == [2.0] * 4


GLOBAL_NAMES = r"""
// No <metal_stdlib>, no `using namespace metal;`: Apple's compiler declares these anyway.
namespace mine {
inline float4 widen(uint x) { return float4(float(x)); }
}
kernel void globals(device float4* out [[buffer(0)]], device uint* bits [[buffer(1)]],
                    uint i [[thread_position_in_grid]]) {
  out[i] = mine::widen(i);
  half h = half(i);
  bits[i] = as_type<uint>(float(h));
}
"""


def test_metal_names_outside_namespace_metal():
    lib = _compile(GLOBAL_NAMES)
    out = torch.empty(3, 4)
    bits = torch.empty(3, dtype=torch.int32)
    lib.globals(out, bits, threads=3)
    assert out.tolist() == [[float(i)] * 4 for i in range(3)]
    assert bits.tolist() == torch.arange(3, dtype=torch.float32).view(torch.int32).tolist()


BUILTINS = r"""
#include <metal_stdlib>
#include <metal_logging>
using namespace metal;

constant os_log logger("emulator", "test");

METAL_FUNC float cube(float x) { return x * x * x; }

kernel void builtins(device float* out [[buffer(0)]], device float* shuf [[buffer(1)]],
                     device float* quad [[buffer(2)]], device uint* qid [[buffer(3)]],
                     uint i [[thread_position_in_grid]],
                     ushort qg [[quadgroup_index_in_threadgroup]],
                     ushort ql [[thread_index_in_quadgroup]]) {
  logger.log_debug("thread %u", i);
  float x = float(i);
  // Apple's internal builtins, as libraries call them.
  out[i] = __metal_exp(x * 0.1f, __METAL_FAST_MATH__) + cube(__metal_fabs(-1.0f, __METAL_PRECISE_MATH__));
  // Lane i of each 8-lane window: data from i + 3, past the window's end filling_data from i + 3 - 8.
  shuf[i] = simd_shuffle_and_fill_down(x, x + 100.0f, ushort(3), ushort(8));
  shuf[32 + i] = simd_shuffle_and_fill_up(x, x + 100.0f, ushort(2));
  quad[i] = quad_sum(x) + quad_shuffle(x, ushort(1)) * 1000.0f;
  qid[i] = uint(qg) * 10 + uint(ql);
}
"""


def test_builtins_shuffle_fill_and_quads():
    lib = _compile(BUILTINS)
    out, shuf, quad = torch.empty(32), torch.empty(64), torch.empty(32)
    qid = torch.empty(32, dtype=torch.int32)
    lib.builtins(out, shuf, quad, qid, threads=32, group_size=32)
    xs = torch.arange(32, dtype=torch.float32)
    assert torch.allclose(out, torch.exp(xs * 0.1) + 1.0)
    down = [i + 3 if i % 8 + 3 < 8 else (i - i % 8 + i % 8 + 3 - 8) + 100 for i in range(32)]
    up = [i - 2 if i >= 2 else i + 32 - 2 + 100 for i in range(32)]
    assert shuf.tolist() == [float(v) for v in down + up]
    assert quad.tolist() == [float(4 * (i // 4) * 4 + 6 + 1000 * (4 * (i // 4) + 1)) for i in range(32)]
    assert qid.tolist() == [(i // 4) * 10 + i % 4 for i in range(32)]


ADDRESS_SPACE_OVERLOADS = r"""
#include <metal_stdlib>
using namespace metal;

struct acc_t {
  float v;
  acc_t() thread : v(0) {}
  acc_t() threadgroup : v(0) {}
  float get() const thread { return v; }
  float get() const device { return v; }
  float get() const constant { return v; }
};
inline void bump(thread float& x) { x += 1.0f; }
inline void bump(device float& x) { x += 1.0f; }
inline void bump(threadgroup float& x) { x += 1.0f; }

template <typename T> struct elem {};
template <typename T> struct elem<thread T*> { using type = T; };
template <typename T> struct elem<device T*> { using type = T; };

struct pick {
  template <typename T> T operator()(T x) { return x; }
  template <> float operator()(float x) { return -x; }  // clang accepts this in a class
};

kernel void overloads(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  acc_t a;
  a.v = float(i);
  bump(out[i]);
  float t = 1.0f;
  bump(t);
  typename elem<device float*>::type e = a.get() + t;
  out[i] += e + pick()(2.0f) + float(pick()(3));
}
"""


def test_overloads_on_address_spaces_and_member_specializations():
    lib = _compile(ADDRESS_SPACE_OVERLOADS)
    out = torch.zeros(4)
    lib.overloads(out)
    assert out.tolist() == [1.0 + i + 2.0 - 2.0 + 3.0 for i in range(4)]


CONSTANT_EXPRESSIONS = r"""
#include <metal_stdlib>
using namespace metal;

static_assert(bfloat(1.0f) + bfloat(2.0f) == bfloat(3.0f), "bfloat in a constant expression");
static_assert(half(1.5h) * half(2.0h) == 3.0h, "half in a constant expression");
constexpr constant bfloat kScale = bfloat(0.5f) * bfloat(4.0f);
static constant constexpr const int kOffset = 7;  // one const once `constant` is erased

// A library's own void_t in namespace metal (Apple's library has none).
namespace metal {
template <typename... Ts> struct make_void_ { typedef void type; };
template <typename... Ts> using void_t = typename make_void_<Ts...>::type;
}

struct wrapped { float v; operator float() const { return v; } };

kernel void constants(device float* out [[buffer(0)]], device int* iout [[buffer(1)]],
                      uint i [[thread_position_in_grid]]) {
  const uniform<int> n = make_uniform(int(i) + 1);
  int a = int(i), b = 2;
  thread int& ra = a;
  thread int& rb = b;
  iout[i] = max(ra, rb) + n * kOffset;
  out[i] = float(kScale) + log(wrapped{1.0f}) + exp(make_uniform(0.0f));
}
"""


def test_constant_expressions_uniform_and_math_on_wrappers():
    lib = _compile(CONSTANT_EXPRESSIONS)
    out = torch.empty(4)
    iout = torch.empty(4, dtype=torch.int32)
    lib.constants(out, iout)
    assert out.tolist() == [3.0] * 4
    assert iout.tolist() == [max(i, 2) + (i + 1) * 7 for i in range(4)]


FUNCTION_CONSTANTS = r"""
#include <metal_stdlib>
using namespace metal;

constant bool use_bias [[function_constant(0)]];
constant int repeat_n [[function_constant(1)]];
constant float unused_scale [[function_constant(2)]];
constant bool has_scale = is_function_constant_defined(unused_scale);

kernel void fc(device float* out [[buffer(0)]], constant float* bias [[buffer(1)]],
               uint i [[thread_position_in_grid]]) {
  float v = 0.0f;
  for (int r = 0; r < repeat_n; ++r) v += 1.0f;
  if (use_bias) v += bias[i];
  if (has_scale) v *= unused_scale;
  out[i] = v;
}
"""


def test_function_constants():
    bias = torch.tensor([10.0, 20.0, 30.0])
    on = _compile(FUNCTION_CONSTANTS, function_constants={"use_bias": True, 1: 3})
    off = _compile(FUNCTION_CONSTANTS, function_constants={"use_bias": False, "repeat_n": 2})
    out = torch.empty(3)
    on.fc(out, bias)
    assert out.tolist() == [13.0, 23.0, 33.0]
    off.fc(out, bias)
    assert out.tolist() == [2.0, 2.0, 2.0]
    from my_mps_ops.emulator import CompileError

    with pytest.raises(CompileError, match="no_such"):
        _compile(FUNCTION_CONSTANTS, function_constants={"no_such": 1})


# Kernels instantiated inside their namespace, by the unqualified name and with template arguments
# named from there (PyTorch's Gemm.metal), and a plain kernel in a namespace.
NAMESPACED_INSTANTIATIONS = r"""
#include <metal_stdlib>
using namespace metal;

namespace outer {
enum class Mode { add, mul };
namespace inner {
template <typename T, Mode M>
kernel void apply(device T* out [[buffer(0)]], constant T& k [[buffer(1)]], uint i [[thread_position_in_grid]]) {
  threadgroup uint32_t seen = 7;
  out[i] = (M == Mode::add ? out[i] + k : out[i] * k) + T(seen - 7);
}
kernel void fill(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  out[i] = float(i);
}
}  // namespace inner
template [[host_name("apply_add")]] kernel void inner::apply<float, Mode::add>(device float*, constant float&, uint);
namespace inner {
template [[host_name("apply_mul")]] kernel void apply<float, Mode::mul>(device float*, constant float&, uint);
}
}  // namespace outer
"""


def test_kernels_instantiated_inside_their_namespace():
    lib = _compile(NAMESPACED_INSTANTIATIONS)
    out = torch.empty(3)
    lib.fill(out, threads=3)
    assert out.tolist() == [0.0, 1.0, 2.0]
    lib.apply_add(out, 2.0, threads=3)
    lib.apply_mul(out, 10.0, threads=3)
    assert out.tolist() == [20.0, 30.0, 40.0]


# A library's own SIMD-group reduction, called unqualified on a bfloat from inside its namespace (as
# c10/metal/reduction_utils.h does): bfloat is a built-in type in Metal, so argument-dependent lookup
# adds nothing, and metal::simd_max does not make the call ambiguous. Its operators still apply.
BFLOAT_ADL = r"""
#include <metal_stdlib>

namespace lib {
template <typename T, ::metal::enable_if_t<::metal::is_floating_point_v<T>, bool> = true>
inline T simd_max(T val) {
  return T(::metal::simd_max(float(val)));
}
template <typename T>
T reduce(T x) {
  return T(simd_max(x) + x * 2.0f);
}
}  // namespace lib

kernel void bf_reduce(device bfloat* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  out[i] = lib::reduce(out[i]);
}
"""


def test_bfloat_brings_no_metal_functions_by_argument_dependent_lookup():
    lib = _compile(BFLOAT_ADL)
    x = torch.arange(4, dtype=torch.bfloat16)
    lib.bf_reduce(x, threads=4)
    assert x.tolist() == [3.0, 5.0, 7.0, 9.0]


PARAMETERS_AND_THREADGROUP = r"""
#include <metal_stdlib>
using namespace metal;

template <typename T>
struct traits { using acc = float; static constexpr constant int width = 4; };

template <typename T>
kernel void tg_forms(device float* out [[buffer(0)]],
                     constant const int64_t strides[2] [[buffer(1)]],
                     uint i [[thread_position_in_grid]], uint l [[thread_index_in_threadgroup]]) {
  using K = traits<T>;
  using acc_t = typename K::acc;
  typedef float other_t;
  threadgroup acc_t buf[K::width] = {0};
  threadgroup other_t second[2];
  if (l < 4) buf[l] = float(strides[0] * l + strides[1]);
  if (l < 2) second[l] = 1.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[i] = buf[l % 4] + second[l % 2];
}
template [[host_name("tg_forms_half")]] kernel void tg_forms<half>(
    device float*, constant const int64_t strides[2], uint, uint);
"""


def test_array_parameters_and_threadgroup_declaration_forms():
    lib = _compile(PARAMETERS_AND_THREADGROUP)
    out = torch.empty(8)
    lib.tg_forms_half(out, torch.tensor([10, 1]), threads=8, group_size=8)
    assert out.tolist() == [float(10 * (l % 4) + 1 + 1) for l in range(8)]
    assert lib.tg_forms_half.static_thread_group_memory_length >= 6 * 4


# Threadgroup declarations with initializers and several declarators (PyTorch's SVD kernel has
# `threadgroup uint32_t do_break = 0;` in a loop and `threadgroup uint32_t pbuf[48], qbuf[48];`).
THREADGROUP_INITIALIZERS = r"""
#include <metal_stdlib>
using namespace metal;

template <typename T>
kernel void tg_init(device float* out [[buffer(0)]], uint l [[thread_index_in_threadgroup]],
                    uint g [[threadgroup_position_in_grid]]) {
  using acc_t = T;
  constexpr int n = 3;
  threadgroup acc_t base[n] = {10, 20, 30}, twice[n];
  threadgroup uint32_t pbuf[4], qbuf[4];
  threadgroup int rounds = 0;
  for (int it = 0; it < 8; ++it) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    threadgroup uint32_t stop = 0;  // stays set once a round sets it
    if (l == 0) {
      rounds += 1;
      stop = it == 2 + g;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (stop) break;
  }
  if (l < 4) { pbuf[l] = l; qbuf[l] = 10 * l; }
  if (l < n) twice[l] = 2 * base[l];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[g * 4 + l] = float(pbuf[3 - l] + qbuf[l]) + float(twice[l % n]) + 1000.0f * rounds;
}
template [[host_name("tg_init_float")]] kernel void tg_init<float>(device float*, uint, uint);
"""


def test_threadgroup_initializers_and_several_declarators():
    from my_mps_ops.emulator import CompileError, race_check, schedule

    with pytest.raises(CompileError, match="unsupported threadgroup declaration"):
        # a pointer among the declarators: refused, not made per-thread
        _compile(THREADGROUP_INITIALIZERS.replace("twice[n];", "twice[n], *p = nullptr;"), strict=False)
    lib = _compile(THREADGROUP_INITIALIZERS)
    expected = [float((3 - l) + 10 * l + 2 * [10, 20, 30][l % 3] + 1000 * (3 + g)) for g in range(2) for l in range(4)]
    for order in ("in_order", "reverse"):
        out = torch.zeros(8)
        with schedule(order):
            lib.tg_init_float(out, threads=8, group_size=4)
        assert out.tolist() == expected
    with race_check():  # the initial values are stored before the threads run: no thread's store
        out = torch.zeros(8)
        lib.tg_init_float(out, threads=8, group_size=4)
    assert out.tolist() == expected


MASK_TO_BFLOAT = r"""
#include <metal_stdlib>
using namespace metal;

struct always { char x; constexpr operator bool() const { return true; } };

kernel void mask_scale(device const always* m [[buffer(0)]], device bfloat* out [[buffer(1)]],
                       uint i [[thread_position_in_grid]]) {
  bfloat s;
  s = m[i];  // class -> bool -> bfloat: one user-defined conversion in MSL
  out[i] = s * bfloat(float(i));
}
"""


def test_bfloat_assigned_from_a_class_converting_to_bool():
    lib = _compile(MASK_TO_BFLOAT)
    out = torch.empty(5, dtype=torch.bfloat16)
    lib.mask_scale(torch.zeros(5, dtype=torch.uint8), out)
    assert out.float().tolist() == [float(i) for i in range(5)]


MISC_FORMS = r"""
#include <metal_stdlib>
using namespace metal;

kernel void misc(volatile coherent(device) device float* out [[buffer(0)]],
                 device float* prod [[buffer(1)]],
                 uint i [[thread_position_in_grid]], ushort lane [[thread_index_in_simdgroup]]) {
  uint4 v = {i, i + 1, i + 2};                         // the fourth component is zero
  metal::remove_addrspace_t<const uint> w = v.w;
  float bits = __metal_simd_xor(as_type<float>(uint(1) << lane));  // XOR of the bit patterns
  out[i] = float(v.x + v.y + v.z + w) + float(as_type<uint>(bits) == 0xffffffffu);
  simdgroup_matrix<float, 8, 8> a = make_filled_simdgroup_matrix<float, 8, 8>(2.0f);
  simdgroup_matrix<float, 8, 8> b = make_filled_simdgroup_matrix<float, 8, 8>(0.5f);
  simdgroup_matrix<float, 8, 8> c = a * b;            // 8 * (2 * 0.5) everywhere
  simdgroup_store(c, prod, 8);
}
"""


def test_coherent_partial_brace_list_float_simd_xor_and_matrix_product():
    lib = _compile(MISC_FORMS)
    out, prod = torch.empty(32), torch.empty(64)
    lib.misc(out, prod, threads=32, group_size=32)
    assert out.tolist() == [float(3 * i + 3 + 1) for i in range(32)]
    assert prod.tolist() == [8.0] * 64


# Forms of PyTorch's MPS kernels (written here, each reduced to a line or two): template arguments of an
# explicit instantiation deduced from its parameters (Gamma.metal), a constexpr function returning a
# vector (Eye.metal), Metal's min/pow beside a library's own templates of them in scope (c10/metal's
# min/pow, EmbeddingBag.metal and Gamma.metal), an integer literal beside a bfloat in `?:`
# (HistogramKernel.metal: the int converts to bfloat).
PYTORCH_FORMS = r"""
#include <metal_stdlib>
using namespace metal;

namespace lib {
template <typename T, typename U>
enable_if_t<is_integral_v<T> && is_integral_v<U>, T> min(T a, U b) { return a < T(b) ? a : T(b); }
template <typename T, typename U, enable_if_t<is_floating_point_v<T> || is_floating_point_v<U>, bool> = true>
float pow(T x, U y) { return ::metal::precise::pow(float(x), float(y)); }
}  // namespace lib
using namespace lib;

template <typename T>
constexpr T one() { return static_cast<T>(1); }
template <>
constexpr float2 one<float2>() { return float2(1.0, 0.0); }

template <typename T0, typename T1>
kernel void forms(constant T0* in [[buffer(0)]], device T1* out [[buffer(1)]],
                  constant uint& n [[buffer(2)]], uint i [[thread_position_in_grid]]) {
  const uint last = min(i + 1, n - 1);
  const float z = float(in[last]);
  const int k = 2;
  out[i] = static_cast<T1>(pow(z, k) + one<float2>().x);
}
template [[host_name("forms_float_float")]] kernel void forms(
    constant float* in [[buffer(0)]], device float* out [[buffer(1)]], constant uint& n [[buffer(2)]],
    uint i [[thread_position_in_grid]]);

template <typename T>
kernel void weighted(constant T* w [[buffer(0)]], device T* out [[buffer(1)]],
                     constant long& stride [[buffer(2)]], uint i [[thread_position_in_grid]]) {
  out[i] += (stride >= 0) ? w[i * stride] : 1;
}
template [[host_name("weighted_bfloat")]] kernel void weighted<bfloat>(
    constant bfloat*, device bfloat*, constant long&, uint);
template [[host_name("weighted_int")]] kernel void weighted<int>(constant int*, device int*, constant long&, uint);
"""


def test_pytorch_kernel_forms():
    lib = _compile(PYTORCH_FORMS)
    x = torch.arange(6, dtype=torch.float32)
    out = torch.empty(6)
    lib.forms_float_float(x, out, 6, threads=6, arg_casts={2: "int32"})
    assert out.tolist() == [float(min(i + 1, 5)) ** 2 + 1.0 for i in range(6)]
    for dtype, kernel in ((torch.bfloat16, lib.weighted_bfloat), (torch.int32, lib.weighted_int)):
        w = torch.arange(4).to(dtype) * 2
        for stride, want in ((1, [0, 2, 4, 6]), (-1, [1, 1, 1, 1])):
            out = torch.zeros(4, dtype=dtype)
            kernel(w, out, stride, threads=4)
            assert out.tolist() == want, (dtype, stride)


FILLED_SQUARE = r"""
#include <metal_stdlib>
using namespace metal;
kernel void filled(device float* out [[buffer(0)]], uint lane [[thread_index_in_simdgroup]]) {
  simdgroup_float8x8 m = make_filled_simdgroup_matrix<float, 8>(2.5f);
  simdgroup_store(m, out, 8);
}
"""


def test_make_filled_simdgroup_matrix_takes_rows_from_cols():
    # make_filled_simdgroup_matrix<float, 8>(x): Rows defaults to Cols (MSL
    # specification; PyTorch's Quantized.metal relies on it).
    lib = _compile(FILLED_SQUARE, strict=True)
    out = torch.zeros(64)
    lib.filled(out, threads=32, group_size=32)
    assert out.tolist() == [2.5] * 64


# More forms of PyTorch's MPS kernels: `void kernel f` (SpecialOps.metal), two kernel templates of one name
# told apart by their parameters (FusedOptimizerOps.metal's fused_sgd), numeric_limits<int>::infinity()
# in a conditional on the type (ScanKernel.metal), an integer expression beside a bfloat in `?:`
# (GridSampler3D.metal), an array parameter whose element type is deduced (ScanKernel.metal's load_safe)
# and a functor ending in a private section, default-constructed.
PYTORCH_FORMS_2 = r"""
#include <metal_stdlib>
using namespace metal;

template <typename T>
T clip(T coord, long size) {
  return coord < 0 ? 0 : coord > size - 1 ? size - 1 : coord;
}

template <typename T, int N>
void fill(T values[N], T init) {
  for (int i = 0; i < N; i++) values[i] = init;
}

template <typename T>
struct MinOp {
  static constexpr constant T init = is_floating_point_v<T> ? numeric_limits<T>::infinity()
                                                            : numeric_limits<T>::max();
  T operator()(T a, T b) { return a < b ? a : b; }

 private:
  int unused_;
};

template <typename T>
void kernel
clipped(device T* out [[buffer(0)]], constant long& size [[buffer(1)]], uint i [[thread_position_in_grid]]) {
  T v[2];
  fill<T, 2>(v, T(int(i)));
  MinOp<T> op;
  out[i] = op(clip(v[1], size), MinOp<T>::init);
}
template [[host_name("clipped_bfloat")]] void kernel clipped<bfloat>(device bfloat*, constant long&, uint);
template [[host_name("clipped_int")]] void kernel clipped<int>(device int*, constant long&, uint);

template <typename T>
kernel void step(device T* p [[buffer(0)]], constant float& lr [[buffer(1)]], uint i [[thread_position_in_grid]]) {
  p[i] -= T(lr);
}
template <typename T>
kernel void step(device T* p [[buffer(0)]], device T* m [[buffer(1)]], constant float& lr [[buffer(2)]],
                 uint i [[thread_position_in_grid]]) {
  m[i] += T(1);
  p[i] -= T(lr) * m[i];
}
template [[host_name("step_float")]] kernel void step<float>(device float*, constant float&, uint);
template [[host_name("step_momentum_float")]] kernel void step<float>(
    device float* p [[buffer(0)]], device float* m [[buffer(1)]], constant float& lr [[buffer(2)]], uint i);
"""


def test_pytorch_kernel_forms_2():
    lib = _compile(PYTORCH_FORMS_2)
    for dtype, kernel in ((torch.bfloat16, lib.clipped_bfloat), (torch.int32, lib.clipped_int)):
        out = torch.zeros(6, dtype=dtype)
        kernel(out, 4, threads=6)
        assert out.tolist() == [0, 1, 2, 3, 3, 3], dtype
    p = torch.ones(4)
    lib.step_float(p, 0.5, threads=4)
    assert p.tolist() == [0.5] * 4
    m = torch.ones(4)
    lib.step_momentum_float(p, m, 0.25, threads=4)
    assert p.tolist() == [0.0] * 4 and m.tolist() == [2.0] * 4


# Metal's is_floating_point and is_integral hold for vectors too (c10/metal's is_scalar_floating_point_v
# is `is_floating_point_v<T> && is_scalar_v<T>`; UnaryKernel.metal's complex half2 functors are chosen by
# is_floating_point_v), is_signed_v of a vector is false rather than an error (c10/metal's integer pow
# instantiates it), and `static_cast<decltype(v.y)>(f)` converts to the element type.
VECTOR_TRAITS = r"""
#include <metal_stdlib>
using namespace metal;
static_assert(is_floating_point_v<half2> && is_floating_point_v<float> && is_integral_v<int2>, "");
static_assert(!is_scalar_v<float2> && is_scalar_v<float> && !is_signed_v<float2> && is_signed_v<int>, "");
struct twice_functor {
  template <typename T, enable_if_t<is_floating_point_v<T> && is_scalar_v<T>, bool> = true>
  T operator()(const T x) { return x * T(2); }
  template <typename T, enable_if_t<is_floating_point_v<T> && is_vector_v<T>, bool> = true>
  T operator()(const T x) { return T(x.x * 2, static_cast<decltype(x.y)>(float(x.y) * 3.0f)); }
  template <typename T, enable_if_t<is_integral_v<T> && !is_signed_v<T>, bool> = true>
  T operator()(const T x) { return x + 1; }
};
template <typename T>
kernel void twice(device T* x [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  twice_functor f;
  x[i] = f(x[i]);
}
template <typename T> struct vec2type { using type = float2; };
template <> struct vec2type<half> { using type = half2; };
template <typename T> using vec2type_t = typename vec2type<T>::type;
struct make_complex_functor {  // (BinaryKernel.metal: a vector built through an alias template)
  template <typename U>
  using ret_type = vec2type_t<U>;
  template <typename T>
  ret_type<T> operator()(const T a, const T b) { return ret_type<T>(a, b); }
};
kernel void complex_inf(device float2* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  // numeric_limits of a vector (c10/metal's logaddexp reads numeric_limits<float2>::infinity().x)
  constexpr auto inf = numeric_limits<float2>::infinity().x;
  make_complex_functor f;
  out[i] = f(float(i), i == 0 ? -inf : inf);
}
template [[host_name("twice_float")]] kernel void twice<float>(device float*, uint);
template [[host_name("twice_half2")]] kernel void twice<half2>(device half2*, uint);
template [[host_name("twice_uint")]] kernel void twice<uint>(device uint*, uint);
"""


def test_vector_type_traits():
    lib = _compile(VECTOR_TRAITS)
    x = torch.tensor([1.0, 2.0])
    lib.twice_float(x, threads=2)
    assert x.tolist() == [2.0, 4.0]
    h = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float16)
    lib.twice_half2(h, threads=2)
    assert h.tolist() == [2.0, 6.0, 6.0, 12.0]
    u = torch.tensor([1, 5], dtype=torch.int32)
    lib.twice_uint(u, threads=2)
    assert u.tolist() == [2, 6]
    c = torch.zeros(2, 2)
    lib.complex_inf(c, threads=2)
    assert c.tolist() == [[0.0, float("-inf")], [1.0, float("inf")]]
