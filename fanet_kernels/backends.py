"""Which implementation runs the fused ops (SPEC §4).

Backends: ``reference`` (plain PyTorch, the spec), ``cpu`` (C++), ``cuda`` (C++/CUDA),
``triton``; ``auto`` picks, per call, the fastest one available for the tensors' device.
Select one for the process with :func:`set_backend` or the environment variable ``FANET_BACKEND``,
for a block of code in the current thread with :func:`use_backend` (thread-local, as
``torch.no_grad``), or per module with its ``backend=`` argument.
Inside torch.func's differentiating transforms (grad, vjp, jvp, jacrev, jacfwd, hessian) ``auto``
picks ``reference``: they cannot run the fused ops' autograd (C++ nodes, and torch.library formulas
for Triton's).  ``vmap`` alone runs the fused ops (one call per batch entry).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
try:
    from torch._C._functorch import TransformType, peek_interpreter_stack
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    _AUTOGRAD_TRANSFORMS = (TransformType.Grad, TransformType.Jvp)  # vjp, jacrev, jacfwd, hessian: these
except ImportError:  # a torch without functorch's API: no transforms to detect
    def peek_interpreter_stack() -> None:
        return None

NAMES = ("auto", "reference", "cpu", "cuda", "triton")

# Order in which `auto` tries backends for a device type: fastest first.  Triton runs on the
# CPU only under TRITON_INTERPRET=1 (a slow simulation), so auto never picks it there.
AUTO_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}


@dataclass(frozen=True)
class Backend:
    """The fused ops of one implementation, and the device types it runs on."""

    name: str
    devices: tuple[str, ...]
    gate: Callable[..., torch.Tensor]
    gate_pool: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    focus: Callable[..., torch.Tensor]
    residual_gate_pool: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    mlp: Callable[..., torch.Tensor]  # the MLP head of focus and association on (N, C) inputs
    # residual_gate_pool with the branch's last BatchNorm folded in, F.batch_norm's arguments after
    # k; None: ops.bn_residual_gate_pool composes F.batch_norm and residual_gate_pool.
    bn_residual_gate_pool: Optional[Callable[..., tuple[torch.Tensor, torch.Tensor]]] = None
    # a branch that ends BatchNorm -> SE (SE weights after the BatchNorm's affine ones), with the gate and
    # without (k = 1, no pool); None: ops composes the reference's eager tail.
    bn_se_residual_gate_pool: Optional[Callable[..., tuple[torch.Tensor, torch.Tensor]]] = None
    bn_se_residual: Optional[Callable[..., torch.Tensor]] = None
    # True when the ops check their arguments themselves (the C++ ops, with the messages of
    # _validate): the Python-side checks are then skipped, saving ~8 us per call.
    checks_args: bool = False
    # False when torch.func's grad and jvp transforms cannot run the ops' autograd (a C++ node; a
    # custom_op's register_autograd): inside one `auto` then picks the reference.  vmap can.
    func_transforms: bool = True
    # device -> None where the backend runs on that device, else why not (the cuda backend on a GPU
    # its build carries no code for): ``auto`` passes such a device on, naming the backend raises.
    device_check: Optional[Callable[[torch.device], Optional[str]]] = None

    def refusal(self, device: torch.device) -> Optional[str]:
        """Why this backend cannot run on ``device`` (None where it can, or where it cannot say)."""
        return None if self.device_check is None else self.device_check(device)


# Where each backend is defined: imported on first use, so that `import fanet_kernels` stays light and
# a backend whose toolchain is missing only fails when it is asked for.  Importing the module registers
# the backend (register) or why it cannot run here (register_unavailable).
PROVIDERS = {
    "reference": "fanet_kernels.reference",
    "cpu": "fanet_kernels.native",
    "cuda": "fanet_kernels.native",
    "triton": "fanet_kernels.triton",
}
_registered: dict[str, Backend] = {}
_errors: dict[str, str] = {}


def register(backend: Backend) -> None:
    """Makes ``backend`` the implementation of its name (called by the module that defines it)."""
    check_name(backend.name, "backend.name")
    _registered[backend.name] = backend
    _errors.pop(backend.name, None)


def register_unavailable(name: str, reason: str) -> None:
    """Records why backend ``name`` cannot run here (called by its module, e.g. extension not built)."""
    _errors[name] = reason


def _read_env() -> str:
    name = os.environ.get("FANET_BACKEND", "auto").strip().lower() or "auto"
    if name not in NAMES:
        raise ValueError(f"fanet: environment variable FANET_BACKEND must be one of {', '.join(NAMES)}, "
                         f"got {name!r}")
    return name


_active: str = _read_env()
# use_backend's overrides: per thread, so that threads entering and leaving it in any order each
# see their own block's setting and leave the process setting as it was.
_thread = threading.local()


def check_name(name: str, what: str = "backend") -> str:
    """``name`` normalized, if it is a backend name or ``auto``; else ValueError naming argument ``what``."""
    if not isinstance(name, str) or name.strip().lower() not in NAMES:
        raise ValueError(f"fanet: argument '{what}' must be one of {', '.join(NAMES)}, got {name!r}")
    return name.strip().lower()


def load(name: str) -> Optional[Backend]:
    """The Backend called ``name``, or None if it cannot run here (the reason is in
    :func:`unavailable_reason`)."""
    if name not in _registered and name not in _errors:
        try:
            importlib.import_module(PROVIDERS[name])
            if name not in _registered and name not in _errors:
                raise ImportError(f"{PROVIDERS[name]} registers no backend {name!r}")
        except Exception as exc:  # a missing toolchain must not break the other backends
            _errors.setdefault(name, f"{type(exc).__name__}: {exc}")
    return _registered.get(name)


def preload() -> None:
    """Load the backends ahead of the first op call (``import fanet_kernels`` does it): Dynamo
    cannot trace ``importlib``, so a model compiled before any eager call would otherwise fail
    under ``fullgraph=True``.  Their modules are imported already; Triton's only where a GPU
    can run it, since importing triton costs a second."""
    for name in ("reference", "cpu", "cuda"):
        load(name)
    if torch.cuda.is_available():
        load("triton")


def unavailable_reason(name: str) -> Optional[str]:
    return None if load(name) is not None else _errors.get(name, "unknown")


def set_backend(name: str) -> None:
    """Use backend ``name`` for every op call that does not name its own, in every thread (a
    :func:`use_backend` block still overrides it in its own thread)."""
    global _active
    _active = _settable(name)


def _settable(name: str) -> str:
    """``name`` normalized, if it is ``auto`` or a backend that can run here."""
    name = check_name(name, "name")
    if name != "auto" and load(name) is None:
        raise RuntimeError(f"fanet: backend {name!r} is not available: {unavailable_reason(name)}")
    return name


def get_backend(device: torch.device | str = "cpu") -> str:
    """The backend that op calls on tensors of ``device`` resolve to now (``auto`` resolved)."""
    return resolve(None, torch.device(device)).name


def active_setting() -> str:
    """The setting op calls of this thread use now (its innermost use_backend, else the process
    setting), possibly ``auto``."""
    return _current()


def _current() -> str:
    return getattr(_thread, "override", None) or _active


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with use_backend("reference"): ...`` runs the block with that backend.  Thread-local, as
    ``torch.no_grad``: other threads, including threads the block starts, keep their setting."""
    name = _settable(name)
    previous = getattr(_thread, "override", None)
    _thread.override = name
    try:
        yield
    finally:
        _thread.override = previous


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on tensors of ``device`` here."""
    device = torch.device(device)
    return [n for n in NAMES[1:] if (b := load(n)) is not None and device.type in b.devices
            and b.refusal(device) is None]


def resolve(name: Optional[str], device: torch.device) -> Backend:
    """The Backend for a call: ``name`` (or the global setting) for tensors on ``device``.  During
    ``torch.onnx.export`` (either exporter) every name resolves to ``reference``: the fused ops have no
    ONNX translation, and the reference's plain ATen ops (the spec, same results) export as they are."""
    name = _current() if name is None else check_name(name)
    if _in_onnx_export():
        return load("reference")  # type: ignore[return-value]  (the reference always loads)
    dev = device.type
    transformed = _in_autograd_transform()
    if name == "auto":
        for candidate in AUTO_ORDER.get(dev, ("reference",)):
            backend = load(candidate)
            if backend is not None and dev in backend.devices and (backend.func_transforms or not transformed) \
                    and backend.refusal(device) is None:
                return backend
        raise RuntimeError(f"fanet: no backend can run on device {device}")  # reference always can
    backend = load(name)
    if backend is None:
        raise RuntimeError(f"fanet: backend {name!r} is not available: {unavailable_reason(name)}")
    if dev not in backend.devices:
        raise ValueError(f"fanet: backend {name!r} does not run on {dev} tensors "
                         f"(it runs on: {', '.join(backend.devices)})")
    if (reason := backend.refusal(device)) is not None:
        raise RuntimeError(reason)
    if transformed and not backend.func_transforms:
        raise RuntimeError(f"fanet: backend {name!r} cannot run inside torch.func's grad, vjp, jvp, jacrev, "
                           "jacfwd or hessian: its ops' autograd does not support them; use backend 'reference' or "
                           "'auto' there")
    return backend


