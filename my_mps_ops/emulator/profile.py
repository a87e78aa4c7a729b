"""Performance counters of emulated Metal launches (nothing here is measured on a GPU).

``profile()`` is a context manager: every launch inside it — ``compile_shader``
kernels and the ops' launches under ``my_mps_ops.testing.metal_emulation()`` —
runs from a profile build of its library (unoptimised and instrumented like the
race check's, include/metal_profile.cpp; several to a hundred times slower) and
its counters are collected::

    with my_mps_ops.emulator.profile() as prof:
        lib.copy(x, out, threads=n, group_size=256)
    print(prof.report())
    launch = prof.launches[0]   # a LaunchProfile
    launch.bytes_ratio, launch.coalescing, launch.bank_conflicts

``kernel(..., profile=True)`` runs one launch so and returns its LaunchProfile.
Results are the same as without profiling (the same source, unoptimised);
outside ``profile()`` nothing is counted and the plain libraries run.

What is counted, per launch (include/metal_profile.cpp has the details):

- device memory: bytes loaded and stored by all threads through each buffer
  binding (dynamic), distinct bytes read / written of each, and the compulsory
  minimum (each distinct byte read once plus each distinct byte written once).
  ``constant T&`` parameters (scalars, structs) are argument-table data, not
  counted;
- coalescing: per access site (the .metal line, the buffer, load or store), the
  accesses of the 32 lanes of a SIMD group that are one dynamic instance of the
  site touch some number of aligned segments (``segment_bytes``, 64 by
  default); the fewest that could hold the distinct bytes requested, over the
  number touched, is the site's efficiency;
- threadgroup memory: per access site, bank conflicts (``banks`` banks of
  ``bank_bytes`` bytes, 32 x 4 by default): the most distinct words one bank
  serves in one SIMD-group access (a word read by several lanes is broadcast),
  minus the fewest passes its distinct words need (one, unless the lanes ask
  for more words than there are banks: 8- and 16-byte accesses); bytes
  allocated per threadgroup;
- threadgroup barriers (per thread), SIMD-group function calls (per SIMD group),
  simdgroup_barrier calls, simdgroup_matrix multiply-accumulates as FLOPs
  (2*8*8*8 per SIMD group), transcendental functions evaluated (exp, log, sqrt,
  sin, tanh, pow... per lane and vector component).

These are properties of the kernel and its launch. Their mapping to Apple GPU
hardware (segment size, banks) is a model: Apple does not document them.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator, List, Optional

from .. import _emulator

PROFILE_ENV = "MY_MPS_OPS_EMULATOR_PROFILE"

_active: List["Profile"] = []


def profile_enabled() -> bool:
    return os.environ.get(PROFILE_ENV, "").strip() not in ("", "0")


class SiteProfile:
    """One access site: a .metal line, a buffer or threadgroup array, load or store."""

    def __init__(self, d: dict):
        self.__dict__.update(d)

    @property
    def efficiency(self) -> Optional[float]:
        """Device sites: fewest segments / segments touched (1.0 = fully coalesced)."""
        if self.space != "device" or not self.segments:
            return None
        return self.min_segments / self.segments

    def describe(self) -> str:
        head = f"{self.line} {self.kind} {self.where}: {self.instructions} SIMD-group accesses"
        if self.space == "device":
            return (f"{head}, {self.bytes} B, coalescing {100 * self.efficiency:.1f}% "
                    f"({self.min_segments} of {self.segments} segments needed)")
        return f"{head}, {self.conflicts} bank conflicts ({self.conflicted} accesses conflicted)"

    def __repr__(self) -> str:
        return f"<SiteProfile {self.describe()}>"


class LaunchProfile:
    """The counters of one launch (see the module's docstring)."""

    def __init__(self, d: dict):
        self.raw = d
        self.kernel = d["kernel"]
        self.grid = tuple(d["grid"])
        self.group = tuple(d["group"])
        self.threads = d["threads"]
        self.threadgroups = d["threadgroups"]
        self.segment_bytes = d["segment_bytes"]
        self.banks = d["banks"]
        self.bank_bytes = d["bank_bytes"]
        self.threadgroup_memory_bytes = d["threadgroup_memory_bytes"]
        self.threadgroup_loaded = d["threadgroup_loaded"]
        self.threadgroup_stored = d["threadgroup_stored"]
        self.barriers = d["barriers"]
        self.barrier_arrivals = d["barrier_arrivals"]
        self.simd_calls = d["simd_calls"]
        self.simdgroup_barriers = d["simdgroup_barriers"]
        self.mma_flops = d["mma_flops"]
        self.transcendentals = d["transcendentals"]
        self.buffers = d["buffers"]
        self.sites = [SiteProfile(s) for s in d["sites"]]

    # ---- device memory
    @property
    def bytes_loaded(self) -> int:
        return sum(b["loaded"] for b in self.buffers)

    @property
    def bytes_stored(self) -> int:
        return sum(b["stored"] for b in self.buffers)

    @property
    def bytes_moved(self) -> int:
        return self.bytes_loaded + self.bytes_stored

    @property
    def compulsory_bytes(self) -> int:
        """Each distinct byte read, read once; each distinct byte written, written once."""
        return sum(b["distinct_read"] + b["distinct_written"] for b in self.buffers)

    @property
    def bytes_ratio(self) -> float:
        c = self.compulsory_bytes
        return self.bytes_moved / c if c else float("nan")

    def buffer(self, name: str) -> dict:
        for b in self.buffers:
            if b["name"] == name:
                return b
        raise KeyError(f"kernel {self.kernel} has no counted buffer {name!r}")

    # ---- sites
    def device_sites(self) -> List[SiteProfile]:
        return [s for s in self.sites if s.space == "device"]

    def threadgroup_sites(self) -> List[SiteProfile]:
        return [s for s in self.sites if s.space == "threadgroup"]

    def site(self, line_suffix: str, kind: Optional[str] = None) -> SiteProfile:
        """The one site whose line ends with `line_suffix` (e.g. ":12"), of `kind` if given."""
        found = [s for s in self.sites if s.line.endswith(line_suffix) and (kind is None or s.kind == kind)]
        if len(found) != 1:
            raise KeyError(f"{len(found)} sites match {line_suffix!r} {kind or ''}: "
                           f"{[s.describe() for s in self.sites]}")
        return found[0]

    @property
    def coalescing(self) -> Optional[float]:
        """Over all device accesses: segments needed / segments touched (weighted by accesses)."""
        seg = sum(s.segments for s in self.device_sites())
        return sum(s.min_segments for s in self.device_sites()) / seg if seg else None

    @property
    def transaction_bytes(self) -> int:
        """Device bytes in whole segments: what the SIMD-group accesses move at segment granularity."""
        return sum(s.segments for s in self.device_sites()) * self.segment_bytes

    @property
    def bank_conflicts(self) -> int:
        return sum(s.conflicts for s in self.threadgroup_sites())

    @property
    def barriers_per_thread(self) -> float:
        return self.barrier_arrivals / self.threads if self.threads else 0.0

    def threadgroups_per_core(self, threadgroup_memory_per_core: Optional[int]) -> Optional[int]:
        """How many threadgroups of this launch fit a core's threadgroup memory (None: budget unknown)."""
        if not threadgroup_memory_per_core or not self.threadgroup_memory_bytes:
            return None
        return threadgroup_memory_per_core // self.threadgroup_memory_bytes

    def report(self) -> str:
        lines = [f"kernel {self.kernel}: grid {self.grid}, threadgroup {self.group}, {self.threads} threads in "
                 f"{self.threadgroups} threadgroups",
                 f"  device: {self.bytes_loaded} B loaded, {self.bytes_stored} B stored, compulsory "
                 f"{self.compulsory_bytes} B ({self.bytes_ratio:.2f}x)" +
                 (f", coalescing {100 * self.coalescing:.1f}% ({self.segment_bytes} B segments)"
                  if self.coalescing is not None else "")]
        for b in self.buffers:
            lines.append(f"    buffer({b['index']}) '{b['name']}': {b['loaded']} B loaded, {b['stored']} B stored, "
                         f"{b['distinct_touched']} of {b['bound']} B touched")
        lines.append(f"  threadgroup memory: {self.threadgroup_memory_bytes} B per threadgroup, "
                     f"{self.threadgroup_loaded} B loaded, {self.threadgroup_stored} B stored, "
                     f"{self.bank_conflicts} bank conflicts ({self.banks} banks x {self.bank_bytes} B)")
        lines.append(f"  {self.barriers_per_thread:g} barriers per thread, {self.simd_calls} SIMD-group function "
                     f"calls, {self.simdgroup_barriers} simdgroup_barriers, {self.mma_flops} simdgroup_matrix "
                     f"FLOPs, {self.transcendentals} transcendental evaluations")
        for s in self.sites:
            lines.append("    " + s.describe())
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<LaunchProfile {self.kernel} {self.bytes_moved} B moved, {self.compulsory_bytes} B compulsory>"


class Profile:
    """The launches run inside one profile() block, in order."""

    def __init__(self, segment_bytes: int, banks: int, bank_bytes: int):
        self.segment_bytes = segment_bytes
        self.banks = banks
        self.bank_bytes = bank_bytes
        self.launches: List[LaunchProfile] = []

    def report(self) -> str:
        return "\n".join(l.report() for l in self.launches)

    def __repr__(self) -> str:
        return f"<Profile of {len(self.launches)} launch(es)>"


def _collect() -> None:
    records = _emulator.take_profile_records()
    if not records or not _active:
        return
    parsed = [LaunchProfile(json.loads(r)) for r in records]
    for p in _active:
        p.launches.extend(parsed)


def _switch_embedded_shaders() -> None:
    from .race import _switch_embedded_shaders as switch

    switch()


@contextlib.contextmanager
def profile(segment_bytes: int = 64, banks: int = 32, bank_bytes: int = 4) -> Iterator[Profile]:
    """Within the block, emulated launches run with the counters; yields a Profile
    whose .launches fill in as they finish (nested blocks each get them all)."""
    for name, v in (("segment_bytes", segment_bytes), ("banks", banks), ("bank_bytes", bank_bytes)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    _collect()
    prof = Profile(segment_bytes, banks, bank_bytes)
    previous = os.environ.get(PROFILE_ENV)
    os.environ[PROFILE_ENV] = f"1,segment_bytes={segment_bytes},banks={banks},bank_bytes={bank_bytes}"
    _active.append(prof)
    try:
        _switch_embedded_shaders()
        yield prof
    finally:
        _collect()
        _active.remove(prof)
        if previous is None:
            os.environ.pop(PROFILE_ENV, None)
        else:
            os.environ[PROFILE_ENV] = previous
        _switch_embedded_shaders()
