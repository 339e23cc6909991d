"""Argument checks for the Python-side backends and the fake kernels (SPEC §4).

The C++ backends run the same checks in csrc/common/checks.h, with the same messages, so
a bad call fails the same way on every backend, under torch.compile included.
"""
from __future__ import annotations

from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def need(cond: bool, msg: str) -> None:
    """Raises ValueError("fanet: " + msg) unless cond."""
    if not cond:
        raise ValueError("fanet: " + msg)


def check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fanet: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fanet: argument '{name}' must be a floating tensor (float32, float64, "
                        f"float16 or bfloat16), got {t.dtype}")


def check_gate(x: torch.Tensor, u: torch.Tensor, k: torch.Tensor, u_name: str = "u") -> None:
    """x, u: (N, C, H, W), same shape, dtype and device, H*W >= 1; k: (N,) floating.  ``u_name``
    is the second argument's name in messages ("branch" for the residual op)."""
    check_pair(x, u, u_name)
    check_float(k, "k")
    need(k.dim() == 1 and k.shape[0] == x.shape[0],
         f"argument 'k' must have shape (N,) = ({x.shape[0]},), got {_shape(k)}")
    need(k.device == x.device, f"argument 'k' must be on the device of x ({x.device}), got {k.device}")


def check_pair(x: torch.Tensor, u: torch.Tensor, u_name: str = "u") -> None:
    """x, u: (N, C, H, W), same shape, dtype and device, H*W >= 1."""
    check_float(x, "x")
    need(x.dim() == 4, f"argument 'x' must be 4-D (N, C, H, W), got {x.dim()}-D with shape {_shape(x)}")
    check_float(u, u_name)
    need(u.dim() == 4, f"argument '{u_name}' must be 4-D (N, C, H, W) like x, got {u.dim()}-D with shape {_shape(u)}")
    need(u.shape == x.shape, f"argument '{u_name}' must have the shape of x {_shape(x)}, got {_shape(u)}")
    if u.dtype != x.dtype:
        raise TypeError(f"fanet: argument '{u_name}' must have the dtype of x ({x.dtype}), got {u.dtype}")
    need(u.device == x.device, f"argument '{u_name}' must be on the device of x ({x.device}), got {u.device}")
    need(x.shape[2] * x.shape[3] >= 1, f"argument 'x' must have H*W >= 1, got shape {_shape(x)}")


