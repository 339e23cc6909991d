"""fanet_kernels: fused kernels and modules for Focus-and-Association networks (FANet)."""
from __future__ import annotations

from . import backends, complexity, ops, reference, zoo
from .zoo.timm_api import register_when_imported as _register_with_timm
from .apply import apply_fa, fuse_tails
from .backends import available_backends, get_backend, set_backend, use_backend
from .modules import (FAGate, FASequential, FAStage, FAStages, NormResidual, NormSEResidual, Residual, ResidualBlock,
                      SEBlock, collect_k)
from .native import HAS_EXTENSION
from .ops import (bn_residual_gate_pool, bn_se_residual, bn_se_residual_gate_pool, focus, gate, gate_pool, mlp,
                  residual_gate_pool)

backends.preload()
_register_with_timm()  # timm.create_model("fa_resnet56") works, whether timm is imported before or after

__version__ = "0.1.0"

__all__ = [
    "apply_fa", "available_backends", "backends", "bn_residual_gate_pool", "bn_se_residual", "bn_se_residual_gate_pool",
    "collect_k", "complexity", "FAGate", "FASequential", "FAStage", "FAStages", "focus", "fuse_tails", "gate",
    "gate_pool", "get_backend", "HAS_EXTENSION", "mlp", "NormResidual", "NormSEResidual", "ops", "reference",
    "Residual", "residual_gate_pool", "ResidualBlock", "SEBlock", "set_backend", "use_backend", "zoo",
]
