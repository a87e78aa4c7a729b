"""Compiles translated shaders into shared libraries, cached on disk.

The cache key covers the translated source, the emulator's runtime headers,
the compiler's version and the flags, so a stale library is never reused.
The scheduler (metal_runtime.cpp) is compiled once into an object file that
every kernel library links.

A race-check library (race_check=True) is the same shader compiled without
optimisation, with debug lines, frame pointers and the compiler's
thread-sanitizer instrumentation, linked with the scheduler built for it and
the race check (metal_race_check.cpp) that receives the instrumentation's
calls; no sanitizer runtime is linked. Unoptimised code compiles several
times faster than -O2, and the check is about correctness, not speed.

A profile library (profile=True, my_mps_ops.emulator.profile()) is built the
same way with MTL_EMU_PROFILE, linked with the performance counters
(metal_profile.cpp) in place of the race check: they receive the same calls
and count device and threadgroup memory traffic, coalescing and bank
conflicts, barriers and SIMD-group calls (profile.py reads them).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import List, Optional

from .translate import Translation, TranslationError, translate

INCLUDE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "include")


class CompileError(RuntimeError):
    pass


def cache_dir() -> str:
    root = os.environ.get("MY_MPS_OPS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "my_mps_ops")
    path = os.path.join(root, "emulator")
    os.makedirs(path, exist_ok=True)
    return path


def compiler() -> str:
    cxx = os.environ.get("MY_MPS_OPS_EMULATOR_CXX") or os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        raise CompileError(f"the Metal emulator needs a C++ compiler; {cxx!r} was not found (set CXX)")
    return cxx


@functools.lru_cache(maxsize=None)
def _compiler_version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> tuple:
    # F16C turns half<->float conversions into single instructions (a libgcc
    # call each without it). Only when this CPU has it: the cache is per machine.
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return ()
    flags = []
    if " f16c" in info:
        flags.append("-mf16c")
    if " fma" in info:
        flags.append("-mfma")
    if " avx2" in info:
        flags.append("-mavx2")
    return tuple(flags)


def _flags() -> List[str]:
    return ["-std=c++17", "-O2", "-fPIC", "-fno-strict-aliasing", "-fvisibility=hidden", "-w",
            *_cpu_flags(), "-I", INCLUDE_DIR]


def _race_runtime_flags() -> List[str]:
    # Frame pointers and no tail calls: the race check walks the frames from
    # its hooks to the shader's code.
    return [*_flags(), "-DMTL_EMU_RACE_CHECK=1", "-fno-omit-frame-pointer", "-fno-optimize-sibling-calls"]


def _profile_runtime_flags() -> List[str]:
    return [*_race_runtime_flags(), "-DMTL_EMU_PROFILE=1"]


def _race_kernel_flags(cxx: str) -> List[str]:
    flags = [f for f in _flags() if f != "-O2"]
    flags += ["-O0", "-g", "-DMTL_EMU_RACE_CHECK=1", "-fno-omit-frame-pointer", "-fsanitize=thread"]
    if "clang" not in _compiler_version(cxx):
        flags.append("--param=tsan-instrument-func-entry-exit=0")  # GCC: no calls on function entry and exit
    return flags


def _headers_digest() -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(INCLUDE_DIR)):
        with open(os.path.join(INCLUDE_DIR, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()


def _run(cmd: List[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompileError(f"{what} failed:\n{proc.stderr[-8000:]}")


def _publish(tmp_path: str, final_path: str) -> None:
    os.replace(tmp_path, final_path)  # atomic: concurrent builders never see half a file


def _object(cxx: str, source: str, flags: List[str]) -> str:
    stem = os.path.splitext(source)[0]
    key = hashlib.sha256((_headers_digest() + _compiler_version(cxx) + " ".join(flags)).encode()).hexdigest()[:20]
    obj = os.path.join(cache_dir(), f"{stem}-{key}.o")
    if not os.path.exists(obj):
        fd, tmp = tempfile.mkstemp(suffix=".o", dir=cache_dir())
        os.close(fd)
        _run([cxx, *flags, "-c", os.path.join(INCLUDE_DIR, source), "-o", tmp], f"compiling the emulator's {source}")
        _publish(tmp, obj)
    return obj


def _runtime_objects(cxx: str, race_check: bool, profile: bool = False) -> List[str]:
    if profile:
        return [_object(cxx, source, _profile_runtime_flags()) for source in ("metal_runtime.cpp", "metal_profile.cpp")]
    if not race_check:
        return [_object(cxx, "metal_runtime.cpp", _flags())]
    return [_object(cxx, source, _race_runtime_flags()) for source in ("metal_runtime.cpp", "metal_race_check.cpp")]


def build(source: str, name: str = "shader", include_dirs=(), race_check: bool = False,
          function_constants: Optional[dict] = None, profile: bool = False) -> tuple:
    """Translates and compiles MSL source; returns (library path, Translation).
    race_check: the library checks every run for data races (slower).
    profile: the library counts memory traffic and the like instead (slower;
    takes precedence over race_check).
    function_constants: values of the source's [[function_constant]]s, by name or index."""
    cxx = compiler()
    try:
        translation = translate(source, name, include_dirs, compiler=cxx, function_constants=function_constants)
    except TranslationError as e:
        raise CompileError(f"Metal emulator: cannot translate {name}.metal: {e}") from None
    if profile:
        race_check = False
        flags = _race_kernel_flags(cxx) + ["-DMTL_EMU_PROFILE=1"]
    else:
        flags = _race_kernel_flags(cxx) if race_check else _flags()
    instrumented = race_check or profile
    suffix = "-profile" if profile else "-race" if race_check else ""
    key = hashlib.sha256((translation.cpp + _headers_digest() + _compiler_version(cxx) +
                          " ".join(flags)).encode()).hexdigest()[:24]
    lib = os.path.join(cache_dir(), f"{name}{suffix}-{key}.so")
    if not os.path.exists(lib):
        runtime = _runtime_objects(cxx, race_check, profile)
        fd, cpp_path = tempfile.mkstemp(suffix=".cpp", prefix=f"{name}-", dir=cache_dir())
        with os.fdopen(fd, "w") as f:
            f.write(translation.cpp)
        tmp_lib = cpp_path[:-4] + ".so.tmp"
        try:
            if instrumented:
                # Linked without -fsanitize: the race check, not a sanitizer runtime, takes the calls.
                obj = cpp_path[:-4] + ".o"
                _run([cxx, *flags, "-c", cpp_path, "-o", obj], f"Metal emulator: compiling {name}.metal")
                try:
                    _run([cxx, *[f for f in flags if f != "-fsanitize=thread"], "-shared", obj, *runtime,
                          "-o", tmp_lib, "-lboost_context"], f"Metal emulator: linking {name}.metal")
                finally:
                    os.remove(obj)
            else:
                _run([cxx, *flags, "-shared", cpp_path, *runtime, "-o", tmp_lib, "-lboost_context"],
                     f"Metal emulator: compiling {name}.metal")
            _publish(tmp_lib, lib)
        finally:
            # Keep the translated source beside the library for debugging.
            os.replace(cpp_path, lib[:-3] + ".cpp")
    return lib, translation
