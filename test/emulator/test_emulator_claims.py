"""What the emulator says it catches, tried the way a new user would: each
test plants one defect the emulator once let pass (or crashed on) and asserts
a Python error that names it."""

import signal
import threading
import time

import pytest
import torch

from my_mps_ops.emulator import compile_shader

SRC = r"""
#include <metal_stdlib>
using namespace metal;

kernel void two_barriers_one_line(device float* x, uint tid [[thread_position_in_threadgroup]]) {
  if (tid < 16) { threadgroup_barrier(mem_flags::mem_threadgroup); } else { threadgroup_barrier(mem_flags::mem_threadgroup); }
  x[tid] = 1.0;
}

kernel void two_simd_calls_one_line(device float* x, uint lane [[thread_index_in_simdgroup]]) {
  float v = 1.0;
  if (lane < 8) { v = simd_sum(v); } else { v = simd_sum(v); }
  x[lane] = v;
}

kernel void threadgroup_past_end(device float* x, uint tid [[thread_position_in_threadgroup]]) {
  threadgroup float tile[32];
  tile[tid + 8] = 1.0;  // threads 24..31 write past the end
  threadgroup_barrier(mem_flags::mem_threadgroup);
  x[tid] = tile[tid];
}

kernel void threadgroup_2d(device float* x, constant int& row, uint tid [[thread_position_in_threadgroup]]) {
  threadgroup float tile[4][8];
  tile[row][tid % 8] = 2.0;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  x[tid] = tile[row][tid % 8];
}

kernel void write_far_past(device float* out, constant uint& n, uint i [[thread_position_in_grid]]) {
  out[i + n] = 1.0;
}

kernel void write_far_past_through_pointer(device float* out, uint i [[thread_position_in_grid]]) {
  device float* p = out + (1 << 24);  // 64 MB past a 400-byte buffer
  p[i] = 1.0;
}

kernel void copy_shifted(device const float* in, device float* out, constant int& shift,
                         uint i [[thread_position_in_grid]]) {
  out[i] = in[int(i) + shift];
}

kernel void copy_through_pointer(device const float* in, device float* out, constant int& shift,
                                 uint i [[thread_position_in_grid]]) {
  device const float* p = in + shift;
  out[i] = p[i];
}

kernel void fill_uint(device uint* out, constant uint& value, uint i [[thread_position_in_grid]]) {
  out[i] = value;
}

kernel void scale(device const float* x, device float* out, constant float& factor,
                  uint i [[thread_position_in_grid]]) {
  out[i] = x[i] * factor;
}

kernel void spin(device const float* flag, device float* out, uint i [[thread_position_in_grid]]) {
  while (flag[0] == 0.0) {
    out[i] += 1.0;
  }
}

kernel void spin_empty(device const float* flag, uint i [[thread_position_in_grid]]) {
  for (;;) {
    if (flag[0] != 0.0) break;
  }
}

kernel void one_barrier_in_a_loop(device float* x, uint tid [[thread_position_in_threadgroup]]) {
  for (int k = 0; k < 2; ++k) { threadgroup_barrier(mem_flags::mem_threadgroup); }
  x[tid] = 1.0;
}
"""


@pytest.fixture(scope="module")
def lib():
    return compile_shader(SRC)


# --- threadgroup arrays ------------------------------------------------------------------------


def test_threadgroup_array_past_its_end_names_array_index_and_thread(lib):
    with pytest.raises(RuntimeError, match=r"threadgroup_past_end.*threadgroup array 'tile' indexed at 32, outside its "
                                           r"32 elements, at .*\.metal:\d+ by thread_position_in_threadgroup "
                                           r"\(24, 0, 0\) of threadgroup \(0, 0, 0\)"):
        lib.threadgroup_past_end(torch.zeros(32), threads=32, group_size=32)


