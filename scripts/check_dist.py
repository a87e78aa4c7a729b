#!/usr/bin/env python3
"""Checks what a built wheel and sdist of my_mps_ops hold.

    python scripts/check_dist.py dist/my_mps_ops-*.whl dist/my_mps_ops-*.tar.gz

Wheel: both extension modules, the emulator's runtime headers and sources and
the strict front end's header files (read at run time), the version from
my_mps_ops/_version.py, the torch pin and extras in its metadata; no shader
sources or C++ sources (the shaders are compiled into _C). sdist: everything
setup.py reads to build (csrc/, shaders/, the emulator's host/ and include/),
the metadata files and the tests; no build products."""

import email.parser
import fnmatch
import os
import re
import sys
import tarfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def version():
    with open(os.path.join(ROOT, "my_mps_ops", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def need(names, patterns, what):
    missing = [p for p in patterns if not fnmatch.filter(names, p)]
    if missing:
        sys.exit(f"{what} lacks {missing}")


def forbid(names, patterns, what):
    found = [n for p in patterns for n in fnmatch.filter(names, p)]
    if found:
        sys.exit(f"{what} must not hold {found[:10]}")


def check_wheel(path):
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(z.read(f"{dist_info}/METADATA").decode())
    need(names, ["my_mps_ops/__init__.py", "my_mps_ops/__main__.py", "my_mps_ops/_version.py",
                 "my_mps_ops/_C*.so", "my_mps_ops/_emulator*.so", "my_mps_ops/models/tiny_llama.py",
                 "my_mps_ops/emulator/include/metal_runtime.h", "my_mps_ops/emulator/include/metal_runtime.cpp",
                 "my_mps_ops/emulator/include/metal_race_check.cpp", "my_mps_ops/emulator/strict_include/metal_stdlib",
                 "my_mps_ops/emulator/strict_include/__metal_prelude", "*.dist-info/licenses/LICENSE"], path)
    forbid(names, ["*.metal", "csrc/*", "*/host/*.cpp", "shaders/*", "test/*", "build/*"], path)
    assert meta["Name"] == "my_mps_ops", meta["Name"]
    assert meta["Version"] == version(), (meta["Version"], version())
    requires = meta.get_all("Requires-Dist") or []
    torch_pin = [r for r in requires if r.startswith("torch")]
    assert torch_pin and "<" in torch_pin[0], f"the wheel must pin torch's minor release: {requires}"
    assert {"hf", "bench", "test"} <= set(meta.get_all("Provides-Extra") or []), meta.get_all("Provides-Extra")
    assert meta["License-Expression"] == "BSD-3-Clause" or meta["License"], "no license in the metadata"
    assert meta["Requires-Python"], "no Requires-Python"
    print(f"{os.path.basename(path)}: {len(names)} files, requires {torch_pin[0]}, "
          f"extras {meta.get_all('Provides-Extra')}")


def check_sdist(path):
    with tarfile.open(path) as t:
        top = os.path.commonpath(t.getnames())
        names = [n[len(top) + 1:] for n in t.getnames() if n != top]
    shaders = [os.path.relpath(p, ROOT) for p in sorted(os.listdir(os.path.join(ROOT, "shaders")))]
    need(names, ["setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "PKG-INFO",
                 "csrc/ops/schema.cpp", "csrc/cpu/*_kernels.cpp", "csrc/cpu/*.h", "csrc/metal/*.mm",
                 "csrc/metal/*.h", "csrc/python_bindings.cpp", "shaders/include/*.h",
                 "my_mps_ops/_version.py", "my_mps_ops/emulator/host/*.cpp", "my_mps_ops/emulator/host/*.h",
                 "my_mps_ops/emulator/include/*.h", "my_mps_ops/emulator/strict_include/metal_stdlib",
                 "test/conftest.py", "test/support.py"] + [f"shaders/{s}" for s in shaders if s.endswith(".metal")],
         path)
    forbid(names, ["*.so", "*.o", "build/*", "*__pycache__*", "*.egg-info/SOURCES.txt.bak"], path)
    print(f"{os.path.basename(path)}: {len(names)} files")


def main(paths):
    for path in paths:
        if path.endswith(".whl"):
            check_wheel(path)
        elif path.endswith(".tar.gz"):
            check_sdist(path)
        else:
            sys.exit(f"neither a wheel nor an sdist: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
