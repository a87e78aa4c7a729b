"""Testing helpers: run the ops' Metal path on cpu tensors through the emulator."""

from __future__ import annotations

import contextlib
import threading

from . import _C
from . import emulator  # noqa: F401  registers the emulator as the executor for cpu tensors
from ._emulator import register_library
from .emulator.build import build
from .emulator.race import race_check_enabled

_lock = threading.Lock()
_loaded = {}  # name -> registered library path
_built = {}  # (name, race check) -> library path


def load_embedded_shaders() -> dict:
    """Builds (cached on disk) and registers every shader compiled into this build,
    with the race check when my_mps_ops.emulator.race_check() is in force."""
    race = race_check_enabled()
    with _lock:
        for name, source in _C.embedded_shaders().items():
            if (name, race) not in _built:
                _built[name, race], _ = build(source, name, race_check=race)
            if _loaded.get(name) != _built[name, race]:
                register_library(name, _built[name, race])
                _loaded[name] = _built[name, race]
    return dict(_loaded)


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