def test_threadgroup_array_negative_index_and_inner_dimension(lib):
    x = torch.zeros(8)
    lib.threadgroup_2d(x, 3, threads=8, group_size=8, arg_casts={1: "int32"})
    assert torch.equal(x, torch.full((8,), 2.0))
    with pytest.raises(RuntimeError, match=r"threadgroup array 'tile' indexed at -1, outside its 4 elements"):
        lib.threadgroup_2d(x, -1, threads=8, group_size=8, arg_casts={1: "int32"})
    with pytest.raises(RuntimeError, match=r"threadgroup array 'tile' indexed at 4, outside its 4 elements"):
        lib.threadgroup_2d(x, 4, threads=8, group_size=8, arg_casts={1: "int32"})


# --- buffers: far past the end, and outside a view inside its storage ----------------------------


def test_write_far_past_a_buffer_names_buffer_index_and_thread(lib):
    out = torch.zeros(100)
    with pytest.raises(RuntimeError, match=r"write_far_past.*out-of-bounds access to buffer\(0\) 'out' "
                                           r"\(device float\*\): index 1000000 reaches byte offset 4000000, outside "
                                           r"the 400 bytes bound .* by thread_position_in_grid \(0, 0, 0\)"):
        lib.write_far_past(out, 1000000, threads=1, group_size=1, arg_casts={1: "int32"})


def test_write_far_past_through_a_pointer_faults_in_the_guard(lib):
    with pytest.raises(RuntimeError, match=r"out-of-bounds write at byte offset 67108864 of a 400-byte buffer bound "
                                           r"at buffer\(0\) 'out' by thread_position_in_grid \(0, 0, 0\)"):
        lib.write_far_past_through_pointer(torch.zeros(100), threads=1, group_size=1)


@pytest.mark.parametrize("shift, index", [(-1, -1), (10, 10)])
def test_access_outside_a_view_inside_its_storage(lib, shift, index):
    big = torch.arange(30, dtype=torch.float32)
    view = big[10:20]  # a slice: its storage holds elements on both sides
    out = torch.zeros(10)
    with pytest.raises(RuntimeError, match=rf"out-of-bounds access to buffer\(0\) 'in' \(device const float\*\): "
                                           rf"index {index} reaches byte offset {4 * index}, outside the 40 bytes bound"):
        lib.copy_shifted(view, out, shift, threads=1, group_size=1, arg_casts={2: "int32"})
    lib.copy_shifted(view, out, 0, threads=10, group_size=10, arg_casts={2: "int32"})
    assert torch.equal(out, view)


def test_access_outside_a_view_through_a_pointer(lib):
    view = torch.arange(30, dtype=torch.float32)[10:20]
    # Through a derived pointer only the copy's guard pages see it: past the
    # 16-byte alignment padding (element 12).
    with pytest.raises(RuntimeError, match=r"out-of-bounds read at byte offset 48 of a 40-byte buffer bound at "
                                           r"buffer\(0\) 'in'"):
        lib.copy_through_pointer(view, torch.zeros(1), 12, threads=1, group_size=1, arg_casts={2: "int32"})


# --- call sites are told apart by call, not by line ---------------------------------------------


def test_two_barriers_on_one_line_are_different_sites(lib):
    with pytest.raises(RuntimeError, match=r"barriers reached at different call sites .*\.metal:6 and .*\.metal:6 "
                                           r"\(two different calls on that line\)"):
        lib.two_barriers_one_line(torch.zeros(64), threads=64, group_size=64)


def test_two_simd_calls_on_one_line_are_different_sites(lib):
    with pytest.raises(RuntimeError, match=r"SIMD-group functions reached at different call sites.*\.metal:12 and "
                                           r".*\.metal:12 \(two different calls on that line\)"):
        lib.two_simd_calls_one_line(torch.zeros(32), threads=32, group_size=32)


def test_one_call_reached_repeatedly_is_one_site(lib):
    x = torch.zeros(64)
    lib.one_barrier_in_a_loop(x, threads=64, group_size=64)
    assert torch.equal(x, torch.ones(64))


# --- arguments are checked against the parameters they bind -------------------------------------


