"""How the extension is built, where it changes what users get."""

import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch

import my_mps_ops


@pytest.mark.skipif(sys.platform != "linux" or not getattr(torch._C, "has_openmp", False),
                    reason="torch here does not use OpenMP (or not Linux)")
@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")
def test_cpu_kernels_are_compiled_with_openmp():
    # at::parallel_for only fans out when the calling file is compiled with
    # OpenMP; without -fopenmp every CPU kernel silently runs on one thread.
    # With it, the extension calls into libgomp (GOMP_parallel).
    symbols = subprocess.run(["nm", "-D", "--undefined-only", my_mps_ops._C.__file__], capture_output=True,
                             text=True, check=True).stdout
    assert "GOMP_parallel" in symbols


def _torch_ships_libomp():
    torch_dir = torch.__path__[0]
    return (getattr(torch._C, "has_openmp", False) and
            os.path.exists(os.path.join(torch_dir, "include", "omp.h")) and
            os.path.exists(os.path.join(torch_dir, "lib", "libomp.dylib")))


@pytest.mark.skipif(sys.platform != "darwin" or not _torch_ships_libomp(),
                    reason="macOS with a torch wheel that ships omp.h and libomp.dylib")
@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm")
def test_cpu_kernels_are_compiled_with_openmp_on_macos():
    # setup.py builds with -Xclang -fopenmp against torch's own libomp there:
    # parallel regions call __kmpc_fork_call (Mach-O adds a leading underscore).
    symbols = subprocess.run(["nm", "-u", my_mps_ops._C.__file__], capture_output=True, text=True,
                             check=True).stdout
    assert "__kmpc_fork_call" in symbols


def _undefined_dynamic_symbols(path):
    """Names an ELF shared object imports (undefined entries of .dynsym)."""
    with open(path, "rb") as f:
        data = f.read()
    wide, order = {1: False, 2: True}[data[4]], {1: "<", 2: ">"}[data[5]]
    header, section, symbol = (("QIHHHHH", "IIQQQQIIQQ", "IBBHQQ") if wide else ("IIHHHHH", "IIIIIIIIII", "IIIBBH"))
    shoff, _, _, _, _, shentsize, shnum = struct.unpack_from(order + header, data, 0x28 if wide else 0x20)
    sections = [struct.unpack_from(order + section, data, shoff + i * shentsize) for i in range(shnum)]
    names = set()
    for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
        if sh_type != 11:  # SHT_DYNSYM
            continue
        strtab = sections[link][4]
        for pos in range(offset, offset + size, entsize):
            fields = struct.unpack_from(order + symbol, data, pos)
            name, shndx = fields[0], fields[3] if wide else fields[5]
            if shndx == 0 and name:  # SHN_UNDEF
                names.add(data[strtab + name:data.index(b"\0", strtab + name)].decode())
    return names


def _is_elf(path):
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


@pytest.mark.skipif(not _is_elf(my_mps_ops._C.__file__), reason="reads ELF shared objects (Linux)")
def test_native_module_holds_no_emulator_code():
    # The Metal emulator (signal handlers for out-of-bounds reports, dlopen of
    # kernel libraries) is the separate my_mps_ops._emulator module, loaded
    # only by my_mps_ops.emulator / my_mps_ops.testing.
    import my_mps_ops._emulator

    emulator_only = {"sigaction", "sigaltstack", "siglongjmp", "dlopen", "dlsym"}
    assert emulator_only <= _undefined_dynamic_symbols(my_mps_ops._emulator.__file__)  # the reader finds them
    assert not emulator_only & _undefined_dynamic_symbols(my_mps_ops._C.__file__)
    with open(my_mps_ops._C.__file__, "rb") as f:
        assert b"mtl_emu_" not in f.read()  # the kernel-library entry points the emulator looks up


def test_ops_name_the_emulator_when_it_is_not_loaded():
    # `import my_mps_ops` alone leaves the emulator out of the process.
    code = """
import sys, torch, my_mps_ops
assert "my_mps_ops._emulator" not in sys.modules
gate, up = torch.randn(4, 8), torch.randn(4, 8)
my_mps_ops._C.set_metal_emulation(True)
try:
    my_mps_ops.swiglu(gate, up)
except RuntimeError as e:
    print(e)
"""
    package_parent = os.path.dirname(os.path.dirname(my_mps_ops.__file__))
    out = subprocess.run([sys.executable, "-c", code], cwd=package_parent, capture_output=True, text=True,
                         check=True).stdout
    assert "Metal kernels on cpu tensors run on the Metal emulator, which is not loaded" in out
