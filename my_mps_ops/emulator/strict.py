"""A strict Metal Shading Language front end: rejects what Apple's compiler rejects.

The emulator compiles MSL with g++, which accepts much that Apple's Metal
compiler refuses (a struct member named ``half``, ``double``, a device pointer
passed where a thread one is expected...). ``check_msl`` compiles the source a
second time, with clang in C++ for OpenCL mode, only to find such errors:

- OpenCL's address spaces stand in for MSL's (device = __global,
  threadgroup = __local, constant = __constant, thread = __private), so
  clang checks pointer conversions, writes through constant pointers,
  program-scope variables outside constant memory, function pointers,
  virtual functions, exceptions, new/delete and double (fp64 is off);
- ``strict_include/`` is a declarations-only ``<metal_stdlib>`` whose overload
  sets follow the MSL specification, so unknown functions and wrong
  overloads fail as they do with Apple's library;
- the source is preprocessed first (``__METAL__`` and ``__METAL_VERSION__``
  defined as by Apple's compiler, line markers kept), then rewritten where
  clang and MSL differ: attributes are set aside, ``kernel`` becomes an
  annotation (kernels may be templates), vector constructors
  (``float4(a, b)``) become calls of a checked constructor template, MSL type
  names are qualified (so that declaring one as an identifier fails),
  ``threadgroup`` variables of function bodies become references to
  threadgroup storage, unqualified pointer parameters become thread ones,
  every class gets copy members from the constant address space, the
  operands of ``?:`` become prvalues, casts to vectors convert element-wise;
- checks of its own: MSL type names and address spaces as declared names,
  kernel parameters (address spaces, built-in attributes and their types),
  ``goto`` and direct recursion (of functions that are not templates).

clang's generic address space stays on (without it clang cannot construct a
class temporary), so `this` and what is reached through it are generic here
where MSL's are thread: thread references and member qualifiers are left
generic, and only pointer parameters keep MSL's thread default strictly.

Errors name ``file:line:col`` of the MSL source (the checked source under
``name``). ``python -m my_mps_ops.emulator.strict FILE...`` checks files.
Sources that passed are remembered under the cache directory
(MY_MPS_OPS_STRICT_CACHE=0 turns that off); MY_MPS_OPS_STRICT_KEEP=DIR keeps
the rewritten source clang checked.
"""

from __future__ import annotations

import bisect
import difflib
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["MSLStrictError", "check_msl", "find_clang", "STRICT_INCLUDE_DIR", "METAL_VERSION"]

STRICT_INCLUDE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "strict_include")
# The emulator's preprocessor defines the same version (translate.preprocess).
METAL_VERSION = 320


class MSLStrictError(RuntimeError):
    """The source is not MSL that Apple's compiler accepts; the message lists each error."""

    def __init__(self, message: str, errors: Sequence["Diagnostic"] = ()):
        super().__init__(message)
        self.errors = list(errors)


@dataclass
class Diagnostic:
    path: str
    line: int
    col: int
    message: str
    notes: List[str] = field(default_factory=list)
    own: bool = False  # found by the front end's own checks
    shadows_line: bool = False  # clang's errors on its line are its consequences

    def __str__(self) -> str:
        text = f"{self.path}:{self.line}:{self.col}: error: {self.message}"
        return "\n".join([text] + [f"  {n}" for n in self.notes])


# ------------------------------------------------------------------- clang

_CLANG_CANDIDATES = ["clang++", "clang"] + [f"clang++-{v}" for v in range(20, 13, -1)] + \
    [f"clang-{v}" for v in range(20, 13, -1)]

_OPENCL_FLAGS = [
    "-x", "clcpp", "-cl-std=clc++2021", "-target", "spir64",
    # No double (MSL has none); program-scope variables only in constant memory.
    # Function pointers are on (the prelude enables them): MSL 2.3+ has them, and Apple's compiler builds
    # PyTorch's and MLX's uses; the front end rejects function pointer variables and members itself.
    "-Xclang", "-cl-ext=-cl_khr_fp64,-__opencl_c_fp64,-__opencl_c_program_scope_global_variables,"
               "-__opencl_c_device_enqueue,+__cl_clang_function_pointers",
    "-cl-no-stdinc", "-nostdinc",
]
# What Apple's compiler defines; OpenCL's own macros are removed so that
# shared headers do not take an OpenCL branch.
_DEFINES = ["-D__METAL__=1", f"-D__METAL_VERSION__={METAL_VERSION}", "-D__METAL_MACOS__=1",
            "-D__HAVE_BFLOAT__=1"]
_OPENCL_MACROS = ["__OPENCL_VERSION__", "__OPENCL_C_VERSION__", "__OPENCL_CPP_VERSION__", "__CL_CPP_VERSION_1_0__",
                  "__CL_CPP_VERSION_2021__", "CL_VERSION_1_0", "CL_VERSION_1_1", "CL_VERSION_1_2", "CL_VERSION_2_0",
                  "CL_VERSION_3_0", "__SPIR__", "__SPIR64__", "__ENDIAN_LITTLE__", "__IMAGE_SUPPORT__",
                  "__OPENCL_MEMORY_SCOPE_WORK_ITEM", "__OPENCL_MEMORY_SCOPE_WORK_GROUP",
                  "__OPENCL_MEMORY_SCOPE_DEVICE", "__OPENCL_MEMORY_SCOPE_ALL_SVM_DEVICES",
                  "__OPENCL_MEMORY_SCOPE_SUB_GROUP"]