def check_focus(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> None:
    """x: (N, C, H, W); w1: (H1, C), b1: (H1,), w2: (1, H1), b2: (1,), one floating dtype."""
    check_float(x, "x")
    need(x.dim() == 4, f"argument 'x' must be 4-D (N, C, H, W), got {x.dim()}-D with shape {_shape(x)}")
    need(x.shape[2] * x.shape[3] >= 1, f"argument 'x' must have H*W >= 1, got shape {_shape(x)}")
    _check_mlp_weights(x, "x", w1, b1, w2, b2)


def check_mlp(inputs: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> None:
    """inputs: (N, C); the weights as for check_focus."""
    check_float(inputs, "inputs")
    need(inputs.dim() == 2, f"argument 'inputs' must be 2-D (N, C), got {inputs.dim()}-D with shape {_shape(inputs)}")
    _check_mlp_weights(inputs, "inputs", w1, b1, w2, b2)


def _check_mlp_weights(inp: torch.Tensor, inp_name: str, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                       b2: torch.Tensor) -> None:
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        check_float(t, name)
    c = inp.shape[1]
    need(w1.dim() == 2 and w1.shape[1] == c and w1.shape[0] >= 1,
          f"argument 'w1' must have shape (H1, C) with C = {c}, got {_shape(w1)}")
    h1 = w1.shape[0]
    need(b1.dim() == 1 and b1.shape[0] == h1, f"argument 'b1' must have shape ({h1},), got {_shape(b1)}")
    need(w2.dim() == 2 and tuple(w2.shape) == (1, h1), f"argument 'w2' must have shape (1, {h1}), got {_shape(w2)}")
    need(b2.dim() == 1 and b2.shape[0] == 1, f"argument 'b2' must have shape (1,), got {_shape(b2)}")
    for name, t in (("b1", b1), ("w2", w2), ("b2", b2)):
        if t.dtype != w1.dtype:
            raise TypeError(f"fanet: argument '{name}' must have the dtype of w1 ({w1.dtype}), got {t.dtype}")
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        need(t.device == inp.device,
              f"argument '{name}' must be on the device of {inp_name} ({inp.device}), got {t.device}")


def check_bn(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean, running_var,
             training: bool, names: tuple[str, str] = ("running_mean", "running_var")) -> None:
    """The BatchNorm arguments of bn_residual_gate_pool against z (N, C, H, W): weight, bias and the
    running stats where given are (C,) floating tensors on z's device; eval needs the running stats,
    training more than one value per channel (F.batch_norm's rule).  ``names``: of the statistics in
    messages (the backward op's are the forward's "mean" and "var")."""
    c = z.shape[1]
    need((running_mean is None) == (running_var is None),
          f"arguments '{names[0]}' and '{names[1]}' must both be given or both be None")
    need(training or running_mean is not None,
          f"arguments '{names[0]}' and '{names[1]}' are required when not training")
    for name, t in (("weight", weight), ("bias", bias)):
        need(t is not None, f"argument '{name}' must be a tensor (an affine BatchNorm's), got None")
    for name, t in (("weight", weight), ("bias", bias), (names[0], running_mean), (names[1], running_var)):
        if t is None:
            continue
        check_float(t, name)
        need(t.dim() == 1 and t.shape[0] == c, f"argument '{name}' must have shape (C,) = ({c},), got {_shape(t)}")
        need(t.device == z.device, f"argument '{name}' must be on the device of z ({z.device}), got {t.device}")
    need(not training or c == 0 or z.numel() // c != 1,
          f"argument 'z': Expected more than 1 value per channel when training, got input size {_shape(z)}")


def check_bn_gate(x: torch.Tensor, z: torch.Tensor, k: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  running_mean, running_var, training: bool,
                  names: tuple[str, str] = ("running_mean", "running_var")) -> None:
    """The arguments of bn_residual_gate_pool (and, with the forward's statistics as ``running_mean``
    and ``running_var`` and ``names`` ("mean", "var"), of its backward op): check_gate with z in
    place of u, then check_bn."""
    check_gate(x, z, k, "z")
    check_bn(z, weight, bias, running_mean, running_var, training, names)


def check_se(z: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> None:
    """The SE block's weights against its input z (N, C, H, W): w1 (R, C), b1 (R,), w2 (C, R), b2 (C,),
    one floating dtype, on z's device (the argument names are the ops': se_w1 .. se_b2)."""
    named = (("se_w1", w1), ("se_b1", b1), ("se_w2", w2), ("se_b2", b2))
    for name, t in named:
        check_float(t, name)
    c = z.shape[1]
    need(w1.dim() == 2 and w1.shape[1] == c and w1.shape[0] >= 1,
         f"argument 'se_w1' must have shape (R, C) with C = {c}, got {_shape(w1)}")
    r = w1.shape[0]
    need(tuple(b1.shape) == (r,), f"argument 'se_b1' must have shape ({r},), got {_shape(b1)}")
    need(tuple(w2.shape) == (c, r), f"argument 'se_w2' must have shape ({c}, {r}), got {_shape(w2)}")
    need(tuple(b2.shape) == (c,), f"argument 'se_b2' must have shape ({c},), got {_shape(b2)}")
    for name, t in named[1:]:
        if t.dtype != w1.dtype:
            raise TypeError(f"fanet: argument '{name}' must have the dtype of se_w1 ({w1.dtype}), got {t.dtype}")
    for name, t in named:
        need(t.device == z.device, f"argument '{name}' must be on the device of z ({z.device}), got {t.device}")


def check_grad_like(g: torch.Tensor, x: torch.Tensor, name: str) -> None:
    """A gradient of an output shaped as x: floating, x's shape, x's device."""
    check_float(g, name)
    need(g.shape == x.shape, f"argument '{name}' must have the shape of x {_shape(x)}, got {_shape(g)}")
    need(g.device == x.device, f"argument '{name}' must be on the device of x ({x.device}), got {g.device}")


def check_pool_grads(grad_out: Optional[torch.Tensor], grad_pooled: Optional[torch.Tensor], x: torch.Tensor) -> None:
    """The output gradients a gate_pool-like backward op takes, either of them None: grad_out shaped as x,
    grad_pooled as its (N, C) channel means."""
    if grad_out is not None:
        check_grad_like(grad_out, x, "grad_out")
    if grad_pooled is not None:
        check_float(grad_pooled, "grad_pooled")
        need(tuple(grad_pooled.shape) == tuple(x.shape[:2]),
             f"argument 'grad_pooled' must have shape ({x.shape[0]}, {x.shape[1]}), got {_shape(grad_pooled)}")
        need(grad_pooled.device == x.device,
             f"argument 'grad_pooled' must be on the device of x ({x.device}), got {grad_pooled.device}")


def check_grad_k(grad_k: torch.Tensor, inp: torch.Tensor, inp_name: str = "x") -> None:
    """The gradient of a (N,) attention output of an op whose input is inp (N, ...)."""
    need(grad_k.dim() == 1 and grad_k.shape[0] == inp.shape[0],
         f"argument 'grad_k' must have shape ({inp.shape[0]},), got {_shape(grad_k)}")
    check_float(grad_k, "grad_k")
    need(grad_k.device == inp.device,
         f"argument 'grad_k' must be on the device of {inp_name} ({inp.device}), got {grad_k.device}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums and means accumulate in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def out_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the kernels run in and write: channels_last when x is laid out so (and not
    also plain-contiguous), else contiguous. Mirrors kernel_memory_format in checks.h."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def empty_out(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped, typed and laid out as the kernels' output for x."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=out_memory_format(x))