def _in_onnx_export() -> bool:
    """Inside torch.onnx.export: its TorchScript exporter and, in its first capture (non-strict
    torch.export, which runs this Python), its dynamo one set the flag that is_in_onnx_export reads.
    Asked only once torch.onnx is imported (import fanet_kernels does not import it), so op calls
    pay nothing for it otherwise; not asked while Dynamo traces (torch.compile, strict export)."""
    return (not torch.compiler.is_dynamo_compiling() and "torch.onnx" in sys.modules
            and torch.onnx.is_in_onnx_export())


def _in_autograd_transform() -> bool:
    """Inside a torch.func grad or jvp transform (0.1 us when in none).  Not asked under
    torch.compile, where the interpreter stack is not empty even without transforms: a compiled
    torch.func.grad over FA modules needs backend 'reference'."""
    if torch.compiler.is_compiling() or peek_interpreter_stack() is None:
        return False
    return any(i.key() in _AUTOGRAD_TRANSFORMS for i in retrieve_all_functorch_interpreters())


def update_running_stats(z: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, running_mean: Optional[torch.Tensor],
                         running_var: Optional[torch.Tensor], training: bool, momentum: float) -> None:
    """Updates the running stats from the batch statistics (mean, biased var) that a fused
    bn_residual_gate_pool op returns, as F.batch_norm updates them (running_var with the unbiased
    variance); nothing in eval mode.  For the backends whose op returns the statistics."""
    if training:
        n = z.numel() // z.shape[1]
        with torch.no_grad():
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            if running_var is not None:
                running_var.mul_(1 - momentum).add_((var * (n / (n - 1))).to(running_var.dtype), alpha=momentum)


def with_running_stats(op: Callable, outputs: int) -> Callable:
    """A backend's entry for a BatchNorm op whose fused ``op`` returns its batch statistics: called as the
    public op is (F.batch_norm's momentum before eps, which ``op`` does not take), it returns ``op``'s first
    ``outputs`` results (one: that tensor) and updates the running stats from the (mean, var) after them."""
    def run(*args):
        *head, momentum, eps = args
        results = op(*head, eps)
        running_mean, running_var, training = head[-3:]
        update_running_stats(args[1], results[outputs], results[outputs + 1], running_mean, running_var, training,
                             momentum)
        return tuple(results[:outputs]) if outputs > 1 else results[0]
    return run


_warned_missing = False


def warn_extension_missing(reason: str) -> None:
    """One warning per process that the compiled kernels are missing, and how to build them."""
    global _warned_missing
    if not _warned_missing:
        _warned_missing = True
        warnings.warn(
            "fanet_kernels: the compiled extension fanet_kernels._C is not available "
            f"({reason}); falling back to the slow 'reference' backend. Build it with "
            "`pip install -e . --no-build-isolation` in the repository (see README).",
            RuntimeWarning, stacklevel=3)