def _clang_works(path: str) -> bool:
    try:
        proc = subprocess.run([path, *_OPENCL_FLAGS, "-fsyntax-only", "-"], input="", capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


@functools.lru_cache(maxsize=None)
def _find_clang(override: Optional[str]) -> Optional[str]:
    candidates = [override] if override else _CLANG_CANDIDATES
    for name in candidates:
        path = shutil.which(name)
        if path and _clang_works(path):
            return path
    return None


def find_clang() -> Optional[str]:
    """A clang that compiles C++ for OpenCL 2021 (clang 14 or newer), or None.

    MY_MPS_OPS_STRICT_CLANG names one explicitly."""
    return _find_clang(os.environ.get("MY_MPS_OPS_STRICT_CLANG") or None)


# ---------------------------------------------------------------- tokens

_TOKEN_RE = re.compile(r"""
    (?P<ws>[ \t\r\f\v]+)
  | (?P<nl>\n)
  | (?P<str>(?:u8|u|U|L)?"(?:\\.|[^"\\\n])*")
  | (?P<chr>(?:u8|u|U|L)?'(?:\\.|[^'\\\n])*')
  | (?P<num>\.?\d(?:[eEpP][+-]|[\w.])*)
  | (?P<id>[A-Za-z_]\w*)
  | (?P<op>\.\.\.|<<=|>>=|->\*|::|->|\+\+|--|<<|>>|<=|>=|==|!=|&&|\|\||\+=|-=|\*=|/=|%=|&=|\|=|\^=|\#\#|.)
""", re.X)


@dataclass
class Tok:
    kind: str  # id, num, str, chr, op
    text: str
    line: int  # physical line in the preprocessed text (0-based)
    col: int  # column in that line (0-based)
    user: bool  # from the checked source or its headers, not from the strict library
    file: str = ""
    pline: int = 0  # presumed line in `file` (1-based)


@dataclass
class Preprocessed:
    lines: List[str]
    tokens: List[Tok]
    line_info: List[Tuple[str, int, bool]]  # per physical line: (file, presumed line, user)


_MARKER_RE = re.compile(r'^#\s*(?:line\s+)?(\d+)\s+"((?:\\.|[^"\\])*)"')


def _tokenize(text: str, library_dir: str) -> Preprocessed:
    lines = text.split("\n")
    tokens: List[Tok] = []
    info: List[Tuple[str, int, bool]] = []
    cur_file, cur_line = "", 1
    for i, line in enumerate(lines):
        m = _MARKER_RE.match(line)
        if m:
            info.append((cur_file, cur_line, False))
            cur_line = int(m.group(1))
            cur_file = m.group(2).encode().decode("unicode_escape")
            continue
        user = not (cur_file.startswith(library_dir) or cur_file.startswith("<"))
        info.append((cur_file, cur_line, user))
        if not user or line.lstrip().startswith("#"):  # the library, #pragma lines
            cur_line += 1
            continue
        for t in _TOKEN_RE.finditer(line):
            kind = t.lastgroup
            if kind in ("ws", "nl"):
                continue
            tokens.append(Tok(kind, t.group(), i, t.start(), user, cur_file, cur_line))
        cur_line += 1
    return Preprocessed(lines, tokens, info)


# ------------------------------------------------------------ MSL vocabulary

_VECTOR_ELEMENTS = ["bool", "char", "uchar", "short", "ushort", "int", "uint", "long", "ulong", "half", "float",
                    "bfloat"]
EXT_VECTOR_TYPES = {f"{p}{e}{n}" for e in _VECTOR_ELEMENTS if e != "bool" for n in (2, 3, 4) for p in ("", "packed_")}
CLASS_VECTOR_TYPES = {f"{p}bool{n}" for n in (2, 3, 4) for p in ("", "packed_")}
MATRIX_TYPES = {f"{e}{c}x{r}" for e in ("half", "float") for c in (2, 3, 4) for r in (2, 3, 4)}
SIMDGROUP_MATRIX_TYPES = {f"simdgroup_{e}8x8" for e in ("half", "float", "bfloat")}
# Type names of MSL that cannot name a declaration (half is a keyword of clang's OpenCL already).
RESERVED_TYPE_NAMES = EXT_VECTOR_TYPES | CLASS_VECTOR_TYPES | MATRIX_TYPES | {"bfloat"}
FUNCTION_QUALIFIERS = {"kernel": "metal_kernel", "vertex": "metal_vertex", "fragment": "metal_fragment"}
_ADDRESS_SPACES = {"__global": "device", "__local": "threadgroup", "__constant": "constant", "__private": "thread"}
_KERNEL_SPACES = {"__global", "__local", "__constant"}

_SCALAR_AND_VECTOR_NAMES = {f"{e}{n}" for e in _VECTOR_ELEMENTS for n in ("", "2", "3", "4")} | \
    {"int", "unsigned int", "unsigned", "unsigned short", "unsigned char", "signed char", "size_t", "ptrdiff_t",
     "int8_t", "uint8_t", "int16_t", "uint16_t", "int32_t", "uint32_t", "int64_t", "uint64_t"}
_BUILTIN_TYPES_GRID = {"uint", "uint2", "uint3", "ushort", "ushort2", "ushort3"}
_BUILTIN_TYPES_INDEX = {"uint", "ushort"}
KERNEL_BUILTINS = {
    **{n: _BUILTIN_TYPES_GRID for n in (
        "thread_position_in_grid", "threadgroup_position_in_grid", "thread_position_in_threadgroup",
        "threads_per_threadgroup", "threadgroups_per_grid", "threads_per_grid", "dispatch_threads_per_threadgroup",
        "grid_origin", "grid_size")},
    **{n: _BUILTIN_TYPES_INDEX for n in (
        "thread_index_in_threadgroup", "thread_index_in_simdgroup", "simdgroup_index_in_threadgroup",
        "threads_per_simdgroup", "simdgroups_per_threadgroup", "thread_execution_width",
        "thread_index_in_quadgroup", "quadgroup_index_in_threadgroup", "quadgroups_per_threadgroup",
        "dispatch_simdgroups_per_threadgroup", "dispatch_quadgroups_per_threadgroup")},
}
_PARAM_ATTRIBUTES = re.compile(r"^(buffer|threadgroup|__local|texture|sampler|function_constant|id|raster_order_group)"
                               r"\s*\(|^(stage_in|payload|visible)$")

_CONTROL_KEYWORDS = {"if", "for", "while", "switch", "return", "sizeof", "alignof", "decltype", "static_assert",
                     "__attribute__", "catch", "noexcept", "throw", "new", "delete", "typeid", "case", "else",
                     "do", "alignas", "__typeof__", "typeof", "_Pragma", "defined", "annotate", "co_return"}
_STANDARD_HEADERS = {"math.h", "stdint.h", "stddef.h", "stdio.h", "stdlib.h", "string.h", "float.h", "limits.h",
                     "assert.h", "stdbool.h"}
# Keywords and types of clang's OpenCL that are plain names (or metal:: types) in MSL.
_OPENCL_WORDS = {"global", "local", "read_only", "write_only", "read_write", "pipe", "generic", "image1d_t",
                 "image2d_t", "image3d_t", "image1d_array_t", "image2d_array_t", "image1d_buffer_t", "sampler_t",
                 "event_t", "queue_t", "clk_event_t", "reserve_id_t", "ndrange_t", "atomic_int", "atomic_uint",
                 "atomic_float", "atomic_bool", "atomic_ulong", "atomic_long", "atomic_flag", "atomic_double",
                 "atomic_size_t", "atomic_ptrdiff_t", "atomic_intptr_t", "atomic_uintptr_t", "atomic_half"}
_MSL_ATOMICS = {"atomic_int", "atomic_uint", "atomic_float", "atomic_bool", "atomic_ulong"}
# Before a type name in an expression or a type-id rather than in a declaration.
_NOT_DECLARATION_KEYWORDS = {"return", "case", "sizeof", "alignof", "typename", "operator", "new", "delete", "throw",
                             "else", "do", "co_return", "co_yield", "const", "volatile", "static", "constexpr",
                             "inline", "extern", "thread_local", "mutable", "unsigned", "signed", "typedef", "using",
                             "__global", "__local", "__constant", "__private", "__generic", "template", "friend",
                             "virtual", "explicit", "register", "auto"}
_PARAM_SKIP = {"__global", "__local", "__constant", "__private", "__generic"}


# ---------------------------------------------------------------- rewriting

@dataclass
class Edit:
    index: int  # token index
    text: str  # replacement of the token ("" deletes it)
    before: str = ""  # inserted before the token
    after: str = ""  # inserted after it (closing parentheses of rewrites)


@dataclass
class KernelInfo:
    name: str
    name_tok: int
    params: List[Tuple[int, int]]  # token ranges [start, end)
    attrs: Dict[int, List[str]]  # token index of an attribute's opening bracket -> its content
    body: Optional[Tuple[int, int]]
    qualifier: str


def _match(tokens: List[Tok], i: int, open_c: str, close_c: str) -> int:
    depth = 0
    for j in range(i, len(tokens)):
        t = tokens[j].text
        if t == open_c:
            depth += 1
        elif t == close_c:
            depth -= 1
            if depth == 0:
                return j
    return len(tokens) - 1


def _split_top_level(tokens: List[Tok], start: int, end: int) -> List[Tuple[int, int]]:
    """Comma-separated ranges of tokens[start:end] (brackets and template arguments nest)."""
    parts, depth, angle, s = [], 0, 0, start
    for j in range(start, end):
        t = tokens[j].text
        if t in "([{":
            depth += 1
        elif t in ")]}":
            depth -= 1
        elif t == "<" and depth == 0 and j > start and tokens[j - 1].kind == "id":
            angle += 1
        elif t == ">" and angle > 0 and depth == 0:
            angle -= 1
        elif t == ">>" and angle > 0 and depth == 0:
            angle = max(0, angle - 2)
        elif t == "," and depth == 0 and angle == 0:
            parts.append((s, j))
            s = j + 1
    if s < end:
        parts.append((s, end))
    return parts


class _Rewriter:
    def __init__(self, pre: Preprocessed):
        self.pre = pre
        self.toks = pre.tokens
        self.edits: Dict[int, Edit] = {}
        self.errors: List[Tuple[int, str]] = []  # (token index, message)
        self.kernels: List[KernelInfo] = []
        self.attrs: Dict[int, str] = {}  # token index of `[[` -> attribute text
        self.attr_end: Dict[int, int] = {}  # token index of `[[` -> index after its `]]`
        self.threadgroup_variables: List[Tuple[int, int, int, int, int]] = []
        self.functions: List[Tuple[str, int, int, int, int]] = []  # name, name tok, params (start, end), body start
        self.function_pointer_aliases: set = set()  # `using F = R (*)(A...);` names
        self.function_template_param_names: set = set()  # template parameters of those types (made `auto`)
        self.dropped: set = set()  # token indices removed for good (later passes may not bring their text back)
        self.template_function_params: List[Tuple[int, int, frozenset]] = []  # (open, close, template params)
        self._pending_template: frozenset = frozenset()
        self._own_template: frozenset = frozenset()  # the parameters of the template head being declared
        self.dependent_aliases: set = set()  # type aliases declared in templates
        self.conditional_literals: List[Tuple[Tuple[int, int], Tuple[int, int]]] = []  # (literal, other operand)
        self.alias_templates: set = set()  # names of `template <...> using X = ...;`
        self.renamed_tokens: List[Tuple[int, str]] = []  # (index, original text) of _static_only_structs
        self.conditional_operands: List[Tuple[int, Tuple[int, int], Tuple[int, int]]] = []  # ('?', 2nd, 3rd)

    def edit(self, i: int, text: Optional[str] = None, before: str = "", after: str = "") -> None:
        e = self.edits.get(i)
        if e is None:
            e = self.edits[i] = Edit(i, self.toks[i].text)
        if text is not None and i not in self.dropped:
            e.text = text
        e.before += before
        e.after += after

    # -- passes

    def run(self) -> None:
        self._attributes()
        self._function_pointer_aliases()
        self._static_only_structs()
        self._scan()
        self._finish_threadgroup_variables()
        self._finish_conditional_literals()
        for k, text in self.renamed_tokens:
            self.toks[k].text = text

    def _attributes(self) -> None:
        toks = self.toks
        i = 0
        while i + 1 < len(toks):
            if toks[i].text == "[" and toks[i + 1].text == "[" and toks[i].user and toks[i + 1].col == toks[i].col + 1:
                j = i + 2
                depth = 0
                while j + 1 < len(toks):
                    if toks[j].text in "([{":
                        depth += 1
                    elif toks[j].text in ")}":
                        depth -= 1
                    elif toks[j].text == "]" and depth == 0 and toks[j + 1].text == "]":
                        break
                    elif toks[j].text == "]":
                        depth -= 1
                    j += 1
                self.attrs[i] = " ".join(t.text for t in toks[i + 2:j])
                self.attr_end[i] = j + 2
                for k in range(i, min(j + 2, len(toks))):
                    self.edit(k, "")
                i = j + 2
                continue
            i += 1

    def _is_attr_tok(self, i: int) -> bool:
        e = self.edits.get(i)
        return e is not None and e.text == "" and not e.before and not e.after

    def _prev(self, i: int, skip_attrs: bool = True) -> int:
        j = i - 1
        while j >= 0 and skip_attrs and self._is_attr_tok(j):
            j -= 1
        return j

    def _next(self, i: int) -> int:
        j = i + 1
        while j < len(self.toks) and self._is_attr_tok(j):
            j += 1
        return j

    def _scan(self) -> None:
        toks = self.toks
        n = len(toks)
        # Scope stack: (kind, closing token index, class name or None, template params)
        stack: List[Tuple[str, int, Optional[str], frozenset]] = [("ns", n, None, frozenset())]
        pending_template: frozenset = frozenset()
        i = 0
        while i < n:
            t = toks[i]
            while len(stack) > 1 and i > stack[-1][1]:
                stack.pop()
            kind = stack[-1][0]
            text = t.text
            if self._is_attr_tok(i) and i not in self.attr_end:
                i += 1  # set aside by an earlier rewrite
                continue
            if i in self.attr_end:
                if "metal_kernel" in self.attrs[i] or self.attrs[i].strip() == "kernel":
                    self._kernel_declaration(self.attr_end[i] - 1, "kernel")
                if self.attrs[i].startswith("function_constant") and kind == "ns":
                    self._function_constant(self.attr_end[i])
                i = self.attr_end[i]
                continue
            if text == "template" and kind in ("ns", "class"):
                nxt = self._next(i)
                if nxt < n and toks[nxt].text == "<":
                    close = self._angle_close(nxt)
                    names = {toks[k + 1].text for k in range(nxt, close)
                             if toks[k].text in ("class", "typename") and k + 1 < close and toks[k + 1].kind == "id"}
                    pending_template = frozenset(names) | stack[-1][3]
                    self._own_template = frozenset(names)
                    self._function_template_params(nxt, close)
            if t.kind == "id":
                self._pending_template = pending_template
                self._identifier(i, kind, stack)
                if kind == "func" and text in stack[-1][3]:
                    self._template_typed_local(i)
                    self._template_construction(i)
                elif kind == "func" and text in self.dependent_aliases:
                    self._template_construction(i)
                if text == "using" and (stack[-1][3] or pending_template) and i + 2 < n and \
                        toks[i + 1].kind == "id" and toks[i + 2].text == "=":
                    # `using complex_T = vec<T, 2>;` in a template: `complex_T(a, b)` may construct a vector
                    self.dependent_aliases.add(toks[i + 1].text)
                if text == "typedef" and (stack[-1][3] or pending_template):
                    j = i + 1
                    while j < n and toks[j].text not in (";", "{", "(", "["):
                        j += 1
                    if j < n and toks[j].text == ";" and toks[j - 1].kind == "id":
                        self.dependent_aliases.add(toks[j - 1].text)
            elif t.kind == "num":
                self._number(i)
            if text == "(" and kind in ("ns", "class"):
                self._function_declarator(i, stack, pending_template)
            if text == "{":
                close = _match(toks, i, "{", "}")
                new_kind, cname = self._brace_kind(i, kind)
                tparams = pending_template if new_kind == "class" else \
                    (pending_template | stack[-1][3] if new_kind == "func" else stack[-1][3])
                if new_kind == "class" and cname:
                    self._inject_copy_members(i, close, cname)
                stack.append((new_kind, close, cname, tparams))
                pending_template = frozenset() if new_kind == "class" else pending_template
            elif text == ";" and kind in ("ns", "class"):
                pending_template = stack[-1][3] if kind == "class" else frozenset()
                self._own_template = frozenset()
            if text in ("{", "}"):
                self._own_template = frozenset()
            if text == "__local" and kind == "func":
                self._threadgroup_variable(i)
            if text in _ADDRESS_SPACES and not self._qualifies_member(i):
                nxt = self._next(i)
                if nxt < n and toks[nxt].text in (";", "=", ",", ")", "[", "{", ":"):
                    self.errors.append((i, f"'{_ADDRESS_SPACES[text]}' is an MSL address space: it cannot name a "
                                           "variable, member, parameter, function or type"))
            if text == "__private":
                self._thread_qualifier(i, any(sc[0] == "class" for sc in stack))
            if text == "__constant" and kind == "ns" and self._redundant_static_definition(i):
                i += 1
                continue
            if text == "__constant" and kind == "func" and self._declarator_kind(i) == "value":
                # A block-scope `constexpr constant int k = 1;` (clang's OpenCL allows constant variables
                # in kernel functions only, which cannot be templates): a const local.
                self.edit(i, "const")
                i += 1
                continue
            if text == "__constant" and not self._qualifies_member(i):
                # MSL's constant memory is read-only: `constant T&` binds a `const constant T` as well.
                self.edit(i, before="const ")
            if text == "{" and kind == "func":
                self._braced_argument(i)
            if text == "?":
                self._conditional(i)
            if text == "(" and kind == "func":
                self._c_style_cast(i, stack[-1][3])
            if kind == "func" and (text == "static_cast" or text in self.alias_templates):
                self._vector_cast(i, stack[-1][3])
            if text == "goto":
                self.errors.append((i, "goto is not supported in MSL"))
            if text == "virtual" and kind == "class":
                # (clang's OpenCL allows them with function pointers on)
                self.errors.append((i, "virtual functions are not supported in MSL"))
            if kind in ("func", "class") and (text == "(" or text in self.function_pointer_aliases):
                self._function_pointer_object(i)
            i += 1

    def _static_only_structs(self) -> None:
        """A struct of static member functions only, named only as a qualifier (`Op::amax<T>`, PyTorch's
        IndexReduceOp), becomes a namespace of inline functions: clang's OpenCL gives static member functions
        a `__generic` method qualifier, so one cannot bind to a function-pointer template parameter, which
        Apple's compiler allows."""
        toks = self.toks
        n = len(toks)
        for i in range(n - 3):
            if toks[i].text != "struct" or not toks[i].user or toks[i + 1].kind != "id" or toks[i + 2].text != "{":
                continue
            p = self._prev(i)
            if p >= 0 and toks[p].text not in (";", "}", "{"):
                continue  # a template, a declaration's type...
            name, close = toks[i + 1].text, _match(toks, i + 2, "{", "}")
            if close + 1 >= n or toks[close + 1].text != ";":
                continue
            statics, j, ok = [], i + 3, True
            while j < close and ok:  # each member: [template <...>] static R f(...) {...}
                if toks[j].text == "template" and j + 1 < close and toks[j + 1].text == "<":
                    j = self._angle_close(j + 1) + 1
                if j >= close or toks[j].text != "static":
                    ok = False
                    break
                statics.append(j)
                k = j + 1
                while k < close and toks[k].text not in ("(", ";", "{", "="):
                    k += 1
                if k >= close or toks[k].text != "(":
                    ok = False
                    break
                k = _match(toks, k, "(", ")") + 1
                while k < close and toks[k].text != "{" and toks[k].text != ";":
                    k += 1
                if k >= close or toks[k].text != "{":
                    ok = False
                    break
                j = _match(toks, k, "{", "}") + 1
            if not ok or not statics:
                continue
            if any(toks[k].text == name and (k + 1 >= n or toks[k + 1].text != "::") for k in range(n)
                   if k != i + 1):
                continue  # used as a type
            # (the passes read the new words; output() needs the old ones' lengths: run() restores them)
            for k, word in [(i, "namespace")] + [(k, "inline") for k in statics]:
                self.renamed_tokens.append((k, toks[k].text))
                toks[k].text = word
                self.edit(k, word)

    def _function_pointer_aliases(self) -> None:
        """The names of function pointer types, `using F = R (*)(A...);`: template parameters of such a type
        become `auto` (_function_template_params; clang's OpenCL cannot bind a function to one), variables and
        members of it are rejected (_function_pointer_object)."""
        toks = self.toks
        n = len(toks)
        for i in range(n - 4):
            if toks[i].text != "using" or toks[i + 1].kind != "id" or toks[i + 2].text != "=":
                continue
            end = i + 3
            while end < n and toks[end].text not in (";", "{", "}"):
                end += 1
            if end >= n or toks[end].text != ";":
                continue
            depth, star = 0, None
            for j in range(i + 3, end - 3):
                tx = toks[j].text
                if tx == "(" and depth == 0 and toks[j + 1].text == "*" and toks[j + 2].text == ")" and \
                        toks[j + 3].text == "(":
                    star = j
                    break
                if tx in ("(", "[", "<"):
                    depth += 1
                elif tx in (")", "]", ">"):
                    depth -= 1
            if star is None or _match(toks, star + 3, "(", ")") != end - 1:
                continue
            self.function_pointer_aliases.add(toks[i + 1].text)
        for i in range(1, n - 2):  # alias templates: `template <...> using X =`
            if toks[i].text == "using" and toks[i - 1].text == ">" and toks[i + 1].kind == "id" and \
                    toks[i + 2].text == "=":
                self.alias_templates.add(toks[i + 1].text)

    def _function_pointer_object(self, i: int) -> None:
        """A variable or member of a function pointer type (`R (*name)(A...)`, or of an alias of one), in a
        function body or a class: rejected. (Function pointers as parameters and template parameters, bound to
        a function where the code is inlined, are what Apple's compiler builds in PyTorch's and MLX's
        kernels; a function pointer object needs [[visible]] functions and a function table.)"""
        toks = self.toks
        n = len(toks)
        e = self.edits.get(i)
        if e is not None and e.text == "" and not e.before:
            return  # a template parameter rewritten away
        p = self._prev(i)
        if p >= 0 and toks[p].text in ("::", ".", "->", "<", ","):
            return
        if toks[i].text == "(":
            if not (i + 4 < n and toks[i + 1].text == "*" and toks[i + 2].kind == "id" and toks[i + 3].text == ")"
                    and toks[i + 4].text == "("):
                return
            if p < 0 or not (toks[p].kind == "id" and toks[p].text not in _CONTROL_KEYWORDS or toks[p].text == ">"):
                return
            if self._in_parameter_list(i):
                return
            name = i + 2
        else:
            j = self._next(i)
            if j < n and toks[j].text == "<":
                j = self._angle_close(j) + 1
            if j >= n or toks[j].kind != "id" or j + 1 >= n or toks[j + 1].text not in ("=", ";", "{", ",", "["):
                return
            if self._in_parameter_list(i):
                return
            name = j
        self.errors.append((name, f"pointers to functions are not allowed: '{toks[name].text}' is a function "
                                  "pointer variable or member (MSL takes a function pointer only as a parameter or "
                                  "template parameter bound to a function at compile time; a function pointer "
                                  "object needs [[visible]] functions)"))

    def _in_parameter_list(self, i: int) -> bool:
        """Whether token i is inside the parentheses of a function declarator's parameters."""
        toks = self.toks
        depth = 0
        for j in range(i - 1, max(-1, i - 400), -1):
            tx = toks[j].text
            if tx in (")", "]", "}"):
                depth += 1
            elif tx in ("[", "{"):
                if depth == 0:
                    return False
                depth -= 1
            elif tx == "(":
                if depth == 0:
                    q = self._prev(j)
                    return q >= 0 and (toks[q].kind == "id" and toks[q].text not in _CONTROL_KEYWORDS or
                                       toks[q].text == ">")
                depth -= 1
            elif tx == ";" and depth == 0:
                return False
        return False

    def _function_declarator_return(self, open_i: int) -> bool:
        """Whether the `(` at open_i opens `(*name)(`, `(&name)(` or `(*)(`: the type before it is a function
        pointer's return type, not a vector construction (a call on a constructed vector is no expression)."""
        toks = self.toks
        j = open_i + 1
        if j >= len(toks) or toks[j].text not in ("*", "&"):
            return False
        j += 1
        if j < len(toks) and toks[j].kind == "id":
            j += 1
        return j + 1 < len(toks) and toks[j].text == ")" and toks[j + 1].text == "("

    def _function_template_params(self, open_i: int, close: int) -> None:
        """Non-type template parameters of a function pointer type. clang's OpenCL cannot take a function's
        address in a constant expression (the pointer would need an address space), so `R (*f)(A...)` becomes
        a function reference `R (&f)(A...)`: bound at compile time like Apple's pointer, a function template's
        bare name still deduces its arguments from the parameter type, and calls keep their type checks.
        `F<T> f` with F an alias of a function pointer type becomes `auto f`."""
        toks = self.toks
        if toks[close].text != ">":
            return
        for s, e in _split_top_level(toks, open_i + 1, close):
            texts = [toks[k].text for k in range(s, e)]
            if not texts or texts[0] in ("typename", "class", "template"):
                continue
            if "=" in texts:
                e = s + texts.index("=")
                texts = texts[:e - s]
            name = None
            if texts[0] in self.function_pointer_aliases and toks[e - 1].kind == "id" and e - 1 > s:
                name = e - 1
            elif len(texts) >= 6 and "(" in texts:
                j = s + texts.index("(")
                if toks[j + 1].text == "*" and toks[j + 2].kind == "id" and toks[j + 3].text == ")" and \
                        toks[j + 4].text == "(" and _match(toks, j + 4, "(", ")") == e - 1:
                    self.edit(j + 1, "&")
                    continue
            if name is None:
                continue
            for k in range(s, e):
                if k != name:
                    self.edit(k, "")
                    self.dropped.add(k)  # e.g. a vector return type, which a later pass would qualify
            self.edit(s if s != name else name, before="auto ")
            self.function_template_param_names.add(toks[name].text)

    def _angle_close(self, i: int) -> int:
        depth = 0
        for j in range(i, len(self.toks)):
            t = self.toks[j].text
            if t == "<":
                depth += 1
            elif t == ">":
                depth -= 1
            elif t == ">>":
                depth -= 2
            elif t in (";", "{"):
                return j
            if depth <= 0:
                return j
        return len(self.toks) - 1

    def _brace_kind(self, i: int, kind: str) -> Tuple[str, Optional[str]]:
        toks = self.toks
        # A class head: struct/class/union [name [<args>]] [final] [: bases] {
        j = i - 1
        depth = 0
        while j >= 0:
            tx = toks[j].text
            if tx in (";", "{", "}"):
                break
            if tx in (")", "]"):
                depth += 1
            elif tx in ("(", "["):
                depth -= 1
            elif depth == 0 and tx == "=":
                break
            elif depth == 0 and tx in ("struct", "class", "union", "enum", "namespace") and \
                    not (j > 0 and toks[j - 1].text in ("<", ",") and tx in ("class", "struct")) and \
                    not (tx == "class" and self._template_template_parameter(j)):
                # (`class T` in a template parameter list is not a class head, nor is the `class` of a
                # template template parameter, `template <template <typename> class Op, typename T>`)
                if tx == "namespace":
                    return "ns", None
                if tx == "enum" or (j > 0 and toks[j - 1].text == "enum"):  # `enum class E {` is no class
                    return "init", None
                k = j + 1
                while k < i and (self._is_attr_tok(k) or toks[k].text in ("alignas", "__attribute__")):
                    if toks[k].text in ("alignas", "__attribute__") and k + 1 < i and toks[k + 1].text == "(":
                        k = _match(toks, k + 1, "(", ")")
                    k += 1
                name = toks[k].text if k < i and toks[k].kind == "id" and toks[k].text not in ("final",) else None
                return "class", name
            j -= 1
        if kind == "func":
            return "func", None
        p = self._prev(i)
        if p >= 0:
            pt = toks[p].text
            if pt == ")" or pt in ("const", "volatile", "noexcept", "override", "final", "__global", "__local",
                                    "__constant", "__private", "__generic", "mutable") or \
                    (pt in ("&", "&&") and p > 0 and toks[self._prev(p)].text in (")", "const")):
                return "func", None
            if pt == '"C"' or pt == '"C++"':
                return "ns", None
        return "init", None

    def _template_template_parameter(self, j: int) -> bool:
        """Whether the `class` at j follows `template <...>` inside a template parameter list (an unclosed
        `<` before that `template`)."""
        toks = self.toks
        if j < 1 or toks[j - 1].text not in (">", ">>"):
            return False
        angle, k = 0, j - 1
        while k >= 0 and toks[k].text not in (";", "{", "}"):
            tx = toks[k].text
            if tx == ">":
                angle += 1
            elif tx == ">>":
                angle += 2
            elif tx == "<":
                if angle == 0:
                    return True
                angle -= 1
            k -= 1
        return False

    # -- identifiers and literals

    def _identifier(self, i: int, kind: str, stack) -> None:
        toks = self.toks
        text = toks[i].text
        if text in _OPENCL_WORDS:
            p = self._prev(i)
            if text.startswith("atomic_") and text in _MSL_ATOMICS:
                if p < 0 or toks[p].text not in ("::", ".", "->"):
                    self.edit(i, "::metal::" + text)
            else:
                self.edit(i, "__msl_" + text)  # a keyword or type of clang's OpenCL, a plain name in MSL
            return
        if text in ("vec", "packed_vec"):
            if kind in ("ns", "class"):
                self._deducible_vec(i, stack)
            self._vec_constructor(i)
            return
        if text in FUNCTION_QUALIFIERS:
            self.edit(i, f'__attribute__((annotate("{FUNCTION_QUALIFIERS[text]}")))')
            if text == "kernel" and kind in ("ns", "class"):
                self._kernel_declaration(i, text)
            return
        if text not in RESERVED_TYPE_NAMES and text != "half":
            return
        p = self._prev(i)
        ptext = toks[p].text if p >= 0 else ""
        self._reserved_declarator(i, p)
        if text == "half":
            return
        if ptext in (".", "->"):
            return
        qualified_by_metal = ptext == "::" and p >= 1 and toks[p - 1].text == "metal"
        if ptext == "::" and not qualified_by_metal:
            return
        nxt = self._next(i)
        is_ctor = nxt < len(toks) and toks[nxt].text == "(" and text in EXT_VECTOR_TYPES and \
            ptext != "operator" and not (qualified_by_metal and toks[self._prev(p - 1)].text == "operator") and \
            not self._function_declarator_return(nxt)
        if text in EXT_VECTOR_TYPES and nxt < len(toks) and toks[nxt].kind == "id":
            self._vector_brace_init(i)
        if kind == "func" and text in EXT_VECTOR_TYPES and nxt < len(toks) and toks[nxt].kind == "id":
            # `float4 v(a, b);`: a vector variable initialized by a constructor.
            after = self._next(nxt)
            if after < len(toks) and toks[after].text == "(":
                close = _match(toks, after, "(", ")")
                if self._next(close) < len(toks) and toks[self._next(close)].text in (";", ","):
                    self.edit(after, f"= ::metal::__make<::{text}>(")
        if is_ctor:
            if qualified_by_metal:
                first = p - 1
                pp = self._prev(first)
                if pp >= 0 and toks[pp].text == "::":
                    first = pp
                for k in range(first, i):
                    self.edit(k, "")
            self.edit(i, f"::metal::__make<::{text}>")
        elif not qualified_by_metal:
            self.edit(i, "::" + text)

    def _template_typed_local(self, i: int) -> None:
        """`T w = a;` in a template whose T was deduced from a reference to class members (generic here): a
        local of T without the address space (clang allows none on locals, MSL deduces thread)."""
        toks = self.toks
        p = self._prev(i)
        while p >= 0 and toks[p].text in ("const", "constexpr", "volatile"):
            p = self._prev(p)
        if p >= 0 and toks[p].text not in (";", "{", "}", "(", ":"):
            return
        name = self._next(i)
        after = self._next(name)
        if name < len(toks) and toks[name].kind == "id" and after < len(toks) and \
                toks[after].text in ("=", ";", "{", "[", ","):
            self.edit(i, f"::metal::remove_addrspace_t<{toks[i].text}>")

    def _template_construction(self, i: int) -> None:
        """`T(x)` with T a template parameter: `::metal::__construct<T>(x)`, a vector constructor when T is
        a vector (`T(x > 0)` converts a comparison's bool vector), T's own construction otherwise."""
        toks = self.toks
        nxt = self._next(i)
        p = self._prev(i)
        if nxt >= len(toks) or toks[nxt].text != "(" or (p >= 0 and toks[p].text in ("::", ".", "->", "operator")):
            return
        e = self.edits.get(i)
        if e is not None and e.text != toks[i].text:
            return
        self.edit(i, f"::metal::__construct<{toks[i].text}>")

    def _deducible_vec(self, i: int, stack) -> None:
        """`vec<T, N>` with T a template parameter where T is deduced from it (a function template's
        parameter, a partial specialization's argument, an alias template of T): `::metal::__dvec<T, N>`, the
        ext-vector form clang deduces T through (the library's `vec` maps bool and bfloat, so it does not).
        (Deduced from a bfloat vector, T is the bfloat vector's element type here.)"""
        toks = self.toks
        p = self._prev(i)
        first = i
        if p >= 1 and toks[p].text == "::" and toks[p - 1].text == "metal":
            first = p - 1
            if first >= 1 and toks[first - 1].text == "::":
                first -= 1
        elif p >= 0 and toks[p].text in ("::", ".", "->"):
            return
        nxt = self._next(i)
        if nxt >= len(toks) or toks[nxt].text != "<":
            return
        close = self._angle_close(nxt)
        if toks[close].text not in (">", ">>"):
            return
        args = _split_top_level(toks, nxt + 1, close)
        if len(args) != 2 or args[0][1] - args[0][0] != 1:
            return
        elem = toks[args[0][0]].text
        after = self._next(close)
        if toks[close].text == ">" and after < len(toks) and toks[after].text in ("(", "{"):
            return  # a construction
        deduced = False
        for o, c, params in reversed(self.template_function_params):
            if o < i < c:
                deduced = elem in params
                break
        if not deduced and elem in self._own_template:
            # an alias template of T, or a partial specialization's argument list
            j = first - 1
            depth = 0
            while j >= 0 and toks[j].text not in (";", "{", "}"):
                tx = toks[j].text
                if tx in (">", ")"):
                    depth += 1
                elif tx in ("<", "("):
                    if depth == 0 and tx == "<" and j >= 2 and toks[j - 1].kind == "id" and \
                            toks[j - 2].text in ("struct", "class"):
                        deduced = True
                        break
                    depth = max(0, depth - 1)
                elif tx == "=" and depth == 0 and j >= 2 and toks[j - 2].text == "using":
                    deduced = True
                    break
                j -= 1
        if not deduced:
            return
        for k in range(first, i):
            self.edit(k, "")
        self.edit(i, "::metal::__dvec")

    def _vec_constructor(self, i: int) -> None:
        """`vec<T, N>(...)`, a vector constructor through metal::vec."""
        toks = self.toks
        p = self._prev(i)
        if p >= 0 and toks[p].text in (".", "->", "operator"):
            return
        qualified = p >= 1 and toks[p].text == "::" and toks[p - 1].text == "metal"
        if p >= 0 and toks[p].text == "::" and not qualified:
            return
        nxt = self._next(i)
        if nxt >= len(toks) or toks[nxt].text != "<":
            return
        close = self._angle_close(nxt)
        after = self._next(close)
        if toks[close].text != ">" or after >= len(toks) or toks[after].text != "(":
            return
        if qualified:
            first = p - 1
            if first >= 1 and toks[first - 1].text == "::":
                first -= 1
            for k in range(first, i):
                self.edit(k, "")
        self.edit(i, f"::metal::__make<::metal::{toks[i].text}")
        self.edit(close, "> >")

    def _conditional(self, i: int) -> None:
        """`c ? a : b` -> `c ? __rv(a) : __rv(b)`: both operands as prvalues of their type without an address
        space. (clang cannot unify two objects of one class in different address spaces, such as a thread
        variable and a temporary; MSL can.)"""
        toks = self.toks
        n = len(toks)
        depth, j, nested = 0, i + 1, 0
        while j < n:  # the second operand ends at the matching ':'
            tx = toks[j].text
            if tx in ("(", "[", "{"):
                depth += 1
            elif tx in (")", "]", "}"):
                depth -= 1
                if depth < 0:
                    return
            elif depth == 0 and tx == "?":
                nested += 1
            elif depth == 0 and tx == ":":
                if nested == 0:
                    break
                nested -= 1
            elif depth == 0 and tx == ";":
                return
            j += 1
        if j >= n or j == i + 1:
            return
        colon = j
        depth, nested, j = 0, 0, colon + 1
        while j < n:  # the third operand: an assignment-expression
            tx = toks[j].text
            if tx in ("(", "[", "{"):
                depth += 1
            elif tx in (")", "]", "}"):
                if depth == 0:
                    break
                depth -= 1
            elif depth == 0 and tx == "?":
                nested += 1
            elif depth == 0 and tx == ":":
                if nested == 0:
                    break
                nested -= 1
            elif depth == 0 and tx in (",", ";"):
                break
            elif depth == 0 and tx == ">" and self._closes_template(j, i):
                break
            j += 1
        end = j
        if end == colon + 1:
            return
        for a, b in ((i + 1, colon), (colon + 1, end)):
            self.edit(a, before="::metal::__rv(")
            self.edit(b - 1, after=")")
        lit2, lit3 = self._int_literal(i + 1, colon), self._int_literal(colon + 1, end)
        if lit2 != lit3:
            # `c ? bf : 1`: the literal takes the other operand's type if that is bfloat (finished at the end,
            # once the other operand's tokens are rewritten)
            self.conditional_literals.append(((colon + 1, end), (i + 1, colon)) if lit3 else
                                             ((i + 1, colon), (colon + 1, end)))
        elif not lit2:
            # `c ? i : bf` with i of an integer type: it converts to bfloat too (both operands are passed
            # through ::metal::__cond_op, which converts only that)
            self.conditional_operands.append((i, (i + 1, colon), (colon + 1, end)))

    def _int_literal(self, a: int, b: int) -> bool:
        texts = [self.toks[k].text for k in range(a, b)]
        if texts and texts[0] in ("-", "+"):
            texts = texts[1:]
        return len(texts) == 1 and self.toks[b - 1].kind == "num" and \
            re.fullmatch(r"(?:0[xX][0-9a-fA-F]+|\d+)[uUlL]*", texts[0]) is not None

    def _operand_text(self, a: int, b: int) -> str:
        """The rewritten text of tokens [a, b): an operand, without the parentheses that wrappers of an
        enclosing operand ending at the same token leave after it."""
        toks = self.toks
        text = " ".join((self.edits[m].before + self.edits[m].text + self.edits[m].after) if m in self.edits
                        else toks[m].text for m in range(a, b))
        excess = text.count(")") - text.count("(")
        while excess > 0 and text.rstrip().endswith(")"):
            text = text.rstrip()[:-1]
            excess -= 1
        return text

    def _finish_conditional_literals(self) -> None:
        for (la, lb), (oa, ob) in self.conditional_literals:
            other = self._operand_text(oa, ob)
            self.edit(la, before=f"::metal::__cond_lit<decltype({other})>(")
            self.edit(lb - 1, after=")")
        # innermost (last) first: an enclosing conditional's decltype sees them rewritten
        for _q, (a2, b2), (a3, b3) in sorted(self.conditional_operands, reverse=True):
            second, third = self._operand_text(a2, b2), self._operand_text(a3, b3)
            if len(second) + len(third) > 4000:
                continue
            self.edit(a2, before=f"::metal::__cond_op<decltype({third})>(")
            self.edit(b2 - 1, after=")")
            self.edit(a3, before=f"::metal::__cond_op<decltype({second})>(")
            self.edit(b3 - 1, after=")")

    def _vector_cast(self, i: int, template_params: frozenset) -> None:
        """`static_cast<X>(v)` with X not a scalar type name (a vector, a template parameter, an alias, a
        template-id such as `opmath_t<T>`), and
        `alias<T>(v)` with alias an alias template: MSL converts a vector to another of its length element-wise
        this way (PyTorch's ReplicationPad.metal, half2 to float2); `::metal::__scast<X>(v)` does."""
        toks = self.toks
        n = len(toks)
        if i + 1 >= n or toks[i + 1].text != "<":
            return
        close = self._angle_close(i + 1)
        if close + 1 >= n or toks[close].text not in (">", ">>") or toks[close + 1].text != "(" or \
                toks[close].text == ">>" and toks[i].text != "static_cast":
            return
        target = [toks[k].text for k in range(i + 2, close)]  # (`static_cast<a<T>>`: the `<` is in it)
        if not target or "&" in target or "&&" in target or "*" in target:
            return
        if toks[i].text == "static_cast":
            if target[0] == "decltype":
                # `static_cast<decltype(x.y)>(f)`: a vector element's decltype is a thread reference here, which
                # clang's OpenCL cannot bind to a converted temporary; the value is what MSL code means
                self.edit(i, "::metal::__scast")
                self.edit(i + 2, before="::metal::remove_reference_t<")
                self.edit(close - 1, after=">")
                return
            if len(target) == 1 and target[0] in _SCALAR_AND_VECTOR_NAMES and target[0] not in EXT_VECTOR_TYPES:
                return  # a scalar type: static_cast as it is
            # (a vector, template parameter, template-id or alias, such as c10/metal's `using res_t = ...`)
            self.edit(i, "::metal::__scast")
            return
        p = self._prev(i)
        if p >= 0 and toks[p].text in (".", "->", "::"):
            return
        pc = _match(toks, close + 1, "(", ")")
        if pc == close + 2:
            return
        # one value: a conversion; more: a construction (`ret_type<T>(a, b)`, a float2 in BinaryKernel.metal)
        helper = "__scast" if len(_split_top_level(toks, close + 2, pc)) == 1 else "__construct"
        self.edit(i, before=f"::metal::{helper}<")
        self.edit(close, after=">")

    def _c_style_cast(self, i: int, template_params: frozenset) -> None:
        """`(float4)h` or `(T)x`: MSL converts vectors element-wise by a cast (clang's OpenCL reinterprets
        vectors of one size and rejects others); `::metal::__cast<T>(...)` does MSL's conversion."""
        toks = self.toks
        close = self._next(i)
        if close >= len(toks) or toks[close].kind != "id":
            return
        target = toks[close].text
        if target not in EXT_VECTOR_TYPES and target not in template_params:
            return
        close = self._next(close)
        if close >= len(toks) or toks[close].text != ")":
            return
        p = self._prev(i)
        if p >= 0 and (toks[p].kind == "id" and toks[p].text not in _CONTROL_KEYWORDS or toks[p].text in (")", "]")):
            return  # a call, not a cast
        start = self._next(close)
        if start >= len(toks):
            return
        end = self._unary_end(start)
        if end is None:
            return
        target_text = self.edits[close - 1].text if close - 1 in self.edits else toks[close - 1].text
        for k in range(i, close + 1):
            self.edit(k, "")
        self.edit(i, f"::metal::__cast<{target_text}>(")
        self.edit(end, after=")")

    def _unary_end(self, j: int) -> Optional[int]:
        """The last token of the unary-expression (a cast's operand) starting at j, or None."""
        toks = self.toks
        n = len(toks)
        while j < n and toks[j].text in ("-", "+", "!", "~", "*", "&", "++", "--"):
            j += 1
        if j >= n:
            return None
        if toks[j].text == "(":
            end = _match(toks, j, "(", ")")
        elif toks[j].kind in ("id", "num", "str", "chr"):
            end = j
            while end + 1 < n and toks[end + 1].text == "::" and end + 2 < n and toks[end + 2].kind == "id":
                end += 2
            if end + 1 < n and toks[end + 1].text == "<" and toks[end].kind == "id":
                close = self._angle_close(end + 1)
                if toks[close].text == ">" and close + 1 < n and toks[close + 1].text in ("(", "::", "{"):
                    end = close
        else:
            return None
        while end + 1 < n:  # postfix: calls, subscripts, members
            nt = toks[end + 1].text
            if nt == "(":
                end = _match(toks, end + 1, "(", ")")
            elif nt == "[":
                end = _match(toks, end + 1, "[", "]")
            elif nt in (".", "->") and end + 2 < n and toks[end + 2].kind == "id":
                end += 2
            elif nt in ("++", "--"):
                end += 1
            else:
                break
        return end

    def _closes_template(self, j: int, question: int) -> bool:
        """Whether the '>' at j closes a template argument list opened before the conditional's '?'."""
        depth = 0
        for k in range(j - 1, max(-1, j - 400), -1):
            tx = self.toks[k].text
            if tx in (")", "]", "}"):
                depth += 1
            elif tx in ("(", "[", "{"):
                if depth == 0:
                    return False
                depth -= 1
            elif tx == "<" and depth == 0 and k > 0 and self.toks[k - 1].kind == "id" and k > question:
                return False  # opened in the operand itself (`c ? a : static_cast<float>(b)`)
            elif tx == "<" and depth == 0 and k > 0 and self.toks[k - 1].kind == "id" and k < question:
                return True
            elif tx in (";",) and depth == 0:
                return False
        return False

    def _braced_argument(self, i: int) -> None:
        """`f({a, b, c})`: a braced list as a call argument (clang cannot convert one to a vector parameter)."""
        toks = self.toks
        p = self._prev(i)
        if p < 0 or toks[p].text not in ("(", ","):
            return
        close = _match(toks, i, "{", "}")
        nxt = self._next(close)
        if nxt >= len(toks) or toks[nxt].text not in (",", ")"):
            return
        inner = [toks[k].text for k in range(i + 1, close)]
        if "{" in inner or "." in inner and "=" in inner:
            return
        # The enclosing parenthesis must be a call's.
        depth, j = 0, p
        while j >= 0:
            tx = toks[j].text
            if tx in (")", "]", "}"):
                depth += 1
            elif tx in ("(", "[", "{"):
                if depth == 0:
                    break
                depth -= 1
            elif tx == ";" and depth == 0:
                return
            j -= 1
        if j < 1 or toks[j].text != "(":
            return
        callee = toks[self._prev(j)]
        if not (callee.kind == "id" and callee.text not in _CONTROL_KEYWORDS or callee.text in (">", ")", "]")):
            return
        self.edit(i, "::metal::__braced(")
        self.edit(close, ")")

    def _reserved_declarator(self, i: int, p: int) -> None:
        """An MSL type name where a declaration names something (`uint half;`, `struct float4 {`)."""
        toks = self.toks
        nxt = self._next(i)
        if p < 0 or nxt >= len(toks):
            return
        ptext, ntext = toks[p].text, toks[nxt].text
        named = ntext in (";", "=", ",", "[", "{", ":", ")") and (
            toks[p].kind == "id" and ptext not in _NOT_DECLARATION_KEYWORDS or ptext in ("*", "&", "&&", ">"))
        named = named or ntext == "(" and toks[p].kind == "id" and ptext not in _NOT_DECLARATION_KEYWORDS
        named = named or ptext in ("struct", "class", "union", "enum", "namespace")
        named = named or ptext == "," and ntext in (";", ",", "=", "[", ":") and self._in_declarator_list(p)
        if named and ntext != "::":
            self.errors.append((i, f"'{toks[i].text}' is an MSL type name: it cannot name a variable, member, "
                                   "parameter, function or type"))

    def _in_declarator_list(self, i: int) -> bool:
        """Whether the comma at i separates declarators (not arguments of a call or a template)."""
        depth = 0
        for j in range(i - 1, -1, -1):
            tx = self.toks[j].text
            if tx in (")", "]", ">"):
                depth += 1
            elif tx == ">>":
                depth += 2
            elif tx in ("(", "[", "<"):
                if depth == 0:
                    return False
                depth -= 1
            elif tx in (";", "{", "}") and depth == 0:
                return True
        return True

    def _number(self, i: int) -> None:
        text = self.toks[i].text
        if re.fullmatch(r"(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+", text):
            # An unsuffixed floating literal: float in MSL (double in clang, even with fp64 off, for the
            # rules of vector operands and overloads).
            self.edit(i, text + "f")
            return
        m = re.fullmatch(r"(.*?)(bf|BF)", text)
        if m and re.fullmatch(r"\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?", m.group(1)):
            num = m.group(1)
            if not re.search(r"[.eE]", num):
                num += ".0"
            self.edit(i, f"::bfloat({num}f)")

    # -- declarations

    def _threadgroup_variable(self, i: int) -> None:
        toks = self.toks
        p = self._prev(i)
        if p >= 0 and toks[p].text not in (";", "{", "}", ":"):
            return
        # `__local TYPE NAME [dims] ;` -> `__local TYPE (&NAME)[dims] = *__threadgroup_storage<TYPE[dims]>();`,
        # each declarator of `__local TYPE A[n], B[m];` alike. An initializer (`= 0`, `= {0}`; Apple's
        # compiler accepts them) is set aside.
        declarators: List[Tuple[int, int, Optional[int], int]] = []  # (name, end of dims, `=`, `,` or `;`)
        j, depth, first_bracket, init = i + 1, 0, None, None
        while j < len(toks):
            tx = toks[j].text
            if tx == "<" and depth == 0 and first_bracket is None and init is None and toks[j - 1].kind == "id":
                close = self._angle_close(j)  # template arguments (`vec<T, 2>`): their commas separate nothing
                if toks[close].text in (">", ">>"):
                    j = close + 1
                    continue
            if tx in ("(", "[", "{"):
                if tx == "[" and depth == 0 and first_bracket is None and init is None:
                    first_bracket = j
                depth += 1
            elif tx in (")", "]", "}"):
                depth -= 1
            elif depth == 0 and tx == "=" and init is None:
                init = j
            elif depth == 0 and tx in (";", ","):
                end = init if init is not None else j
                declarators.append(((first_bracket if first_bracket is not None else end) - 1, end, init, j))
                if tx == ";":
                    break
                first_bracket, init = None, None
            elif depth == 0 and init is None and tx in ("*", "&", "&&") and first_bracket is None:
                return  # a pointer or reference: left to clang
            if depth < 0:
                return
            j += 1
        if not declarators or toks[declarators[-1][3]].text != ";":
            return
        type_end = declarators[0][0]
        if type_end <= i + 1 or toks[type_end].kind != "id":
            return
        for (k, _, _, _), (_, _, _, sep) in zip(declarators[1:], declarators):
            if k != sep + 1 or toks[k].kind != "id":
                return  # not `, NAME [dims]`: left to clang
        for k, end, init, sep in declarators:
            if init is not None:
                for m in range(init, sep):
                    self.edit(m, "")
            self.threadgroup_variables.append((i, type_end, k, end, sep))

    def _finish_threadgroup_variables(self) -> None:
        toks = self.toks
        for i, type_end, k, end, j in self.threadgroup_variables:
            # (the type's own tokens are rewritten by now)
            text = lambda m: (self.edits[m].before + self.edits[m].text + self.edits[m].after) if m in self.edits \
                else toks[m].text
            type_text = " ".join(text(m) for m in range(i + 1, type_end))
            dims = "".join(toks[m].text for m in range(k + 1, end))
            name = toks[k].text
            self.edit(k, f"(&{name})" if dims else f"&{name}")
            self.edit(j, f" = *::metal::__threadgroup_storage<{type_text}{dims}>(){toks[j].text}")

    def _function_constant(self, j: int) -> None:
        """`constant T name [[function_constant(n)]];`: its value comes at pipeline creation."""
        toks = self.toks
        if j < len(toks) and toks[j].text == ";":
            self.edit(j, before=" = {}")

    def _vector_brace_init(self, i: int) -> None:
        """`float4 a = {x, y}, b{z};`: MSL fills the missing elements with zeros (clang's OpenCL wants them
        all)."""
        toks = self.toks
        name = self._next(i)
        while name < len(toks) and toks[name].kind == "id":
            brace = self._next(name)
            if brace < len(toks) and toks[brace].text == "=":
                brace = self._next(brace)
            if brace >= len(toks):
                return
            if toks[brace].text == "{":
                close = _match(toks, brace, "{", "}")
                if any(toks[m].text == "{" for m in range(brace + 1, close)):
                    return
                prefix = "= " if toks[self._prev(brace)].text != "=" else ""
                self.edit(brace, prefix + "::metal::__brace<::" + toks[i].text + ">(")
                self.edit(close, ")")
                last = self._prev(close)
                if last > brace and toks[last].text == ",":
                    self.edit(last, "")  # `float2 v{a, b,};`: the trailing comma
                end = close + 1
            else:
                # another initializer: up to the next declarator
                end, depth = brace, 0
                while end < len(toks):
                    tx = toks[end].text
                    if tx in ("(", "[", "{"):
                        depth += 1
                    elif tx in (")", "]", "}"):
                        depth -= 1
                    elif depth == 0 and tx in (",", ";"):
                        break
                    end += 1
            if end >= len(toks) or toks[end].text != ",":
                return
            name = self._next(end)

    def _kernel_declaration(self, i: int, qualifier: str) -> None:
        toks = self.toks
        j = i + 1
        while j < len(toks) and toks[j].text not in ("(", ";", "{"):
            j += 1
        if j >= len(toks) or toks[j].text != "(":
            return
        name_tok = j - 1
        if toks[name_tok].text == ">":  # an explicit instantiation f<T>(...)
            name_tok = _match_back(toks, name_tok, "<", ">") - 1
        close = _match(toks, j, "(", ")")
        params = _split_top_level(toks, j + 1, close)
        nxt = self._next(close)
        body = None
        if nxt < len(toks) and toks[nxt].text == "{":
            body = (nxt, _match(toks, nxt, "{", "}"))
        attrs = {k: [self.attrs[k]] for k in self.attrs if j < k < close}
        self.kernels.append(KernelInfo(toks[name_tok].text, name_tok, params, attrs, body, qualifier))
        before = self._prev(i)  # `void kernel f(...)`: the qualifier may follow the return type
        if body is not None and "void" not in [toks[k].text for k in range(i + 1, name_tok)] and \
                not (before >= 0 and toks[before].text == "void"):
            self.errors.append((name_tok, f"kernel function '{toks[name_tok].text}' must return void"))

    def _function_declarator(self, i: int, stack, template_params: frozenset) -> None:
        """At a `(` in namespace or class scope: if it opens a function's parameters, their thread pointers,
        this-qualifiers, and the function (for the recursion check)."""
        toks = self.toks
        p = self._prev(i)
        op = self._operator_name(p)
        if op is not None:
            p = op
        elif p < 0 or toks[p].kind != "id" or toks[p].text in _CONTROL_KEYWORDS:
            if not (p >= 0 and toks[p].text == ">"):
                return
            # f<T>(...) (an explicit specialization or instantiation)
            q = _match_back(toks, p, "<", ">") - 1
            if q < 0 or toks[q].kind != "id":
                return
            p = q
        close = _match(toks, i, "(", ")")
        nxt = self._next(close)
        # What follows a function declarator: qualifiers, then a body, `;`, `= default`, a trailing return type...
        k = nxt
        member = stack[-1][0] == "class" or (p >= 1 and toks[p - 1].text == "::")
        while k < len(toks) and toks[k].text in ("const", "volatile", "noexcept", "override", "final", "&", "&&",
                                                   "__global", "__local", "__constant", "__private", "__generic"):
            if toks[k].text == "__private" and member:
                # A thread member function: clang's temporaries and members reached through `this` are not in
                # its private address space, MSL's are in thread memory: leave it unqualified (generic).
                self.edit(k, "")
            k = self._next(k)
        if k >= len(toks):
            return
        after = toks[k].text
        if after not in ("{", ";", "=", "->", ":", ","):
            return
        name = toks[p].text
        if self._own_template:
            self.template_function_params.append((i, close, self._own_template))
        before = self._prev(p)
        if before >= 0 and (toks[before].text == "," or toks[before].text == ":" and
                            toks[self._prev(before)].text not in ("public", "private", "protected")):
            return  # a member initializer
        in_template = template_params | stack[-1][3]
        is_kernel = any(kk.name_tok == p for kk in self.kernels)
        explicit = toks[self._next(p)].text == "<" or self._explicit_instantiation(p)
        if not is_kernel and not explicit:
            self._thread_pointer_params(i, close, in_template)
        if after == "{" and not in_template:
            # (templates are left out of the recursion check: Apple's compiler builds c10/metal/special_math.h's
            # recursive bessel_j1_forward<T>, which PyTorch's kernels instantiate)
            self.functions.append((name, p, i, close, k))

    def _redundant_static_definition(self, i: int) -> bool:
        """`constant constexpr const T X<...>::member[N];`: C++14's out-of-class definition of a constexpr
        static member, redundant in C++17 (clang's OpenCL wants an initializer on it): set aside."""
        toks = self.toks
        start = i
        while start > 0 and toks[start - 1].text not in (";", "{", "}"):
            start -= 1
        j = i
        while j < len(toks) and toks[j].text not in (";", "=", "{", "("):
            j += 1
        texts = [toks[k].text for k in range(start, j)]
        if j >= len(toks) or toks[j].text != ";" or "constexpr" not in texts or "::" not in texts:
            return False
        for k in range(start, j + 1):
            self.edit(k, "")
        return True

    def _thread_qualifier(self, i: int, in_class: bool) -> None:
        """MSL's thread references (and, in classes, thread pointers and member qualifiers) made generic.

        Here a class's members are reached through a generic `this` (MSL's is thread), so what refers to
        thread memory in a class, and thread references anywhere (they bind to such members), are generic.
        (A template's `T&` then deduces T with the argument's address space, as clang deduces it.)"""
        if self._qualifies_member(i):
            self.edit(i, "")
            return
        kind = self._declarator_kind(i)
        if kind == "ref" or in_class:
            self.edit(i, "")

    def _declarator_kind(self, i: int) -> str:
        """'ref', 'ptr' or 'value': what the declaration the qualifier at i starts declares."""
        toks = self.toks
        depth = 0
        for j in range(i + 1, min(len(toks), i + 60)):
            tx = toks[j].text
            if tx == "<":
                depth += 1
            elif tx == ">" and depth:
                depth -= 1
            elif tx == ">>" and depth:
                depth = max(0, depth - 2)
            elif depth == 0:
                if tx in ("&", "&&"):
                    return "ref"
                if tx == "*":
                    return "ptr"
                if tx in (",", ";", ")", "=", "{", "(", "["):
                    return "value"
        return "value"

    def _qualifies_member(self, i: int) -> bool:
        """Whether the qualifier at i follows a function's parameter list (`void f() const constant`)."""
        p = self._prev(i)
        while p >= 0 and self.toks[p].text in ("const", "volatile"):
            p = self._prev(p)
        return p >= 0 and self.toks[p].text == ")"

    def _operator_name(self, p: int) -> Optional[int]:
        """If tokens ending at p spell `operator@` (`operator()`, `operator[]`, `operator+=`...), the index of
        `operator`."""
        toks = self.toks
        if p >= 2 and toks[p].text in (")", "]") and toks[p - 1].text in ("(", "[") and toks[p - 2].text == "operator":
            return p - 2
        if p >= 1 and toks[p].kind == "op" and toks[p - 1].text == "operator":
            return p - 1
        return None

    def _explicit_instantiation(self, p: int) -> bool:
        j = p
        while j > 0 and self.toks[j - 1].text not in (";", "{", "}"):
            j -= 1
        return self.toks[j].text == "template" and self.toks[self._next(j)].text != "<"

    def _thread_pointer_params(self, open_i: int, close: int, template_params: frozenset) -> None:
        """MSL's unqualified pointer parameters point to thread memory (clang's to generic memory)."""
        toks = self.toks
        for s, e in _split_top_level(toks, open_i + 1, close):
            texts = [toks[k].text for k in range(s, e) if not self._is_attr_tok(k)]
            if "=" in texts:
                texts = texts[:texts.index("=")]
            # An array parameter (`acc_t v[N]`) is a pointer to thread memory too; its element type, even a
            # template parameter, is deduced without an address space (as Apple's compiler deduces it).
            array = len(texts) > 3 and texts[-1] == "]" and "[" in texts and "*" not in texts and \
                re.match(r"[A-Za-z_]", texts[texts.index("[") - 1]) is not None
            if "*" not in texts and not array or any(x in _PARAM_SKIP for x in texts) or "(" in texts:
                continue
            if not re.match(r"[A-Za-z_]", texts[-1]) and texts[-1] != "*" and not array:
                continue  # an expression, not a declaration
            if any((x in template_params and not array) or x in ("auto", "decltype", "...") for x in texts):
                continue
            first = s
            while first < e and self._is_attr_tok(first):
                first += 1
            self.edit(first, before="__private ")

    def _inject_copy_members(self, open_i: int, close: int, name: str) -> None:
        toks = self.toks
        if not toks[close].user:
            return
        has_ctor = has_copy = False
        depth = 0
        j = open_i + 1
        while j < close:
            tx = toks[j].text
            if tx in ("{", "(", "["):
                depth += 1
            elif tx in ("}", ")", "]"):
                depth -= 1
            elif depth == 0 and tx == name and j + 1 < close and toks[j + 1].text == "(" and \
                    toks[self._prev(j)].text not in ("~", "::", ".", "->"):
                has_ctor = True
                pc = _match(toks, j + 1, "(", ")")
                params = [toks[k].text for k in range(j + 2, pc)]
                while params and params[0] in ("const", "volatile", "__private", "__generic"):
                    params = params[1:]
                if params[:2] in ([name, "&"], [name, "const"]) or params[:1] == [name] and "&" in params[:4]:
                    has_copy = True
            j += 1
        # (public: the class may end in a private section)
        members = [f"{name}(const __constant {name}&) = default;",
                   f"{name}(const {name}&) __constant = default;",
                   f"{name}(const __constant {name}&) __constant = default;",
                   f"template <class __U, class = ::metal::__same_class_t<__U, {name}>> {name}& operator=(const __U&);"]
        if not has_copy:
            members.insert(0, f"{name}(const {name}&) = default;")
        if not has_ctor:
            members.insert(0, f"{name}() = default;")
        self.edit(close, before=" public: " + " ".join(members) + " ")

    # -- output

    def output(self) -> Tuple[str, Dict[int, List[Tuple[int, int]]]]:
        """The rewritten text, and per physical line a map of column anchors (new col, old col)."""
        lines = list(self.pre.lines)
        for ln, (_f, _l, user) in enumerate(self.pre.line_info):
            if user and lines[ln].lstrip().startswith("#pragma"):
                # Loop hints and Apple's own pragmas: their macro arguments were not expanded by -E.
                lines[ln] = ""
        by_line: Dict[int, List[Edit]] = {}
        for e in self.edits.values():
            by_line.setdefault(self.toks[e.index].line, []).append(e)
        anchors: Dict[int, List[Tuple[int, int]]] = {}
        for ln, edits in by_line.items():
            old = lines[ln]
            edits.sort(key=lambda e: self.toks[e.index].col)
            out, pos, anc = [], 0, [(0, 0)]
            newpos = 0
            for e in edits:
                t = self.toks[e.index]
                seg = old[pos:t.col]
                out.append(seg)
                newpos += len(seg)
                anc.append((newpos, t.col))
                rep = e.before + e.text + e.after
                out.append(rep)
                newpos += len(rep)
                pos = t.col + len(t.text)
                anc.append((newpos, pos))
            out.append(old[pos:])
            lines[ln] = "".join(out)
            anchors[ln] = anc
        return "\n".join(lines), anchors


def _match_back(tokens: List[Tok], i: int, open_c: str, close_c: str) -> int:
    depth = 0
    for j in range(i, -1, -1):
        t = tokens[j].text
        if t == close_c:
            depth += 1
        elif t == open_c:
            depth -= 1
            if depth == 0:
                return j
    return 0


# ------------------------------------------------------------------ checks

def _kernel_checks(rw: _Rewriter) -> None:
    toks = rw.toks
    for k in rw.kernels:
        if k.body is None:
            continue
        grid_vectors: List[Tuple[int, str, str, str]] = []  # (token, attribute, parameter, type)
        for s, e in k.params:
            rng = [j for j in range(s, e) if not rw._is_attr_tok(j)]
            if not rng:
                continue
            attrs = [rw.attrs[j] for j in range(s, e) if j in rw.attrs]
            texts = [toks[j].text for j in rng]
            name_i = rng[-1]
            while toks[name_i].text == "]" and name_i > rng[0]:
                name_i = _match_back(toks, name_i, "[", "]") - 1
            pname = toks[name_i].text
            for a in attrs:
                a_norm = a.replace(" ", "")
                if a_norm in KERNEL_BUILTINS or _PARAM_ATTRIBUTES.match(a.strip()):
                    continue
                rw.errors.append((s, f"kernel {k.name}: unknown attribute [[{a}]] on parameter '{pname}'"))
            spaces = [x for x in texts if x in _ADDRESS_SPACES]
            indirect = "*" in texts or "&" in texts or "&&" in texts or "[" in texts
            norm = [a.replace(" ", "") for a in attrs]
            if any(a.startswith("__local(") for a in norm) and "__local" not in spaces:
                rw.errors.append((s, f"kernel {k.name}: [[threadgroup(n)]] parameter '{pname}' must point to "
                                     "threadgroup memory"))
            if any(a.startswith("buffer(") for a in norm) and spaces and \
                    not any(x in ("__global", "__constant") for x in spaces):
                rw.errors.append((s, f"kernel {k.name}: [[buffer(n)]] parameter '{pname}' must point to device or "
                                     "constant memory"))
            if indirect:
                if not spaces:
                    rw.errors.append((s, f"kernel {k.name}: parameter '{pname}' is a pointer or reference without "
                                         "an address space (device, constant or threadgroup)"))
                elif any(x == "__private" for x in spaces):
                    rw.errors.append((s, f"kernel {k.name}: parameter '{pname}' is in the thread address space "
                                         "(kernel arguments are device, constant or threadgroup)"))
                continue
            builtins = [a.replace(" ", "") for a in attrs if a.replace(" ", "") in KERNEL_BUILTINS]
            if not builtins:
                if any(a.strip() == "stage_in" for a in attrs):
                    continue
                rw.errors.append((s, f"kernel {k.name}: parameter '{pname}' is passed by value without a built-in "
                                     "attribute (buffers are device or constant pointers or references)"))
                continue
            ptype = " ".join(x.lstrip(":") for x in texts[:name_i - rng[0]] if x not in ("const", "::"))
            allowed = KERNEL_BUILTINS[builtins[0]]
            if ptype in _SCALAR_AND_VECTOR_NAMES and ptype not in allowed:
                rw.errors.append((s, f"kernel {k.name}: [[{builtins[0]}]] parameter '{pname}' has type '{ptype}' "
                                     f"(expected {' or '.join(sorted(allowed))})"))
            elif allowed is _BUILTIN_TYPES_GRID and ptype[-1:] in ("2", "3"):
                grid_vectors.append((s, builtins[0], pname, ptype))
        # MSL: the position and size attributes declared as vectors must all have the same number of
        # components (a uint2 position with a uint3 threadgroup size is refused).
        for s, attr, pname, ptype in grid_vectors[1:]:
            s0, attr0, pname0, ptype0 = grid_vectors[0]
            if ptype[-1] != ptype0[-1]:
                rw.errors.append((s, f"kernel {k.name}: [[{attr}]] parameter '{pname}' is a {ptype[-1]}-component "
                                     f"vector but [[{attr0}]] parameter '{pname0}' has {ptype0[-1]} (the position "
                                     "and size attributes that are vectors must have the same number of "
                                     "components)"))


def _recursion_checks(rw: _Rewriter, library_names: Iterable[str]) -> None:
    toks = rw.toks
    counts: Dict[str, int] = {}
    for name, *_ in rw.functions:
        counts[name] = counts.get(name, 0) + 1
    library = set(library_names)
    class_names = {e.before.split("(")[0].split()[-1] for e in rw.edits.values() if "__same_class_t" in e.before}
    for name, name_tok, _open, _close, body in rw.functions:
        if counts[name] != 1 or name in library or name in class_names or name == "operator":
            continue
        end = _match(toks, body, "{", "}")
        for j in range(body + 1, end):
            if toks[j].text != name or toks[j].kind != "id":
                continue
            p = rw._prev(j)
            if p >= 0 and toks[p].text in (".", "->", "::", "~"):
                continue
            nxt = rw._next(j)
            if nxt < len(toks) and toks[nxt].text == "(":
                rw.errors.append((j, f"recursive call of '{name}' (MSL functions cannot call themselves)"))
                break


@functools.lru_cache(maxsize=1)
def _library_function_names() -> frozenset:
    names = set()
    for fn in os.listdir(STRICT_INCLUDE_DIR):
        with open(os.path.join(STRICT_INCLUDE_DIR, fn)) as f:
            names.update(re.findall(r"\b([a-z_][a-z0-9_]*)\s*\(", f.read()))
    return frozenset(names)


# ------------------------------------------------------------------- locations

class _Locator:
    """Maps positions of the rewritten, preprocessed text back to the MSL source."""

    def __init__(self, pre: Preprocessed, anchors: Dict[int, List[Tuple[int, int]]], main_path: str, name: str,
                 source: str):
        self.pre = pre
        self.anchors = anchors
        self.main_path = main_path
        self.name = name
        self.sources = {main_path: source.split("\n")}
        self.physical: Dict[Tuple[str, int], int] = {}
        for i, (f, ln, _user) in enumerate(pre.line_info):
            if not pre.lines[i].startswith("#"):
                self.physical.setdefault((f, ln), i)

    def display(self, path: str) -> str:
        if path == self.main_path:
            return self.name
        try:
            rel = os.path.relpath(path)
            return rel if not rel.startswith("..") else path
        except ValueError:
            return path

    def _source_line(self, path: str, line: int) -> Optional[str]:
        if path not in self.sources:
            try:
                with open(path) as f:
                    self.sources[path] = f.read().split("\n")
            except OSError:
                self.sources[path] = []
        lines = self.sources[path]
        return lines[line - 1] if 0 < line <= len(lines) else None

    def original_col(self, path: str, line: int, col: int, physical: Optional[int] = None,
                     rewritten: bool = True) -> int:
        """1-based column in the original source of 1-based `col` on the (rewritten if `rewritten`) line."""
        if physical is None:
            physical = self.physical.get((path, line))
        if physical is None:
            return col
        c = col - 1
        anc = self.anchors.get(physical) if rewritten else None
        if anc:
            news = [a for a, _ in anc]
            k = bisect.bisect_right(news, c) - 1
            base_new, base_old = anc[max(k, 0)]
            c = base_old + (c - base_new)
            # inside a replacement: its token's column
            if k + 1 < len(anc) and k % 2 == 1:
                c = base_old
        pre_line = self.pre.lines[physical]
        src_line = self._source_line(path, line)
        if src_line is None:
            return c + 1
        return _align_column(pre_line, src_line, c) + 1


def _line_tokens(line: str) -> List[Tuple[str, int]]:
    return [(m.group(), m.start()) for m in _TOKEN_RE.finditer(line) if m.lastgroup not in ("ws", "nl")]


def _align_column(pre_line: str, src_line: str, col: int) -> int:
    """The column in src_line of the token at `col` of its preprocessed form pre_line."""
    if pre_line == src_line:
        return col
    a, b = _line_tokens(pre_line), _line_tokens(src_line)
    if not a or not b:
        return col
    idx = 0
    for n, (_, c) in enumerate(a):
        if c <= col:
            idx = n
    sm = difflib.SequenceMatcher(None, [t for t, _ in a], [t for t, _ in b], autojunk=False)
    best = None
    for block in sm.get_matching_blocks():
        if block.a <= idx < block.a + block.size:
            return b[block.b + idx - block.a][1] + (col - a[idx][1])
        if block.a + block.size <= idx and block.size:
            best = b[block.b + block.size - 1][1]
    return best if best is not None else len(src_line) - len(src_line.lstrip())


# ------------------------------------------------------------------ messages

_WORDS = [
    (re.compile(r"\b__global\b"), "device"), (re.compile(r"\b__local\b"), "threadgroup"),
    (re.compile(r"\b__constant\b"), "constant"), (re.compile(r"\b__private\b"), "thread"),
    (re.compile(r"\b__generic "), ""), (re.compile(r"\b_Float16\b"), "bfloat"),
    (re.compile(r"::metal::__make<::(\w+)>"), r"\1"), (re.compile(r"\bC\+\+ for OpenCL( version \d+)?"), "MSL"),
    (re.compile(r"\b__msl_(\w+)"), r"\1"), (re.compile(r"([*&])thread\b"), r"\1"),
    (re.compile(r"requires cl_khr_fp64 and __opencl_c_fp64 support"), "is not supported (MSL has no double)"),
    (re.compile(r"double precision constant requires cl_khr_fp64.*"), "double precision constant"),
    (re.compile(r"__attribute__\(\(annotate\(\"metal_(\w+)\"\)\)\)"), r"\1"),
]


def _clean(message: str) -> str:
    for pattern, rep in _WORDS:
        message = pattern.sub(rep, message)
    message = message.replace("::bfloat", "bfloat")
    if "no matching function for call to '__make'" in message:
        message = "no vector constructor for these arguments (MSL: a scalar, a vector of as many elements, or " \
                  "scalars and vectors adding up to the element count)"
    if message == "read-only variable is not assignable":
        message += " (constant memory is read-only)"
    if "non-kernel function variable cannot be declared in local address space" in message:
        message = "threadgroup variables are declared one per statement, `threadgroup T name[N];`, without " \
                  "an initializer, in a function body"
    return message


# clang's precision-loss warning for an implicit conversion to bfloat (_Float16 here); the compound
# assignment form ("when assigning computation result") is left alone.
_BFLOAT_NARROWING_RE = re.compile(r"^implicit conversion loses floating-point precision: '(?:\w+ )?(float|half)' to "
                                  r"'[^']*bfloat'")
_TO_BFLOAT_RE = re.compile(r"from '(?:(?:const |thread |device |threadgroup |constant )*)(?:float|half)' to "
                           r"'(?:(?:const |thread |device |threadgroup |constant )*)bfloat'")
# Rules of OpenCL that Apple's compiler does not have: `half4 * 2.0f` converts the scalar to the element
# type in MSL. (The expression is then left unchecked beyond that.)
_OPENCL_ONLY_ERRORS = ("scalar operand type has greater rank than the type of the vector element",)
_DIAG_RE = re.compile(r"^(?P<path>.*?):(?P<line>\d+):(?P<col>\d+): (?P<kind>error|fatal error|warning|note): "
                      r"(?P<msg>.*)$")


_INVALID_FUNCTION_ARGUMENT_RE = re.compile(r"candidate template ignored: invalid explicitly-specified argument for "
                                          r"template parameter '(\w+)'")


def _parse_diagnostics(stderr: str, loc: _Locator, function_params: Iterable[str] = ()) -> List[Diagnostic]:
    diags = _parse_diagnostics_1(stderr, loc)
    if function_params and any(m in stderr for m in _OPENCL_ONLY_ERRORS):
        # A function template whose instantiation met an OpenCL-only error (set aside) is invalid to clang from
        # then on, so passing it as a function template argument fails: a consequence, set aside too.
        def consequence(d: Diagnostic) -> bool:
            if not d.message.startswith("no matching function for call to"):
                return False
            cands = [n for n in d.notes if "candidate" in n]
            return bool(cands) and all((m := _INVALID_FUNCTION_ARGUMENT_RE.search(n)) and m.group(1) in
                                       function_params for n in cands)
        diags = [d for d in diags if not consequence(d)]
    return diags


def _parse_diagnostics_1(stderr: str, loc: _Locator) -> List[Diagnostic]:
    diags: List[Diagnostic] = []
    pending_library_error: Optional[Diagnostic] = None
    current: Optional[Diagnostic] = None
    for raw in stderr.splitlines():
        m = _DIAG_RE.match(raw)
        if not m:
            continue
        path, line, col, kind, msg = m.group("path"), int(m.group("line")), int(m.group("col")), m.group("kind"), \
            _clean(m.group("msg"))
        in_library = path.startswith(STRICT_INCLUDE_DIR) or path.startswith("<")
        if kind == "warning":
            m2 = _BFLOAT_NARROWING_RE.search(msg)
            if not m2:
                current = None
                continue
            kind = "error"
            msg = f"implicit conversion from '{m2.group(1)}' to bfloat (MSL converts float and half to bfloat " \
                  "only explicitly, as bfloat(x))"
        if kind in ("error", "fatal error") and any(m3 in msg for m3 in _OPENCL_ONLY_ERRORS):
            current = pending_library_error = None
            continue
        if kind in ("error", "fatal error"):
            if in_library:
                current = pending_library_error = Diagnostic("", 0, 0, msg)
                continue
            current = Diagnostic(loc.display(path), line, loc.original_col(path, line, col), msg)
            diags.append(current)
            pending_library_error = None
        elif kind == "note" and current is not None:
            if pending_library_error is not None and not in_library and "requested here" in msg or \
                    pending_library_error is not None and not in_library and "in instantiation" in msg:
                # An error inside the library caused by user code: report it where the user code asked for it.
                d = pending_library_error
                d.path, d.line, d.col = loc.display(path), line, loc.original_col(path, line, col)
                diags.append(d)
                pending_library_error = None
                current = d
            elif len(current.notes) < 4 and not current.message.startswith("no vector constructor"):
                where = f"<{os.path.basename(path)}>:{line}" if in_library else \
                    f"{loc.display(path)}:{line}:{loc.original_col(path, line, col)}"
                current.notes.append(f"{where}: note: {msg}")
    for d in diags:
        if any(_TO_BFLOAT_RE.search(text) for text in [d.message] + d.notes) and "explicitly" not in d.message:
            d.message += " (MSL converts float and half to bfloat only explicitly, as bfloat(x))"
    return diags


# ------------------------------------------------------------------- driver

def _run(cmd: List[str], cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)


def check_msl(source: str, name: str = "<source>", include_dirs: Sequence[str] = ()) -> None:
    """Raises MSLStrictError if Apple's Metal compiler would reject `source`.

    `name` names the source in messages (``name:line:col``); `include_dirs`
    are searched by its ``#include "..."``. Needs clang (see find_clang)."""
    clang = find_clang()
    if clang is None:
        raise RuntimeError("the strict MSL check needs clang 14 or newer (clang++ on PATH, or MY_MPS_OPS_STRICT_CLANG)")
    base = re.sub(r"[^\w.-]", "_", os.path.basename(name)) or "source.metal"
    with tempfile.TemporaryDirectory(prefix="msl_strict_") as tmp:
        main = os.path.join(tmp, base)
        with open(main, "w") as f:
            f.write(source)
        includes: List[str] = []
        for d in include_dirs:
            includes += ["-I", os.path.abspath(d)]
        undefs = [f"-U{m}" for m in _OPENCL_MACROS]
        pp = _run([clang, *_OPENCL_FLAGS, "-E", "-isystem", STRICT_INCLUDE_DIR, *undefs, *_DEFINES,
                   "-include", "__metal_prelude", *includes, main], tmp)
        pre_loc = _Locator(Preprocessed([], [], []), {}, main, name, source)
        if pp.returncode != 0:
            diags = _parse_diagnostics(pp.stderr, pre_loc)
            for d in diags:
                m = re.match(r"'([^']+)' file not found", d.message)
                if m and (m.group(1) in _STANDARD_HEADERS or "." not in m.group(1) and "/" not in m.group(1)) \
                        and not m.group(1).startswith("metal_"):
                    d.message += " (MSL has no C or C++ standard library: only <metal_*> headers)"
            _raise(diags or [Diagnostic(name, 0, 0, pp.stderr.strip()[-2000:])])
        pre = _tokenize(pp.stdout, STRICT_INCLUDE_DIR)
        rw = _Rewriter(pre)
        rw.run()
        _kernel_checks(rw)
        _recursion_checks(rw, _library_function_names())
        text, anchors = rw.output()
        loc = _Locator(pre, anchors, main, name, source)
        diags = []
        for i, message in rw.errors:
            t = rw.toks[i]
            col = loc.original_col(t.file, t.pline, t.col + 1, t.line, rewritten=False)
            diags.append(Diagnostic(loc.display(t.file), t.pline, col, message, own=True,
                                    shadows_line="is an MSL type name" in message))
        flags = [*_OPENCL_FLAGS, "-fsyntax-only", "-Wno-everything", "-Wimplicit-float-conversion", "-ferror-limit=0",
                 "-fno-caret-diagnostics", "-fno-diagnostics-fixit-info"]
        passed = _passed_marker(clang, flags, text.replace(tmp, "<tmp>"))
        if not diags and passed is not None and os.path.exists(passed):
            return
        rewritten = os.path.join(tmp, "rewritten.cl")
        with open(rewritten, "w") as f:
            f.write(text)
        keep = os.environ.get("MY_MPS_OPS_STRICT_KEEP")  # a directory to keep the rewritten source in
        if keep:
            shutil.copy(rewritten, os.path.join(keep, base + ".cl"))
        proc = _run([clang, *flags, rewritten], tmp)
        found = _parse_diagnostics(proc.stderr, loc, rw.function_template_param_names)
        error_lines = [ln for ln in proc.stderr.splitlines() if " error: " in ln]
        if proc.returncode != 0 and not found and \
                not all(any(m in ln for m in _OPENCL_ONLY_ERRORS) or "no matching function for call" in ln and
                        rw.function_template_param_names for ln in error_lines):
            found = [Diagnostic(name, 0, 0, proc.stderr.strip()[-2000:])]
        diags += found
        if diags:
            _raise(diags)
        if passed is not None and proc.returncode == 0:
            try:
                with open(passed, "w"):
                    pass
            except OSError:
                pass


@functools.lru_cache(maxsize=None)
def _clang_version(clang: str) -> str:
    return subprocess.run([clang, "--version"], capture_output=True, text=True).stdout


def _passed_marker(clang: str, flags: Sequence[str], text: str) -> Optional[str]:
    """A file whose existence records that this rewritten source passed (the second clang run is the slow
    part). The key covers the rewritten text, which holds the strict library, the clang and its flags.
    MY_MPS_OPS_STRICT_CACHE=0 turns the cache off."""
    if os.environ.get("MY_MPS_OPS_STRICT_CACHE", "1") == "0":
        return None
    root = os.environ.get("MY_MPS_OPS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "my_mps_ops")
    path = os.path.join(root, "strict_msl")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    key = hashlib.sha256("\0".join([_clang_version(clang), " ".join(flags), text]).encode()).hexdigest()[:32]
    return os.path.join(path, key + ".passed")


def _raise(diags: List[Diagnostic]) -> None:
    # clang's errors on a line where the front end found one are its consequences.
    own_at = {(d.path, d.line) for d in diags if d.shadows_line}
    seen, unique = set(), []
    for d in sorted(diags, key=lambda d: (d.path, d.line, d.col, not d.own)):
        key = (d.path, d.line, d.col, d.message)
        if key in seen or (not d.own and (d.path, d.line) in own_at):
            continue
        seen.add(key)
        unique.append(d)
    lines = [str(d) for d in unique[:20]]
    if len(unique) > 20:
        lines.append(f"... and {len(unique) - 20} more errors")
    raise MSLStrictError("MSL rejected by the strict check (Apple's Metal compiler would refuse it):\n" +
                         "\n".join(lines), unique)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m my_mps_ops.emulator.strict",
                                     description="Check MSL files against the rules of Apple's Metal compiler.")
    parser.add_argument("files", nargs="+")
    parser.add_argument("-I", dest="include_dirs", action="append", default=[],
                        help="an include directory (each file's own directory and its include/ are added)")
    args = parser.parse_args(argv)
    if find_clang() is None:
        print("strict MSL check: no clang found (set MY_MPS_OPS_STRICT_CLANG)", file=sys.stderr)
        return 2
    failed = 0
    for path in args.files:
        with open(path) as f:
            source = f.read()
        here = os.path.dirname(os.path.abspath(path))
        dirs = [here, os.path.join(here, "include"), *args.include_dirs]
        try:
            check_msl(source, path, [d for d in dirs if os.path.isdir(d)])
        except MSLStrictError as e:
            failed += 1
            print(e, file=sys.stderr)
        else:
            print(f"{path}: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
