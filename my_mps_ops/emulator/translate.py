"""Metal Shading Language -> C++ for the CPU emulator.

A light, text-level translation of preprocessed MSL (the C preprocessor runs
first, so macro-generated instantiations are visible and line markers point
at the .metal source):

- kernels (``kernel void`` / ``[[kernel, ...]] void``, plain or templates with
  ``template [[host_name("x")]] kernel void f<T>(...);`` or
  ``template [[host_name("x")]] [[kernel]] decltype(f<T>) f<T>;`` instantiations,
  names qualified or not: ``kernel void ::ns::f<T>(...);``) are
  found, and each parameter's attribute is recorded: ``[[buffer(n)]]`` (or an
  automatic index in declaration order), ``[[threadgroup(n)]]``, builtins;
- address-space keywords are erased (``constant`` becomes ``const``); of
  functions or class specializations that differ only by address space, one
  is kept (they would collide);
- ``[[function_constant(i)]]`` declarations become compile-time constants
  with the values given to translate();
- ``threadgroup T x[N];`` declarations in kernels (``threadgroup T a, b[N];``
  alike) become per-threadgroup storage with a layout known before any run;
  one with an initializer (``= 0``, ``= {0}``) gets its value once per
  threadgroup, before any of its threads runs;
- literal suffixes (``1.0h``, ``1.0bf``) and unsuffixed floating literals
  (float in MSL, double in C++) are rewritten;
- multi-letter swizzles (``v.xy``, ``v.bgr``) become ``__mtl::swizzle<...>``
  reads, or ``__mtl::swizzle_ref<...>`` where assigned (single components,
  ``.x`` or ``.r``, are members of the vector types and need no rewriting);
- subscripts of threadgroup arrays and of pointer parameters in kernels are
  wrapped in bounds checks (``__mtl::tg_index`` / ``__mtl::buffer_index``);
- each barrier / SIMD-group call gets its own call-site id, and loop
  conditions poll the run's cancel flag (Ctrl-C, timeout);
- a table of the kernels with their parameters is appended, which the host
  reads after loading the compiled library.
"""

from __future__ import annotations

import bisect
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

BUILTINS = {
    "thread_position_in_grid": 0,
    "threadgroup_position_in_grid": 1,
    "thread_position_in_threadgroup": 2,
    "thread_index_in_threadgroup": 3,
    "threads_per_threadgroup": 4,
    "threadgroups_per_grid": 5,
    "threads_per_grid": 6,
    "thread_index_in_simdgroup": 7,
    "simdgroup_index_in_threadgroup": 8,
    "threads_per_simdgroup": 9,
    "simdgroups_per_threadgroup": 10,
    "quadgroup_index_in_threadgroup": 11,
    "thread_index_in_quadgroup": 12,
    "threads_per_quadgroup": 13,
    "quadgroups_per_threadgroup": 14,
    # Aliases Metal also accepts.
    "dispatch_threads_per_threadgroup": 4,
    "thread_execution_width": 9,
    "grid_size": 6,
}

PARAM_BUFFER, PARAM_THREADGROUP, PARAM_BUILTIN = 0, 1, 2
MAX_BINDINGS = 31  # MTL_EMU_MAX_BINDINGS

# Identifiers that make a kernel synchronise (run its threads as fibers).
SYNC_RE = re.compile(r"\b(threadgroup_barrier|simdgroup_barrier|simd_\w+|quad_\w+|__metal_simd_\w+|thread_elements)\b")

# The runtime's synchronisation functions (metal_runtime.h): each call in the
# source gets its own id as a template argument, so that two calls on one line
# are told apart when lanes wait at both.
SITE_FUNCTIONS = (
    "threadgroup_barrier", "simdgroup_barrier", "simd_sum", "simd_product", "simd_min", "simd_max", "simd_and",
    "simd_or", "simd_xor", "simd_prefix_inclusive_sum", "simd_prefix_exclusive_sum", "simd_prefix_inclusive_product",
    "simd_prefix_exclusive_product", "simd_shuffle", "simd_broadcast", "simd_shuffle_up", "simd_shuffle_down",
    "simd_shuffle_xor", "simd_shuffle_rotate_up", "simd_shuffle_rotate_down", "simd_broadcast_first", "simd_ballot",
    "simd_active_threads_mask", "simd_all", "simd_any", "simd_is_first", "simd_shuffle_and_fill_up",
    "simd_shuffle_and_fill_down", "quad_sum", "quad_product", "quad_min", "quad_max", "quad_and", "quad_or", "quad_xor",
    "quad_shuffle", "quad_broadcast", "quad_shuffle_xor", "quad_shuffle_up", "quad_shuffle_down",
)

METAL_HEADERS = [
    "metal_stdlib", "metal_math", "metal_simdgroup", "metal_simdgroup_matrix", "metal_atomic", "metal_compute",
    "metal_integer", "metal_common", "metal_geometric", "metal_relational", "metal_types", "metal_numeric",
    "metal_pack", "metal_array", "metal_limits", "metal_type_traits", "metal_utility", "metal_matrix",
    "metal_texture", "metal_graphics", "metal_quadgroup", "metal_bfloat", "metal_logging",
]


class TranslationError(RuntimeError):
    pass


@dataclass
class Param:
    name: str
    type: str
    kind: int
    index: int


@dataclass
class Kernel:
    host_name: str
    function: str
    template_args: str  # "<float>" or "" for a plain kernel
    params: List[Param]
    uses_sync: bool
    max_threads: int = 1024
    threadgroup_names: List[str] = field(default_factory=list)  # `threadgroup T name[N];`, by site
    layout: str = ""  # the threadgroup layout function (qualified like `function`)
    initializer: str = ""  # the threadgroup initializer function (qualified alike), if any declaration has one
    scope: str = ""  # the namespace the instantiation is in ("at_gemm"), where its template arguments are named


@dataclass
class Translation:
    cpp: str
    kernels: List[Kernel] = field(default_factory=list)


# ---------------------------------------------------------------- utilities

def _match_forward(s: str, i: int, open_c: str, close_c: str) -> int:
    """Index of the bracket closing the one at s[i]."""
    depth = 0
    for j in range(i, len(s)):
        c = s[j]
        if c == open_c:
            depth += 1
        elif c == close_c:
            depth -= 1
            if depth == 0:
                return j
    raise TranslationError(f"unbalanced {open_c!r} at offset {i}")


def _match_backward(s: str, i: int, open_c: str, close_c: str) -> int:
    depth = 0
    for j in range(i, -1, -1):
        c = s[j]
        if c == close_c:
            depth += 1
        elif c == open_c:
            depth -= 1
            if depth == 0:
                return j
    return -1


def _split_top_level(s: str, sep: str = ",") -> List[str]:
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if c in "([{<":
            depth += 1
        elif c in ")]}>":
            depth -= 1
        elif c == sep and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return [p for p in (x.strip() for x in parts) if p]


def _blank(text: str) -> str:
    """Same number of newlines, so line numbers below stay right."""
    return "\n" * text.count("\n")


_STRING_RE = re.compile(r'"(?:\\.|[^"\\\n])*"' + r"|'(?:\\.|[^'\\\n])*'")


def _protect_strings(s: str) -> Tuple[str, List[str]]:
    saved: List[str] = []

    def keep(m):
        saved.append(m.group(0))
        return f"\x01{len(saved) - 1}\x02"

    return _STRING_RE.sub(keep, s), saved


def _restore_strings(s: str, saved: List[str]) -> str:
    return re.sub(r"\x01(\d+)\x02", lambda m: saved[int(m.group(1))], s)


# ------------------------------------------------------------ preprocessing

