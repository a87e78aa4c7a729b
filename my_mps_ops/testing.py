"""Testing helpers: run the ops' Metal path on cpu tensors through the emulator."""

from __future__ import annotations

import contextlib
import threading

from . import _C
from . import emulator  # noqa: F401  registers the emulator as the executor for cpu tensors
from . import _emulator
from ._emulator import register_library
from .emulator.build import build
from .emulator.profile import profile_enabled
from .emulator.race import race_check_enabled

_lock = threading.Lock()
_loaded = {}  # registered name -> library path
_built = {}  # (name, constants, race check) -> library path
_specialised = {}  # registered name ("flash_attention{0:uint=2}") -> (shader name, function constants)


def _constants_key(constants: dict) -> tuple:
    return tuple(sorted(((str(k), v) for k, v in constants.items())))


def _variant():
    """Which build of the shaders is in force: "profile" within my_mps_ops.emulator.profile(),
    else True within race_check(), else False."""
    return "profile" if profile_enabled() else race_check_enabled()


def _build_embedded(name: str, constants: dict, race) -> str:
    key = (name, _constants_key(constants), race)
    if key not in _built:
        _built[key], _ = build(_C.embedded_shaders()[name], name, race_check=bool(race),
                               function_constants=constants, profile=race == "profile")
    return _built[key]


def load_embedded_shaders() -> dict:
    """Builds (cached on disk) and registers every shader compiled into this build,
    with the race check when my_mps_ops.emulator.race_check() is in force; and
    the variants specialised with function constants that launches have asked for."""
    race = _variant()
    with _lock:
        wanted = {name: (name, {}) for name in _C.embedded_shaders()}
        wanted.update(_specialised)
        for registered, (name, constants) in wanted.items():
            path = _build_embedded(name, constants, race)
            if _loaded.get(registered) != path:
                register_library(registered, path)
                _loaded[registered] = path
    return dict(_loaded)


def _resolve_specialised(name: str, registered: str, constants: dict) -> str:
    """The emulator's builder of a shader specialised with function constants
    (a launch's metal::Launch::constants, {index or name: value}), as a Metal
    pipeline is: the library compiled with them, registered by the caller
    under `registered`."""
    race = _variant()
    with _lock:
        path = _build_embedded(name, dict(constants), race)
        _specialised[registered] = (name, dict(constants))
        _loaded[registered] = path
    return path


def specialised_libraries() -> dict:
    """{registered name: (shader, function constants)} of the specialised shader libraries built so far."""
    with _lock:
        return {k: (name, dict(c)) for k, (name, c) in _specialised.items()}


_emulator.set_library_resolver(_resolve_specialised)


def embedded_shaders_in_use() -> bool:
    """Whether ops on this thread run the registered shader libraries now (inside metal_emulation())."""
    return bool(_loaded) and _C.metal_emulation_enabled()


@contextlib.contextmanager
def metal_emulation(enabled: bool = True):
    """Within the block, my_mps_ops ops on cpu tensors called from this thread
    take their Metal path (the launches the MPS backend encodes) and run it on
    the Metal emulator; other threads keep their own setting. The backward of
    an op follows its forward, wherever and whenever autograd runs it. Blocks
    nest (``metal_emulation(False)`` turns it off inside one); leaving a block,
    by an exception too, restores the setting it found."""
    if enabled:
        load_embedded_shaders()
    previous = _C.metal_emulation_enabled()
    _C.set_metal_emulation(bool(enabled))
    try:
        yield
    finally:
        _C.set_metal_emulation(previous)
