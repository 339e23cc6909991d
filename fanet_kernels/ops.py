"""The fused ops ``fanet::gate``, ``fanet::gate_pool``, ``fanet::focus`` (SPEC §4),
``fanet::residual_gate_pool`` (gate_pool with the residual block's add and ReLU folded in) and
``fanet::bn_residual_gate_pool`` (that with the branch's last BatchNorm folded in too).

Their schemas are defined in C++ (csrc/fanet.cpp), their kernels in csrc/cpu and csrc/cuda and
their autograd in csrc/autograd.cpp (each forward op wired to its backward op); this file
registers the fake (meta) kernels, in the style of pytorch/extension-cpp, and exposes
backend-dispatching Python functions.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import _validate, backends, cuda_arch

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.fanet.*)

    HAS_EXTENSION = True
    _IMPORT_ERROR = ""
except ImportError as exc:  # not built: the reference backend still works
    HAS_EXTENSION = False
    _IMPORT_ERROR = str(exc)


def update_running_stats(z: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, running_mean: Optional[torch.Tensor],
                         running_var: Optional[torch.Tensor], training: bool, momentum: float) -> None:
    """Updates the running stats from the batch statistics (mean, biased var) that a fused
    bn_residual_gate_pool op returns, as F.batch_norm updates them (running_var with the unbiased
    variance); nothing in eval mode.  Shared by the C++ and Triton backends."""
    if training:
        n = z.numel() // z.shape[1]
        with torch.no_grad():
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            if running_var is not None:
                running_var.mul_(1 - momentum).add_((var * (n / (n - 1))).to(running_var.dtype), alpha=momentum)


def _cuda_kernels_built() -> bool:
    return HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key("fanet::gate", "CUDA")


if HAS_EXTENSION:

    # ---- fake kernels: shapes, dtypes and strides exactly as the real kernels make them --
    @torch.library.register_fake("fanet::gate")
    def _gate_fake(x, u, k):
        _validate.check_gate(x, u, k)
        return _validate.empty_out(x)

    @torch.library.register_fake("fanet::gate_pool")
    def _gate_pool_fake(x, u, k):
        _validate.check_gate(x, u, k)
        return _validate.empty_out(x), x.new_empty((x.shape[0], x.shape[1]))

    @torch.library.register_fake("fanet::residual_gate_pool")
    def _residual_gate_pool_fake(x, branch, k):
        _validate.check_gate(x, branch, k, "branch")
        return _validate.empty_out(x), x.new_empty((x.shape[0], x.shape[1]))

    @torch.library.register_fake("fanet::focus")
    def _focus_fake(x, w1, b1, w2, b2):
        _validate.check_focus(x, w1, b1, w2, b2)
        return x.new_empty((x.shape[0],))

    @torch.library.register_fake("fanet::mlp")
    def _mlp_fake(l, w1, b1, w2, b2):
        _validate.check_mlp(l, w1, b1, w2, b2)
        return l.new_empty((l.shape[0],))

    @torch.library.register_fake("fanet::mlp_backward")
    def _mlp_backward_fake(grad_k, l, w1, b1, w2, b2):
        _validate.check_mlp(l, w1, b1, w2, b2)
        return (torch.empty_like(l, memory_format=torch.contiguous_format), w1.new_empty(w1.shape),
                b1.new_empty(b1.shape), w2.new_empty(w2.shape), b2.new_empty(b2.shape))

    @torch.library.register_fake("fanet::gate_backward")
    def _gate_backward_fake(grad_out, x, u, k):
        _validate.check_gate(x, u, k)
        return _validate.empty_out(x), _validate.empty_out(x), k.new_empty(k.shape)

    @torch.library.register_fake("fanet::gate_pool_backward")
    def _gate_pool_backward_fake(grad_out, grad_pooled, x, u, k):
        _validate.check_gate(x, u, k)
        return _validate.empty_out(x), _validate.empty_out(x), k.new_empty(k.shape)

    @torch.library.register_fake("fanet::residual_gate_pool_backward")
    def _residual_gate_pool_backward_fake(grad_out, grad_pooled, x, branch, k):
        _validate.check_gate(x, branch, k, "branch")
        return _validate.empty_out(x), _validate.empty_out(x), k.new_empty(k.shape)

    @torch.library.register_fake("fanet::focus_backward")
    def _focus_backward_fake(grad_k, x, w1, b1, w2, b2):
        _validate.check_focus(x, w1, b1, w2, b2)
        return (_validate.empty_out(x), w1.new_empty(w1.shape), b1.new_empty(b1.shape),
                w2.new_empty(w2.shape), b2.new_empty(b2.shape))

    @torch.library.register_fake("fanet::bn_residual_gate_pool")
    def _bn_residual_gate_pool_fake(x, z, k, weight, bias, running_mean, running_var, training, eps):
        _validate.check_bn_gate(x, z, k, weight, bias, running_mean, running_var, training)
        c, acc = x.shape[1], _validate.acc_dtype(x.dtype)
        return (_validate.empty_out(x), x.new_empty((x.shape[0], c)), x.new_empty((c,), dtype=acc),
                x.new_empty((c,), dtype=acc))

    @torch.library.register_fake("fanet::bn_residual_gate_pool_backward")
    def _bn_residual_gate_pool_backward_fake(grad_out, grad_pooled, x, z, k, weight, bias, mean, var, training, eps):
        _validate.check_bn_gate(x, z, k, weight, bias, mean, var, False, names=("mean", "var"))
        return (_validate.empty_out(x), _validate.empty_out(x), k.new_empty(k.shape), weight.new_empty(weight.shape),
                bias.new_empty(bias.shape))

    def _native_bn_residual_gate_pool(x, z, k, weight, bias, running_mean, running_var, training, momentum, eps):
        """The C++ op, and the running stats updated from the batch statistics it returns, as
        F.batch_norm updates them (running_var with the unbiased variance)."""
        out, pooled, mean, var = torch.ops.fanet.bn_residual_gate_pool(x, z, k, weight, bias, running_mean,
                                                                        running_var, training, eps)
        update_running_stats(z, mean, var, running_mean, running_var, training, momentum)
        return out, pooled

    # Autograd: csrc/autograd.cpp wires each op to its backward op as a C++ autograd node (each
    # backward is one fused op); a Python formula here would cost ~50 us more per call.

    def _compiled_backend(name: str, devices: tuple[str, ...],
                          device_check: Optional[Callable[[torch.device], Optional[str]]] = None) -> backends.Backend:
        return backends.Backend(
            name=name, devices=devices, gate=torch.ops.fanet.gate.default,
            gate_pool=torch.ops.fanet.gate_pool.default, focus=torch.ops.fanet.focus.default,
            residual_gate_pool=torch.ops.fanet.residual_gate_pool.default, mlp=torch.ops.fanet.mlp.default,
            bn_residual_gate_pool=_native_bn_residual_gate_pool, checks_args=True, func_transforms=False,
            device_check=device_check,
        )

    BACKENDS = {"cpu": _compiled_backend("cpu", ("cpu",))}
    if _cuda_kernels_built():
        # A GPU that the build carries no code for is refused when named (auto skips it) instead of failing
        # at the first kernel launch; where the build recorded no archs the kernels' own check decides.
        _archs = getattr(_C, "cuda_archs", lambda: "")() or ""
        BACKENDS["cuda"] = _compiled_backend("cuda", ("cuda",), cuda_arch.device_check(_archs) if _archs else None)
    else:
        backends.mark_unavailable("cuda", "fanet_kernels._C was built without CUDA kernels "
                                  "(no nvcc, or torch without CUDA, or FANET_CUDA=0)")
else:
    BACKENDS = {}
    for _name in ("cpu", "cuda"):
        backends.mark_unavailable(_name, f"fanet_kernels._C is not built ({_IMPORT_ERROR})")
    backends.warn_extension_missing(_IMPORT_ERROR)


# ---- public, backend-dispatching functions ----------------------------------------------
def _backend_for(backend: Optional[str], x: torch.Tensor, name: str = "x") -> backends.Backend:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fanet: argument '{name}' must be a torch.Tensor, got {type(x).__name__}")
    return backends.resolve(backend, x.device)


def gate(x: torch.Tensor, u: torch.Tensor, k: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """``x + (u - x) * k[n]``: the FA weighting of one block (paper eq. 9)."""
    impl = _backend_for(backend, x)
    if not impl.checks_args:
        _validate.check_gate(x, u, k)
    return impl.gate(x, u, k)


def gate_pool(x: torch.Tensor, u: torch.Tensor, k: torch.Tensor, *,
              backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighting and, in the same pass, the channel means of its result: ``(out, pooled)``
    with ``pooled`` of shape (N, C), the focus input of the next block."""
    impl = _backend_for(backend, x)
    if not impl.checks_args:
        _validate.check_gate(x, u, k)
    return impl.gate_pool(x, u, k)