def _stub_dir() -> str:
    d = os.path.join(tempfile.gettempdir(), f"my_mps_ops_metal_stubs_{os.getuid() if hasattr(os, 'getuid') else 0}")
    os.makedirs(d, exist_ok=True)
    for h in METAL_HEADERS:
        p = os.path.join(d, h)
        if not os.path.exists(p):
            with open(p, "w") as f:
                f.write("")
    return d


def preprocess(source: str, name: str, include_dirs: Sequence[str] = (), compiler: str = "g++") -> str:
    """Runs the C preprocessor with empty stand-ins for <metal_*> headers."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.metal")
        with open(path, "w") as f:
            f.write(source)
        cmd = [compiler, "-E", "-x", "c++", "-std=c++17", "-nostdinc", "-D__METAL__=1", "-D__METAL_VERSION__=320",
               "-D__HAVE_BFLOAT__=1", "-I", _stub_dir()]
        for inc in include_dirs:
            cmd += ["-I", inc]
        cmd.append(path)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise TranslationError(f"preprocessing {name}.metal failed:\n{proc.stderr.replace(tmp + os.sep, '')}")
        out = proc.stdout.replace(path, f"{name}.metal")
        return out


# ------------------------------------------------------------------ parsing

_ATTR_RE = re.compile(r"\[\[\s*(.*?)\s*\]\]", re.S)
_KERNEL_DEF_RE = re.compile(
    r"(?P<template>template\s*<(?P<tparams>[^{};]*?)>\s*)?"
    r"(?P<attrs>(?:\[\[[^\]]*\]\]\s*)*)"
    r"(?:(?P<kw>\[\[\s*kernel\s*(?:,[^\]]*)?\]\]|\bkernel\b)\s*"
    r"(?P<attrs2>(?:\[\[[^\]]*\]\]\s*)*)"
    r"void|void\s+(?P<kw2>\bkernel\b))\s+(?P<name>\w+)\s*\(")  # `void kernel f(...)` too (PyTorch's SpecialOps)
_INSTANTIATION_RE = re.compile(
    r"\btemplate\s*(?P<attrs>(?:\[\[[^\]]*\]\]\s*)*)(?:\bkernel\b\s*)?(?P<attrs2>(?:\[\[[^\]]*\]\]\s*)*)"
    r"void\s+(?:kernel\s+)?(?P<name>(?:::\s*)?(?:\w+\s*::\s*)*\w+)\s*(?P<targs><[^;{]*?>)\s*\((?P<params>[^;{]*)\)\s*;")
# The form whose signature comes from the template itself (as MLX's
# instantiate_kernel): template [[host_name("n")]] [[kernel]] decltype(f<T>) f<T>;
_DECLTYPE_INSTANTIATION_RE = re.compile(
    r"\btemplate\s*(?P<attrs>(?:\[\[[^\]]*\]\]\s*)*)(?:\bkernel\b\s*)?(?P<attrs2>(?:\[\[[^\]]*\]\]\s*)*)"
    r"decltype\s*\(\s*(?P<name>(?:::\s*)?(?:\w+\s*::\s*)*\w+)\s*(?P<targs><[^;{()]*?>)\s*\)\s*(?P=name)\s*<[^;{()]*?>\s*;")
# The form whose template arguments are deduced from the parameters (PyTorch's Gamma.metal):
# template [[host_name("n")]] kernel void f(constant half* x [[buffer(0)]], ...);
_DEDUCED_INSTANTIATION_RE = re.compile(
    r"\btemplate\s*(?P<attrs>(?:\[\[[^\]]*\]\]\s*)*)(?:\bkernel\b\s*(?P<attrs2>(?:\[\[[^\]]*\]\]\s*)*)void|void\s+kernel)"
    r"\s+(?P<name>(?:::\s*)?(?:\w+\s*::\s*)*\w+)\s*\((?P<params>[^;{]*)\)\s*;")
_HOST_NAME_RE = re.compile(r'host_name\s*\(\s*((?:"[^"]*"\s*)+)\)')


_NAMESPACE_OR_BRACE_RE = re.compile(r"\bnamespace\s+(?P<name>\w+(?:\s*::\s*\w+)*)?\s*\{|[{}]")


def _namespace_finder(s: str):
    """A function: position in s -> the named namespaces enclosing it, outermost first (None inside an
    anonymous namespace: no name reaches it from outside)."""
    positions: List[int] = []
    states: List[Optional[Tuple[str, ...]]] = []
    stack: List[Optional[str]] = []  # a namespace's name, or None for other braces ("" for an anonymous one)
    for m in _NAMESPACE_OR_BRACE_RE.finditer(s):
        if m.group(0) == "}":
            if stack:
                stack.pop()
        elif m.group(0) == "{":
            stack.append(None)
        else:
            stack.append("::".join(m.group("name").split()) if m.group("name") else "")
        positions.append(m.end())
        names = [n for n in stack if n is not None]
        states.append(None if "" in names else tuple(names))

    def at(pos: int) -> Optional[Tuple[str, ...]]:
        i = bisect.bisect_right(positions, pos) - 1
        return () if i < 0 else states[i]
    return at


def _template_param_names(tparams: str) -> List[str]:
    """The names a template parameter list declares (`typename T, int N = 4` -> T, N)."""
    names = []
    for part in _split_top_level(tparams):
        part = part.split("=")[0].strip()
        m = re.search(r"(\w+)\s*$", part)
        if m and not re.fullmatch(r"(?:typename|class)\s*", part):
            names.append(m.group(1))
    return names


def _normal_type(text: str) -> str:
    return re.sub(r"\s*([*&])\s*", r"\1 ", " ".join(text.split())).strip()


def _deduce_template_args(tparams: List[str], def_types: List[str], inst_types: List[str]) -> Optional[str]:
    """`<half, half>` for `template <typename T0, typename T1> f(constant T0*, device T1*)` instantiated with
    `(constant half*, device half*)`, as C++ deduces them; None if that fails."""
    if len(def_types) != len(inst_types):
        return None
    bound: Dict[str, str] = {}
    for dt, it in zip(def_types, inst_types):
        pattern, seen = re.escape(_normal_type(dt)), set()
        for t in tparams:
            def group(m, t=t):
                if t in seen:
                    return f"(?P={t})"
                seen.add(t)
                return f"(?P<{t}>.+?)"
            pattern = re.sub(r"\b" + re.escape(t) + r"\b", group, pattern)
        m = re.fullmatch(pattern, _normal_type(it))
        if not m:
            return None
        for t, v in m.groupdict().items():
            if bound.setdefault(t, v.strip()) != v.strip():
                return None
    if any(t not in bound for t in tparams):
        return None
    return "<" + ", ".join(bound[t] for t in tparams) + ">"


def _pick_overload(definitions: Dict[str, dict], fname: str, targs: str, inst_params: Optional[str]) -> str:
    """The definition of kernel `fname` (one of its overloads) that an instantiation with template arguments
    `targs` and parameters `inst_params` names: the one whose parameter types, the template's parameters
    replaced by targs, are the instantiation's (else the first with as many parameters)."""
    overloads = [n for n, d in definitions.items() if d["base"] == fname]
    if len(overloads) == 1 or inst_params is None:
        return overloads[0]
    inst = []
    for raw in _split_top_level(inst_params):  # (types only: parameter names and attributes are optional)
        inst.append(_ATTR_RE.sub(" ", raw).strip())
    args = _split_top_level(targs[1:-1]) if targs.startswith("<") else []
    same_count = [n for n in overloads if len(definitions[n]["params"]) == len(inst)]
    for n in same_count:
        d = definitions[n]
        types = []
        for p in d["params"]:
            t = p.type
            for tp, a in zip(d["template_params"], args):
                t = re.sub(r"\b" + re.escape(tp) + r"\b", a.strip(), t)
            types.append(_normal_type(t))
        if all(_same_param_type(t, i) for t, i in zip(types, inst)):
            return n
    return (same_count or overloads)[0]


