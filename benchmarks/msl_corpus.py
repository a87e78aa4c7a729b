"""The Metal emulator on code nobody here wrote: how many of a library's .metal
files it compiles unmodified, why the others fail, and whether a few simple
kernels it runs match a torch reference.

    python benchmarks/msl_corpus.py --mlx MLX_ROOT --torch TORCH_KERNELS_DIR [TORCH_KERNELS_DIR ...]
        [--torch-include DIR ...] [--mode syntax|build] [--strict] [--no-run] [-v]

--mlx: an MLX source tree (its mlx/backend/metal/kernels/ is the corpus; the tree's root is
on the include path, as MLX includes "mlx/backend/metal/kernels/..."); Metal-4 *_nax files are
listed apart (the emulator has no Metal 4 tensor operations), as are files whose kernels are all
under `#if __METAL_VERSION__ >= 400`. --torch: directories of PyTorch kernels
(aten/src/ATen/native/mps/kernels/*.metal, with the .h files they include beside them); the
tree's aten/src (for <ATen/native/mps/kernels/X.h>) and then the installed torch's include/ (its
c10/metal headers) are on the include path, the latter unless --torch-include is given.

--mode syntax (default) translates each file and has g++ check it, every kernel template
instantiated, without generating code (seconds per file; MLX files instantiate up to thousands
of kernels); --mode build compiles and links the kernel library as compile_shader does (minutes
for the largest files). --strict also runs the strict front end (Apple's rules) on each file.
The runs build only the files they need.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _torch_include() -> str:
    import torch

    return os.path.join(os.path.dirname(torch.__file__), "include")


def _cause(message: str) -> str:
    """The first error line with its specifics removed, to group files by cause."""
    message = re.sub(r"^.*?error: ", "", message)
    message = re.sub(r"‘[^’]*’|'[^']*'|\"[^\"]*\"", "'...'", message)
    message = re.sub(r"\d+", "N", message)
    return message.strip()[:140]


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if "error" in line or "cannot translate" in line:
            return line.strip()
    return text.strip().splitlines()[0] if text.strip() else "?"


def compile_file(path: str, include_dirs, mode: str):
    """(ok, kernels, first error line)."""
    import importlib

    from my_mps_ops.emulator.translate import TranslationError, translate

    B = importlib.import_module("my_mps_ops.emulator.build")  # the module (the package exports build())

    name = os.path.splitext(os.path.basename(path))[0]
    with open(path) as f:
        source = f.read()
    dirs = [os.path.dirname(os.path.abspath(path)), *include_dirs]
    if mode == "build":
        try:
            _, tr = B.build(source, name, dirs)
            return True, len(tr.kernels), ""
        except B.CompileError as e:
            return False, 0, _first_error(str(e).split("\n", 1)[-1])
    try:
        tr = translate(source, name, dirs, compiler=B.compiler())
    except TranslationError as e:
        return False, 0, "cannot translate: " + str(e).splitlines()[0]
    with tempfile.NamedTemporaryFile("w", suffix=".cpp", delete=False) as f:
        f.write(tr.cpp)
    try:
        flags = [x for x in B._flags() if x != "-O2"]
        proc = subprocess.run([B.compiler(), *flags, "-fsyntax-only", f.name], capture_output=True, text=True)
    finally:
        os.remove(f.name)
    if proc.returncode == 0:
        return True, len(tr.kernels), ""
    return False, 0, _first_error(proc.stderr)


def _metal4_only(path: str) -> bool:
    with open(path) as f:
        return re.search(r"__METAL_VERSION__\s*>=\s*4\d\d", f.read()) is not None


def strict_file(path: str, include_dirs):
    from my_mps_ops.emulator.strict import MSLStrictError, check_msl

    with open(path) as f:
        source = f.read()
    try:
        check_msl(source, os.path.basename(path), [os.path.dirname(os.path.abspath(path)), *include_dirs])
        return True, ""
    except MSLStrictError as e:
        first = e.errors[0] if e.errors else None
        return False, str(first.message if first else e).splitlines()[0]


def report_corpus(title: str, files, include_dirs, mode: str, strict: bool, verbose: bool, excepted=()):
    ok, causes, strict_ok, strict_causes = 0, collections.defaultdict(list), 0, collections.defaultdict(list)
    start = time.perf_counter()
    metal4 = []
    for path in files:
        good, n, err = compile_file(path, include_dirs, mode)
        rel = os.path.basename(path)
        if not good and err.endswith("defines no kernel") and _metal4_only(path):
            metal4.append(path)  # (its kernels are all under `#if __METAL_VERSION__ >= 400`)
            if verbose:
                print(f"  {rel}: excepted, Metal 4 only (no kernel at Metal 3.2)", flush=True)
            continue
        if good:
            ok += 1
        else:
            causes[_cause(err)].append(rel)
        if verbose:
            print(f"  {rel}: {'ok, ' + str(n) + ' kernels' if good else err}", flush=True)
        if strict:
            s_ok, s_err = strict_file(path, include_dirs)
            strict_ok += s_ok
            if not s_ok:
                strict_causes[_cause(s_err)].append(rel)
    excepted = [*excepted, *metal4]
    counted = len(files) - len(metal4)
    print(f"{title}: {ok}/{counted} files compile in the emulator ({mode} mode, {time.perf_counter() - start:.0f} s)"
          + (f"; excepted (Metal 4): {', '.join(os.path.basename(e) for e in excepted)}" if excepted else ""))
    for cause, names in sorted(causes.items(), key=lambda kv: -len(kv[1])):
        print(f"  {len(names):3d}  {cause}\n         {' '.join(names)}")
    if strict:
        print(f"{title}: {strict_ok}/{counted} files accepted by the strict front end")
        for cause, names in sorted(strict_causes.items(), key=lambda kv: -len(kv[1])):
            print(f"  {len(names):3d}  {cause}\n         {' '.join(names)}")
    return ok


# ------------------------------------------------------------------ runs

ODD_SIZES = (1, 7, 1023, 4099)


def _check(label: str, got, want, atol=1e-6, rtol=1e-5) -> bool:
    import torch

    good = torch.allclose(got.double(), want.double(), atol=atol, rtol=rtol, equal_nan=True)
    print(f"  {'ok  ' if good else 'FAIL'} {label}" +
          ("" if good else f" (max abs error {(got.double() - want.double()).abs().max().item():.3g})"))
    return good


def run_mlx(root: str) -> tuple:
    """MLX's unary and binary elementwise kernels (contiguous, scalar-broadcast and 2-D strided
    forms) against torch, on odd sizes."""
    import torch
    from my_mps_ops.emulator import compile_shader

    kdir = os.path.join(root, "mlx", "backend", "metal", "kernels")
    passed = total = 0
    g = torch.Generator().manual_seed(0)

    def load(name):
        with open(os.path.join(kdir, name)) as f:
            return compile_shader(f.read(), include_dirs=[kdir, root], strict=False)

    unary = load("unary.metal")
    for kname, fn, dtype, lo, hi in [("v_Expfloat32float32", torch.exp, torch.float32, -5, 5),
                                     ("v_Sinfloat32float32", torch.sin, torch.float32, -9, 9),
                                     ("v_Log1pfloat32float32", torch.log1p, torch.float32, -0.9, 9),
                                     ("vn_Absfloat32float32", torch.abs, torch.float32, -9, 9),
                                     ("v_Negativeint32int32", torch.neg, torch.int32, -99, 99),
                                     ("v_Tanhfloat16float16", torch.tanh, torch.float16, -4, 4)]:
        for n in ODD_SIZES:
            x = (torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)
            out = torch.empty_like(x)
            per_thread = 8 // x.element_size() if kname.startswith("vn_") else 1
            getattr(unary, kname)(x, out, n, threads=(n + per_thread - 1) // per_thread, arg_casts={2: "int32"})
            tol = dict(atol=1e-3, rtol=1e-3) if dtype == torch.float16 else {}
            total += 1
            passed += _check(f"MLX {kname} n={n}", out, fn(x.double()).to(dtype), **tol)

    binary = load("binary.metal")
    for kname, fn, dtype in [("vv_Addfloat32", torch.add, torch.float32),
                             ("vvn_Maximumfloat32", torch.maximum, torch.float32),
                             ("vv_Multiplybfloat16", torch.mul, torch.bfloat16),
                             ("vv_Subtractint64", torch.sub, torch.int64)]:
        for n in ODD_SIZES:
            a = (torch.randn(n, generator=g) * 50).to(dtype)
            b = (torch.randn(n, generator=g) * 50).to(dtype)
            out = torch.empty_like(a)
            per_thread = 8 // a.element_size() if kname.startswith("vvn_") else 1
            getattr(binary, kname)(a, b, out, n, threads=(n + per_thread - 1) // per_thread, arg_casts={3: "int32"})
            total += 1
            passed += _check(f"MLX {kname} n={n}", out, fn(a, b))
    for n in ODD_SIZES:
        a, s = torch.randn(n, generator=g), torch.randn(1, generator=g)
        out = torch.empty_like(a)
        binary.vs_Dividefloat32(a, s, out, n, threads=n, arg_casts={3: "int32"})
        total += 1
        passed += _check(f"MLX vs_Dividefloat32 n={n}", out, a / s)
    # 2-D strided: a transposed, b broadcast along rows; strides as `constant int64_t s[2]` arrays.
    rows, cols = 37, 23
    storage = torch.randn(cols, rows, generator=g)
    a = storage.t()  # the kernel reads a's storage through a's strides (compile_shader binds dense tensors)
    b = torch.randn(cols, generator=g)
    out = torch.empty(rows, cols)
    binary.g2_Subtractfloat32(storage, b, out, [a.stride(0), a.stride(1)], [0, 1], threads=(cols, rows),
                              group_size=(23, 1))
    total += 1
    passed += _check(f"MLX g2_Subtractfloat32 {rows}x{cols} strided", out, a - b)
    return passed, total


# A driver of our own for the elementwise kernel templates of PyTorch's c10/metal/indexing.h
# (unary_dense, binary_dense, binary_dense_ilp, binary_strided), instantiated through its
# REGISTER_*_OP macros, which name the kernels `kernel void ::c10::metal::f<...>(...)`.
TORCH_ELEMENTWISE_DRIVER = r"""
#include <c10/metal/indexing.h>
#include <c10/metal/utils.h>
#include <metal_stdlib>
using namespace metal;

