"""The emulator's race check and thread schedules (my_mps_ops/emulator/race.py):
planted defects of each class are reported with the class, the buffer, the
byte offset, both threads and both source lines; the same kernels fixed run
clean; reverse and random schedules change what an order-dependent kernel
computes and not what a correct one does; every shipped shader runs clean."""

import re

import pytest
import torch

from my_mps_ops.emulator import compile_shader, race_check, schedule

# Each kernel comes as <name>_defect and <name>_fixed (and a third variant
# where noted); `// @marker` tags the lines reports must name.
SRC = r"""
#include <metal_stdlib>
using namespace metal;

// Two sums in one threadgroup through one partials array.
template <int Fixed>
[[kernel]] void two_sums(device const float* x, device float* out,
                         uint tid [[thread_index_in_threadgroup]], uint n [[threads_per_threadgroup]]) {
  threadgroup float partials[64];
  for (uint round = 0; round < 2; ++round) {
    partials[tid] = x[round * n + tid];  // @partials_write
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) {
      float s = 0.0f;
      for (uint i = 0; i < n; ++i) s += partials[i];  // @partials_read
      out[round] = s;
    }
    if (Fixed) threadgroup_barrier(mem_flags::mem_threadgroup);  // partials are rewritten next round
  }
}

// out[i] = x[i - 1] through threadgroup memory.
template <int Fixed>
[[kernel]] void shift(device const float* x, device float* out, uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float buf[64];
  buf[tid] = x[tid];  // @shift_write
  if (Fixed) threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = tid > 0 ? buf[tid - 1] : 0.0f;  // @shift_read
}

// Neighbouring lanes of a SIMD group swap values through threadgroup memory.
// Variant 2: a simdgroup_barrier that orders no memory.
template <int Variant>
[[kernel]] void simd_swap(device const float* x, device float* out, uint tid [[thread_index_in_threadgroup]],
                          uint lane [[thread_index_in_simdgroup]], uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float buf[64];
  buf[tid] = x[tid];  // @swap_write
  if (Variant == 1) simdgroup_barrier(mem_flags::mem_threadgroup);
  if (Variant == 2) simdgroup_barrier(mem_flags::mem_none);
  out[tid] = buf[sg * 32 + (lane ^ 1)];  // @swap_read
}

// Each threadgroup adds its sum into out[0].
template <int Fixed>
[[kernel]] void accumulate(device const float* x, device float* out, uint tid [[thread_index_in_threadgroup]],
                           uint gid [[thread_position_in_grid]]) {
  const float v = simd_sum(x[gid]);
  if (tid == 0) {
    if (Fixed) atomic_fetch_add_explicit((device atomic_float*)out, v, memory_order_relaxed);
    else out[0] += v;  // @accumulate
  }
}

// Every thread writes its element, then reads its right neighbour's.
// Variant 0: across threadgroups; 1: one threadgroup, barrier for device
// memory; 2: one threadgroup, barrier for threadgroup memory only.
template <int Variant>
[[kernel]] void neighbour(device float* data, device float* out, uint gid [[thread_position_in_grid]],
                          uint n [[threads_per_grid]]) {
  data[gid] = 2.0f * float(gid);  // @neighbour_write
  threadgroup_barrier(Variant == 2 ? mem_flags::mem_threadgroup : mem_flags::mem_device);
  out[gid] = data[(gid + 1) % n];  // @neighbour_read
}

// Threads count themselves on a threadgroup atomic: atomics do not race.
kernel void count_threads(device const float* x, device float* out, uint tid [[thread_index_in_threadgroup]]) {
  threadgroup atomic_uint count;
  if (tid == 0) atomic_store_explicit(&count, 0u, memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  atomic_fetch_add_explicit(&count, 1u, memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) out[0] = float(atomic_load_explicit(&count, memory_order_relaxed));
}

// neighbour in two launches.
kernel void write_elements(device float* data, device float* out, uint gid [[thread_position_in_grid]]) {
  data[gid] = 2.0f * float(gid);
}
kernel void read_neighbours(device float* data, device float* out, uint gid [[thread_position_in_grid]],
                            uint n [[threads_per_grid]]) {
  out[gid] = data[(gid + 1) % n];
}

#define VARIANT(name, v, tag) template [[host_name(#name "_" #tag)]] [[kernel]] decltype(name<v>) name<v>;
VARIANT(two_sums, 0, defect) VARIANT(two_sums, 1, fixed)
VARIANT(shift, 0, defect) VARIANT(shift, 1, fixed)
VARIANT(simd_swap, 0, defect) VARIANT(simd_swap, 1, fixed) VARIANT(simd_swap, 2, execution_only)
VARIANT(accumulate, 0, defect) VARIANT(accumulate, 1, fixed)
VARIANT(neighbour, 0, defect) VARIANT(neighbour, 1, fixed) VARIANT(neighbour, 2, wrong_flags)
"""