def _same_param_type(definition_type: str, declaration: str) -> bool:
    """Whether an instantiation's parameter declaration (`device float* p`, or unnamed `device float*`)
    declares the type `definition_type`."""
    spaced = lambda t: " ".join(re.sub(r"([<>*&,])", r" \1 ", t).split())
    want, got = spaced(definition_type), spaced(declaration)
    return got == want or got.rsplit(" ", 1)[0] == want


def _host_name(attrs: str) -> Optional[str]:
    """The host_name in attributes; adjacent literals ("a_" "float", from #T) are joined."""
    m = _HOST_NAME_RE.search(attrs)
    return "".join(re.findall(r'"([^"]*)"', m.group(1))) if m else None
_MAX_THREADS_RE = re.compile(r"max_total_threads_per_threadgroup\s*\(\s*(\d+)\s*\)")


def _parse_params(text: str, kernel: str) -> List[Param]:
    params: List[Param] = []
    next_buffer = 0
    next_threadgroup = 0
    for raw in _split_top_level(text):
        attrs = _ATTR_RE.findall(raw)
        decl = _ATTR_RE.sub(" ", raw).strip()
        m = re.match(r"(?P<type>.*?)(?P<name>\w+)\s*(?P<dims>(?:\[[^\]]*\]\s*)*)$", decl, re.S)
        if not m:
            raise TranslationError(f"kernel {kernel}: cannot parse parameter {raw!r}")
        ptype, pname = " ".join(m.group("type").split()), m.group("name")
        kind, index = None, None
        for a in attrs:
            b = re.match(r"buffer\s*\(\s*(\d+)\s*\)", a)
            t = re.match(r"threadgroup\s*\(\s*(\d+)\s*\)", a)
            if b:
                kind, index = PARAM_BUFFER, int(b.group(1))
            elif t:
                kind, index = PARAM_THREADGROUP, int(t.group(1))
            elif a in BUILTINS:
                kind, index = PARAM_BUILTIN, BUILTINS[a]
            elif a.startswith(("stage_in", "texture", "sampler")):
                raise TranslationError(f"kernel {kernel}: parameter {pname!r}: [[{a}]] is not supported by the emulator")
        if kind is None:
            if re.search(r"\bthreadgroup\b", ptype):
                kind, index = PARAM_THREADGROUP, next_threadgroup
            elif "*" in ptype or "&" in ptype or m.group("dims"):  # `constant T s[2]` is a buffer too
                kind, index = PARAM_BUFFER, next_buffer
            else:
                raise TranslationError(
                    f"kernel {kernel}: parameter {pname!r} ({ptype}) is neither a buffer, threadgroup memory nor a builtin")
        if kind == PARAM_BUFFER:
            next_buffer = max(next_buffer, index + 1)
        elif kind == PARAM_THREADGROUP:
            next_threadgroup = max(next_threadgroup, index + 1)
        params.append(Param(pname, ptype, kind, index))
    return params


def _function_bodies(s: str) -> Dict[str, List[str]]:
    """name -> bodies of the functions defined in s (a coarse scan)."""
    bodies: Dict[str, List[str]] = {}
    for m in re.finditer(r"\b(\w+)\s*\(", s):
        name = m.group(1)
        if name in ("if", "for", "while", "switch", "return", "sizeof", "catch", "alignof", "decltype"):
            continue
        try:
            close = _match_forward(s, m.end() - 1, "(", ")")
        except TranslationError:
            continue
        rest = s[close + 1:close + 200]
        q = re.match(r"\s*(?:const\s*)?(?:noexcept\s*)?(?:->\s*[\w:<>,\s]+?)?\s*\{", rest)
        if not q:
            continue
        open_brace = close + 1 + q.end() - 1
        try:
            end = _match_forward(s, open_brace, "{", "}")
        except TranslationError:
            continue
        bodies.setdefault(name, []).append(s[open_brace:end + 1])
    return bodies


def _sync_functions(bodies: Dict[str, List[str]]) -> set:
    syncing = {n for n, bs in bodies.items() if any(SYNC_RE.search(b) for b in bs)}
    changed = True
    while changed:
        changed = False
        for n, bs in bodies.items():
            if n in syncing:
                continue
            if any(re.search(r"\b(" + "|".join(map(re.escape, syncing)) + r")\s*[<(]", b) for b in bs) if syncing else False:
                syncing.add(n)
                changed = True
    return syncing


# ----------------------------------------------------------- rewrite passes

# `threadgroup T name[N]...;`, or several declarators (`threadgroup T a[N], b[M];`), each with an
# initializer or not (`= 0`, `= {0}`: Apple's compiler accepts them).
_TG_DECL_RE = re.compile(
    r"\bthreadgroup\s+(?P<type>[A-Za-z_](?:[\w:\s<>,]*?[\w>])?)\s+"
    r"(?P<decls>\w+\s*(?:\[[^\];]*\]\s*)*(?:[=,][^;{}]*(?:\{[^;{}]*\}[^;{}]*)*)?);")
_TG_DECLARATOR_RE = re.compile(r"\s*(?P<name>\w+)\s*(?P<dims>(?:\[[^\]]*\]\s*)*)(?:=\s*(?P<init>\S.*?))?\s*", re.S)


