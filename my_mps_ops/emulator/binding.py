"""compile_shader's binding rules, checked against the kernel's parameters.

torch.mps.compile_shader binds a Tensor as a buffer at its storage offset, a
Python int as 8 bytes (int64), a float as 4 bytes (float32), a list/tuple as
an array of int64 (float32 if any element is a float); ``arg_casts`` narrows
scalars. A GPU reads whatever bytes it is given, so a wrong binding is a wrong
answer, not an error. Here each argument is checked against the parameter it
binds (argument i binds [[buffer(i)]]) and a mismatch raises, naming the
parameter: a tensor of another element type than the pointer's, a
non-contiguous tensor (the kernel would read its storage as if it were dense),
a float for an integer parameter, a value out of the parameter's range, an
argument no parameter takes, an ``arg_casts`` key that names no scalar.
Parameters of a type this does not know (structs, template parameters) are
checked for width only, by the executor.
"""

from __future__ import annotations

import math
import re
import struct
from typing import Dict, List, Optional, Sequence, Union

import torch

_UINT = tuple(getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n))


def _dtypes(*names):
    return tuple(getattr(torch, n) for n in names if hasattr(torch, n))


# MSL scalar type -> (kind, bits, tensor dtypes a buffer of it may be bound from).
# Unsigned parameters also take the signed dtype of their width (torch's
# unsigned types beyond uint8 have few operations).
_SCALARS = {
    "bool": ("bool", 8, _dtypes("bool")),
    "char": ("int", 8, _dtypes("int8")), "int8_t": ("int", 8, _dtypes("int8")),
    "uchar": ("uint", 8, _dtypes("uint8")), "uint8_t": ("uint", 8, _dtypes("uint8")),
    "short": ("int", 16, _dtypes("int16")), "int16_t": ("int", 16, _dtypes("int16")),
    "ushort": ("uint", 16, _dtypes("int16", "uint16")), "uint16_t": ("uint", 16, _dtypes("int16", "uint16")),
    "int": ("int", 32, _dtypes("int32")), "int32_t": ("int", 32, _dtypes("int32")),
    "uint": ("uint", 32, _dtypes("int32", "uint32")), "uint32_t": ("uint", 32, _dtypes("int32", "uint32")),
    "long": ("int", 64, _dtypes("int64")), "int64_t": ("int", 64, _dtypes("int64")),
    "ulong": ("uint", 64, _dtypes("int64", "uint64")), "uint64_t": ("uint", 64, _dtypes("int64", "uint64")),
    "size_t": ("uint", 64, _dtypes("int64", "uint64")),
    "half": ("float", 16, _dtypes("float16")),
    "bfloat": ("float", 16, _dtypes("bfloat16")),
    "float": ("float", 32, _dtypes("float32")),
}
_ATOMICS = {"atomic_int": "int", "atomic_uint": "uint", "atomic_float": "float", "atomic_bool": "bool"}

_CAST_FORMATS = {"int32": ("int", 32), "int16": ("int", 16), "int8": ("int", 8), "uint8": ("uint", 8)}
CASTS = ("fp16", "bf16", "int32", "int16", "int8", "uint8")


def element_type(param_type: str) -> Optional[str]:
    """The MSL scalar type a buffer parameter's elements are made of
    ("device float4*" -> "float"), or None when unknown (structs, templates)."""
    t = re.sub(r"\b(device|constant|const|volatile|threadgroup|thread)\b", " ", param_type.replace("metal::", " "))
    t = " ".join(t.replace("*", " ").replace("&", " ").split())
    if t in _ATOMICS:
        return _ATOMICS[t]
    if t in _SCALARS:
        return t
    m = re.fullmatch(r"(?:packed_)?([a-z]+)([234])", t)
    return m.group(1) if m and m.group(1) in _SCALARS else None


def _describe(i: int, param: Optional[dict]) -> str:
    return f"argument {i}" + (f" ('{param['name']}', {param['type']})" if param else "")


def _int_format(kind: str, bits: int) -> str:
    code = {8: "b", 16: "h", 32: "i", 64: "q"}[bits]
    return code.upper() if kind == "uint" else code


def _pack_int(value: int, kind: str, bits: int, what: str, type_name: str) -> bytes:
    lo, hi = (0, (1 << bits) - 1) if kind == "uint" else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    if not lo <= value <= hi:
        raise ValueError(f"{what}: {value} is out of range for {type_name} ({lo} to {hi})")
    return struct.pack("<" + _int_format(kind, bits), value)


