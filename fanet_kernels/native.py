"""The compiled backends ``cpu`` and ``cuda``: the extension ``fanet_kernels._C``.

Its schemas (``torch.ops.fanet.*``) are defined in C++ (csrc/fanet.cpp), its kernels in csrc/cpu
and csrc/cuda, and its autograd in csrc/autograd.cpp (each forward op wired to its backward op as
a C++ autograd node: a Python formula would cost ~50 us more per call).  This module loads it,
registers the fake kernels of its ops from :mod:`fanet_kernels.opdefs`, and registers the two
backends (or why they cannot run here).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import backends, cuda_arch, opdefs

try:
    from . import _C  # loading it registers torch.ops.fanet.*

    extension = _C  # the loaded module (cuda_archs(), build facts), or None
    HAS_EXTENSION = True
    IMPORT_ERROR = ""
except ImportError as exc:  # not built: the reference backend still works
    extension = None
    HAS_EXTENSION = False
    IMPORT_ERROR = str(exc)

FORWARD_OPS = ("gate", "gate_pool", "residual_gate_pool", "focus", "mlp")


def cuda_kernels_built() -> bool:
    """Whether the extension carries CUDA kernels (nvcc and a CUDA torch at build time)."""
    return HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key("fanet::gate", "CUDA")


def _backend(name: str, device_check: Optional[Callable[[torch.device], Optional[str]]] = None) -> backends.Backend:
    ops = {op: getattr(torch.ops.fanet, op).default for op in FORWARD_OPS}
    # The BatchNorm ops return their batch statistics; the entries update the running stats from them.
    norm_ops = {op: backends.with_running_stats(getattr(torch.ops.fanet, op).default, outputs)
                for op, outputs in (("bn_residual_gate_pool", 2), ("bn_se_residual_gate_pool", 2),
                                    ("bn_se_residual", 1))}
    return backends.Backend(name=name, devices=(name,), **ops, **norm_ops, checks_args=True, func_transforms=False,
                            device_check=device_check)


if HAS_EXTENSION:
    opdefs.register_fakes("fanet")
    backends.register(_backend("cpu"))
    if cuda_kernels_built():
        # A GPU that the build carries no code for is refused when named (auto skips it) instead of failing
        # at the first kernel launch; where the build recorded no archs the kernels' own check decides.
        _archs = getattr(extension, "cuda_archs", lambda: "")() or ""
        backends.register(_backend("cuda", cuda_arch.device_check(_archs) if _archs else None))
    else:
        backends.register_unavailable("cuda", "fanet_kernels._C was built without CUDA kernels "
                                      "(no nvcc, or torch without CUDA, or FANET_CUDA=0)")
else:
    for _name in ("cpu", "cuda"):
        backends.register_unavailable(_name, f"fanet_kernels._C is not built ({IMPORT_ERROR})")
    backends.warn_extension_missing(IMPORT_ERROR)
