"""The package's version: the one place it is written (pyproject.toml reads it
from here at build time; ``my_mps_ops.__version__`` imports it)."""

__version__ = "0.1.0"
