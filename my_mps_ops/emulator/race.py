"""The emulator's race check and thread schedules.

The emulator runs the threads of a threadgroup one after another between
barriers, so a kernel that misses a barrier usually still gives the right
answer here and a wrong one, now and then, on a GPU. Two tools show it:

``race_check()`` (or ``MY_MPS_OPS_EMULATOR_RACE_CHECK=1``): kernels run from
libraries built with the race check (unoptimised, every threadgroup- and
device-memory access recorded: roughly 10x slower with barriers, 50x for a
plain elementwise kernel, and 84 bytes of shadow memory per buffer byte the
kernel touches). A run that has two
threads access the same bytes, at least one writing and not both atomically,
with nothing ordering them, raises RuntimeError naming the class, the kernel,
the buffer or threadgroup array, the byte offset, both threads and both
source lines:

- "threadgroup race": threadgroup memory, threads of different SIMD groups,
  no ``threadgroup_barrier(mem_flags::mem_threadgroup)`` between the accesses;
- "simdgroup race": threadgroup memory, two lanes of one SIMD group, no
  ``simdgroup_barrier(mem_flags::mem_threadgroup)`` (nor threadgroup barrier)
  between them. Lanes of a SIMD group run in lockstep on Apple GPUs, but
  Metal orders their memory accesses only through a barrier with that flag;
- "device race": device memory, threads of different threadgroups (nothing
  orders them within a launch), or of one threadgroup with no
  ``threadgroup_barrier(mem_flags::mem_device)`` between them.

A barrier orders only the memory its mem_flags name (``mem_none``: execution
only); SIMD-group functions (``simd_sum``, ``simd_shuffle``, ...) order none.

``schedule("reverse")`` / ``schedule("random", seed)`` (or
``MY_MPS_OPS_EMULATOR_SCHEDULE=reverse`` / ``random:SEED``): the threads of a
threadgroup run in reverse or a seeded random order between synchronisation
points, so that a kernel whose result depends on that order shows it.

Both apply to ``compile_shader`` kernels and to the ops under
``my_mps_ops.testing.metal_emulation()``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

RACE_CHECK_ENV = "MY_MPS_OPS_EMULATOR_RACE_CHECK"
SCHEDULE_ENV = "MY_MPS_OPS_EMULATOR_SCHEDULE"  # read by the scheduler at each launch
SCHEDULES = ("in_order", "reverse", "random")


def race_check_enabled() -> bool:
    return os.environ.get(RACE_CHECK_ENV, "").strip() not in ("", "0")


@contextlib.contextmanager
def _environment(name: str, value: Optional[str]) -> Iterator[None]:
    previous = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _switch_embedded_shaders() -> None:
    # Ops launch the shader libraries registered under their names: inside
    # metal_emulation(), register the variant now in force (metal_emulation()
    # itself does on entry).
    from .. import testing

    if testing.embedded_shaders_in_use():
        testing.load_embedded_shaders()


@contextlib.contextmanager
def race_check(enabled: bool = True) -> Iterator[None]:
    """Within the block, emulated kernels run with the race check (or without it, enabled=False)."""
    try:
        with _environment(RACE_CHECK_ENV, "1" if enabled else "0"):
            _switch_embedded_shaders()
            yield
    finally:
        _switch_embedded_shaders()


@contextlib.contextmanager
def schedule(order: str = "reverse", seed: int = 0) -> Iterator[None]:
    """Within the block, the threads of each threadgroup run in `order` between
    synchronisation points: "in_order" (by thread index, the default), "reverse",
    or "random" (a permutation drawn from `seed`, the threadgroup and the round)."""
    if order not in SCHEDULES:
        raise ValueError(f"unknown schedule {order!r}; expected one of {SCHEDULES}")
    value = {"in_order": None, "reverse": "reverse", "random": f"random:{int(seed)}"}[order]
    with _environment(SCHEDULE_ENV, value):
        yield
