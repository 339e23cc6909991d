"""Triton kernels for ``bn_residual_gate_pool`` and its backward op (SPEC §4): residual_gate_pool
with the branch's last BatchNorm folded in, mirroring the C++ CPU op (csrc/cpu/fa_cpu.cpp).

Forward: z's batch statistics (training) by shifted per-(n, c) sums, K_c = z[0, c, H//2, W//2]
(``_moments_kernel``), reduced over the batch in float64; then the residual gate with
B = z * alpha + beta formed in the kernel: the NORM flag of gate.pool_kernel.
Backward, 8 * S bytes as on the CPU: pass 1 (``_norm_gate_bwd_kernel``, tiled per channel block
as the pool kernel, so it sums per channel without atomics) is the residual gate's backward with
B formed from z, writing grad_x and grad_B and summing grad_B, grad_B * xhat and grad_k's terms;
pass 2 (``_norm_grad_kernel``) turns grad_B into grad_z in place.  Per-channel tables are built
with plain PyTorch (C values).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _validate
from .gate import (_check_backward, _gate_pool_impl, acc_tl, check_device, device_of, in_kernel_format, launch,
                   maybe_autotune, need_int64, pool_config, pooled_grad_share, residual_output, sizes, tile_offsets,
                   unit_channels, warps_for)

# Rows of the forward table (csrc/cpu NormRow): B = z * alpha + beta, xhat = z * invstd + shift.
ALPHA, BETA, INVSTD, SHIFT = range(4)


@triton.jit
def _moments_kernel(z_ptr, shift_ptr, sums_ptr, N, C, HW, hw_per,
                    CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_HW: tl.constexpr, ACC: tl.constexpr):
    """Program (n * channel blocks + block, split), tiled as gate.pool_kernel: per channel c over
    the split's positions, with d = z - shift[c], sum(d) into sums[split, n, 0, c] and sum(d * d)
    into sums[split, n, 1, c]."""
    n, c, c_mask = unit_channels(C, BLOCK_C, INT64)
    split = tl.program_id(1)
    if INT64:  # the split's bounds too (see gate.pool_kernel)
        split = split.to(tl.int64)
    k = tl.load(shift_ptr + c, mask=c_mask, other=0)[:, None]
    hw_lo = split * hw_per
    hw_hi = tl.minimum(hw_lo + hw_per, HW)
    s0 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    s1 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
        offs, mask = tile_offsets(n * C * HW, c, c_mask, C, HW, hw0, hw_hi, CHANNELS_LAST, BLOCK_HW)
        d = tl.where(mask, tl.load(z_ptr + offs, mask=mask, other=0).to(ACC) - k, 0)
        s0 += d
        s1 = tl.fma(d, d, s1)
    out = sums_ptr + ((split * N + n) * 2) * C + c
    tl.store(out, tl.sum(s0, axis=1), mask=c_mask)
    tl.store(out + C, tl.sum(s1, axis=1), mask=c_mask)


@triton.jit
def _norm_gate_bwd_kernel(g_ptr, gp_ptr, x_ptr, z_ptr, k_ptr, norm_ptr, gx_ptr, gb_ptr, sums_ptr, N, C, HW, hw_per,
                          HAS_G: tl.constexpr, FOLD: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                          INT64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ACC: tl.constexpr):
    """Pass 1, program (n * channel blocks + block, split) tiled as gate.pool_kernel: the residual
    gate's backward with b = z * alpha[c] + beta[c] (the forward table at norm_ptr) and g = grad_out
    (+ grad_pooled[n, c] / HW, pre-divided, if FOLD): writes grad_x and grad_b (in the outputs' dtype:
    pass 2 turns it into grad_z in place), and per channel over the split's positions sums grad_b,
    grad_b * xhat (xhat = z * invstd + shift) and g * (u - x) into sums[split, n, 0..2, c]."""
    n, c, c_mask = unit_channels(C, BLOCK_C, INT64)
    split = tl.program_id(1)
    if INT64:  # the split's bounds too (see gate.pool_kernel)
        split = split.to(tl.int64)
    kn = tl.load(k_ptr + n)
    alpha = tl.load(norm_ptr + c, mask=c_mask, other=0)[:, None]
    beta = tl.load(norm_ptr + C + c, mask=c_mask, other=0)[:, None]
    invstd = tl.load(norm_ptr + 2 * C + c, mask=c_mask, other=0)[:, None]
    shift = tl.load(norm_ptr + 3 * C + c, mask=c_mask, other=0)[:, None]
    gp = tl.zeros([BLOCK_C, 1], dtype=ACC)
    if FOLD:
        gp = tl.load(gp_ptr + n * C + c, mask=c_mask, other=0)[:, None]
    hw_lo = split * hw_per
    hw_hi = tl.minimum(hw_lo + hw_per, HW)
    s_g = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    s_gx = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    s_k = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
        offs, mask = tile_offsets(n * C * HW, c, c_mask, C, HW, hw0, hw_hi, CHANNELS_LAST, BLOCK_HW)
        xv = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC)
        zv = tl.load(z_ptr + offs, mask=mask, other=0).to(ACC)
        g = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
        if HAS_G:
            g = tl.load(g_ptr + offs, mask=mask, other=0).to(ACC)
        g = tl.where(mask, g + gp, 0)  # masked lanes add nothing below
        uv, off = residual_output(xv, tl.fma(zv, alpha, beta))
        gk = g * kn
        gb = tl.where(off, 0, gk)
        tl.store(gx_ptr + offs, ((g - gk) + gb).to(gx_ptr.dtype.element_ty), mask=mask)
        tl.store(gb_ptr + offs, gb.to(gb_ptr.dtype.element_ty), mask=mask)
        s_g += gb
        s_gx = tl.fma(gb, tl.fma(zv, invstd, shift), s_gx)
        s_k += g * (uv - xv)
    out = sums_ptr + ((split * N + n) * 3) * C + c
    tl.store(out, tl.sum(s_g, axis=1), mask=c_mask)
    tl.store(out + C, tl.sum(s_gx, axis=1), mask=c_mask)
    tl.store(out + 2 * C, tl.sum(s_k, axis=1), mask=c_mask)


@maybe_autotune(key=["C", "HW"], restore_value=["gb_ptr"])  # in place: gb_ptr is gz_ptr
@triton.jit
def _norm_grad_kernel(gb_ptr, z_ptr, t_ptr, gz_ptr, numel, C, HW,
                      CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Pass 2, flat over all elements: grad_z = grad_B * scale + xhat * xhat_coef + constant with
    xhat = z * invstd + shift; t: the (5, C) table (invstd, shift, scale, xhat_coef, constant).
    gz_ptr may be gb_ptr (in place: each element is read, then written, by one program)."""
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
    xhat = tl.fma(zv, tl.load(t_ptr + c, mask=mask, other=0), tl.load(t_ptr + C + c, mask=mask, other=0))
    # the fused multiply-adds of the C++ norm_input_grad, so both round alike
    scale = tl.load(t_ptr + 2 * C + c, mask=mask, other=0)
    xhat_coef = tl.load(t_ptr + 3 * C + c, mask=mask, other=0)
    gz = tl.fma(g, scale, tl.fma(xhat, xhat_coef, tl.load(t_ptr + 4 * C + c, mask=mask, other=0)))
    tl.store(gz_ptr + offs, gz.to(gz_ptr.dtype.element_ty), mask=mask)