def _pack_float(value: float, cast: Optional[str], what: str) -> bytes:
    if cast == "bf16":
        if math.isfinite(value) and abs(value) > 3.3895313892515355e38:
            raise ValueError(f"{what}: {value} is out of range for bfloat")
        return torch.tensor([value], dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    fmt, name = ("<e", "half") if cast == "fp16" else ("<f", "float")
    try:
        return struct.pack(fmt, value)
    except (OverflowError, struct.error):
        raise ValueError(f"{what}: {value} is out of range for {name}") from None


def pack_scalar(value, cast: Optional[str], i: int, param: Optional[dict]) -> bytes:
    """The bytes a non-tensor argument binds, checked against its parameter."""
    what = _describe(i, param)
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, (bool, int, float)):
        items = [value]
    else:
        raise TypeError(f"{what}: cannot bind a {type(value).__name__} to a Metal kernel "
                        "(tensors, ints, floats and lists of them bind)")
    for v in items:
        if not isinstance(v, (bool, int, float)):
            raise TypeError(f"{what}: cannot bind a list element of type {type(v).__name__}")
    elem = element_type(param["type"]) if param else None
    kind, bits = (_SCALARS[elem][0], _SCALARS[elem][1]) if elem else (None, None)
    any_float = any(isinstance(v, float) for v in items)
    if cast is None:
        cast_kind = "float" if any_float else "int"
    else:
        cast_kind = "float" if cast in ("fp16", "bf16") else "int"
    if kind in ("int", "uint", "bool") and (cast_kind == "float" or any_float):
        raise TypeError(f"{what}: the parameter is an integer ({elem}); got a float "
                        f"{'cast ' + repr(cast) if cast_kind == 'float' and not any_float else 'value'}")
    if kind == "float" and cast_kind == "int":
        hint = "a float with arg_casts 'fp16'" if elem == "half" else "a float"
        if cast:
            raise TypeError(f"{what}: the parameter is {elem}; arg_casts {cast!r} binds an integer")
        raise TypeError(f"{what}: the parameter is {elem}; got a Python int, which binds as an integer (pass {hint})")
    out = []
    for v in items:
        if cast_kind == "float":
            out.append(_pack_float(float(v), cast, what))
            continue
        c_kind, c_bits = _CAST_FORMATS[cast] if cast else ("int", 64)
        if kind in ("int", "uint") and bits == c_bits:
            c_kind, name = kind, elem  # the parameter's signedness at the bound width
        else:
            name = f"{'u' if c_kind == 'uint' else ''}int{c_bits}"
        out.append(_pack_int(int(v), c_kind, c_bits, what, name))
    return b"".join(out)


def check_tensor(t: torch.Tensor, i: int, param: Optional[dict]) -> None:
    what = _describe(i, param)
    if t.device.type != "cpu":
        raise RuntimeError(f"Metal emulator: {what} is on {t.device}; the emulator runs cpu tensors")
    if param is None:
        return
    if not t.is_contiguous():
        raise ValueError(f"{what}: the tensor is not contiguous (sizes {tuple(t.shape)}, strides {t.stride()}); "
                         "the kernel would read its storage as a dense array (pass .contiguous())")
    elem = element_type(param["type"])
    if elem is not None and t.dtype not in _SCALARS[elem][2]:
        allowed = " or ".join(str(d) for d in _SCALARS[elem][2])
        raise TypeError(f"{what}: a {t.dtype} tensor bound to {elem} elements (expected {allowed}; "
                        "use .view(dtype) to reinterpret the bytes on purpose)")


def buffer_params(params: Sequence[dict]) -> Dict[int, dict]:
    return {p["index"]: p for p in params if p["kind"] == "buffer"}


def check_arity(kernel: str, args: Sequence, buffers: Dict[int, dict]) -> None:
    count = max(buffers) + 1 if buffers else 0
    if len(args) > count:
        names = ", ".join(f"{buffers[i]['name']}" for i in sorted(buffers)) or "none"
        raise TypeError(f"kernel {kernel} takes {count} buffer argument(s) ({names}); got {len(args)}")


def check_arg_casts(arg_casts: Union[None, str, Dict[int, str]], args: Sequence) -> None:
    if arg_casts is None:
        return
    if isinstance(arg_casts, str):
        if arg_casts not in CASTS:
            raise ValueError(f"unknown arg_cast {arg_casts!r}; expected one of {sorted(CASTS)}")
        return
    if not isinstance(arg_casts, dict):
        raise TypeError(f"arg_casts must be a str or a dict of argument index -> cast, got {type(arg_casts).__name__}")
    scalars = [i for i, a in enumerate(args) if not isinstance(a, torch.Tensor)]
    for key, cast in arg_casts.items():
        if isinstance(key, bool) or not isinstance(key, int) or key not in scalars:
            raise ValueError(f"arg_casts key {key!r} names no scalar argument (the scalar arguments are at "
                             f"{scalars or 'no index'})")
        if cast not in CASTS:
            raise ValueError(f"unknown arg_cast {cast!r} for argument {key}; expected one of {sorted(CASTS)}")


def dims(value, name: str, minimum: int) -> tuple:
    """A grid or threadgroup size as a tuple of 1 to 3 ints, each in [minimum, 2**32)."""
    items = (value,) if isinstance(value, int) else value
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of 1 to 3 ints, got {value!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{name} must be an int or a sequence of 1 to 3 ints, got {value!r}")
    if not 1 <= len(items) <= 3:
        raise ValueError(f"{name} must have 1 to 3 dimensions, got {value}")
    for v in items:
        if not minimum <= v < 1 << 32:
            raise ValueError(f"{name} must be {'positive' if minimum else 'non-negative'} and below 2**32 in every "
                             f"dimension, got {value}")
    return items


def pack_args(kernel: str, params: Sequence[dict], args: Sequence,
              arg_casts: Union[None, str, Dict[int, str]]) -> List:
    """The arguments as _emulator.launch takes them: tensors, and bytes for scalars."""
    buffers = buffer_params(params)
    check_arity(kernel, args, buffers)
    check_arg_casts(arg_casts, args)
    bound = []
    for i, a in enumerate(args):
        param = buffers.get(i)
        if isinstance(a, torch.Tensor):
            check_tensor(a, i, param)
            bound.append(a)
        else:
            cast = arg_casts if isinstance(arg_casts, str) else (arg_casts or {}).get(i)
            bound.append(pack_scalar(a, cast, i, param))
    return bound