def _split_declarators(text: str, sep: str = ",") -> List[str]:
    """`text` split at the `sep`s outside (), [] and {} (`<` may be less-than in an initializer)."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


_LOCAL_CONSTANT_RE = re.compile(
    r"(?:\bstatic\s+)?(?:\bconstexpr\b[^;{}()=]*?|\bconst\s+(?:unsigned\s+)?(?:int|uint|short|ushort|long|ulong|"
    r"size_t|int32_t|uint32_t|int64_t|uint64_t))\s+(?P<name>\w+)\s*=\s*(?P<init>[^;{}]+);")
# Local type aliases (`using ValT = typename K::ValT;`) that threadgroup arrays are typed by.
_LOCAL_ALIAS_RE = re.compile(r"\busing\s+(?P<name>\w+)\s*=\s*(?P<init>[^;{}]+);"
                             r"|\btypedef\s+(?P<init2>[^;{}]+?)\s+(?P<name2>\w+)\s*;")
_IDENT_RE = re.compile(r"\b[A-Za-z_]\w*\b")


def _local_constants_for(body: str, type_ids: List[str]) -> List[str]:
    """The kernel-local constant declarations (`constexpr int N = 64;`) that the
    threadgroup declarations' sizes use, directly or through each other, in
    source order: the layout function outside the kernel repeats them."""
    decls: Dict[str, Tuple[int, str, str]] = {}
    for pattern in (_LOCAL_CONSTANT_RE, _LOCAL_ALIAS_RE):
        for m in pattern.finditer(body):
            g = m.groupdict()
            decls.setdefault(g["name"] or g["name2"], (m.start(), m.group(0), g["init"] or g["init2"]))
    needed, todo = set(), [i for t in type_ids for i in _IDENT_RE.findall(t)]
    while todo:
        name = todo.pop()
        if name in decls and name not in needed:
            needed.add(name)
            todo += _IDENT_RE.findall(decls[name][2])
    return [text for _, text, _ in sorted(decls[n] for n in needed)]


def _rewrite_threadgroup_decls(body: str, kernel: str) -> Tuple[str, List[str], List[str], List[Tuple[int, str]]]:
    """The kernel body with its threadgroup declarations rewritten; their types and names by site, and the
    initializers, as (site, expression)."""
    decls: List[str] = []
    names: List[str] = []
    inits: List[Tuple[int, str]] = []

    def repl(m):
        parsed = [_TG_DECLARATOR_RE.fullmatch(d) for d in _split_declarators(m.group("decls"))]
        if not all(parsed):  # a pointer among them (`threadgroup T a[N], *p;`): erasing `threadgroup` would not do
            raise TranslationError(f"kernel {kernel}: unsupported threadgroup declaration "
                                   f"{' '.join(m.group(0).split())!r} (Metal allows `threadgroup T name[N];`)")
        out = []
        for d in parsed:
            type_id = m.group("type").strip() + " " + "".join(d.group("dims").split())
            site = len(decls)
            decls.append(type_id)
            names.append(d.group("name"))
            if d.group("init") is not None:
                inits.append((site, d.group("init")))
            out.append(f"auto& {d.group('name')} = *__mtl::threadgroup_static<{type_id}>({site});")
        return " ".join(out) + _blank(m.group(0))  # (keeps the line count)

    body = _TG_DECL_RE.sub(repl, body)
    for site, (name, type_id) in enumerate(zip(names, decls)):
        if name in names[:site]:
            continue  # the same name in another scope: its uses are rewritten already
        body = _check_subscripts(body, name, type_id.count("["),
                                 lambda dim, n=name, site=site: f"__mtl::tg_index<decltype({n}), {dim}>", f"{site}")
    return body, decls, names, inits


def _check_pointer_params(body: str, params: List[Param]) -> str:
    """Subscripts of the kernel's buffer and threadgroup pointer parameters are
    checked against what was bound (a parameter the body assigns is not: it may
    point into another buffer)."""
    entry = []
    for p in params:
        if p.kind not in (PARAM_BUFFER, PARAM_THREADGROUP) or "*" not in p.type:
            continue
        if re.search(r"(?<![\w.])" + re.escape(p.name) + r"\s*=(?!=)", body):
            continue
        bound = f"__mtl_bound_{p.name}"
        rewritten = _check_subscripts(body, p.name, 1, lambda dim: "__mtl::buffer_index", f"{p.name}, {bound}")
        if rewritten == body:
            continue
        body = rewritten
        if p.kind == PARAM_THREADGROUP:
            table, slot = "*__mtl::threadgroup_bindings()", p.index + MAX_BINDINGS
        else:
            table, slot = "__mtl::launch_bindings", p.index
        entry.append(f"const __mtl::Bound {bound} = __mtl::bound({table}, {slot});")
    return "{ " + " ".join(entry) + body[1:] if entry else body


def _check_subscripts(body: str, name: str, rank: int, checker, extra: str) -> str:
    """`name[i][j]` -> `name[checker(0)(i, extra)][checker(1)(j, extra)]`, for the
    first `rank` subscripts of each use of `name` (not members: `s.name[i]`)."""
    use = re.compile(r"(?<![\w.])" + re.escape(name) + r"\s*\[")
    out, pos = [], 0
    while True:
        m = use.search(body, pos)
        if m is None:
            out.append(body[pos:])
            return "".join(out)
        if body[max(0, m.start() - 2):m.start()] in ("->", "::"):
            out.append(body[pos:m.end()])
            pos = m.end()
            continue
        out.append(body[pos:m.end() - 1])
        open_bracket = m.end() - 1
        for dim in range(rank):
            close = _match_forward(body, open_bracket, "[", "]")
            index = _check_subscripts(body[open_bracket + 1:close], name, rank, checker, extra)
            out.append(f"[{checker(dim)}({index}, {extra})]")
            pos = close + 1
            following = re.match(r"\s*\[", body[pos:])
            if following is None or dim + 1 == rank:
                break
            out.append(body[pos:pos + following.end() - 1])
            open_bracket = pos + following.end() - 1


_FLOAT_CORE = r"(?:\d+\.\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)"
_SUFFIXED_RE = re.compile(r"(?<![\w.])(" + _FLOAT_CORE + r"|\d+)(h|H|bf|BF)(?![\w.])")
_UNSUFFIXED_RE = re.compile(r"(?<![\w.])(" + _FLOAT_CORE + r")(?![\w.])")


_VECTOR_TYPE = r"(?:::\s*)?(?:metal\s*::\s*)?(?:packed_)?(?:bool|char|uchar|short|ushort|int|uint|long|ulong|half|float|bfloat)[234]"
_CONSTEXPR_VECTOR_RE = re.compile(r"\bconstexpr\b(?P<mid>(?:\s+(?:static|inline|const)\b)*\s+)(?P<type>" + _VECTOR_TYPE +
                                  r")\b(?P<after>\s*\w+\s*(?P<next>[<(=;{])?)")


def _constexpr_vectors(s: str) -> str:
    """`constexpr float2 f() { return float2(1.0, 0.0); }`: the emulator's vectors are not literal types, so
    a constexpr function or variable of a vector type is a plain function or a const variable (Metal
    evaluates neither at compile time unless asked, and what asks is refused by g++ either way)."""
    def rewrite(m):
        # (a function keeps the `inline` it may have: `METAL_FUNC static constexpr short2 f()`)
        word = "" if m.group("next") in ("<", "(") else "const"
        return word + m.group("mid") + m.group("type") + m.group("after")
    s = _CONSTEXPR_VECTOR_RE.sub(rewrite, s)
    return _CONSTEXPR_LIMIT_ELEMENT_RE.sub(lambda m: "const" + m.group(0)[len("constexpr"):], s)


# `constexpr auto inf = numeric_limits<float2>::infinity().x;`: an element of a vector's limit
_CONSTEXPR_LIMIT_ELEMENT_RE = re.compile(
    r"\bconstexpr(?=\s+(?:const\s+)?auto\s+\w+\s*=[^;{}]*\bnumeric_limits\s*<[^;{}]*>\s*::\s*\w+\s*\(\s*\)\s*\.\s*[xyzw]\b)")


_INT_LITERAL_RE = re.compile(r"\s*[-+]?\s*(?:0[xX][0-9a-fA-F]+|\d+)[uUlL]*\s*")


def _conditional_operand_end(s: str, j: int, stop_at_colon: bool) -> Optional[int]:
    """Where the operand of `?:` starting at j ends (at depth 0: `:` for the second operand, `;`, `,` or a
    closing bracket for the third); None if it does not end within the statement."""
    depth, nested = 0, 0
    while j < len(s):
        ch = s[j]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                return None if stop_at_colon else j
            depth -= 1
        elif ch == ";":
            return None if stop_at_colon else j
        elif depth == 0 and ch == "?":
            nested += 1
        elif depth == 0 and ch == ":" and s[j + 1:j + 2] != ":" and s[j - 1:j] != ":":
            if nested:
                nested -= 1
            else:
                return j if stop_at_colon else j
        elif depth == 0 and ch == "," and not stop_at_colon:
            return j
        j += 1
    return None


_ANGLE_NOISE_RE = re.compile(r"<<|>>|<=|>=|->")


def _conditional_literals(s: str) -> str:
    """The operands of `?:`, for Metal's bfloat: in Metal an integer converts to bfloat (a built-in arithmetic
    type), while the emulator's bfloat class converts both ways, which makes `c ? bf : i` ambiguous in C++.
    An integer literal operand becomes `__mtl::cond_operand<decltype(other)>(1)`: a bfloat when the other
    operand is one, the literal itself otherwise (so the usual arithmetic conversions are untouched). Other
    operands become `(__mtl::cond_tag<decltype(other)>(), x)`, which converts an integer-typed x beside a
    bfloat and passes anything else through (lvalues stay lvalues, a void operand takes the built-in comma).
    Conditionals are rewritten innermost (last) first, so an outer one's decltype sees the inner rewritten."""
    for m in reversed(list(re.finditer(r"\?", s))):
        i = m.start()
        colon = _conditional_operand_end(s, i + 1, True)
        if colon is None:
            continue
        end = _conditional_operand_end(s, colon + 1, False)
        if end is None:
            continue
        second, third = s[i + 1:colon], s[colon + 1:end]
        statement = s[max(s.rfind(";", 0, i), s.rfind("{", 0, i), s.rfind("}", 0, i)) + 1:i]
        if re.search(r"\b(?:constexpr|static|template|using|typedef)\b", statement):
            continue  # a constant expression (g++ 12 can fail on decltype there; bfloat is rare there)
        second_lit = _INT_LITERAL_RE.fullmatch(second) is not None
        third_lit = _INT_LITERAL_RE.fullmatch(third) is not None
        if second_lit and third_lit or "\n" in second + third and len(second + third) > 2000 or \
                re.search(r"^\s*#", second + third, re.M):  # (a line marker cannot be joined into one line)
            continue
        if second_lit != third_lit:
            if third_lit:
                edits = [(colon + 1, end, f" ::__mtl::cond_operand<decltype({second})>({third.strip()}) ")]
            else:
                edits = [(i + 1, colon, f" ::__mtl::cond_operand<decltype({third})>({second.strip()}) ")]
        else:
            bare = _ANGLE_NOISE_RE.sub(" ", third)
            if len(second) + len(third) > 600 or "{" in second + third or bare.count(">") > bare.count("<") or \
                    s[end] == "," and bare.count("<") > bare.count(">"):
                continue  # (the third operand may run through the end of a template argument list, or the
                # scan may have cut one at its comma: `c ? a : f<int, 2>(x)`)
            edits = [(colon + 1, end, f" (::__mtl::cond_tag<decltype({second.strip()})>(), {third.strip()}) "),
                     (i + 1, colon, f" (::__mtl::cond_tag<decltype({third.strip()})>(), {second.strip()}) ")]
        for start, stop, text in edits:
            # (keep line breaks: line markers map errors to the .metal lines)
            s = s[:start] + text.replace("\n", " ") + "\n" * s[start:stop].count("\n") + s[stop:]
    return s


