"""Small reference models built with my_mps_ops ops (no hub downloads)."""

from .tiny_llama import TinyLlama, TinyLlamaConfig

__all__ = ["TinyLlama", "TinyLlamaConfig"]
