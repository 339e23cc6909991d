"""fanet_kernels: fused kernels and modules for Focus-and-Association networks (FANet)."""
from __future__ import annotations

from . import backends, ops, reference
from .backends import available_backends, get_backend, set_backend, use_backend
from .ops import HAS_EXTENSION, focus, gate, gate_pool

__version__ = "0.1.0"

__all__ = [
    "available_backends", "backends", "focus", "gate", "gate_pool", "get_backend", "HAS_EXTENSION",
    "ops", "reference", "set_backend", "use_backend",
]
