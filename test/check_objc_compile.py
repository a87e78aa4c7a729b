"""Syntax-checks the Objective-C++ sources (csrc/mps/*.mm) on Linux.

clang compiles each file in Objective-C++ mode (-fsyntax-only, no ARC, as the
macOS build does) against PyTorch's real headers and test/objc_sdk/: minimal
declarations of exactly the Foundation, Metal and libdispatch API we (and
PyTorch's MPS headers) use, with Apple's signatures. A misspelled selector or
a wrong argument type fails the check. It proves nothing about Metal's
runtime behaviour; the MPS tests on a Mac do that.

Usage: python test/check_objc_compile.py [files...]   (default: csrc/mps/*.mm)
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from typing import List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDK = os.path.join(ROOT, "test", "objc_sdk")

# Warnings that are really errors for us: an unknown selector is only a
# warning in Objective-C (the message would be sent anyway and fail at run time).
ERROR_FLAGS = ["-Werror=objc-method-access", "-Werror=incompatible-pointer-types", "-Werror=int-conversion",
               "-Werror=objc-multiple-method-names", "-Werror=receiver-expr", "-Werror=objc-property-implementation"]


def clang() -> Optional[str]:
    for name in ("clang++", "clang++-16", "clang++-15", "clang++-14"):
        if shutil.which(name):
            return name
    return None


def command(source: str) -> List[str]:
    from torch.utils.cpp_extension import include_paths

    cmd = [clang(), "-x", "objective-c++", "-std=c++17", "-fsyntax-only", "-fblocks", "-fno-objc-arc",
           "-fobjc-runtime=macosx-13.0", "-DMY_MPS_OPS_WITH_MPS=1", "-isystem", SDK, "-I", os.path.join(ROOT, "csrc"),
           "-I", os.path.join(ROOT, "my_mps_ops", "emulator", "include"), "-Wno-nullability-completeness",
           *ERROR_FLAGS]
    for inc in include_paths():
        cmd += ["-isystem", inc]
    cmd += ["-isystem", sysconfig.get_paths()["include"], source]
    return cmd


def check(source: str) -> Tuple[int, str]:
    proc = subprocess.run(command(source), capture_output=True, text=True)
    return proc.returncode, proc.stderr


def check_snippet(code: str) -> Tuple[int, str]:
    with tempfile.NamedTemporaryFile("w", suffix=".mm", delete=False) as f:
        f.write(code)
    try:
        return check(f.name)
    finally:
        os.unlink(f.name)


def main(argv: List[str]) -> int:
    if clang() is None:
        print("clang++ not found (apt-get install clang)", file=sys.stderr)
        return 2
    files = argv or sorted(glob.glob(os.path.join(ROOT, "csrc", "mps", "*.mm")))
    failed = 0
    for f in files:
        code, err = check(f)
        print(f"{'ok  ' if code == 0 else 'FAIL'} {os.path.relpath(f, ROOT)}")
        if code:
            failed += 1
            print(err)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