# ---- launch code -----------------------------------------------------------------------------
def _channel_sums(kernel, rows: int, grid_args: tuple, x: torch.Tensor, fmt: torch.memory_format,
                  per_thread: int, **meta) -> torch.Tensor:
    """Launches a channel-block kernel (_moments_kernel, _norm_gate_bwd_kernel) over x's shape with
    gate.pool_config's tiles (per_thread: see pool_config); returns its sums (split, N, rows, C) in
    the acc dtype."""
    n, c, h, w = x.shape
    cl = fmt == torch.channels_last
    cfg = pool_config(n, c, h * w, cl, per_thread=per_thread)
    sums = torch.empty((cfg.split, n, rows, c), dtype=_validate.acc_dtype(x.dtype), device=x.device)
    launch(kernel, (n * triton.cdiv(c, cfg.block_c), cfg.split), *grid_args, sums, n, c, h * w, cfg.hw_per, **meta,
           CHANNELS_LAST=cl, INT64=need_int64(cfg.reach(n, c, h * w, cl, rows)), BLOCK_C=cfg.block_c,
           BLOCK_HW=cfg.block_hw,
           ACC=acc_tl(x.dtype), num_warps=cfg.num_warps)
    return sums


def _batch_stats(z: torch.Tensor, fmt: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) of z (in layout fmt) per channel, in the acc dtype (as cpu batch_stats)."""
    n, c, h, w = z.shape
    acc = _validate.acc_dtype(z.dtype)
    if z.numel() == 0:
        return (torch.zeros((c,), dtype=acc, device=z.device), torch.zeros((c,), dtype=acc, device=z.device))
    # K_c = z[0, c, H//2, W//2]: a value of the channel, so sums of z - K_c stay near the spread
    # (0 where it is not finite: an inf shift would make an inf mean NaN).
    shift = z[0, :, h // 2, w // 2].to(acc)
    shift = torch.where(shift.isfinite(), shift, 0).contiguous()
    # per (n, c) in the acc dtype, then over splits and the batch in float64 (a fixed order)
    # two accumulators per element: float64 ones in half the tile
    per_thread = 4 if z.dtype == torch.float64 else 8
    s1, s2 = _channel_sums(_moments_kernel, 2, (z, shift), z, fmt, per_thread).double().sum((0, 1))
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
    _check_backward(grad_out, grad_pooled, x, z, k, "z")
    check_device(x)
    fmt = _validate.out_memory_format(x)
    x, zf = in_kernel_format(x, fmt), in_kernel_format(z, fmt)
    acc = _validate.acc_dtype(x.dtype)
    ka = k.to(acc).contiguous()
    norm = _norm_table(mean.to(acc), var.to(acc), weight, bias, eps)
    n, c, h, w = x.shape
    count = n * h * w
    gx, gz = _validate.empty_out(x), _validate.empty_out(x)
    if x.numel() == 0:
        return (gx, gz, torch.zeros_like(k), torch.zeros_like(weight), torch.zeros_like(bias))
    # Pass 1: grad_x, grad_B (into gz), and per (split, n, c) the sums of grad_B, grad_B * xhat, grad_k's terms.
    g = in_kernel_format(grad_out.to(x.dtype), fmt) if grad_out is not None else x
    gp = pooled_grad_share(grad_pooled, acc, h * w) if grad_pooled is not None else ka
    # three accumulators, three loads and the norm coefficients per element: a half tile, a quarter in float64
    sums = _channel_sums(_norm_gate_bwd_kernel, 3, (g, gp, x, zf, ka, norm, gx, gz), x, fmt,
                         2 if x.dtype == torch.float64 else 4,
                         HAS_G=grad_out is not None, FOLD=grad_pooled is not None)
    sum_g, sum_gx = sums[:, :, :2].double().sum((0, 1))  # over splits and the batch, in a fixed order
    gk = sums[:, :, 2].double().sum((0, 2)).to(k.dtype)  # in float64, as the other totals
    invstd, shift, scale = norm[INVSTD], norm[SHIFT], norm[ALPHA]  # scale = weight * invstd
    if training:  # the statistics depend on z too: the means of grad_B and grad_B * xhat come out
        xcoef, const = ((-scale.double() * s / count).to(acc) for s in (sum_gx, sum_g))
    else:
        xcoef = const = torch.zeros_like(scale)
    table = torch.stack([invstd, shift, scale, xcoef, const]).contiguous()
    # Pass 2: grad_z over grad_B, in place.
    numel = x.numel()
    block = min(sizes().block, triton.next_power_of_2(numel))
    launch(_norm_grad_kernel, (triton.cdiv(numel, block),), gz, zf, table, gz, numel, c, h * w,
           CHANNELS_LAST=fmt == torch.channels_last, INT64=need_int64(numel + block), BLOCK=block,
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
    with device_of(x):
        return _forward_impl(x, z, k, weight, bias, running_mean, running_var, training, eps)


@torch.library.custom_op("fanet_triton::bn_residual_gate_pool_backward", mutates_args=())
def bn_residual_gate_pool_backward(grad_out: Optional[torch.Tensor], grad_pooled: Optional[torch.Tensor],
                                   x: torch.Tensor, z: torch.Tensor, k: torch.Tensor, weight: torch.Tensor,
                                   bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, training: bool,
                                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor]:
    """(grad_x, grad_z, grad_k, grad_weight, grad_bias); mean, var: the forward's."""
    with device_of(x):
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