def line_of(marker: str) -> int:
    for number, text in enumerate(SRC.splitlines(), 1):
        if text.rstrip().endswith("// @" + marker):
            return number
    raise AssertionError(marker)


@pytest.fixture(scope="module")
def lib():
    return compile_shader(SRC)


def run(lib, kernel, groups=1, group_size=64):
    x = torch.arange(128, dtype=torch.float32) + 1.0
    out = torch.zeros(128, dtype=torch.float32)
    getattr(lib, kernel)(x, out, threads=groups * group_size, group_size=group_size)
    return x, out


def race_message(fn) -> str:
    with race_check():
        with pytest.raises(RuntimeError) as info:
            fn()
    return str(info.value)


def thread(x, group=0):
    return rf"thread \({x}, 0, 0\) of threadgroup \({group}, 0, 0\)"


def at(marker):
    return rf"at shader_\w+\.metal:{line_of(marker)}\b"


def test_reused_partials_without_trailing_barrier_is_a_threadgroup_race(lib):
    msg = race_message(lambda: run(lib, "two_sums_defect"))
    # Thread 0 sums round 0 while thread 32 (another SIMD group) already writes round 1.
    assert "kernel 'two_sums_defect': threadgroup race on threadgroup memory 'partials' at byte offset 128: " in msg
    assert re.search(f"read by {thread(0)} {at('partials_read')}, then write by {thread(32)} {at('partials_write')}; "
                     r"no threadgroup_barrier\(mem_flags::mem_threadgroup\) between them", msg), msg


def test_shift_without_barrier_is_a_threadgroup_race(lib):
    msg = race_message(lambda: run(lib, "shift_defect"))
    assert "kernel 'shift_defect': threadgroup race on threadgroup memory 'buf' at byte offset 124: " in msg
    assert re.search(f"write by {thread(31)} {at('shift_write')}, then read by {thread(32)} {at('shift_read')}",
                     msg), msg


def test_simd_exchange_without_simdgroup_barrier_is_a_simdgroup_race(lib):
    msg = race_message(lambda: run(lib, "simd_swap_defect"))
    assert "kernel 'simd_swap_defect': simdgroup race on threadgroup memory 'buf' at byte offset 4: " in msg
    assert re.search(f"read by {thread(0)} {at('swap_read')}, then write by {thread(1)} {at('swap_write')}; "
                     r"lanes 0 and 1 of SIMD group 0 with no simdgroup_barrier\(mem_flags::mem_threadgroup\)", msg), msg


def test_simdgroup_barrier_without_memory_flags_orders_nothing(lib):
    msg = race_message(lambda: run(lib, "simd_swap_execution_only"))
    assert "simdgroup race on threadgroup memory 'buf' at byte offset 4: " in msg
    assert re.search(f"write by {thread(1)} {at('swap_write')}, then read by {thread(0)} {at('swap_read')}", msg), msg