def test_tensor_of_another_element_type(lib):
    with pytest.raises(TypeError, match=r"argument 0 \('out', device uint\*\): a torch.int64 tensor bound to uint"):
        lib.fill_uint(torch.zeros(4, dtype=torch.int64), 1, threads=4, arg_casts={1: "int32"})
    with pytest.raises(TypeError, match=r"argument 0 \('x', device const float\*\): a torch.float16 tensor bound "
                                        r"to float"):
        lib.scale(torch.zeros(4, dtype=torch.float16), torch.zeros(4), 2.0, threads=4)
    out = torch.zeros(4, dtype=torch.int32)  # int32 for uint: torch's unsigned types have few operations
    lib.fill_uint(out, 7, threads=4, arg_casts={1: "int32"})
    assert out.tolist() == [7] * 4


def test_non_contiguous_tensor(lib):
    x = torch.arange(8, dtype=torch.float32)[::2]
    with pytest.raises(ValueError, match=r"argument 0 \('x', device const float\*\): the tensor is not contiguous"):
        lib.scale(x, torch.zeros(4), 2.0, threads=4)


def test_float_for_an_integer_parameter_and_int_for_a_float_one(lib):
    with pytest.raises(TypeError, match=r"argument 1 \('value', constant uint&\): the parameter is an integer"):
        lib.fill_uint(torch.zeros(4, dtype=torch.int32), 1.5, threads=4)
    with pytest.raises(TypeError, match=r"argument 2 \('factor', constant float&\): the parameter is float; got a "
                                        r"Python int"):
        lib.scale(torch.zeros(4), torch.zeros(4), 2, threads=4)


def test_extra_arguments(lib):
    with pytest.raises(TypeError, match=r"kernel scale takes 3 buffer argument\(s\) \(x, out, factor\); got 4"):
        lib.scale(torch.zeros(4), torch.zeros(4), 2.0, torch.zeros(4), threads=4)


@pytest.mark.parametrize("casts, message", [
    ({0: "int32"}, r"arg_casts key 0 names no scalar argument \(the scalar arguments are at \[1\]\)"),
    ({5: "int32"}, r"arg_casts key 5 names no scalar argument"),
    ({1: "int64"}, r"unknown arg_cast 'int64' for argument 1"),
])
def test_arg_casts_that_name_no_scalar(lib, casts, message):
    with pytest.raises(ValueError, match=message):
        lib.fill_uint(torch.zeros(4, dtype=torch.int32), 1, threads=4, arg_casts=casts)


@pytest.mark.parametrize("value", [-1, 2**40])
def test_out_of_range_scalar_for_a_uint(lib, value):
    with pytest.raises(ValueError, match=rf"argument 1 \('value', constant uint&\): {value} is out of range for uint "
                                         r"\(0 to 4294967295\)"):
        lib.fill_uint(torch.zeros(4, dtype=torch.int32), value, threads=4, arg_casts={1: "int32"})
    out = torch.zeros(1, dtype=torch.int32)
    lib.fill_uint(out, 2**32 - 1, threads=1, arg_casts={1: "int32"})  # the full uint range binds
    assert out.item() == -1


def test_out_of_range_half_and_int64(lib):
    with pytest.raises(ValueError, match=r"argument 2 \('factor', constant float&\): 1000000.0 is out of range for half"):
        lib.scale(torch.zeros(4), torch.zeros(4), 1e6, threads=4, arg_casts={2: "fp16"})
    with pytest.raises(ValueError, match=r"argument 1 \('value', constant uint&\): 1180591620717411303424 is out of "
                                         r"range for int64"):
        lib.fill_uint(torch.zeros(4, dtype=torch.int32), 2**70, threads=4)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(threads=-1), ValueError, r"threads must be non-negative and below 2\*\*32 in every dimension, got -1"),
    (dict(threads=4, group_size=0), ValueError, r"group_size must be positive"),
    (dict(threads=(4, -2), group_size=(4, 1)), ValueError, r"threads must be non-negative"),
    (dict(threads=2**40), ValueError, r"threads must be non-negative and below 2\*\*32"),
    (dict(threads=4.0), TypeError, r"threads must be an int or a sequence of 1 to 3 ints, got 4.0"),
])
def test_bad_grid_sizes(lib, kwargs, error, message):
    with pytest.raises(error, match=message):
        lib.fill_uint(torch.zeros(4, dtype=torch.int32), 1, arg_casts={1: "int32"}, **kwargs)


