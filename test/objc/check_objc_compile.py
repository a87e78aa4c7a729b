#!/usr/bin/env python3
"""Syntax-check the Objective-C++ sources (csrc/**/*.mm) on Linux.

No Apple SDK exists here, so clang compiles each file with -fsyntax-only
against PyTorch's real headers and the declaration subset of Foundation,
libdispatch, Metal, MetalPerformanceShaders(Graph) in test/objc/objc_sdk/
(Apple's exact signatures, only what the code uses).

In Objective-C, messaging an unknown selector or passing an object of the
wrong protocol is only a warning by default; -Werror makes every such
diagnostic fail the check. Usage:

    python test/objc/check_objc_compile.py [--sdk 14|15] [file.mm ...]   # default: csrc/**/*.mm, both SDKs

Exit status 0 when every file compiles; clang's diagnostics are printed
otherwise. CLANGXX=/path/to/clang++ picks the compiler.
"""

import argparse
import glob
import re
import os
import shutil
import subprocess
import sys
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SDK_DIR = os.path.join(HERE, "objc_sdk")
CLANG_CANDIDATES = ["clang++", "clang++-19", "clang++-18", "clang++-17", "clang++-16", "clang++-15", "clang++-14"]

# Objective-C++ as the macOS build compiles it (setup.py: no ARC), with
# Apple's runtime semantics and blocks (both implicit on Darwin).
# -Xclang -fopenmp: setup.py builds every source, the .mm included, in OpenMP
# mode on macOS when the torch wheel ships libomp.
OBJC_FLAGS = ["-x", "objective-c++", "-fsyntax-only", "-fno-objc-arc", "-fblocks", "-fobjc-runtime=macosx",
              "-Xclang", "-fopenmp"]
# Every warning is an error: "instance method not found" (-Wobjc-method-access)
# and "sending 'id<A>' to parameter of incompatible type 'id<B>'" are warnings
# in Objective-C.
WARNING_FLAGS = ["-Wall", "-Wextra", "-Werror", "-Werror=objc-method-access", "-Werror=incompatible-pointer-types"]


def find_clang():
    """The clang++ to use, or None when none is installed."""
    explicit = os.environ.get("CLANGXX")
    if explicit:
        return shutil.which(explicit) or (explicit if os.path.exists(explicit) else None)
    for name in CLANG_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def torch_include_paths(torch_include=None):
    """The installed torch's include dirs, or those under another torch's
    include/ directory (to check against a different release's headers)."""
    if torch_include:
        return [torch_include, os.path.join(torch_include, "torch", "csrc", "api", "include")]
    from torch.utils.cpp_extension import include_paths

    return include_paths()


def torch_version(torch_include=None):
    """(major, minor) of the torch whose headers are used."""
    for include in torch_include_paths(torch_include)[:1]:
        for rel in ("torch/headeronly/version.h", "torch/csrc/api/include/torch/version.h"):
            path = os.path.join(include, rel)
            if os.path.exists(path):
                text = open(path).read()
                major = re.search(r"#define TORCH_VERSION_MAJOR (\d+)", text)
                minor = re.search(r"#define TORCH_VERSION_MINOR (\d+)", text)
                if major and minor:
                    return int(major.group(1)), int(minor.group(1))
    raise RuntimeError(f"cannot find torch's version.h under {torch_include_paths(torch_include)[0]}")


def default_std(torch_include=None):
    # torch 2.14's headers need C++20 (operator<=>, concepts); older ones
    # build with the c++17 setup.py passes.
    return "c++20" if torch_version(torch_include) >= (2, 14) else "c++17"


def include_flags(torch_include=None):
    flags = ["-isystem", SDK_DIR]
    for path in torch_include_paths(torch_include):
        flags += ["-isystem", path]
    flags += ["-isystem", sysconfig.get_paths()["include"]]
    flags += ["-I", os.path.join(ROOT, "csrc")]
    return flags


# The macOS SDK generations the .mm files must compile against: the oldest
# supported (14: Metal Shading Language 3.1, bfloat) and the newest modelled.
# The declarations in test/objc_sdk/ leave out what a generation lacks.
SDK_GENERATIONS = (14, 15)
NEWEST_SDK = max(SDK_GENERATIONS)


def command(clang, source, std=None, torch_include=None, sdk=NEWEST_SDK):
    std = std or default_std(torch_include)
    return [clang, *OBJC_FLAGS, f"-std={std}", *WARNING_FLAGS, *include_flags(torch_include), "-DMY_MPS_OPS_WITH_MPS=1",
            f"-DSDK_SUBSET_MACOS={sdk}", source]


def check_file(source, clang=None, std=None, torch_include=None, sdk=NEWEST_SDK):
    """Runs clang on one file against the declarations of macOS SDK generation
    `sdk`; returns the CompletedProcess (stderr has the diagnostics)."""
    clang = clang or find_clang()
    if clang is None:
        raise RuntimeError("no clang++ found (apt-get install clang); set CLANGXX to choose one")
    if sdk not in SDK_GENERATIONS:
        raise ValueError(f"sdk must be one of {SDK_GENERATIONS}, got {sdk!r}")
    return subprocess.run(command(clang, source, std, torch_include, sdk), capture_output=True, text=True)


def default_sources():
    return sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.mm"), recursive=True))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="*", help="Objective-C++ files (default: csrc/**/*.mm)")
    parser.add_argument("--std", help="C++ standard (default: c++17, c++20 for torch >= 2.14)")
    parser.add_argument("--torch-include", help="another torch's include/ directory (default: the installed torch)")
    parser.add_argument("--sdk", type=int, choices=SDK_GENERATIONS, action="append",
                        help="macOS SDK generation to check against (repeatable; default: all)")
    parser.add_argument("--print-command", action="store_true", help="print each clang command line")
    args = parser.parse_args(argv)

    clang = find_clang()
    if clang is None:
        print("check_objc_compile: no clang++ found (apt-get install clang)", file=sys.stderr)
        return 2
    sources = args.sources or default_sources()
    if not sources:
        print("check_objc_compile: no .mm files to check", file=sys.stderr)
        return 2
    sdks = args.sdk or list(SDK_GENERATIONS)
    failed = 0
    for source in sources:
        rel = os.path.relpath(source, ROOT)
        for sdk in sdks:
            if args.print_command:
                print(" ".join(command(clang, source, args.std, args.torch_include, sdk)))
            result = check_file(source, clang, args.std, args.torch_include, sdk)
            if result.returncode == 0:
                print(f"ok    {rel} (macOS {sdk} SDK)")
            else:
                failed += 1
                print(f"FAIL  {rel} (macOS {sdk} SDK)")
                sys.stderr.write(result.stderr)
    checks = len(sources) * len(sdks)
    print(f"{checks - failed}/{checks} Objective-C++ file x SDK checks pass the syntax check ({os.path.basename(clang)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
