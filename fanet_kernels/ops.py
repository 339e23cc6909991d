"""The fused ops, the public API (SPEC §4): ``gate``, ``gate_pool``, ``focus``, ``mlp``,
``residual_gate_pool`` (gate_pool with the residual block's add and ReLU folded in),
``bn_residual_gate_pool`` (that with the branch's last BatchNorm folded in too), and
``bn_se_residual_gate_pool`` / ``bn_se_residual`` (a branch that ends BatchNorm -> SE, with the gate
and without).

Each call runs on the backend that :mod:`fanet_kernels.backends` resolves for its tensors' device;
the ops are declared in :mod:`fanet_kernels.opdefs`, their compiled kernels loaded by
:mod:`fanet_kernels.native` and :mod:`fanet_kernels.triton`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from . import backends, opdefs


def _backend_for(backend: Optional[str], x: torch.Tensor, name: str = "x") -> backends.Backend:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fanet: argument '{name}' must be a torch.Tensor, got {type(x).__name__}")
    return backends.resolve(backend, x.device)


def _call(op: str, backend: Optional[str], *args: Any) -> Any:
    """Runs ``op`` on the backend resolved for its first argument's device, checking the arguments
    first where that backend does not check them itself."""
    impl = _backend_for(backend, args[0], "inputs" if op == "mlp" else "x")
    if not impl.checks_args:
        opdefs.OPS[op].check(*args)
    return getattr(impl, op)(*args)


def _call_norm(op: str, backend: Optional[str], args: tuple, momentum: float, eps: float,
               fallback: Optional[Callable[[backends.Backend], Any]] = None) -> Any:
    """The BatchNorm ops, as _call (their checks take eps, not momentum); where the backend has no
    kernel for ``op`` or the batch is empty, ``fallback(backend)`` (default: the reference's ``op``)."""
    impl = _backend_for(backend, args[0])
    fused = getattr(impl, op)
    if fused is None or args[0].numel() == 0:
        if fallback is not None:
            return fallback(impl)
        return getattr(backends.load("reference"), op)(*args, momentum, eps)
    if not impl.checks_args:
        opdefs.OPS[op].check(*args, eps)
    return fused(*args, momentum, eps)


def gate(x: torch.Tensor, u: torch.Tensor, k: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """``x + (u - x) * k[n]``: the FA weighting of one block (paper eq. 9)."""
    return _call("gate", backend, x, u, k)


def gate_pool(x: torch.Tensor, u: torch.Tensor, k: torch.Tensor, *,
              backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighting and, in the same pass, the channel means of its result: ``(out, pooled)``
    with ``pooled`` of shape (N, C), the focus input of the next block."""
    return _call("gate_pool", backend, x, u, k)


def residual_gate_pool(x: torch.Tensor, branch: torch.Tensor, k: torch.Tensor, *,
                       backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``gate_pool(x, relu(branch + x), k)`` in one pass: the weighting of a residual block with an
    identity shortcut, given its residual ``branch``, so the block's add and ReLU (and their
    backward) cost no pass of their own.  ``relu(branch + x)`` is formed in the accumulation dtype."""
    return _call("residual_gate_pool", backend, x, branch, k)


def bn_residual_gate_pool(x: torch.Tensor, z: torch.Tensor, k: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor, running_mean: Optional[torch.Tensor] = None,
                          running_var: Optional[torch.Tensor] = None, training: bool = True, momentum: float = 0.1,
                          eps: float = 1e-5, *, backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual_gate_pool(x, F.batch_norm(z, running_mean, running_var, weight, bias, training, momentum,
    eps), k)``: a residual block whose branch ends in a BatchNorm (z: the branch before it), with that
    BatchNorm folded into the gate.  The running stats are updated as F.batch_norm updates them.  On the
    cpu, cuda and triton backends one op: the batch statistics take one read of z, the normalized branch
    is never written, and the backward is two passes instead of the gate's and BatchNorm's three.  The
    reference backend runs F.batch_norm and its residual_gate_pool."""
    def unfused(impl: backends.Backend) -> tuple[torch.Tensor, torch.Tensor]:
        branch = torch.nn.functional.batch_norm(z, running_mean, running_var, weight, bias, training, momentum, eps)
        return residual_gate_pool(x, branch, k, backend=impl.name)
    return _call_norm("bn_residual_gate_pool", backend, (x, z, k, weight, bias, running_mean, running_var, training),
                      momentum, eps, unfused)


def bn_se_residual_gate_pool(x: torch.Tensor, z: torch.Tensor, k: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor, se_w1: torch.Tensor, se_b1: torch.Tensor, se_w2: torch.Tensor,
                             se_b2: torch.Tensor, running_mean: Optional[torch.Tensor] = None,
                             running_var: Optional[torch.Tensor] = None, training: bool = True, momentum: float = 0.1,
                             eps: float = 1e-5, *, backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The tail of a residual block whose branch ends ``BatchNorm -> SE``, and its FA gate, in one op:
    with B = F.batch_norm(z, running_mean, running_var, weight, bias, training, momentum, eps) and the
    SE scale e = sigmoid(se_w2 relu(se_w1 mean_hw(B) + se_b1) + se_b2) (N, C),
    ``residual_gate_pool(x, B * e[n, c], k)``.  The running stats are updated as F.batch_norm updates
    them.  On the fused backends the forward reads z twice and x once and writes out (B is never
    written), the backward is two passes; the reference runs the eager block tail."""
    return _call_norm("bn_se_residual_gate_pool", backend,
                      (x, z, k, weight, bias, se_w1, se_b1, se_w2, se_b2, running_mean, running_var, training),
                      momentum, eps)


def bn_se_residual(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, se_w1: torch.Tensor,
                   se_b1: torch.Tensor, se_w2: torch.Tensor, se_b2: torch.Tensor,
                   running_mean: Optional[torch.Tensor] = None, running_var: Optional[torch.Tensor] = None,
                   training: bool = True, momentum: float = 0.1, eps: float = 1e-5, *,
                   backend: Optional[str] = None) -> torch.Tensor:
    """The same block tail with no FA gate, for SE networks: ``relu(B * e[n, c] + x)`` in one op (the
    forward reads z twice and x once and writes the output; no pool)."""
    return _call_norm("bn_se_residual", backend,
                      (x, z, weight, bias, se_w1, se_b1, se_w2, se_b2, running_mean, running_var, training),
                      momentum, eps)


def focus(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, *,
          backend: Optional[str] = None) -> torch.Tensor:
    """The focused attention ``k'[n] = sigmoid(w2 . relu(w1 . mean_hw(x[n]) + b1) + b2)``, shape (N,)."""
    return _call("focus", backend, x, w1, b1, w2, b2)


def mlp(inputs: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, *,
        backend: Optional[str] = None) -> torch.Tensor:
    """The MLP head ``k[n] = sigmoid(w2 . relu(w1 . inputs[n] + b1) + b2)`` on ``inputs`` (N, C), shape
    (N,), as one op with one backward op: FA's focus MLP on a pool that a gate already wrote, and
    its association MLP on the k history (many tiny ATen calls and autograd nodes otherwise)."""
    return _call("mlp", backend, inputs, w1, b1, w2, b2)