def _rewrite_literals(s: str) -> str:
    def suffixed(m):
        num = m.group(1)
        if not re.search(r"[.eE]", num):
            num += ".0"
        kind = "half" if m.group(2) in ("h", "H") else "bfloat"
        return f"{kind}({num}f)"

    s = _SUFFIXED_RE.sub(suffixed, s)
    return _UNSUFFIXED_RE.sub(lambda m: m.group(1) + "f", s)


_SWIZZLE_RE = re.compile(r"\.\s*([xyzw]{2,4}|[rgba]{2,4})\b(?!\s*\()")
_ASSIGN_RE = re.compile(r"\s*(?:=(?!=)|\+=|-=|\*=|/=|%=|&=|\|=|\^=|<<=|>>=)")
_IDENT_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_SWIZZLE_INDEX = {"x": 0, "y": 1, "z": 2, "w": 3, "r": 0, "g": 1, "b": 2, "a": 3}


_KEYWORDS = {"return", "case", "else", "do", "throw", "co_return", "sizeof", "typename", "template", "new", "delete"}


def _expression_start(s: str, dot: int) -> int:
    """Start of the postfix expression that ends right before s[dot] == '.'."""
    i = dot
    state = "operand"  # what may stand left of s[i]: operand | postfix (after a () / [] group) | ident

    def consume_identifier(j):
        k = j
        while k > 0 and s[k - 1] in _IDENT_CHARS:
            k -= 1
        return k

    while True:
        j = i - 1
        while j >= 0 and s[j] in " \t\n":
            j -= 1
        if j < 0:
            return i
        c = s[j]
        if c in ")]" and state in ("operand", "postfix"):
            k = _match_backward(s, j, "(" if c == ")" else "[", c)
            if k < 0:
                return i
            i, state = k, "postfix"
            continue
        if c == ">" and state == "postfix":
            k = _match_backward(s, j, "<", ">")
            if k > 0 and s[k - 1] in _IDENT_CHARS:
                i, state = k, "ident"
                continue
            return i
        if c in _IDENT_CHARS:
            k = consume_identifier(j)
            if s[k:j + 1] in _KEYWORDS or s[k].isdigit() and state != "operand":
                return i
            i = k
            j = k - 1
            while j >= 0 and s[j] in " \t\n":
                j -= 1
            if j >= 0 and s[j] == "." and not (j >= 1 and s[j - 1].isdigit()):
                i, state = j, "operand"
                continue
            if j >= 1 and s[j - 1:j + 1] in ("->", "::"):
                i, state = j - 1, "operand"
                continue
            return i
        return i


def _rewrite_swizzles(s: str) -> str:
    pos = 0
    while True:
        m = _SWIZZLE_RE.search(s, pos)
        if not m:
            return s
        start = _expression_start(s, m.start())
        expr = s[start:m.start()].strip()
        if not expr or expr[0].isdigit():
            pos = m.end()
            continue
        idx = ",".join(str(_SWIZZLE_INDEX[c]) for c in m.group(1))
        write = _ASSIGN_RE.match(s, m.end()) is not None
        fn = "swizzle_ref" if write else "swizzle"
        rep = f"__mtl::{fn}<{idx}>({expr})"
        s = s[:start] + rep + s[m.end():]
        pos = start


def _tag_sync_sites(s: str, user_functions: set) -> str:
    """`simd_sum(x)` -> `simd_sum<7>(x)`: a distinct id per call in the text
    (functions the source defines itself under those names are left alone)."""
    names = [n for n in SITE_FUNCTIONS if n not in user_functions]
    if not names:
        return s
    pattern = re.compile(r"(?<![\w.>])((?:metal\s*::\s*)?)(" + "|".join(names) + r")(\s*\()")
    counter = iter(range(1, 1 << 30))

    def repl(m):
        before = s[max(0, m.start() - 2):m.start()]
        if before.endswith("::") and not m.group(1):
            return m.group(0)  # another namespace's function of that name
        return f"{m.group(1)}{m.group(2)}<{next(counter)}>{m.group(3)}"

    return pattern.sub(repl, s)


_LOOP_RE = re.compile(r"(?<![\w.])(while|for)\s*\(")
_DECLARATION_RE = re.compile(r"\s*(?:const\s+)?[A-Za-z_][\w:<>]*\s+[A-Za-z_]\w*\s*=")
# `i < n; ++i`-style counted loops: bounded, and a poll would keep the compiler from vectorising them.
_COUNTED_COND_RE = re.compile(r"\s*(\w+)\s*<=?\s*[^;]+$")
_COUNTED_STEP_RE = re.compile(r"\s*(?:\+\+\s*(\w+)|(\w+)\s*\+\+|(\w+)\s*\+=\s*[\w.:()]+)\s*$")


