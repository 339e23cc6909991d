"""Each fused op declared once (SPEC §4): the arguments it checks and the outputs it makes.

The schemas are C++ (csrc/fanet.cpp, namespace ``fanet``) and Python (the Triton backend's
``torch.library.custom_op`` s, namespace ``fanet_triton``); both namespaces get their fake kernels
from this table (:func:`register_fakes`), and the public functions of :mod:`fanet_kernels.ops` run
its checks for backends that do not check their arguments themselves.  The checks raise what the
C++ ops raise (csrc/common/checks.h), so a bad call fails the same way everywhere, under
torch.compile included; the outputs have the shapes, dtypes and strides the kernels give.
A new op is one entry here plus its kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ._validate import (acc_dtype, check_bn, check_bn_gate, check_float, check_focus, check_gate, check_grad_k,
                        check_grad_like, check_mlp, check_pair, check_pool_grads, check_se, empty_out)


@dataclass(frozen=True)
class OpDef:
    """One op: ``check(*args)`` raises on bad arguments, ``outputs(*args)`` returns empty tensors
    shaped, typed and laid out as the real kernels' results.  Both take the schema's arguments."""

    name: str
    check: Callable[..., None]
    outputs: Callable[..., Any]

    def fake(self, *args: Any) -> Any:
        """The fake (meta) kernel: the checks, then the outputs."""
        self.check(*args)
        return self.outputs(*args)


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0],))


def _channel_means(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], x.shape[1]))


def _like(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.new_empty(t.shape) for t in ts)


def _plane_means(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], x.shape[1]), dtype=acc_dtype(x.dtype))


def _bn_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acc = acc_dtype(x.dtype)
    return x.new_empty((x.shape[1],), dtype=acc), x.new_empty((x.shape[1],), dtype=acc)


# ---- argument checks of each op, with its schema's argument names -------------------------------
def _check_gate(x, u, k):
    check_gate(x, u, k)


def _check_residual(x, branch, k):
    check_gate(x, branch, k, "branch")


def _check_bn(x, z, k, weight, bias, running_mean, running_var, training, eps):
    check_bn_gate(x, z, k, weight, bias, running_mean, running_var, training)


def _check_bn_se(x, z, k, weight, bias, se_w1, se_b1, se_w2, se_b2, running_mean, running_var, training, eps):
    check_bn_gate(x, z, k, weight, bias, running_mean, running_var, training)
    check_se(z, se_w1, se_b1, se_w2, se_b2)


def _check_bn_se_residual(x, z, weight, bias, se_w1, se_b1, se_w2, se_b2, running_mean, running_var, training, eps,
                          names=("running_mean", "running_var")):
    check_pair(x, z, "z")
    check_bn(z, weight, bias, running_mean, running_var, training, names)
    check_se(z, se_w1, se_b1, se_w2, se_b2)


def _check_z_mean(z_mean, z):
    """The forward's plane means of z, (N, C) on z's device."""
    need_shape = (z.shape[0], z.shape[1])
    check_float(z_mean, "z_mean")
    if tuple(z_mean.shape) != need_shape or z_mean.device != z.device:
        raise ValueError(f"fanet: argument 'z_mean' must have shape {need_shape} on z's device ({z.device}), got "
                         f"{list(z_mean.shape)} on {z_mean.device}")


def _check_gate_backward(grad_out, x, u, k):
    check_gate(x, u, k)
    check_pool_grads(grad_out, None, x)


def _check_gate_pool_backward(grad_out, grad_pooled, x, u, k):
    check_gate(x, u, k)
    check_pool_grads(grad_out, grad_pooled, x)


def _check_residual_backward(grad_out, grad_pooled, x, branch, k):
    check_gate(x, branch, k, "branch")
    check_pool_grads(grad_out, grad_pooled, x)


def _check_bn_backward(grad_out, grad_pooled, x, z, k, weight, bias, mean, var, training, eps):
    check_bn_gate(x, z, k, weight, bias, mean, var, False, names=("mean", "var"))
    check_pool_grads(grad_out, grad_pooled, x)


def _check_bn_se_backward(grad_out, grad_pooled, x, z, k, weight, bias, se_w1, se_b1, se_w2, se_b2, mean, var,
                          z_mean, training, eps):
    check_bn_gate(x, z, k, weight, bias, mean, var, False, names=("mean", "var"))
    check_se(z, se_w1, se_b1, se_w2, se_b2)
    _check_z_mean(z_mean, z)
    check_pool_grads(grad_out, grad_pooled, x)


def _check_bn_se_residual_backward(grad_out, x, z, weight, bias, se_w1, se_b1, se_w2, se_b2, mean, var, z_mean,
                                   training, eps):
    _check_bn_se_residual(x, z, weight, bias, se_w1, se_b1, se_w2, se_b2, mean, var, False, eps, names=("mean", "var"))
    _check_z_mean(z_mean, z)
    check_grad_like(grad_out, x, "grad_out")


def _check_focus_backward(grad_k, x, w1, b1, w2, b2):
    check_focus(x, w1, b1, w2, b2)
    check_grad_k(grad_k, x)


def _check_mlp_backward(grad_k, inputs, w1, b1, w2, b2):
    check_mlp(inputs, w1, b1, w2, b2)
    check_grad_k(grad_k, inputs, "inputs")


def _gate_grads(x, k):
    return empty_out(x), empty_out(x), k.new_empty(k.shape)


OPS: dict[str, OpDef] = {d.name: d for d in (
    # forward ops
    OpDef("gate", _check_gate, lambda x, u, k: empty_out(x)),
    OpDef("gate_pool", _check_gate, lambda x, u, k: (empty_out(x), _channel_means(x))),
    OpDef("residual_gate_pool", _check_residual, lambda x, branch, k: (empty_out(x), _channel_means(x))),
    # -> (out, pooled, batch mean, batch biased var): the stats in the accumulation dtype
    OpDef("bn_residual_gate_pool", _check_bn, lambda x, z, *_: (empty_out(x), _channel_means(x), *_bn_stats(x))),
    # the BatchNorm -> SE tail with and without the gate; + z's plane means (N, C) in the acc dtype
    OpDef("bn_se_residual_gate_pool", _check_bn_se,
          lambda x, z, *_: (empty_out(x), _channel_means(x), *_bn_stats(x), _plane_means(x))),
    OpDef("bn_se_residual", _check_bn_se_residual,
          lambda x, z, *_: (empty_out(x), *_bn_stats(x), _plane_means(x))),
    OpDef("focus", check_focus, lambda x, *_: _per_sample(x)),
    OpDef("mlp", check_mlp, lambda inputs, *_: _per_sample(inputs)),
    # backward ops: -> the gradients of the forward's tensor inputs, in order
    OpDef("gate_backward", _check_gate_backward, lambda grad_out, x, u, k: _gate_grads(x, k)),
    OpDef("gate_pool_backward", _check_gate_pool_backward, lambda go, gp, x, u, k: _gate_grads(x, k)),
    OpDef("residual_gate_pool_backward", _check_residual_backward, lambda go, gp, x, branch, k: _gate_grads(x, k)),
    OpDef("bn_residual_gate_pool_backward", _check_bn_backward,
          lambda go, gp, x, z, k, weight, bias, *_: (*_gate_grads(x, k), *_like(weight, bias))),
    OpDef("bn_se_residual_gate_pool_backward", _check_bn_se_backward,
          lambda go, gp, x, z, k, weight, bias, w1, b1, w2, b2, *_: (*_gate_grads(x, k), *_like(weight, bias, w1, b1,
                                                                                                 w2, b2))),
    OpDef("bn_se_residual_backward", _check_bn_se_residual_backward,
          lambda go, x, z, weight, bias, w1, b1, w2, b2, *_: (empty_out(x), empty_out(x), *_like(weight, bias, w1, b1,
                                                                                                  w2, b2))),
    OpDef("focus_backward", _check_focus_backward, lambda grad_k, x, *w: (empty_out(x), *_like(*w))),
    OpDef("mlp_backward", _check_mlp_backward,
          lambda grad_k, inputs, *w: (torch.empty_like(inputs, memory_format=torch.contiguous_format), *_like(*w))),
)}

# The ops with an autograd formula, and the backward op each one's formula calls.
BACKWARD_OF: dict[str, str] = {name: f"{name}_backward" for name in OPS if f"{name}_backward" in OPS}


def register_fakes(namespace: str, names: Optional[list[str]] = None) -> None:
    """Registers the fake kernel of each op in ``names`` (default: all) for ``namespace::name``."""
    for name in OPS if names is None else names:
        torch.library.register_fake(f"{namespace}::{name}")(OPS[name].fake)