def test_threadgroups_accumulating_non_atomically_is_a_device_race(lib):
    msg = race_message(lambda: run(lib, "accumulate_defect", groups=2, group_size=32))
    assert "kernel 'accumulate_defect': device race on buffer(1) 'out' at byte offset 0: " in msg
    # The two threadgroups run on two OS threads: either may come first.
    assert re.search(thread(0, 0) + " " + at("accumulate"), msg) and re.search(thread(0, 1) + " " + at("accumulate"),
                                                                              msg), msg
    assert "threads of different threadgroups are not ordered within a launch" in msg


def test_reading_another_threadgroups_write_is_a_device_race(lib):
    msg = race_message(lambda: run(lib, "neighbour_defect", groups=2, group_size=32))
    assert "kernel 'neighbour_defect': device race on buffer(0) 'data' at byte offset " in msg
    offset = int(re.search(r"at byte offset (\d+)", msg).group(1))
    # Thread 31 reads data[32] (group 1 writes it) or thread 63 reads data[0].
    reader, writer = {128: ((31, 0), (0, 1)), 0: ((31, 1), (0, 0))}[offset]
    assert re.search(thread(*reader) + " " + at("neighbour_read"), msg), msg
    assert re.search(thread(*writer) + " " + at("neighbour_write"), msg), msg


def test_device_memory_needs_a_mem_device_barrier_within_a_threadgroup(lib):
    msg = race_message(lambda: run(lib, "neighbour_wrong_flags", groups=1, group_size=64))
    assert "device race on buffer(0) 'data' at byte offset 4: " in msg
    assert re.search(f"write by {thread(1)} {at('neighbour_write')}, then read by {thread(0)} {at('neighbour_read')}; "
                     r"no threadgroup_barrier\(mem_flags::mem_device\) between them", msg), msg


def test_fixed_kernels_run_clean_and_right(lib):
    with race_check():
        x, out = run(lib, "two_sums_fixed")
        assert out[:2].tolist() == [x[:64].sum().item(), x[64:].sum().item()]
        x, out = run(lib, "shift_fixed")
        assert torch.equal(out[1:64], x[:63]) and out[0] == 0
        x, out = run(lib, "simd_swap_fixed")
        assert torch.equal(out[:64], x[:64].view(32, 2).flip(1).reshape(64))
        x, out = run(lib, "accumulate_fixed", groups=2, group_size=32)
        assert out[0] == x[:64].sum()
        x, out = run(lib, "count_threads")
        assert out[0] == 64
        data, out = run(lib, "neighbour_fixed", groups=1, group_size=64)
        assert torch.equal(out[:64], data[:64].roll(-1))
        # Across threadgroups, a second launch orders the accesses.
        data, out = run(lib, "write_elements", groups=2, group_size=32)
        data, out = data.clone(), torch.zeros(128)
        lib.read_neighbours(data, out, threads=64, group_size=32)
        assert torch.equal(out[:64], data[:64].roll(-1))


def test_race_check_is_off_by_default(lib):
    x, out = run(lib, "shift_defect")  # the emulator's in-order run hides the missing barrier
    assert torch.equal(out[1:64], x[:63])


def test_schedules_change_an_order_dependent_kernel_only(lib):
    x, in_order = run(lib, "shift_defect")
    with schedule("reverse"):
        _, reverse = run(lib, "shift_defect")
        _, reverse_fixed = run(lib, "shift_fixed")
    with schedule("random", seed=3):
        _, random = run(lib, "shift_defect")
        _, random_fixed = run(lib, "shift_fixed")
    with schedule("random", seed=3):
        _, random_again = run(lib, "shift_defect")
    # Threads that read before their neighbour wrote see the poisoned (NaN) memory.
    assert reverse[1:64].isnan().all()
    assert random[1:64].isnan().any() and not random[1:64].isnan().all()
    assert torch.equal(random.nan_to_num(-1), random_again.nan_to_num(-1))
    assert torch.equal(in_order, reverse_fixed) and torch.equal(in_order, random_fixed)
    with pytest.raises(ValueError, match="unknown schedule"):
        with schedule("sideways"):
            pass