def residual_gate_pool(x: torch.Tensor, branch: torch.Tensor, k: torch.Tensor, *,
                       backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``gate_pool(x, relu(branch + x), k)`` in one pass: the weighting of a residual block with an
    identity shortcut, given its residual ``branch``, so the block's add and ReLU (and their
    backward) cost no pass of their own.  ``relu(branch + x)`` is formed in the accumulation dtype."""
    impl = _backend_for(backend, x)
    if not impl.checks_args:
        _validate.check_gate(x, branch, k, "branch")
    return impl.residual_gate_pool(x, branch, k)


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
    impl = _backend_for(backend, x)
    if impl.bn_residual_gate_pool is None or x.numel() == 0:
        branch = torch.nn.functional.batch_norm(z, running_mean, running_var, weight, bias, training, momentum, eps)
        return residual_gate_pool(x, branch, k, backend=impl.name)
    if not impl.checks_args:
        _validate.check_bn_gate(x, z, k, weight, bias, running_mean, running_var, training)
    return impl.bn_residual_gate_pool(x, z, k, weight, bias, running_mean, running_var, training, momentum, eps)


def focus(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, *,
          backend: Optional[str] = None) -> torch.Tensor:
    """The focused attention ``k'[n] = sigmoid(w2 . relu(w1 . mean_hw(x[n]) + b1) + b2)``, shape (N,)."""
    impl = _backend_for(backend, x)
    if not impl.checks_args:
        _validate.check_focus(x, w1, b1, w2, b2)
    return impl.focus(x, w1, b1, w2, b2)


def mlp(l: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, *,
        backend: Optional[str] = None) -> torch.Tensor:
    """The MLP head ``k[n] = sigmoid(w2 . relu(w1 . l[n] + b1) + b2)`` on inputs ``l`` (N, C), shape
    (N,), as one op with one backward op: FA's focus MLP on a pool that a gate already wrote, and
    its association MLP on the k history (many tiny ATen calls and autograd nodes otherwise)."""
    impl = _backend_for(backend, l, "l")
    if not impl.checks_args:
        _validate.check_mlp(l, w1, b1, w2, b2)
    return impl.mlp(l, w1, b1, w2, b2)