def _split_statements(s: str) -> List[str]:
    """s split at `;` outside () [] {} (not <>: inside a for header they compare)."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == ";" and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return parts


def _counted(cond: str, step: str) -> bool:
    c, st = _COUNTED_COND_RE.match(cond), _COUNTED_STEP_RE.match(step)
    return bool(c and st) and c.group(1) in st.groups()


def _poll_loops(s: str) -> str:
    """Loop conditions become `__mtl::poll() && (cond)`, so that a run can be
    stopped (Ctrl-C, timeout) in a kernel that never ends."""
    out, last = [], 0
    for m in _LOOP_RE.finditer(s):
        if m.start() < last:
            continue  # inside a loop header already rewritten
        open_paren = m.end() - 1
        try:
            close = _match_forward(s, open_paren, "(", ")")
        except TranslationError:
            continue
        inner = s[open_paren + 1:close]
        if m.group(1) == "for":
            parts = _split_statements(inner)
            if len(parts) != 3 or _counted(parts[1], parts[2]):
                continue  # range-based for, or a counted loop
            cond = f"__mtl::poll() && ({parts[1]})" if parts[1].strip() else "__mtl::poll()"
            inner = f"{parts[0]};{cond};{parts[2]}"
        else:
            if _DECLARATION_RE.match(inner):
                continue
            inner = f"__mtl::poll() && ({inner})"
        out.append(s[last:open_paren + 1] + inner)
        last = close
    out.append(s[last:])
    return "".join(out)


_SPACE_WORD_RE = re.compile(r"\b(?:thread|device|threadgroup|constant)\b")
_FUNCTION_NAME_RE = re.compile(r"(?:\boperator\s+[A-Za-z_][\w:<>,\s*&]*?(?=\s*\()|\boperator\s*(?:\(\s*\)|\[\s*\]|[^\s\w(]+)|\b[A-Za-z_]\w*)\s*\(")
_AFTER_PARAMS_RE = re.compile(
    r"\s*(?P<quals>(?:(?:const|thread|device|threadgroup|constant|noexcept)\b\s*)*)"
    r"(?:->[^{;]*?)?(?P<open>\{|:(?!:))")
_CLASS_HEAD_RE = re.compile(r"\b(?:struct|class|union)\s+(\w+)[^{;()]*$")


def _enclosing_braces(s: str) -> List[int]:
    """For each offset, the offset of the innermost `{` around it (-1 at file scope)."""
    out, stack = [0] * len(s), [-1]
    for i, c in enumerate(s):
        if c == "}" and len(stack) > 1:
            stack.pop()
        out[i] = stack[-1]
        if c == "{":
            stack.append(i)
    return out


def _drop_address_space_overloads(s: str) -> str:
    """Functions overloaded only on address spaces (`f(thread T&)` / `f(device T&)`,
    member functions `f() thread` / `f() device`) collide once address spaces are
    erased: of each such set the one spelled `thread` or without an address space
    stays (else the first), the others are blanked. A member function's `constant`
    qualifier becomes `const` (an object in constant memory is const), except on a
    constructor."""
    scope = None
    groups: Dict[Tuple[int, str], List[Tuple[int, int, int, int, int]]] = {}
    qual_edits: List[Tuple[int, int, str]] = []
    skip_until = 0
    for m in _FUNCTION_NAME_RE.finditer(s):
        if m.start() < skip_until:  # inside a found function (its initialiser list, its body)
            continue
        if m.group(0).split("(")[0].strip() in ("if", "for", "while", "switch", "return", "sizeof", "decltype",
                                                "alignof", "static_assert", "catch"):
            continue
        open_ = m.end() - 1
        try:
            close = _match_forward(s, open_, "(", ")")
        except TranslationError:
            continue
        a = _AFTER_PARAMS_RE.match(s, close + 1)
        if not a:
            continue
        start = max(s.rfind(";", 0, m.start()), s.rfind("{", 0, m.start()), s.rfind("}", 0, m.start())) + 1
        head = re.sub(r"^\s*(?:(?:public|private|protected)\s*:)?", "", s[start:close + 1])
        quals = a.group("quals")
        if not (_SPACE_WORD_RE.search(head) or _SPACE_WORD_RE.search(quals)):
            continue
        if scope is None:
            scope = _enclosing_braces(s)
        # The end: the body's closing brace, past a member initialiser list.
        j, depth = a.end() - 1, 0
        while j < len(s):
            c = s[j]
            if c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
            elif depth == 0 and c == "{":
                j = _match_forward(s, j, "{", "}")
                break
            j += 1
        skip_until = j + 1
        name = m.group(0)[:-1].strip()
        cls = _CLASS_HEAD_RE.search(s[max(0, scope[start] - 300):scope[start]]) if scope[start] >= 0 else None
        ctor = cls is not None and cls.group(1) == name
        q_space = re.search(r"\b(?:thread|device|threadgroup|constant)\b", quals)
        if q_space:
            qs, qe = a.start("quals") + q_space.start(), a.start("quals") + q_space.end()
            qual_edits.append((qs, qe, "const" if q_space.group(0) == "constant" and not ctor else ""))
        erased_quals = re.sub(r"\bconstant\b", "" if ctor else "const", quals)
        key = (scope[start], " ".join(_erase_address_spaces(head + " " + erased_quals).split()))
        plain = not re.search(r"\b(?:device|threadgroup|constant)\b", head + quals)
        groups.setdefault(key, []).append((0 if plain else 1, start, j + 1, close, a.end()))
    spans = []
    for members in groups.values():
        if len(members) < 2:
            continue
        keep = min(range(len(members)), key=lambda k: members[k][0])
        spans += [(st, en) for k, (_, st, en, _, _) in enumerate(members) if k != keep]
    edits = [(st, en, None) for st, en in spans] + qual_edits
    for st, en, text in sorted(edits, key=lambda e: -e[0]):
        if text is None:
            s = s[:st] + _blank(s[st:en]) + s[en:]
        elif not any(a <= st < b for a, b in spans):
            s = s[:st] + text.ljust(en - st) + s[en:]
    return s


_FUNCTION_CONSTANT_RE = re.compile(
    r"(?P<decl>(?:\b(?:static|constant|constexpr|const)\s+)+)(?P<type>[A-Za-z_][\w:]*)\s+(?P<name>\w+)\s*"
    r"\[\[\s*function_constant\s*\(\s*(?P<index>\w+)\s*\)\s*\]\]\s*;")


def _literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    raise TranslationError(f"function constant value {value!r}: expected a bool, int or float")


def _bind_function_constants(s: str, values: Dict) -> str:
    """`constant T x [[function_constant(i)]];` becomes a compile-time constant with the value
    given by name or index (a pipeline is specialised at compile time, as Metal does), or T()
    when none is given; is_function_constant_defined(x) becomes true or false."""
    defined, seen = set(), set()

    def repl(m):
        name, index, ctype = m.group("name"), m.group("index"), m.group("type")
        number = int(index) if index.isdigit() else None
        seen.update((name, str(number)))
        key = name if name in values else number if number in values else None
        if key is None:
            return f"static constexpr {ctype} {name} = {ctype}();"
        defined.add(name)
        return f"static constexpr {ctype} {name} = {ctype}({_literal(values[key])});"

    s = _FUNCTION_CONSTANT_RE.sub(repl, s)
    unknown = [k for k in values if str(k) not in seen]
    if unknown:
        raise TranslationError(f"function_constants {unknown} name no [[function_constant]] of the source")
    return re.sub(r"\bis_function_constant_defined\s*\(\s*(\w+)\s*\)",
                  lambda m: "true" if m.group(1) in defined else "false", s)


_MEMBER_SPECIALIZATION_RE = re.compile(r"\btemplate\s*<\s*>")
_SPACE_SPECIALIZATION_RE = re.compile(
    r"\b(?:struct|class)\s+(?P<name>\w+)\s*<(?P<args>[^{};]*\b(?:thread|device|threadgroup|constant)\b[^{};]*)>"
    r"\s*(?::[^{};]*)?\{")


def _class_scope_fixes(s: str) -> str:
    """What clang (Apple's compiler) accepts in a class and g++ does not, or what collides once
    address spaces are erased:
    - `template <> R f(...)` in a class body (an explicit specialization of a member template,
      allowed since C++17 by CWG 727, which g++ does not implement) becomes a plain overload,
      which overload resolution prefers for the same arguments;
    - class template specializations differing only by address space
      (`pointer_element<thread T*>` / `<device T*>`): the first stays."""
    if not (_MEMBER_SPECIALIZATION_RE.search(s) or _SPACE_SPECIALIZATION_RE.search(s)):
        return s
    scope = _enclosing_braces(s)

    def in_class(pos: int) -> bool:
        brace = scope[pos]
        return brace >= 0 and _CLASS_HEAD_RE.search(s[max(0, brace - 300):brace]) is not None

    edits: List[Tuple[int, int]] = [(m.start(), m.end()) for m in _MEMBER_SPECIALIZATION_RE.finditer(s)
                                    if in_class(m.start()) and not re.match(r"\s*(?:struct|class|union)\b", s[m.end():])]
    seen = set()
    for m in _SPACE_SPECIALIZATION_RE.finditer(s):
        key = (scope[m.start()], m.group("name"), " ".join(_erase_address_spaces(m.group("args")).split()))
        if key not in seen:
            seen.add(key)
            continue
        start = max(s.rfind(";", 0, m.start()), s.rfind("{", 0, m.start()), s.rfind("}", 0, m.start())) + 1
        end = _match_forward(s, m.end() - 1, "{", "}") + 1
        q = re.match(r"\s*;", s[end:])
        edits.append((start, end + (q.end() if q else 0)))
    for a, b in sorted(edits, reverse=True):
        s = s[:a] + (" " * (b - a) if "\n" not in s[a:b] else _blank(s[a:b])) + s[b:]
    return s


def _erase_address_spaces(s: str) -> str:
    s = re.sub(r"\bcoherent\s*\(\s*\w+\s*\)", " ", s)  # MSL 3.2 coherence: x86 stores are coherent
    s = re.sub(r"\bdevice\b", " ", s)
    s = re.sub(r"\bthread\b", " ", s)
    s = re.sub(r"\bthreadgroup\b", " ", s)
    s = re.sub(r"\bconstant\b", "const", s)
    s = re.sub(r"\bconst(\s+const\b)+", "const", s)
    # `static constant constexpr const T x`: one const once `constant` is
    s = re.sub(r"\bconst\b((?:\s+(?:constexpr|static|inline|volatile)\b)+)\s+const\b", r"\1 const", s)
    return s


# -------------------------------------------------------------- translation

def translate(source: str, name: str = "shader", include_dirs: Sequence[str] = (), compiler: str = "g++",
              function_constants: Optional[Dict] = None) -> Translation:
    pre = preprocess(source, name, include_dirs, compiler)
    s, saved = _protect_strings(pre)
    s = _bind_function_constants(s, dict(function_constants or {}))
    s = _drop_address_space_overloads(s)
    s = _class_scope_fixes(s)
    bodies = _function_bodies(s)
    sync_fns = _sync_functions(bodies)
    user_functions = set(bodies)

    # Explicit instantiations: record, then blank them (the table instantiates).
    instantiations = []
    for pattern in (_INSTANTIATION_RE, _DECLTYPE_INSTANTIATION_RE):
        site_namespaces = _namespace_finder(s)
        for m in list(pattern.finditer(s)):
            attrs = _restore_strings(m.group("attrs") + m.group("attrs2"), saved)
            qualified = "".join(m.group("name").split())
            host = _host_name(attrs) or qualified.split("::")[-1] + m.group("targs")
            params = m.groupdict().get("params")
            instantiations.append((host, qualified, " ".join(m.group("targs").split()),
                                   _restore_strings(params, saved) if params is not None else None,
                                   "::".join(site_namespaces(m.start()) or ())))
        s = pattern.sub(lambda m: _blank(m.group(0)), s)
    site_namespaces = _namespace_finder(s)
    for m in list(_DEDUCED_INSTANTIATION_RE.finditer(s)):
        attrs = _restore_strings(m.group("attrs") + (m.group("attrs2") or ""), saved)
        qualified = "".join(m.group("name").split())
        host = _host_name(attrs) or qualified.split("::")[-1]
        params = _restore_strings(m.group("params"), saved)
        instantiations.append((host, qualified, params, params, "::".join(site_namespaces(m.start()) or ())))
    s = _DEDUCED_INSTANTIATION_RE.sub(lambda m: _blank(m.group(0)), s)

    # Kernel definitions: parse the parameters, strip `kernel`, rewrite the
    # body's threadgroup declarations, append a layout function.
    definitions: Dict[str, dict] = {}
    namespaces_at = _namespace_finder(s)
    out, last = [], 0
    for m in _KERNEL_DEF_RE.finditer(s):
        if m.start() < last:
            continue
        fname = m.group("name")
        kw_start, kw_end = m.span("kw") if m.group("kw") is not None else m.span("kw2")
        open_paren = m.end() - 1
        close_paren = _match_forward(s, open_paren, "(", ")")
        after = s[close_paren + 1:]
        q = re.match(r"\s*\{", after)
        if not q:  # a declaration (`kernel void f(...);`): the keyword goes, the definition is found later
            out.append(s[last:kw_start] + " " * (kw_end - kw_start))
            last = kw_end
            continue
        open_brace = close_paren + 1 + q.end() - 1
        close_brace = _match_forward(s, open_brace, "{", "}")
        params_text = s[open_paren + 1:close_paren]
        params = _parse_params(_restore_strings(params_text, saved), fname)
        body = s[open_brace:close_brace + 1]
        body, tg_decls, tg_names, tg_inits = _rewrite_threadgroup_decls(body, fname)
        body = _check_pointer_params(body, params)
        leftover = re.search(r"\bthreadgroup\s+[^;*&]*;", body)
        if leftover:  # erasing `threadgroup` here would make a per-thread variable: refuse
            raise TranslationError(f"kernel {fname}: unsupported threadgroup declaration "
                                   f"{' '.join(leftover.group(0).split())!r} (Metal allows `threadgroup T name[N];`)")
        attrs = _restore_strings((m.group("attrs") or "") + (m.group("attrs2") or ""), saved)
        mt = _MAX_THREADS_RE.search(attrs)
        uses_sync = bool(SYNC_RE.search(body)) or any(
            re.search(r"\b" + re.escape(fn) + r"\s*[<(]", body) for fn in sync_fns)
        template = m.group("template") or ""
        # Overloaded kernel templates (PyTorch's two fused_sgd): each definition gets its own name, and an
        # instantiation picks the one its parameters match (a kernel cannot be called, so nothing else
        # names it).
        base, fname = fname, fname
        while fname in definitions:
            fname = f"{base}__mtl_overload{sum(d['base'] == base for d in definitions.values())}"
        # The namespace the kernel is defined in: the kernel table, at global scope, names it from there
        # (an instantiation inside the namespace may name it unqualified, as PyTorch's Gemm.metal does).
        ns = namespaces_at(m.start())
        definitions[fname] = dict(base=base, params=params, uses_sync=uses_sync, template=bool(template),
                                  namespace="".join(f"::{n}" for n in ns) if ns else "",
                                  template_params=_template_param_names(m.group("tparams") or ""),
                                  max_threads=int(mt.group(1)) if mt else 1024,
                                  host_name=_host_name(attrs) or base, threadgroup_names=tg_names,
                                  layout=f"__mtl_tg_layout_{fname}",
                                  initializer=f"__mtl_tg_init_{fname}" if tg_inits else "")
        header = s[m.start():kw_start] + " " + s[kw_end:m.start("name")] + fname + s[m.end("name"):open_paren]
        layout_lines = [f"{' '.join(template.split())} inline size_t __mtl_tg_layout_{fname}(size_t* offsets) {{", "  size_t total = 0;"]
        layout_lines += ["  " + " ".join(decl.split()) for decl in _local_constants_for(body, tg_decls)]
        for site, type_id in enumerate(tg_decls):
            layout_lines.append(f"  total = __mtl::threadgroup_place<{type_id}>(total, offsets, {site});")
        layout_lines += ["  return total;", "}"]
        if tg_inits:
            # Initialized threadgroup variables (`threadgroup uint32_t flag = 0;`, `threadgroup float
            # buf[32] = {0};`). On Apple's GPUs every thread stores the value when it reaches the
            # declaration, so a thread's store made before another thread gets there may be overwritten;
            # here the value is stored once per threadgroup before any of its threads runs, which is what a
            # program relying on it expects, deterministically (the scheduler calls this after filling
            # threadgroup memory with poison).
            layout_lines += [f"{' '.join(template.split())} inline void __mtl_tg_init_{fname}(unsigned char* base, "
                             "const size_t* offsets) {"]
            layout_lines += ["  " + " ".join(decl.split()) for decl in
                             _local_constants_for(body, tg_decls + [init for _, init in tg_inits])]
            for site, init in tg_inits:
                layout_lines.append(f"  {{ using __mtl_t = {tg_decls[site]}; __mtl_t __mtl_v = {' '.join(init.split())}; "
                                    f"__builtin_memcpy(base + offsets[{site}], (const void*)&__mtl_v, sizeof(__mtl_t)); }}")
            layout_lines.append("}")
        out.append(s[last:m.start()])
        out.append(header + s[open_paren:open_brace] + body)
        out.append(" " + " ".join(layout_lines))  # one line: keeps line numbers
        last = close_brace + 1
    out.append(s[last:])
    s = "".join(out)

    kernels: List[Kernel] = []
    for host, qualified, targs, inst_params, site_scope in instantiations:
        fname = qualified.split("::")[-1]  # `kernel void ::c10::metal::f<T>(...)`: defined as f
        if fname not in definitions:
            raise TranslationError(f"host_name {host!r} instantiates {fname}, which is not a kernel defined in {name}.metal")
        fname = _pick_overload(definitions, fname, targs, inst_params)
        d = definitions[fname]
        qualified = f"{d['namespace']}::{fname}" if d["namespace"] else "::".join(qualified.split("::")[:-1] + [fname])
        if not targs.startswith("<"):  # deduced from the instantiation's parameters
            inst = _parse_params(targs, fname)
            deduced = _deduce_template_args(d["template_params"], [p.type for p in d["params"]],
                                            [p.type for p in inst])
            if deduced is None:
                raise TranslationError(f"host_name {host!r}: cannot deduce the template arguments of {fname} from "
                                       f"its parameters ({', '.join(p.type for p in inst)})")
            targs = deduced
        scope = qualified.split("::")[:-1]
        kernels.append(Kernel(host, qualified, targs, d["params"], d["uses_sync"], d["max_threads"],
                              d["threadgroup_names"], "::".join(scope + [d["layout"]]),
                              "::".join(scope + [d["initializer"]]) if d["initializer"] else "", site_scope))
    for fname, d in definitions.items():
        if not d["template"]:
            scope = [d["namespace"]] if d["namespace"] else []
            kernels.append(Kernel(d["host_name"], "::".join(scope + [fname]), "", d["params"], d["uses_sync"],
                                  d["max_threads"], d["threadgroup_names"], "::".join(scope + [d["layout"]]),
                                  "::".join(scope + [d["initializer"]]) if d["initializer"] else ""))
    if not kernels:
        raise TranslationError(f"{name}.metal defines no kernel")

    s = _ATTR_RE.sub(" ", s)
    s = _erase_address_spaces(s)
    s = _constexpr_vectors(s)
    s = _conditional_literals(s)
    s = _rewrite_literals(s)
    s = _rewrite_swizzles(s)
    s = _tag_sync_sites(s, user_functions)
    s = _poll_loops(s)
    s = _restore_strings(s, saved)

    table = _kernel_table(kernels)
    cpp = f'#include "metal_runtime.h"\n{s}\n{table}'
    return Translation(cpp, kernels)


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _kernel_table(kernels: List[Kernel]) -> str:
    lines = ["// ---- kernel table (generated by my_mps_ops.emulator.translate)", "using namespace metal;"]
    entries = []
    scoped = {}  # kernel -> prefix naming its helpers from global scope
    for i, k in enumerate(kernels):
        # An instantiation inside a namespace names its template arguments from there (`GemmEpilogue::ab`
        # in namespace at_gemm): its helpers are declared in that namespace too.
        scoped[i] = f"::{k.scope}::" if k.scope else ""
        if k.scope:
            lines.append(f"namespace {k.scope} {{")
        fn = f"&{k.function}{k.template_args}"
        lines.append(f"using __mtl_fn_{i} = decltype({fn});")
        params = []
        for j, p in enumerate(k.params):
            bytes_expr = f"__mtl::param_bytes<__mtl_fn_{i}, {j}>()" if p.kind == PARAM_BUFFER else "0"
            params.append(f"{{{p.kind}, {p.index}, {bytes_expr}, {_c_string(p.name)}, {_c_string(p.type)}}}")
        if params:
            lines.append(f"static const mtl_emu_param __mtl_params_{i}[] = {{{', '.join(params)}}};")
        else:
            lines.append(f"static const mtl_emu_param* const __mtl_params_{i} = nullptr;")
        lines.append(f"static void __mtl_invoke_{i}(const mtl_emu_launch* L, const mtl_emu_lane* lane) "
                     f"{{ __mtl::invoke_kernel<{fn}>(__mtl_params_{i}, L, lane); }}")
        lines.append(f"static size_t __mtl_layout_{i}(size_t* o) {{ return {k.layout}{k.template_args}(o); }}")
        names = "".join(f"{_c_string(n)}, " for n in k.threadgroup_names)
        lines.append(f"static const char* const __mtl_tg_names_{i}[] = {{{names}nullptr}};")
        if k.initializer:
            lines.append(f"static void __mtl_tg_init_{i}(unsigned char* b, const size_t* o) "
                         f"{{ {k.initializer}{k.template_args}(b, o); }}")
        if k.scope:
            lines.append("}")
        q = scoped[i]
        entries.append(f"{{{_c_string(k.host_name)}, {len(k.params)}, {q}__mtl_params_{i}, {int(k.uses_sync)}, "
                       f"{q}__mtl_layout_{i}, {q}__mtl_invoke_{i}}}")
    lines.append(f"static const mtl_emu_kernel __mtl_kernel_table[] = {{{', '.join(entries)}}};")
    lines.append(f"static const char* const* const __mtl_tg_names[] = {{{', '.join(f'{scoped[i]}__mtl_tg_names_{i}' for i in range(len(kernels)))}}};")
    lines.append("const char* const* __mtl::threadgroup_names(const mtl_emu_kernel* k) "
                 "{ return __mtl_tg_names[k - __mtl_kernel_table]; }")
    inits = ", ".join(f"{scoped[i]}__mtl_tg_init_{i}" if k.initializer else "nullptr" for i, k in enumerate(kernels))
    lines.append(f"static void (*const __mtl_tg_inits[])(unsigned char*, const size_t*) = {{{inits}}};")
    lines.append("void __mtl::threadgroup_initialize(const mtl_emu_kernel* k, unsigned char* base, const size_t* offsets) "
                 "{ if (auto f = __mtl_tg_inits[k - __mtl_kernel_table]) f(base, offsets); }")
    lines.append('extern "C" __attribute__((visibility("default"))) const mtl_emu_kernel* '
                 "mtl_emu_kernels(int32_t* count, int32_t* abi) "
                 f"{{ *count = {len(kernels)}; *abi = MTL_EMU_ABI_VERSION; return __mtl_kernel_table; }}")
    return "\n".join(lines) + "\n"