# ------------------------------------------------------ shipped shaders

def _inputs(dtype, *shapes, grad=True):
    gen = torch.Generator().manual_seed(len(shapes) * 7 + sum(map(len, shapes)))
    return [torch.randn(*s, generator=gen, dtype=torch.float32).to(dtype).requires_grad_(grad) for s in shapes]


def _rms_norm(dtype):
    import my_mps_ops

    x, w = _inputs(dtype, (3, 37), (37,))
    xl, wl = _inputs(dtype, (2, 4100), (4100,))  # longer than one pass of a threadgroup: the looped kernel
    return [x, w, xl, wl], [my_mps_ops.rms_norm(x, w), my_mps_ops.rms_norm(xl, wl)]


def _fused_add_rms_norm(dtype):
    import my_mps_ops

    x, r, w = _inputs(dtype, (3, 37), (3, 37), (37,))
    return [x, r, w], list(my_mps_ops.fused_add_rms_norm(x, r, w))


def _layer_norm(dtype):
    import my_mps_ops

    x, w, b = _inputs(dtype, (3, 37), (37,), (37,))
    return [x, w, b], [my_mps_ops.layer_norm(x, w, b)]


def _glu(dtype):
    import my_mps_ops

    g, u = _inputs(dtype, (3, 37), (3, 37))
    return [g, u], [my_mps_ops.swiglu(g, u), my_mps_ops.geglu(g, u), my_mps_ops.geglu(g, u, "tanh")]


def _cross_entropy(dtype):
    import my_mps_ops

    (logits,) = _inputs(dtype, (5, 37))
    target = torch.tensor([3, 0, -100, 36, 11])
    return [logits], [my_mps_ops.cross_entropy(logits, target, label_smoothing=0.1)]


def _flash_attention(dtype):
    import my_mps_ops

    q, k, v = _inputs(dtype, (1, 2, 37, 32), (1, 1, 29, 32), (1, 1, 29, 32))  # grouped-query, odd lengths
    return [q, k, v], [my_mps_ops.flash_attention(q, k, v, causal) for causal in (False, True)]


def _rotary(dtype):
    import my_mps_ops

    x, q, k = _inputs(dtype, (1, 7, 2, 16), (1, 7, 4, 16), (1, 7, 2, 16))
    cos, sin = _inputs(dtype, (7, 6), (7, 6), grad=False)  # partial rotary: 12 of 16
    outs = [my_mps_ops.rotary_embedding(x, cos, sin, interleaved) for interleaved in (False, True)]
    return [x, q, k], outs + list(my_mps_ops.rotary_embedding_qk(q, k, cos, sin))


def _quantized_linear(dtype):
    import my_mps_ops

    q, scales, biases = my_mps_ops.quantize(torch.randn(37, 128, generator=torch.Generator().manual_seed(3)), 4, 64)
    x, xl = _inputs(dtype, (3, 128), (20, 128))  # the fused products; the dequantize tiles
    return [x, xl], [my_mps_ops.quantized_linear(t, q, scales, biases) for t in (x, xl)]


SHIPPED = [_rms_norm, _fused_add_rms_norm, _layer_norm, _glu, _cross_entropy, _flash_attention, _rotary,
           _quantized_linear]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("case", SHIPPED, ids=[f.__name__[1:] for f in SHIPPED])
def test_shipped_shaders_run_clean(case, dtype):
    from my_mps_ops.testing import load_embedded_shaders, metal_emulation

    with race_check(), metal_emulation():
        assert all("-race-" in path for path in load_embedded_shaders().values())
        inputs, outputs = case(dtype)
        loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outputs)
        loss.backward()
    for t in outputs + [i.grad for i in inputs]:
        assert t is not None and torch.isfinite(t.float()).all()
