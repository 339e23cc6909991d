"""Triton kernels for ``bn_residual_gate_pool`` and its backward op (SPEC §4): residual_gate_pool
with the branch's last BatchNorm folded in, mirroring the C++ CPU op (csrc/cpu/fa_cpu.cpp).

Forward: z's batch statistics (training) by shifted per-(n, c) sums, K_c = z[0, c, H//2, W//2],
reduced over the batch in float64 (``_pair_sums_kernel``); then the residual gate with
B = z * alpha + beta formed in the kernel: the NORM flag of gate.pool_kernel.
Backward: pass 1 is the residual gate's backward with B formed from z (the NORM flag of
gate._gate_bwd_kernel), writing grad_B in the accumulation dtype; the channel sums of grad_B
and grad_B * xhat take one more read of grad_B and z (``_pair_sums_kernel`` again: a flat
Triton sweep cannot reduce per channel without atomics, which would not be deterministic);
pass 2 (``_norm_grad_kernel``) forms grad_z.  Per-channel tables are built with plain PyTorch
(C values).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _validate
from .gate import (_gate_backward_impl, _gate_pool_impl, acc_tl, check_device, in_kernel_format, launch,
                   maybe_autotune, need_int64, pool_config, sizes, tile_offsets, unit_channels, warps_for)

# Rows of the forward table (csrc/cpu NormRow): B = z * alpha + beta, xhat = z * invstd + shift.
ALPHA, BETA, INVSTD, SHIFT = range(4)


@maybe_autotune(key=["C", "HW"])
@triton.jit
def _pair_sums_kernel(a_ptr, b_ptr, coef_ptr, sums_ptr, N, C, HW, hw_per,
                      SAME: tl.constexpr, CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ACC: tl.constexpr):
    """Program (n * channel blocks + block, split), tiled as gate.pool_kernel: per channel c over
    the split's positions, with d = a + coef[0, c] and e = b * coef[1, c] + coef[2, c], sum(d) into
    sums[split, n, 0, c] and sum(d * e) into sums[split, n, 1, c].  SAME: b is a (not loaded twice).
    Batch statistics: a = b = z, coef = (-K, 1, -K); backward: a = grad_B, b = z, coef = (0, invstd,
    shift), i.e. the sums of grad_B and grad_B * xhat."""
    n, c, c_mask = unit_channels(C, BLOCK_C, INT64)
    split = tl.program_id(1)
    c0 = tl.load(coef_ptr + c, mask=c_mask, other=0)[:, None]
    c1 = tl.load(coef_ptr + C + c, mask=c_mask, other=0)[:, None]
    c2 = tl.load(coef_ptr + 2 * C + c, mask=c_mask, other=0)[:, None]
    hw_lo = split * hw_per
    hw_hi = tl.minimum(hw_lo + hw_per, HW)
    base = n * C * HW
    s0 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    s1 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
        offs, mask = tile_offsets(base, c, c_mask, C, HW, hw0, hw_hi, CHANNELS_LAST, BLOCK_HW)
        av = tl.load(a_ptr + offs, mask=mask, other=0).to(ACC)
        if SAME:
            bv = av
        else:
            bv = tl.load(b_ptr + offs, mask=mask, other=0).to(ACC)
        d = tl.where(mask, av + c0, 0)
        s0 += d
        s1 += d * (bv * c1 + c2)
    out = sums_ptr + ((split * N + n) * 2) * C + c
    tl.store(out, tl.sum(s0, axis=1), mask=c_mask)
    tl.store(out + C, tl.sum(s1, axis=1), mask=c_mask)


@maybe_autotune(key=["C", "HW"])
@triton.jit
def _norm_grad_kernel(gb_ptr, z_ptr, t_ptr, gz_ptr, numel, C, HW,
                      CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Pass 2, flat over all elements: grad_z = grad_B * scale + xhat * xhat_coef + constant with
    xhat = z * invstd + shift; t: the (5, C) table (invstd, shift, scale, xhat_coef, constant)."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if CHANNELS_LAST:
        c = offs % C
    else:
        c = (offs // HW) % C
    g = tl.load(gb_ptr + offs, mask=mask, other=0).to(ACC)
    zv = tl.load(z_ptr + offs, mask=mask, other=0).to(ACC)
    xhat = zv * tl.load(t_ptr + c, mask=mask, other=0) + tl.load(t_ptr + C + c, mask=mask, other=0)
    gz = g * tl.load(t_ptr + 2 * C + c, mask=mask, other=0) + (xhat * tl.load(t_ptr + 3 * C + c, mask=mask, other=0)
                                                               + tl.load(t_ptr + 4 * C + c, mask=mask, other=0))
    tl.store(gz_ptr + offs, gz.to(gz_ptr.dtype.element_ty), mask=mask)


# ---- launch code -----------------------------------------------------------------------------
def _pair_sums(a: torch.Tensor, b: Optional[torch.Tensor], coef: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """(2, C) float64: the per-channel sums of _pair_sums_kernel, per (n, c) in the acc dtype, then
    over splits and the batch in float64 (a fixed order: deterministic).  b None: b is a."""
    n, c, h, w = a.shape
    hw = h * w
    acc = coef.dtype
    if n * c * hw == 0:
        return torch.zeros((2, c), dtype=torch.float64, device=a.device)
    cl = fmt == torch.channels_last
    cfg = pool_config(n, c, hw, cl)
    sums = torch.empty((cfg.split, n, 2, c), dtype=acc, device=a.device)
    grid = (n * triton.cdiv(c, cfg.block_c), cfg.split)
    launch(_pair_sums_kernel, grid, a, a if b is None else b, coef, sums, n, c, hw, cfg.hw_per,
           SAME=b is None, CHANNELS_LAST=cl, INT64=need_int64(a.numel()), BLOCK_C=cfg.block_c,
           BLOCK_HW=cfg.block_hw, ACC=acc_tl(a.dtype), num_warps=cfg.num_warps)
    return sums.double().sum((0, 1))


def _batch_stats(z: torch.Tensor, fmt: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) of z (in layout fmt) per channel, in the acc dtype (as cpu batch_stats)."""
    n, c, h, w = z.shape
    acc = _validate.acc_dtype(z.dtype)
    if z.numel() == 0:
        return (torch.zeros((c,), dtype=acc, device=z.device), torch.zeros((c,), dtype=acc, device=z.device))
    # K_c = z[0, c, H//2, W//2]: a value of the channel, so sums of z - K_c stay near the spread.
    shift = z[0, :, h // 2, w // 2].to(acc)
    coef = torch.stack([-shift, torch.ones_like(shift), -shift]).contiguous()
    s1, s2 = _pair_sums(z, None, coef, fmt)
    m = s1 / (n * h * w)
    mean = (shift.double() + m).to(acc)
    var = (s2 / (n * h * w) - m * m).clamp(min=0).to(acc)
    return mean, var


def _norm_table(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> torch.Tensor:
    """The (4, C) table (ALPHA, BETA, INVSTD, SHIFT) in mean's (acc) dtype, as cpu norm_table."""
    acc = mean.dtype
    invstd = 1 / torch.sqrt(var + eps)
    alpha = weight.to(acc) * invstd  # B = z * alpha + beta, as ATen's batch norm forms it
    return torch.stack([alpha, bias.to(acc) - mean * alpha, invstd, -mean * invstd]).contiguous()


def _forward_impl(x, z, k, weight, bias, running_mean, running_var, training: bool, eps: float):
    _validate.check_bn_gate(x, z, k, weight, bias, running_mean, running_var, training)
    check_device(x)
    fmt = _validate.out_memory_format(x)
    acc = _validate.acc_dtype(x.dtype)
    z = in_kernel_format(z, fmt)  # once, for the statistics and the gate
    if training:
        mean, var = _batch_stats(z, fmt)
    else:  # the running stats, returned as given (in the acc dtype); never written here
        mean, var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
    out, pooled = _gate_pool_impl(x, z, k, residual=True, norm=_norm_table(mean, var, weight, bias, eps), u_name="z")
    return out, pooled, mean, var


def _backward_impl(grad_out, grad_pooled, x, z, k, weight, bias, mean, var, training: bool, eps: float):
    _validate.check_bn_gate(x, z, k, weight, bias, mean, var, False, names=("mean", "var"))
    acc = _validate.acc_dtype(x.dtype)
    m, v = mean.to(acc), var.to(acc)
    norm = _norm_table(m, v, weight, bias, eps)
    fmt = _validate.out_memory_format(x)
    zf = in_kernel_format(z, fmt)  # once, for the three passes
    # Pass 1: grad_x, grad_B (acc dtype, kernel layout), grad_k; checks grad_out and grad_pooled.
    gx, gb, gk = _gate_backward_impl(grad_out, grad_pooled, x, zf, k, residual=True, norm=norm, u_name="z")
    n, c, h, w = x.shape
    count = n * h * w
    invstd, shift = norm[INVSTD], norm[SHIFT]
    sum_g, sum_gx = _pair_sums(gb, zf, torch.stack([torch.zeros_like(invstd), invstd, shift]).contiguous(), fmt)
    scale = norm[ALPHA]  # weight * invstd
    if training:  # the statistics depend on z too: the means of grad_B and grad_B * xhat come out
        xcoef, const = ((-scale.double() * s / count).to(acc) for s in (sum_gx, sum_g))
    else:
        xcoef = const = torch.zeros_like(scale)
    table = torch.stack([invstd, shift, scale, xcoef, const]).contiguous()
    gz = _validate.empty_out(x)
    numel = x.numel()
    if numel:
        block = min(sizes().block, triton.next_power_of_2(numel))
        launch(_norm_grad_kernel, (triton.cdiv(numel, block),), gb, zf, table, gz, numel, c, h * w,
               CHANNELS_LAST=fmt == torch.channels_last, INT64=need_int64(numel), BLOCK=block,
               ACC=acc_tl(x.dtype), num_warps=warps_for(block))
    # copies: the two are rows of one tensor, and outputs must not alias
    return gx, gz, gk, sum_gx.to(acc).to(weight.dtype, copy=True), sum_g.to(acc).to(bias.dtype, copy=True)


# ---- custom ops ------------------------------------------------------------------------------
@torch.library.custom_op("fanet_triton::bn_residual_gate_pool", mutates_args=())
def bn_residual_gate_pool(x: torch.Tensor, z: torch.Tensor, k: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor, running_mean: Optional[torch.Tensor],
                          running_var: Optional[torch.Tensor], training: bool,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, pooled, mean, var) as fanet::bn_residual_gate_pool: training, z's batch mean and biased
    variance, else the running stats; the running stats are never written (the caller updates them)."""
    return _forward_impl(x, z, k, weight, bias, running_mean, running_var, training, eps)


@torch.library.custom_op("fanet_triton::bn_residual_gate_pool_backward", mutates_args=())
def bn_residual_gate_pool_backward(grad_out: Optional[torch.Tensor], grad_pooled: Optional[torch.Tensor],
                                   x: torch.Tensor, z: torch.Tensor, k: torch.Tensor, weight: torch.Tensor,
                                   bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, training: bool,
                                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor]:
    """(grad_x, grad_z, grad_k, grad_weight, grad_bias); mean, var: the forward's."""
    return _backward_impl(grad_out, grad_pooled, x, z, k, weight, bias, mean, var, training, eps)


@bn_residual_gate_pool.register_fake
def _(x, z, k, weight, bias, running_mean, running_var, training, eps):
    _validate.check_bn_gate(x, z, k, weight, bias, running_mean, running_var, training)
    c, acc = x.shape[1], _validate.acc_dtype(x.dtype)
    return (_validate.empty_out(x), x.new_empty((x.shape[0], c)), x.new_empty((c,), dtype=acc),
            x.new_empty((c,), dtype=acc))


@bn_residual_gate_pool_backward.register_fake
def _(grad_out, grad_pooled, x, z, k, weight, bias, mean, var, training, eps):
    _validate.check_bn_gate(x, z, k, weight, bias, mean, var, False, names=("mean", "var"))
    return (_validate.empty_out(x), _validate.empty_out(x), k.new_empty(k.shape), weight.new_empty(weight.shape),
            bias.new_empty(bias.shape))


def _setup_context(ctx, inputs, output):
    x, z, k, weight, bias, _, _, training, eps = inputs
    mean, var = output[2], output[3]
    ctx.save_for_backward(x, z, k, weight, bias, mean, var)
    ctx.training, ctx.eps = training, eps
    ctx.mark_non_differentiable(mean, var)  # statistics for the running stats (csrc/autograd.cpp)
    ctx.set_materialize_grads(False)  # an unused output's gradient reaches the backward op as None


def _backward(ctx, grad_out, grad_pooled, _grad_mean, _grad_var):
    grads = bn_residual_gate_pool_backward(grad_out, grad_pooled, *ctx.saved_tensors, ctx.training, ctx.eps)
    return (*grads, None, None, None, None)


bn_residual_gate_pool.register_autograd(_backward, setup_context=_setup_context)