struct sum_functor {
  template <typename T>
  inline T operator()(const T a, const T b) { return static_cast<T>(a + b); }
};
struct prod_functor {
  template <typename T>
  inline T operator()(const T a, const T b) { return c10::metal::mul(a, b); }
};
struct expo_functor {
  template <typename T>
  inline T operator()(const T x) { return static_cast<T>(precise::exp(float(x))); }
};
REGISTER_BINARY_OP(sum, float, float);
REGISTER_BINARY_OP(sum, long, long);
REGISTER_OPMATH_BINARY_OP(prod, half, half);
REGISTER_UNARY_OP(expo, float, float);
REGISTER_UNARY_OP(expo, bfloat, bfloat);
"""


def run_torch(dirs) -> tuple:
    """PyTorch's elementwise kernel templates (through a driver of ours over the installed
    torch's c10/metal headers), and kernels of the sample that need no host-side set-up (roll,
    cross, arange), against torch on odd sizes."""
    import torch
    from my_mps_ops.emulator import compile_shader

    include = [_torch_include()]
    passed = total = 0
    g = torch.Generator().manual_seed(1)

    def load(name):
        for d in dirs:
            path = os.path.join(d, name)
            if os.path.exists(path):
                with open(path) as f:
                    try:
                        return compile_shader(f.read(), include_dirs=[d, *include], strict=False)
                    except Exception as e:  # this version of the file does not compile
                        print(f"  skip {path}: {str(e).splitlines()[-1][:120]}")
        return None

    ew = compile_shader(TORCH_ELEMENTWISE_DRIVER, include_dirs=include, strict=False)
    for n in ODD_SIZES:
        a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
        out = torch.empty(n)
        ew.sum_dense_float_float(out, a, b, threads=n)
        total += 1
        passed += _check(f"PyTorch binary_dense sum float n={n}", out, a + b)
        out = torch.empty(n)
        ew.sum_dense_ilp4_float_float(out, a, b, n, threads=(n + 3) // 4, arg_casts={3: "int32"})
        total += 1
        passed += _check(f"PyTorch binary_dense_ilp sum float n={n}", out, a + b)
        ai, bi = torch.randint(-2**40, 2**40, (n,), generator=g), torch.randint(-2**40, 2**40, (n,), generator=g)
        outi = torch.empty(n, dtype=torch.long)
        ew.sum_dense_long_long(outi, ai, bi, threads=n)
        total += 1
        passed += _check(f"PyTorch binary_dense sum long n={n}", outi, ai + bi, atol=0, rtol=0)
        ah, bh = a.half(), b.half()
        outh = torch.empty(n, dtype=torch.half)
        ew.prod_dense_half_half(outh, ah, bh, threads=n)
        total += 1
        passed += _check(f"PyTorch binary_dense prod half (opmath) n={n}", outh, (ah.float() * bh.float()).half(),
                         atol=0, rtol=0)
        out = torch.empty(n)
        ew.expo_dense_float_float(out, a, n, threads=(n + 3) // 4, arg_casts={2: "int32"})
        total += 1
        passed += _check(f"PyTorch unary_dense expo float n={n}", out, torch.exp(a.double()).float())
        ab = a.bfloat16()
        outb = torch.empty(n, dtype=torch.bfloat16)
        ew.expo_dense_bfloat_bfloat(outb, ab, n, threads=(n + 3) // 4, arg_casts={2: "int32"})
        total += 1
        passed += _check(f"PyTorch unary_dense expo bfloat n={n}", outb, torch.exp(ab.double()).bfloat16())
    # binary_strided: a transposed, b broadcast along rows; sizes and byte strides innermost first.
    rows, cols = 19, 13
    a_storage, b_storage = torch.randn(cols, rows, generator=g), torch.randn(1, cols, generator=g)
    # the kernel reads the views' dense storage through their strides (compile_shader binds dense tensors)
    a, b = a_storage.t(), b_storage.expand(rows, cols)
    out = torch.empty(rows, cols)
    es = 4
    ew.sum_strided_float_float(out, a_storage, b_storage, [cols, rows], [es * out.stride(1), es * out.stride(0)],
                               [es * a.stride(1), es * a.stride(0)], [es * b.stride(1), es * b.stride(0)],
                               [2, 0, 0, 0], threads=rows * cols, arg_casts={7: "int32"})
    total += 1
    passed += _check(f"PyTorch binary_strided sum float {rows}x{cols}", out, a + b)

    roll = load("Roll.metal")
    if roll is not None:
        for shape, shifts in [((7,), (3,)), ((5, 9), (2, -4)), ((3, 4, 5), (1, 0, -2))]:
            x = torch.randn(*shape, generator=g)
            out = torch.empty_like(x)
            sizes = list(shape)
            norm = [s % n for s, n in zip(shifts, shape)]
            roll.roll_float(x, out, sizes, list(x.stride()), list(out.stride()), norm, len(shape), x.numel(),
                            threads=x.numel(), arg_casts={6: "int32"})
            total += 1
            passed += _check(f"PyTorch roll_float {tuple(shape)}", out, torch.roll(x, shifts, tuple(range(len(shape)))))
    cross = load("CrossKernel.metal")
    if cross is not None:
        for n in (1, 5, 333):
            a, b = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)
            out = torch.empty_like(a)
            cross.cross_dense_float(out, a, b, 1, threads=n, arg_casts={3: "int32"})
            total += 1
            passed += _check(f"PyTorch cross_dense_float n={n}", out, torch.cross(a, b, dim=1))
    rng = load("RangeFactories.metal")
    if rng is not None:
        for n in ODD_SIZES:
            out = torch.empty(n)
            rng.arange_float_i32(out, [0.5, 0.25], 1, threads=n, arg_casts={2: "int32"})
            total += 1
            passed += _check(f"PyTorch arange_float_i32 n={n}", out, 0.5 + 0.25 * torch.arange(n, dtype=torch.float64))
    return passed, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mlx", help="MLX source tree (root)")
    parser.add_argument("--torch", nargs="+", default=[], help="directories of PyTorch's .metal kernels")
    parser.add_argument("--torch-include", action="append", default=None)
    parser.add_argument("--mode", choices=("syntax", "build"), default="syntax")
    parser.add_argument("--strict", action="store_true", help="also run the strict front end on each file")
    parser.add_argument("--no-run", action="store_true", help="skip the kernel runs")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    failed_runs = 0
    if args.mlx:
        kdir = os.path.join(args.mlx, "mlx", "backend", "metal", "kernels")
        files = sorted(os.path.join(r, f) for r, _, names in os.walk(kdir) for f in names if f.endswith(".metal"))
        nax = [f for f in files if f.endswith("_nax.metal")]
        report_corpus("MLX", [f for f in files if f not in nax], [kdir, args.mlx], args.mode, args.strict,
                      args.verbose, excepted=nax)
        if not args.no_run:
            passed, total = run_mlx(args.mlx)
            print(f"MLX runs: {passed}/{total} match torch")
            failed_runs += total - passed
    if args.torch:
        include = args.torch_include or [_torch_include()]
        # PyTorch's kernels include their headers as <ATen/native/mps/kernels/X.h>: the tree's aten/src, ahead
        # of the wheel's include/ (which has the wheel's own versions of some of them).
        for d in args.torch:
            root = os.path.abspath(d)
            for _ in range(4):
                root = os.path.dirname(root)
            if os.path.isdir(os.path.join(root, "ATen")) and root not in include:
                include = [root, *include]
        files = sorted(os.path.join(d, f) for d in args.torch for f in os.listdir(d) if f.endswith(".metal"))
        report_corpus("PyTorch", files, include, args.mode, args.strict, args.verbose)
        if not args.no_run:
            passed, total = run_torch(args.torch)
            print(f"PyTorch runs: {passed}/{total} match torch")
            failed_runs += total - passed
    return 1 if failed_runs else 0


if __name__ == "__main__":
    sys.exit(main())
