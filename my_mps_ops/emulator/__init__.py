"""The Metal emulator: runs Metal Shading Language kernels on the CPU.

``compile_shader(source)`` mirrors ``torch.mps.compile_shader``: kernels are
attributes of the returned library, called with cpu tensors::

    lib = my_mps_ops.emulator.compile_shader(source)
    lib.add_kernel(x, y, out, threads=out.numel(), group_size=256)

Binding rules are torch.mps.compile_shader's: a Tensor binds a buffer (at its
storage offset), a Python int 8 bytes (int64), a float 4 bytes (float32), a
list/tuple an array of int64 (or float32 if any element is a float);
``arg_casts`` ("fp16", "bf16", "int32", "int16", "int8", "uint8", for all
scalars as a str or per argument index as a dict) narrows scalars. Kernels run
with dispatchThreads semantics (non-uniform grids): only threads inside
``threads`` run.

Every GPU thread is run (fibers when the kernel synchronises), and what a GPU
hides is raised as RuntimeError: out-of-bounds accesses (subscripts of
threadgroup arrays and of pointer parameters checked; a tensor binds only its
view's extent), divergent barriers, SIMD-group functions waited on at two call
sites by lanes of one SIMD group (each runs over its active lanes otherwise;
call sites are told apart by call, not by line), threads that returned before
a barrier, scalars of the wrong width, unbound buffers, threadgroups over 1024
threads or 32 KB. Arguments that do not match their parameters raise
TypeError/ValueError (binding.py). A kernel call takes ``timeout=`` seconds
(default MY_MPS_OPS_EMULATOR_TIMEOUT); Ctrl-C stops a running kernel.

Importing this package also makes the emulator the executor of the ops' Metal
path on cpu tensors (taken inside ``my_mps_ops.testing.metal_emulation()``).
The executor is the extension module ``my_mps_ops._emulator``
(``emulator/host/``); the translator and compiler of kernel libraries are
``translate.py`` and ``build.py``, the runtime they compile against ``include/``.

Data races (missing barriers, unordered device writes) are raised within
``race_check()``; ``schedule()`` changes the order threads run in (race.py).
``profile()`` counts memory traffic, coalescing, bank conflicts, barriers and
SIMD-group calls of every launch inside it (profile.py); ``projection.py``
turns counters into projected times on Apple GPUs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Dict, Optional, Sequence, Union

import torch

from .. import _C, _emulator
from .binding import dims, pack_args
from .build import CompileError, build
from .race import race_check, race_check_enabled, schedule
from .profile import LaunchProfile, Profile, profile, profile_enabled
from .profile import profile as _profile_block

_C._set_cpu_executor(_emulator.executor())

__all__ = ["compile_shader", "ShaderLibrary", "CompileError", "race_check", "schedule", "pipeline_thread_limit",
           "profile", "Profile", "LaunchProfile"]

MAX_THREADS_PER_THREADGROUP = 1024
THREAD_EXECUTION_WIDTH = 32

class ShaderKernel:
    def __init__(self, library: "ShaderLibrary", info: dict):
        self._library = library
        self._info = info
        self.name = info["name"]

    @property
    def max_threads_per_threadgroup(self) -> int:
        return MAX_THREADS_PER_THREADGROUP

    @property
    def thread_execution_width(self) -> int:
        return THREAD_EXECUTION_WIDTH

    @property
    def static_thread_group_memory_length(self) -> int:
        return int(self._info["static_thread_group_memory_length"])

    def __call__(self, *args, threads=None, group_size=None,
                 arg_casts: Optional[Union[str, Dict[int, str]]] = None, timeout: Optional[float] = None,
                 profile: bool = False) -> Optional[LaunchProfile]:
        """Runs the kernel; raises, naming the parameter, on an argument that
        does not match it (binding.py). timeout: seconds after which the run
        stops with an error (default: MY_MPS_OPS_EMULATOR_TIMEOUT, else none).
        profile=True: runs it with the performance counters and returns its
        LaunchProfile (see my_mps_ops.emulator.profile)."""
        if profile:
            with _profile_block() as prof:
                self(*args, threads=threads, group_size=group_size, arg_casts=arg_casts, timeout=timeout)
            return prof.launches[-1]
        bound = pack_args(self.name, self._info["params"], args, arg_casts)
        if threads is None:
            first_tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if first_tensor is None:
                raise ValueError("threads must be given when no tensor argument is passed")
            threads = first_tensor.numel()
        threads = dims(threads, "threads", 0)
        if group_size is None:
            group_size = (max(1, min(threads[0], MAX_THREADS_PER_THREADGROUP)),) + (1,) * (len(threads) - 1)
        group_size = dims(group_size, "group_size", 1)
        if len(group_size) != len(threads):
            raise ValueError(f"threads {threads} and group_size {group_size} must have the same rank")
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        grid = threads + (1,) * (3 - len(threads))
        group = group_size + (1,) * (3 - len(group_size))
        _emulator.launch(self._library._launch_key(), self.name, bound, list(grid), list(group), False,
                         timeout=float(timeout or 0))

    def __repr__(self) -> str:
        return f"<emulated Metal kernel {self.name}>"


class ShaderLibrary:
    """Kernels compiled from one MSL source, as attributes."""

    def __init__(self, source: str, name: Optional[str] = None, include_dirs: Sequence[str] = (),
                 function_constants: Optional[dict] = None):
        digest = hashlib.sha256((source + repr(sorted((str(k), v) for k, v in (function_constants or {}).items())))
                                .encode()).hexdigest()[:16]
        self._key = f"__compile_shader_{name or digest}"
        self._build_args = (source, name or f"shader_{digest}", tuple(include_dirs))
        self._function_constants = dict(function_constants or {})
        self._race_key = None
        self._profile_key = None
        self.path, self.translation = build(*self._build_args, function_constants=self._function_constants)
        _emulator.register_library(self._key, self.path)
        self._kernels = {k["name"]: ShaderKernel(self, k) for k in _emulator.kernels(self._key)}

    def _launch_key(self) -> str:
        """The registered library to launch: its profile build within profile(),
        its race-check build within race_check()."""
        if profile_enabled():
            if self._profile_key is None:
                path, _ = build(*self._build_args, profile=True, function_constants=self._function_constants)
                _emulator.register_library(self._key + "+profile", path)
                self._profile_key = self._key + "+profile"
            return self._profile_key
        if not race_check_enabled():
            return self._key
        if self._race_key is None:
            path, _ = build(*self._build_args, race_check=True, function_constants=self._function_constants)
            _emulator.register_library(self._key + "+race_check", path)
            self._race_key = self._key + "+race_check"
        return self._race_key

    def __getattr__(self, name: str) -> ShaderKernel:
        kernels = self.__dict__.get("_kernels", {})
        if name in kernels:
            return kernels[name]
        raise AttributeError(f"no kernel named {name!r} in this library (it has: {', '.join(sorted(kernels))})")

    def __dir__(self):
        return list(super().__dir__()) + list(self._kernels)


STRICT_ENV = "MY_MPS_OPS_EMULATOR_STRICT"


@contextlib.contextmanager
def pipeline_thread_limit(threads: int):
    """Every emulated pipeline reports (and enforces) ``threads`` as its
    maxTotalThreadsPerThreadgroup inside the block, as a GPU may for a kernel
    with high register use; op code must size its threadgroups from it."""
    previous = _emulator.pipeline_thread_limit()
    _emulator.set_pipeline_thread_limit(int(threads))
    try:
        yield
    finally:
        _emulator.set_pipeline_thread_limit(previous)


def strict_default() -> bool:
    """compile_shader's `strict` when not given: on when MY_MPS_OPS_EMULATOR_STRICT=1 (the test suite sets it)."""
    return os.environ.get(STRICT_ENV, "0") not in ("", "0")


def compile_shader(source: str, include_dirs: Sequence[str] = (), strict: Optional[bool] = None,
                   function_constants: Optional[dict] = None) -> ShaderLibrary:
    """Compiles MSL source for the emulator (cached on disk); mirrors torch.mps.compile_shader.

    function_constants gives the source's `[[function_constant(i)]]` values, by
    name or index ({"use_bias": True, 3: 64}): the kernels are specialised with
    them, as a Metal pipeline is; one not given reads as T() and
    is_function_constant_defined() of it is false.

    strict=True first checks the source the way Apple's Metal compiler would
    (my_mps_ops.emulator.strict: needs clang) and raises MSLStrictError, naming
    the line, for what Apple's compiler rejects and g++ would accept (a member
    named `half`, `double`, a pointer without an address space...). Default:
    off, or MY_MPS_OPS_EMULATOR_STRICT=1."""
    if strict is None:
        strict = strict_default()
    if strict:
        from .strict import check_msl

        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        check_msl(source, f"shader_{digest}.metal", include_dirs)
    return ShaderLibrary(source, include_dirs=include_dirs, function_constants=function_constants)
