"""``my_mps_ops.info()`` / ``python -m my_mps_ops``: what this installation is
and what it can run."""

from __future__ import annotations

import ctypes.util
import os
import platform
import shutil
import sys
from typing import Dict


def _emulator_toolchain() -> Dict[str, object]:
    """What the Metal emulator needs at run time: a C++ compiler for the
    kernel libraries, Boost.Context for its fibers, its runtime headers (in the
    package), and clang for the strict MSL front end (optional)."""
    import importlib

    # The modules (my_mps_ops.emulator re-exports a function named build).
    build = importlib.import_module("my_mps_ops.emulator.build")
    strict = importlib.import_module("my_mps_ops.emulator.strict")

    try:
        cxx = shutil.which(build.compiler())
    except build.CompileError:
        cxx = None
    boost = ctypes.util.find_library("boost_context")
    headers = os.path.isfile(os.path.join(build.INCLUDE_DIR, "metal_runtime.h"))
    clang = strict.find_clang()
    return {"c++ compiler": cxx, "boost_context": boost, "runtime headers": build.INCLUDE_DIR if headers else None,
            "clang (strict)": clang, "ready": bool(cxx and boost and headers)}


def info_dict() -> Dict[str, object]:
    import torch

    from . import _C, __version__

    return {
        "my_mps_ops": __version__,
        "location": os.path.dirname(os.path.abspath(__file__)),
        "python": platform.python_version(),
        "platform": f"{sys.platform} {platform.machine()}",
        "torch": torch.__version__,
        "cpu isa": _C.cpu_isa(),
        "mps compiled in": bool(_C.built_with_mps),
        "mps available": bool(torch.backends.mps.is_available()),
        "embedded shaders": sorted(_C.embedded_shaders()),
        "emulator": _emulator_toolchain(),
    }


def info(file=None) -> Dict[str, object]:
    """Prints the version, torch's version, the CPU loops' instruction-set copy
    in use, whether MPS support was compiled in (and an MPS device is there),
    the embedded shader libraries and whether the Metal emulator's toolchain is
    present; returns the same as a dict."""
    d = info_dict()
    out = file or sys.stdout
    width = 20
    for key, value in d.items():
        if key == "emulator":
            print(f"{'metal emulator':<{width}} {'ready' if value['ready'] else 'NOT ready (see below)'}", file=out)
            for k, v in value.items():
                if k != "ready":
                    print(f"  {k:<{width - 2}} {v if v else 'not found'}", file=out)
        elif isinstance(value, list):
            print(f"{key:<{width}} {', '.join(value)}", file=out)
        else:
            print(f"{key:<{width}} {value}", file=out)
    return d
