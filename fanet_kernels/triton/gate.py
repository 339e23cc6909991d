"""Triton kernels for ``gate``, ``gate_pool`` and ``residual_gate_pool`` and their backward ops
(SPEC §4).  The residual op is gate_pool with u = relu(branch + x) formed in the kernels: a
RESIDUAL flag of the gate_pool kernels, not kernels of its own.  gate_pool's forward is the
channel-block pool kernel of :mod:`.common`; gate's forward and every backward are flat sweeps.
Every launch is wrapped in a ``torch.library.custom_op`` (namespace ``fanet_triton``) whose fake
kernel comes from :mod:`fanet_kernels.opdefs`, so the ops trace under torch.compile and pass opcheck.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _validate, opdefs
from .common import (PER_THREAD, acc_tl, channel_sums, check_device, device_of, flat_config, in_kernel_format, launch,
                     need_int64, pooled_grad_share, register_autograd, residual_output, sizes, warps_for)


# ---- kernels ---------------------------------------------------------------------------------
@triton.jit
def _gate_flat_kernel(x_ptr, u_ptr, k_ptr, out_ptr, numel, M,
                      INT64: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """out = x + (u - x) * k[n], flat over all elements; n = offset // (C*H*W) in both layouts."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    kn = tl.load(k_ptr + offs // M, mask=mask, other=0)
    xv = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC)
    uv = tl.load(u_ptr + offs, mask=mask, other=0).to(ACC)
    tl.store(out_ptr + offs, (xv + (uv - xv) * kn).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd_kernel(g_ptr, gp_ptr, x_ptr, u_ptr, k_ptr, gx_ptr, gu_ptr, partial_ptr, M, C, HW, P, iters,
                     HAS_G: tl.constexpr, FOLD: tl.constexpr, RESIDUAL: tl.constexpr,
                     CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
                     ACC: tl.constexpr):
    """Program (n, p) sweeps elements [p*iters*BLOCK, (p+1)*iters*BLOCK) of sample n once: g =
    grad_out (+ grad_pooled[n, c] / HW, pre-divided, if FOLD), writes grad_x = g - g*k and
    grad_u = g*k, and its partial sum of g * (u - x) into partial[n, p].  RESIDUAL: u_ptr holds
    the branch b, u = relu(b + x), grad_b = g*k where b + x > 0 (or NaN) else 0, and grad_x gets
    grad_b added (the identity shortcut), in the order of math::residual_grad_x."""
    pid = tl.program_id(0)
    n = pid // P
    p = pid % P
    if INT64:
        n = n.to(tl.int64)
        p = p.to(tl.int64)
    kn = tl.load(k_ptr + n)
    base = n * M
    start = p * iters * BLOCK
    s = tl.zeros([BLOCK], dtype=ACC)
    for it in range(iters):
        j = start + it * BLOCK + tl.arange(0, BLOCK)
        mask = j < M
        offs = base + j
        xv = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC)
        uv = tl.load(u_ptr + offs, mask=mask, other=0).to(ACC)
        if HAS_G:
            g = tl.load(g_ptr + offs, mask=mask, other=0).to(ACC)
        else:
            g = tl.zeros([BLOCK], dtype=ACC)
        if FOLD:
            if CHANNELS_LAST:
                c = j % C
            else:
                c = j // HW
            g += tl.load(gp_ptr + n * C + c, mask=mask, other=0)
        gk = g * kn
        gu = gk
        gx = g - gk
        if RESIDUAL:
            uv, off = residual_output(xv, uv)
            gu = tl.where(off, 0, gk)
            gx = gx + gu
        tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        tl.store(gu_ptr + offs, gu.to(gu_ptr.dtype.element_ty), mask=mask)
        s += g * (uv - xv)
    tl.store(partial_ptr + pid, tl.sum(s, axis=0))


# ---- launch code -----------------------------------------------------------------------------
def _u_name(residual: bool) -> str:
    """The second argument's name in error messages."""
    return "branch" if residual else "u"


def _prepare(x: torch.Tensor, u: torch.Tensor, k: torch.Tensor, u_name: str = "u"):
    _validate.check_gate(x, u, k, u_name)
    check_device(x)
    fmt = _validate.out_memory_format(x)
    return in_kernel_format(x, fmt), in_kernel_format(u, fmt), k.to(_validate.acc_dtype(x.dtype)).contiguous(), fmt


