"""The Triton backend of the fused ops (SPEC §4): ``torch.ops.fanet_triton.*``.

Runs on CUDA tensors, and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1,
set before this package is first imported), which is how CI tests it without a GPU.
Kernel families: ``fanet_kernels.triton.gate`` (gate, gate_pool, residual_gate_pool and their
backward ops), ``fanet_kernels.triton.bn_gate`` (bn_residual_gate_pool, whose gate passes are
gate's kernels with their NORM flag) and ``fanet_kernels.triton.focus``; what they share (guards,
launch, heuristics, the pool kernel) is in ``fanet_kernels.triton.common``.
"""
from __future__ import annotations

try:
    import triton  # noqa: F401
except ImportError as exc:  # backends.load() reports this as "unavailable"
    raise ImportError("fanet_kernels.triton needs the 'triton' package, which is not installed "
                      f"(pip install triton): {exc}") from exc

from .. import reference
from ..backends import Backend, register, with_running_stats
from . import bn_gate, common, focus, gate  # registers torch.ops.fanet_triton.*
from .common import AUTOTUNE, INTERPRET


def _gate_pool(x, u, k):
    return tuple(gate.gate_pool(x, u, k))


def _residual_gate_pool(x, branch, k):
    return tuple(gate.residual_gate_pool(x, branch, k))


BACKEND = Backend(name="triton", devices=("cuda", "cpu") if INTERPRET else ("cuda",),
                  gate=gate.gate, gate_pool=_gate_pool, focus=focus.focus,
                  residual_gate_pool=_residual_gate_pool,
                  # the BatchNorm ops return their batch statistics; the entries update the running stats
                  bn_residual_gate_pool=with_running_stats(bn_gate.bn_residual_gate_pool, 2),
                  bn_se_residual_gate_pool=with_running_stats(bn_gate.bn_se_residual_gate_pool, 2),
                  bn_se_residual=with_running_stats(bn_gate.bn_se_residual, 1),
                  mlp=reference.mlp,  # a few tiny matrix products, no pass over activations: plain PyTorch
                  func_transforms=False)
register(BACKEND)

__all__ = ["AUTOTUNE", "BACKEND", "INTERPRET", "bn_gate", "common", "focus", "gate"]
