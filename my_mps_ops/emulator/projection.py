"""Projected times of Metal kernels on Apple GPUs, from the emulator's counters.

Nothing here is measured on a Mac: a projection is a roofline model fed with
counted bytes and FLOPs and with published chip figures (apple_gpus.json, a
source for every number, unknown ones marked). For one dispatch:

    projected time = max(bytes / (bandwidth x achievable fraction), FLOPs / peak) + dispatch overhead

- ours: one term per launch, with the launch's device bytes loaded and stored
  by all threads (LaunchProfile.bytes_moved: what the kernel asks for; a
  cache may serve repeated reads) and its simdgroup_matrix FLOPs;
- PyTorch's MPS composite: one term per aten op a TorchDispatchMode records
  (AtenRecorder): each op reads its inputs and writes its outputs once (the
  distinct elements of each view), plus one dispatch; FLOPs only for matrix
  products (mm, bmm, addmm, baddbmm, scaled dot-product attention).

The peak used is FP16's for half/bfloat16 work and FP32's otherwise (the FP32
figure where FP16's is unknown). Results are always labelled "projected".
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "apple_gpus.json")


@dataclass
class Chip:
    name: str
    family: str
    raw: dict

    def _value(self, key: str) -> Optional[float]:
        v = self.raw[key].get("value")
        return None if v is None else float(v)

    @property
    def gpu_cores(self) -> int:
        return int(self._value("gpu_cores"))

    @property
    def bandwidth(self) -> float:
        """Bytes per second (specification)."""
        return self._value("bandwidth_gbs") * 1e9

    @property
    def fp32_flops(self) -> float:
        return self._value("fp32_tflops") * 1e12

    @property
    def fp16_flops(self) -> Optional[float]:
        v = self._value("fp16_tflops")
        return None if v is None else v * 1e12

    @property
    def threadgroup_memory_per_core(self) -> Optional[int]:
        v = self.raw.get("threadgroup_memory_per_core", {}).get("value")
        return None if v is None else int(v)


def _data() -> dict:
    with open(DATA) as f:
        return json.load(f)


def load_chips() -> Dict[str, Chip]:
    return {c["name"]: Chip(c["name"], c["family"], c) for c in _data()["chips"]}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def find_chip(name: str) -> Chip:
    """A chip by name, loosely ("m1max", "M1-Max", "M1 Max")."""
    chips = load_chips()
    for chip in chips.values():
        if _norm(chip.name) == _norm(name):
            return chip
    raise KeyError(f"unknown chip {name!r}; known: {', '.join(chips)}")


def model_defaults() -> dict:
    m = _data()["model"]
    return {"bandwidth_fraction": float(m["bandwidth_fraction"]["value"]), "dispatch_us": float(m["dispatch_us"]["value"])}


class Model:
    """The roofline model on one chip (see the module's docstring)."""

    def __init__(self, chip: Chip, bandwidth_fraction: Optional[float] = None, dispatch_us: Optional[float] = None):
        d = model_defaults()
        self.chip = chip
        self.bandwidth_fraction = d["bandwidth_fraction"] if bandwidth_fraction is None else float(bandwidth_fraction)
        self.dispatch_us = d["dispatch_us"] if dispatch_us is None else float(dispatch_us)

    def peak(self, half: bool = False) -> float:
        if half and self.chip.fp16_flops is not None:
            return self.chip.fp16_flops
        return self.chip.fp32_flops

    def memory_time(self, bytes_moved: float) -> float:
        return bytes_moved / (self.chip.bandwidth * self.bandwidth_fraction)

    def compute_time(self, flops: float, half: bool = False) -> float:
        return flops / self.peak(half)

    def time(self, bytes_moved: float, flops: float = 0.0, dispatches: int = 1, half: bool = False) -> float:
        """Projected seconds of `dispatches` dispatches moving `bytes_moved` and computing `flops` in all."""
        return max(self.memory_time(bytes_moved), self.compute_time(flops, half)) + dispatches * self.dispatch_us * 1e-6

    def ridge(self, half: bool = False) -> float:
        """FLOPs per byte where the two roofs meet."""
        return self.peak(half) / (self.chip.bandwidth * self.bandwidth_fraction)

    def describe(self) -> str:
        c = self.chip
        fp16 = f"{c.fp16_flops / 1e12:g}" if c.fp16_flops is not None else "unknown (FP32 used)"
        return (f"projected on {c.name} ({c.gpu_cores} GPU cores): {c.bandwidth / 1e9:g} GB/s x "
                f"{self.bandwidth_fraction:g} achievable, {c.fp32_flops / 1e12:g} TFLOPS FP32, {fp16} TFLOPS FP16, "
                f"{self.dispatch_us:g} us per dispatch (assumed); not measured")

    # ---- ours and theirs
    def launches_time(self, launches, half: bool = False) -> float:
        """Projected seconds of emulated launches (LaunchProfiles), one dispatch each."""
        return sum(self.time(l.bytes_moved, l.mma_flops, 1, half) for l in launches)

    def aten_time(self, ops: List["AtenOp"], half: bool = False) -> float:
        """Projected seconds of recorded aten ops, one dispatch each."""
        return sum(self.time(op.bytes, op.flops, 1, half) for op in ops)


# ------------------------------------------------------------------ aten ops

def _distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's distinct elements (a broadcast dimension, stride 0, counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(x, out: list) -> list:
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            _tensors(y, out)
    elif isinstance(x, dict):
        for y in x.values():
            _tensors(y, out)
    return out


def _matmul_flops(func, name: str, args, kwargs, outs) -> float:
    """FLOPs of matrix products: mm/bmm/addmm/baddbmm, and scaled dot-product attention
    (4 B H L S D forward, 2.5 times that backward; half of it with is_causal)."""
    try:
        if name in ("aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default"):
            a = args[0] if name in ("aten.mm.default", "aten.bmm.default") else args[1]
            return 2.0 * outs[0].numel() * a.shape[-1]
        if "scaled_dot_product" in name:
            names = [a.name for a in func._schema.arguments]
            values = dict(zip(names, args))
            values.update(kwargs)
            q, k = values["query"], values["key"]
            flops = 4.0 * q.numel() * k.shape[-2]
            if "backward" in name:
                flops *= 2.5
            if values.get("is_causal"):
                flops *= 0.5
            return flops
    except (AttributeError, IndexError, KeyError, TypeError):
        pass
    return 0.0


@dataclass
class AtenOp:
    name: str
    input_bytes: int
    output_bytes: int
    flops: float = 0.0

    @property
    def bytes(self) -> int:
        return self.input_bytes + self.output_bytes


# Ops that launch no kernel: allocation, and metadata-only ones (views are skipped by schema).
_NO_KERNEL = re.compile(r"^aten\.(empty|empty_like|empty_strided|new_empty|new_empty_strided|detach|lift_fresh|"
                        r"_local_scalar_dense|sym_size|sym_stride|sym_numel|is_same_size|_has_compatible_shallow_copy_type)\b")


class AtenRecorder(TorchDispatchMode):
    """Records the aten ops run inside it, with the bytes each reads and writes
    (distinct elements of each input and output, once) and matrix-product FLOPs.
    Views and allocations are left out (no kernel); ops of the `skip`
    namespaces (our own ops, whose launches the profile counts) are recorded in
    .skipped instead."""

    def __init__(self, skip=("my_mps_ops",)):
        super().__init__()
        self.skip = tuple(skip)
        self.ops: List[AtenOp] = []
        self.skipped: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func)
        if name.split(".")[0] in self.skip:
            self.skipped.append(name)
            return out
        if getattr(func, "is_view", False) or _NO_KERNEL.match(name):
            return out
        ins = _tensors(list(args) + list(kwargs.values()), [])
        outs = _tensors(out, [])
        seen, in_bytes = set(), 0
        for t in ins:
            key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if key not in seen:
                seen.add(key)
                in_bytes += _distinct_bytes(t)
        out_bytes = sum(_distinct_bytes(t) for t in outs)
        self.ops.append(AtenOp(name, in_bytes, out_bytes, _matmul_flops(func, name, args, kwargs, outs)))
        return out

    @property
    def bytes(self) -> int:
        return sum(op.bytes for op in self.ops)

    @property
    def dispatches(self) -> int:
        return len(self.ops)
