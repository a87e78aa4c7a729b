"""Compiles translated shaders into shared libraries, cached on disk.

The cache key covers the translated source, the emulator's runtime headers,
the compiler's version and the flags, so a stale library is never reused.
The scheduler (metal_runtime.cpp) is compiled once into an object file that
every kernel library links.
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


def _runtime_object(cxx: str) -> str:
    key = hashlib.sha256((_headers_digest() + _compiler_version(cxx) + " ".join(_flags())).encode()).hexdigest()[:20]
    obj = os.path.join(cache_dir(), f"metal_runtime-{key}.o")
    if not os.path.exists(obj):
        fd, tmp = tempfile.mkstemp(suffix=".o", dir=cache_dir())
        os.close(fd)
        _run([cxx, *_flags(), "-c", os.path.join(INCLUDE_DIR, "metal_runtime.cpp"), "-o", tmp],
             "compiling the emulator runtime")
        _publish(tmp, obj)
    return obj


def build(source: str, name: str = "shader", include_dirs=()) -> tuple:
    """Translates and compiles MSL source; returns (library path, Translation)."""
    cxx = compiler()
    try:
        translation = translate(source, name, include_dirs, compiler=cxx)
    except TranslationError as e:
        raise CompileError(f"Metal emulator: cannot translate {name}.metal: {e}") from None
    key = hashlib.sha256((translation.cpp + _headers_digest() + _compiler_version(cxx) +
                          " ".join(_flags())).encode()).hexdigest()[:24]
    lib = os.path.join(cache_dir(), f"{name}-{key}.so")
    if not os.path.exists(lib):
        runtime = _runtime_object(cxx)
        fd, cpp_path = tempfile.mkstemp(suffix=".cpp", prefix=f"{name}-", dir=cache_dir())
        with os.fdopen(fd, "w") as f:
            f.write(translation.cpp)
        tmp_lib = cpp_path[:-4] + ".so.tmp"
        try:
            _run([cxx, *_flags(), "-shared", cpp_path, runtime, "-o", tmp_lib, "-lboost_context"],
                 f"Metal emulator: compiling {name}.metal")
            _publish(tmp_lib, lib)
        finally:
            # Keep the translated source beside the library for debugging.
            os.replace(cpp_path, lib[:-3] + ".cpp")
    return lib, translation
