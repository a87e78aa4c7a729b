"""Testing helpers: run the ops' Metal path on cpu tensors through the emulator."""

from __future__ import annotations

import contextlib
import threading

from . import _C
from . import emulator  # noqa: F401  registers the emulator as the executor for cpu tensors
from ._emulator import register_library
from .emulator.build import build

_lock = threading.Lock()
_loaded = {}


def load_embedded_shaders() -> dict:
    """Builds (cached on disk) and registers every shader compiled into this build."""
    with _lock:
        for name, source in _C.embedded_shaders().items():
            if name not in _loaded:
                path, _ = build(source, name)
                register_library(name, path)
                _loaded[name] = path
    return dict(_loaded)


@contextlib.contextmanager
def metal_emulation():
    """Within the block, my_mps_ops ops on cpu tensors take their Metal path
    (the launches the MPS backend encodes) and run it on the Metal emulator."""
    load_embedded_shaders()
    previous = _C.metal_emulation_enabled()
    _C.set_metal_emulation(True)
    try:
        yield
    finally:
        _C.set_metal_emulation(previous)
