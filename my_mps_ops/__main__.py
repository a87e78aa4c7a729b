"""``python -m my_mps_ops``: prints my_mps_ops.info()."""

from . import info

info()