# --- a kernel that never ends can be stopped ----------------------------------------------------


def test_timeout_stops_a_kernel_that_never_ends(lib):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"kernel 'spin' ran longer than its 0.3 s timeout .* timed out in the loop "
                                           r"at .*\.metal:\d+, running thread_position_in_grid"):
        lib.spin(torch.zeros(1), torch.zeros(64), threads=64, group_size=32, timeout=0.3)
    assert time.monotonic() - start < 5
    out = torch.zeros(64)
    lib.spin(torch.ones(1), out, threads=64, group_size=32, timeout=5)  # the library still runs
    assert torch.equal(out, torch.zeros(64))


def test_timeout_from_the_environment(lib, monkeypatch):
    monkeypatch.setenv("MY_MPS_OPS_EMULATOR_TIMEOUT", "0.2")
    with pytest.raises(RuntimeError, match=r"kernel 'spin_empty' ran longer than its 0.2 s timeout"):
        lib.spin_empty(torch.zeros(1), threads=1, group_size=1)


def test_ctrl_c_stops_a_kernel_that_never_ends(lib):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGINT goes to the main thread")
    main = threading.get_ident()
    timer = threading.Timer(0.3, lambda: signal.pthread_kill(main, signal.SIGINT))
    start = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            lib.spin(torch.zeros(1), torch.zeros(64), threads=64, group_size=32)
    finally:
        timer.cancel()
    assert time.monotonic() - start < 5


# --- metal_emulation() is per thread, re-entrant, and followed by backward ----------------------


def _rms_norm_runs(x, w):
    """Emulator launches this thread ran for one rms_norm."""
    import my_mps_ops
    from my_mps_ops import _emulator

    before = _emulator.runs_on_this_thread()
    my_mps_ops.rms_norm(x, w, 1e-6)
    return _emulator.runs_on_this_thread() - before


def test_metal_emulation_is_per_thread():
    from my_mps_ops.testing import metal_emulation

    x, w = torch.randn(4, 64), torch.randn(64)
    both_inside = threading.Barrier(2, timeout=30)
    results, errors = {}, []

    def run(name, emulate):
        try:
            with metal_emulation(emulate):
                both_inside.wait()
                results[name] = sum(_rms_norm_runs(x, w) for _ in range(3))
                both_inside.wait()
        except Exception as e:  # noqa: BLE001  reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=("emulated", True)),
               threading.Thread(target=run, args=("native", False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert results["emulated"] >= 3 and results["native"] == 0


def test_metal_emulation_nests_and_restores_on_exceptions():
    from my_mps_ops import _C
    from my_mps_ops.testing import metal_emulation

    x, w = torch.randn(4, 64), torch.randn(64)
    assert not _C.metal_emulation_enabled()
    with metal_emulation():
        with metal_emulation(False):
            assert _rms_norm_runs(x, w) == 0
            with metal_emulation():
                assert _rms_norm_runs(x, w) > 0
            assert not _C.metal_emulation_enabled()
        assert _C.metal_emulation_enabled()
        with pytest.raises(ZeroDivisionError):
            with metal_emulation(False):
                1 / 0
        assert _C.metal_emulation_enabled()
    assert not _C.metal_emulation_enabled()


def test_backward_follows_its_forward_across_threads():
    import my_mps_ops
    from my_mps_ops import _emulator
    from my_mps_ops.testing import metal_emulation

    w = torch.randn(64)
    x = torch.randn(4, 64, requires_grad=True)
    outputs = {}

    def forward_emulated():
        with metal_emulation():
            outputs["y"] = my_mps_ops.rms_norm(x, w, 1e-6)

    t = threading.Thread(target=forward_emulated)
    t.start()
    t.join(60)
    before = _emulator.runs_on_this_thread()
    outputs["y"].sum().backward()  # here, outside metal_emulation(): still the Metal path
    assert _emulator.runs_on_this_thread() > before

    x.grad = None
    y = my_mps_ops.rms_norm(x, w, 1e-6)  # forward native
    with metal_emulation():
        before = _emulator.runs_on_this_thread()
        y.sum().backward()
        assert _emulator.runs_on_this_thread() == before  # its backward native too