def _gate_impl(x: torch.Tensor, u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    x, u, ka, _ = _prepare(x, u, k)
    out = _validate.empty_out(x)
    numel = x.numel()
    if numel:
        block = min(sizes().block, triton.next_power_of_2(numel))
        launch(_gate_flat_kernel, (triton.cdiv(numel, block),), x, u, ka, out, numel, numel // x.shape[0],
               INT64=need_int64(numel + block), BLOCK=block, ACC=acc_tl(x.dtype), num_warps=warps_for(block))
    return out


def gate_pool_impl(x: torch.Tensor, u: torch.Tensor, k: torch.Tensor, residual: bool = False,
                    norm: Optional[torch.Tensor] = None,
                    u_name: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_pool; residual_gate_pool (u is the branch) if residual; with a norm table (see
    channel_sums), bn_residual_gate_pool's gate (u is z)."""
    x, u, ka, fmt = _prepare(x, u, k, u_name or _u_name(residual))
    out = _validate.empty_out(x)
    pooled = channel_sums(x, u, ka, out, fmt, x.dtype, residual, norm)
    return out, pooled


def _gate_backward_impl(grad_out: Optional[torch.Tensor], grad_pooled: Optional[torch.Tensor],
                        x: torch.Tensor, u: torch.Tensor, k: torch.Tensor, residual: bool = False):
    """Backward of gate_pool (of gate without grad_pooled); of residual_gate_pool (u is the
    branch) if residual."""
    u_name = _u_name(residual)
    _validate.check_gate(x, u, k, u_name)
    _validate.check_pool_grads(grad_out, grad_pooled, x)
    kdtype = k.dtype
    x, u, ka, fmt = _prepare(x, u, k, u_name)
    acc = ka.dtype
    gx, gu = _validate.empty_out(x), _validate.empty_out(x)
    n, c, h, w = x.shape
    hw, m = h * w, c * h * w
    block, iters, per_sample = flat_config(n, m)
    partial = torch.empty((n, per_sample), dtype=acc, device=x.device)
    if x.numel():
        g = in_kernel_format(grad_out.to(x.dtype), fmt) if grad_out is not None else x
        gp = pooled_grad_share(grad_pooled, acc, hw) if grad_pooled is not None else ka
        launch(_gate_bwd_kernel, (n * per_sample,), g, gp, x, u, ka, gx, gu, partial, m, c, hw,
               per_sample, iters, HAS_G=grad_out is not None, FOLD=grad_pooled is not None,
               RESIDUAL=residual, CHANNELS_LAST=fmt == torch.channels_last,
               INT64=need_int64(x.numel() + iters * block),  # a program's steps may pass its sample's end
               BLOCK=block, ACC=acc_tl(x.dtype),
               num_warps=warps_for(block, 4 if x.dtype == torch.float64 else PER_THREAD))
    # Per-sample sum of the per-program partials, in float64 and program order: deterministic.
    return gx, gu, partial.double().sum(1).to(kdtype)


# ---- custom ops ------------------------------------------------------------------------------
@torch.library.custom_op("fanet_triton::gate", mutates_args=())
def gate(x: torch.Tensor, u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    with device_of(x):
        return _gate_impl(x, u, k)


@torch.library.custom_op("fanet_triton::gate_pool", mutates_args=())
def gate_pool(x: torch.Tensor, u: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with device_of(x):
        return gate_pool_impl(x, u, k)


@torch.library.custom_op("fanet_triton::residual_gate_pool", mutates_args=())
def residual_gate_pool(x: torch.Tensor, branch: torch.Tensor,
                       k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with device_of(x):
        return gate_pool_impl(x, branch, k, residual=True)


@torch.library.custom_op("fanet_triton::gate_backward", mutates_args=())
def gate_backward(grad_out: torch.Tensor, x: torch.Tensor, u: torch.Tensor,
                  k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with device_of(x):
        return _gate_backward_impl(grad_out, None, x, u, k)


@torch.library.custom_op("fanet_triton::gate_pool_backward", mutates_args=())
def gate_pool_backward(grad_out: Optional[torch.Tensor], grad_pooled: Optional[torch.Tensor], x: torch.Tensor,
                       u: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with device_of(x):
        return _gate_backward_impl(grad_out, grad_pooled, x, u, k)


@torch.library.custom_op("fanet_triton::residual_gate_pool_backward", mutates_args=())
def residual_gate_pool_backward(grad_out: Optional[torch.Tensor], grad_pooled: Optional[torch.Tensor],
                                x: torch.Tensor, branch: torch.Tensor,
                                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with device_of(x):
        return _gate_backward_impl(grad_out, grad_pooled, x, branch, k, residual=True)


opdefs.register_fakes("fanet_triton", ["gate", "gate_pool", "residual_gate_pool", "gate_backward",
                                      "gate_pool_backward", "residual_gate_pool_backward"])
for _op, _backward in ((gate, gate_backward), (gate_pool, gate_pool_backward),
                       (residual_gate_pool, residual_gate_pool_backward)):
    register_autograd(_op, _backward)
