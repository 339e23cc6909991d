"""Triton kernels for ``bn_residual_gate_pool`` and its backward op (SPEC §4): residual_gate_pool
with the branch's last BatchNorm folded in, mirroring the C++ CPU op (csrc/cpu/bn_gate.cpp, its kernels in
csrc/cpu/kernels/bn_gate.inc); and the BatchNorm -> SE tail ops (bn_se_residual_gate_pool, bn_se_residual).

Forward: z's batch statistics (training) by shifted per-(n, c) sums, K_c = z[0, c, H//2, W//2]
(``_moments_kernel``), reduced over the batch in float64; then the residual gate with
B = z * alpha + beta formed in the kernel: the NORM flag of common.pool_kernel.
Backward, 8 * S bytes as on the CPU: pass 1 (``_norm_gate_bwd_kernel``, tiled per channel block
as the pool kernel, so it sums per channel without atomics) is the residual gate's backward with
B formed from z, writing grad_x and grad_B and summing grad_B, grad_B * xhat and grad_k's terms;
pass 2 (``_norm_grad_kernel``) turns grad_B into grad_z in place.  Per-channel tables are built
with plain PyTorch (C values).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import _validate, opdefs
from .common import (ALPHA, BETA, INVSTD, NORM_ROWS, SHIFT, acc_tl, channel_sums, check_device, device_of,
                     in_kernel_format, launch, maybe_autotune, need_int64, pool_config, pooled_grad_share,
                     residual_output, sizes, tile_offsets, unit_channels, warps_for)
from .gate import gate_pool_impl



@triton.jit
def _moments_kernel(z_ptr, shift_ptr, sums_ptr, N, C, HW, hw_per,
                    CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_HW: tl.constexpr, ACC: tl.constexpr):
    """Program (n * channel blocks + block, split), tiled as common.pool_kernel: per channel c over
    the split's positions, with d = z - shift[c], sum(d) into sums[split, n, 0, c] and sum(d * d)
    into sums[split, n, 1, c]."""
    n, c, c_mask = unit_channels(C, BLOCK_C, INT64)
    split = tl.program_id(1)
    if INT64:  # the split's bounds too (see common.pool_kernel)
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
                          INT64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ACC: tl.constexpr,
                          SE: tl.constexpr = False, WEIGH: tl.constexpr = True):
    """Pass 1, program (n * channel blocks + block, split) tiled as common.pool_kernel: the residual
    gate's backward with b = z * alpha[c] + beta[c] (the forward table at norm_ptr) and g = grad_out
    (+ grad_pooled[n, c] / HW, pre-divided, if FOLD): writes grad_x and grad_b (in the outputs' dtype:
    pass 2 turns it into grad_z in place), and per channel over the split's positions sums grad_b,
    grad_b * xhat (xhat = z * invstd + shift) and g * (u - x) into sums[split, n, 0..2, c].
    SE: sample n's table of an (N, NORM_ROWS, C) one, whose alpha and beta make the SE-scaled branch
    S = B * e[n, c]; grad_b is then grad_S.  WEIGH=False: no gate (out = u, grad_x = grad_S, row 2 unused)."""
    n, c, c_mask = unit_channels(C, BLOCK_C, INT64)
    split = tl.program_id(1)
    if INT64:  # the split's bounds too (see common.pool_kernel)
        split = split.to(tl.int64)
    kn = 1.0
    if WEIGH:
        kn = tl.load(k_ptr + n)
    table = norm_ptr
    if SE:
        table += n * (NORM_ROWS * C)
    alpha = tl.load(table + c, mask=c_mask, other=0)[:, None]
    beta = tl.load(table + C + c, mask=c_mask, other=0)[:, None]
    invstd = tl.load(table + 2 * C + c, mask=c_mask, other=0)[:, None]
    shift = tl.load(table + 3 * C + c, mask=c_mask, other=0)[:, None]
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
        if WEIGH:
            gk = g * kn
            gb = tl.where(off, 0, gk)
            gx = (g - gk) + gb
            s_k += g * (uv - xv)
        else:
            gb = tl.where(off, 0, g)
            gx = gb
        tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        tl.store(gb_ptr + offs, gb.to(gb_ptr.dtype.element_ty), mask=mask)
        s_g += gb
        s_gx = tl.fma(gb, tl.fma(zv, invstd, shift), s_gx)
    out = sums_ptr + ((split * N + n) * 3) * C + c
    tl.store(out, tl.sum(s_g, axis=1), mask=c_mask)
    tl.store(out + C, tl.sum(s_gx, axis=1), mask=c_mask)
    tl.store(out + 2 * C, tl.sum(s_k, axis=1), mask=c_mask)


@maybe_autotune(key=["C", "HW"], restore_value=["gb_ptr"])  # in place: gb_ptr is gz_ptr
@triton.jit
def _norm_grad_kernel(gb_ptr, z_ptr, t_ptr, gz_ptr, numel, C, HW,
                      CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
                      PER_SAMPLE: tl.constexpr = False):
    """Pass 2, flat over all elements: grad_z = grad_B * scale + xhat * xhat_coef + constant with
    xhat = z * invstd + shift; t: the (5, C) table (invstd, shift, scale, xhat_coef, constant), or
    (N, 5, C) if PER_SAMPLE (the SE tail: scale and constant depend on the sample).
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
    t = t_ptr + c
    if PER_SAMPLE:
        t += (offs // (C * HW)) * (5 * C)
    g = tl.load(gb_ptr + offs, mask=mask, other=0).to(ACC)
    zv = tl.load(z_ptr + offs, mask=mask, other=0).to(ACC)
    xhat = tl.fma(zv, tl.load(t, mask=mask, other=0), tl.load(t + C, mask=mask, other=0))
    # the fused multiply-adds of the C++ norm_input_grad, so both round alike
    scale = tl.load(t + 2 * C, mask=mask, other=0)
    xhat_coef = tl.load(t + 3 * C, mask=mask, other=0)
    gz = tl.fma(g, scale, tl.fma(xhat, xhat_coef, tl.load(t + 4 * C, mask=mask, other=0)))
    tl.store(gz_ptr + offs, gz.to(gz_ptr.dtype.element_ty), mask=mask)


# ---- launch code -----------------------------------------------------------------------------
def _channel_sums(kernel, rows: int, grid_args: tuple, x: torch.Tensor, fmt: torch.memory_format,
                  per_thread: int, **meta) -> torch.Tensor:
    """Launches a channel-block kernel (_moments_kernel, _norm_gate_bwd_kernel) over x's shape with
    common.pool_config's tiles (per_thread: see pool_config); returns its sums (split, N, rows, C) in
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


def _plane_moments(z: torch.Tensor, fmt: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift (C,) in the acc dtype, sums (N, 2, C) in float64): per (n, c) the sums over H*W of
    d = z - shift[c] and of d * d (z in layout fmt, not empty)."""
    n, c, h, w = z.shape
    acc = _validate.acc_dtype(z.dtype)
    # K_c = z[0, c, H//2, W//2]: a value of the channel, so sums of z - K_c stay near the spread
    # (0 where it is not finite: an inf shift would make an inf mean NaN).
    shift = z[0, :, h // 2, w // 2].to(acc)
    shift = torch.where(shift.isfinite(), shift, 0).contiguous()
    # per (n, c) in the acc dtype, then over splits in float64 (a fixed order)
    # two accumulators per element: float64 ones in half the tile
    per_thread = 4 if z.dtype == torch.float64 else 8
    return shift, _channel_sums(_moments_kernel, 2, (z, shift), z, fmt, per_thread).double().sum(0)


def _batch_stats(z: torch.Tensor, fmt: torch.memory_format,
                 moments: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) of z (in layout fmt) per channel, in the acc dtype (as cpu batch_stats), from
    its _plane_moments (computed here unless given)."""
    n, c, h, w = z.shape
    acc = _validate.acc_dtype(z.dtype)
    if z.numel() == 0:
        return (torch.zeros((c,), dtype=acc, device=z.device), torch.zeros((c,), dtype=acc, device=z.device))
    shift, sums = moments if moments is not None else _plane_moments(z, fmt)
    s1, s2 = sums.sum(0)  # over the batch in float64
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
    opdefs.OPS["bn_residual_gate_pool"].check(x, z, k, weight, bias, running_mean, running_var, training, eps)
    check_device(x)
    fmt = _validate.out_memory_format(x)
    acc = _validate.acc_dtype(x.dtype)
    z = in_kernel_format(z, fmt)  # once, for the statistics and the gate
    if training:
        mean, var = _batch_stats(z, fmt)
    else:  # the running stats, returned as given (in the acc dtype); never written here
        mean, var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
    out, pooled = gate_pool_impl(x, z, k, residual=True, norm=_norm_table(mean, var, weight, bias, eps), u_name="z")
    return out, pooled, mean, var


def _backward_impl(grad_out, grad_pooled, x, z, k, weight, bias, mean, var, training: bool, eps: float):
    opdefs.OPS["bn_residual_gate_pool_backward"].check(grad_out, grad_pooled, x, z, k, weight, bias, mean, var,
                                                       training, eps)
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


# ---- the BatchNorm -> SE tail (bn_se_residual_gate_pool, bn_se_residual) ------------------------
# Forward, with B = z * alpha[c] + beta[c] (the BatchNorm): the plane means zbar[n, c] = mean_hw(z[n, c])
# from the plane sums of z (the moments pass that also gives the batch statistics; returned, in the acc
# dtype, for the backward), the squeeze q = mean_hw(B) = alpha zbar + beta (in float64), e = excite(q)
# (N, C) with plain PyTorch, then one gate pass with the per-sample table alpha[c] * e[n, c],
# beta[c] * e[n, c]: S = B * e, U = relu(S + x), out = x + (U - x) k.
# Backward (g = grad_out + grad_pooled / HW; dU = g k, or g without a gate):
#   pass 1: dS = dU where S + x > 0 (NaN passes), grad_x = g - g k + dS (grad_x = dS without a gate),
#           and per (n, c): P0 = sum dS, P1 = sum dS xhat, and grad_k[n] = sum g (U - x);
#   (N, C) in float64: de = w P1 + b P0 (B = w xhat + b), the excitation's backward gives its weights'
#           gradients and dq; dB = dS e + dq / HW; with xbar = zbar invstd + shift (mean_hw xhat),
#           grad_bias = sum_n (e P0 + dq), grad_weight = sum_n (e P1 + dq xbar);
#   pass 2: grad_z = dS (scale e) + xhat xcoef + const, scale = w invstd, and in training
#           xcoef = -scale grad_weight / M, const = scale (dq / HW - grad_bias / M) (M = N HW);
#           in eval xcoef = 0, const = scale dq / HW.
def _se_tables(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm (4, C), per-sample (N, NORM_ROWS, C)): the BatchNorm table, and it with alpha and beta
    scaled by the SE scale (N, C) per sample."""
    norm = _norm_table(mean, var, weight, bias, eps)
    per_sample = norm.unsqueeze(0).repeat(scale.shape[0], 1, 1)
    per_sample[:, :2] *= scale.unsqueeze(1)
    return norm, per_sample.contiguous()


def _squeeze(z_mean: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             eps: float) -> torch.Tensor:
    """SE's squeeze mean_hw(B) = alpha zbar + beta (N, C) from z's plane means, in float64, rounded to
    zbar's (acc) dtype."""
    norm = _norm_table(mean, var, weight, bias, eps)
    return (norm[ALPHA].double() * z_mean.double() + norm[BETA].double()).to(z_mean.dtype)


def _excitation(squeeze: torch.Tensor, w1, b1, w2, b2) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden, e) of SE's excitation on the squeeze, in its dtype."""
    dt = squeeze.dtype
    hidden = F.relu(F.linear(squeeze, w1.to(dt), b1.to(dt)))
    return hidden, torch.sigmoid(F.linear(hidden, w2.to(dt), b2.to(dt)))


def _se_forward_impl(x, z, k, weight, bias, w1, b1, w2, b2, running_mean, running_var, training: bool, eps: float,
                     weigh: bool):
    check_device(x)
    fmt = _validate.out_memory_format(x)
    acc = _validate.acc_dtype(x.dtype)
    x, z = in_kernel_format(x, fmt), in_kernel_format(z, fmt)
    n, c, h, w = z.shape
    shift, sums = _plane_moments(z, fmt)
    if training:
        mean, var = _batch_stats(z, fmt, (shift, sums))
    else:  # the running stats, returned as given (in the acc dtype); never written here
        mean, var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
    z_mean = (shift.double() + sums[:, 0] / (h * w)).to(acc)  # (N, C)
    _, e = _excitation(_squeeze(z_mean, mean, var, weight, bias, eps), w1, b1, w2, b2)
    _, table = _se_tables(mean, var, weight, bias, eps, e)
    out = _validate.empty_out(x)
    ka = k.to(acc).contiguous() if weigh else table
    pooled = channel_sums(x, z, ka, out, fmt, x.dtype, residual=True, norm=table, weigh=weigh)
    return out, pooled, mean, var, z_mean


def _se_backward_impl(grad_out, grad_pooled, x, z, k, weight, bias, w1, b1, w2, b2, mean, var, z_mean,
                      training: bool, eps: float, weigh: bool):
    check_device(x)
    fmt = _validate.out_memory_format(x)
    x, zf = in_kernel_format(x, fmt), in_kernel_format(z, fmt)
    acc = _validate.acc_dtype(x.dtype)
    n, c, h, w = x.shape
    hw, count = h * w, n * h * w
    wdt = w1.dtype
    gx, gz = _validate.empty_out(x), _validate.empty_out(x)
    gk = torch.zeros_like(k) if weigh else None
    if x.numel() == 0:
        return (gx, gz, gk, torch.zeros_like(weight), torch.zeros_like(bias), torch.zeros_like(w1),
                torch.zeros_like(b1), torch.zeros_like(w2), torch.zeros_like(b2))
    mean, var, z_mean = mean.to(acc), var.to(acc), z_mean.to(acc)
    squeeze = _squeeze(z_mean, mean, var, weight, bias, eps)
    hidden, e = _excitation(squeeze, w1, b1, w2, b2)
    norm, table = _se_tables(mean, var, weight, bias, eps, e)
    # Pass 1: grad_x, grad_S (into gz), and per (split, n, c) the sums P0, P1 and grad_k's terms.
    ka = k.to(acc).contiguous() if weigh else table
    g = in_kernel_format(grad_out.to(x.dtype), fmt) if grad_out is not None else x
    gp = pooled_grad_share(grad_pooled, acc, hw) if grad_pooled is not None else ka
    sums = _channel_sums(_norm_gate_bwd_kernel, 3, (g, gp, x, zf, ka, table, gx, gz), x, fmt,
                         2 if x.dtype == torch.float64 else 4, HAS_G=grad_out is not None,
                         FOLD=grad_pooled is not None, SE=True, WEIGH=weigh).double().sum(0)  # (N, 3, C)
    p0, p1, pk = sums.unbind(1)
    if weigh:
        gk = pk.sum(1).to(k.dtype)
    # The excitation's backward and the BatchNorm's totals, on (N, C) in float64.
    e64, h64, q64 = e.double(), hidden.double(), squeeze.double()
    w64, b64 = weight.double(), bias.double()
    de = w64 * p1 + b64 * p0
    da = de * e64 * (1 - e64)
    dh = (da @ w2.double()).masked_fill(h64 <= 0, 0)
    dq = dh @ w1.double()
    grad_bias = (e64 * p0 + dq).sum(0)
    xbar = z_mean.double() * norm[INVSTD].double() + norm[SHIFT].double()  # mean_hw(xhat), (N, C)
    grad_weight = (e64 * p1 + dq * xbar).sum(0)
    scale = norm[ALPHA].double()  # weight * invstd
    if training:
        xcoef = (-scale * grad_weight / count).expand(n, c)
        const = scale * (dq / hw - grad_bias / count)
    else:
        xcoef = torch.zeros_like(dq)
        const = scale * dq / hw
    coefs = torch.stack([norm[INVSTD].double().expand(n, c), norm[SHIFT].double().expand(n, c), scale * e64, xcoef,
                         const], dim=1)
    # Pass 2: grad_z over grad_S, in place.
    numel = x.numel()
    block = min(sizes().block, triton.next_power_of_2(numel))
    launch(_norm_grad_kernel, (triton.cdiv(numel, block),), gz, zf, coefs.to(acc).contiguous(), gz, numel, c, hw,
           CHANNELS_LAST=fmt == torch.channels_last, INT64=need_int64(numel + block), BLOCK=block,
           ACC=acc_tl(x.dtype), PER_SAMPLE=True, num_warps=warps_for(block))
    return (gx, gz, gk, grad_weight.to(acc).to(weight.dtype), grad_bias.to(acc).to(bias.dtype),
            (dh.t() @ q64).to(wdt), dh.sum(0).to(wdt), (da.t() @ h64).to(wdt), da.sum(0).to(wdt))


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


opdefs.register_fakes("fanet_triton", ["bn_residual_gate_pool", "bn_residual_gate_pool_backward"])


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


@torch.library.custom_op("fanet_triton::bn_se_residual_gate_pool", mutates_args=())
def bn_se_residual_gate_pool(x: torch.Tensor, z: torch.Tensor, k: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor, se_w1: torch.Tensor, se_b1: torch.Tensor, se_w2: torch.Tensor,
                             se_b2: torch.Tensor, running_mean: Optional[torch.Tensor],
                             running_var: Optional[torch.Tensor], training: bool,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, pooled, mean, var, z_mean) as fanet::bn_se_residual_gate_pool (z_mean: z's plane means (N, C))."""
    opdefs.OPS["bn_se_residual_gate_pool"].check(x, z, k, weight, bias, se_w1, se_b1, se_w2, se_b2, running_mean,
                                                 running_var, training, eps)
    with device_of(x):
        return _se_forward_impl(x, z, k, weight, bias, se_w1, se_b1, se_w2, se_b2, running_mean, running_var,
                                training, eps, weigh=True)


@torch.library.custom_op("fanet_triton::bn_se_residual_gate_pool_backward", mutates_args=())
def bn_se_residual_gate_pool_backward(
        grad_out: Optional[torch.Tensor], grad_pooled: Optional[torch.Tensor], x: torch.Tensor, z: torch.Tensor,
        k: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, se_w1: torch.Tensor, se_b1: torch.Tensor,
        se_w2: torch.Tensor, se_b2: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, z_mean: torch.Tensor,
        training: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_z, grad_k, grad_weight, grad_bias, grad_se_w1, grad_se_b1, grad_se_w2, grad_se_b2)."""
    opdefs.OPS["bn_se_residual_gate_pool_backward"].check(grad_out, grad_pooled, x, z, k, weight, bias, se_w1, se_b1,
                                                          se_w2, se_b2, mean, var, z_mean, training, eps)
    with device_of(x):
        return _se_backward_impl(grad_out, grad_pooled, x, z, k, weight, bias, se_w1, se_b1, se_w2, se_b2, mean, var,
                                 z_mean, training, eps, weigh=True)


@torch.library.custom_op("fanet_triton::bn_se_residual", mutates_args=())
def bn_se_residual(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, se_w1: torch.Tensor,
                   se_b1: torch.Tensor, se_w2: torch.Tensor, se_b2: torch.Tensor, running_mean: Optional[torch.Tensor],
                   running_var: Optional[torch.Tensor], training: bool,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, var, z_mean) as fanet::bn_se_residual."""
    opdefs.OPS["bn_se_residual"].check(x, z, weight, bias, se_w1, se_b1, se_w2, se_b2, running_mean, running_var,
                                       training, eps)
    with device_of(x):
        out, _, mean, var, z_mean = _se_forward_impl(x, z, None, weight, bias, se_w1, se_b1, se_w2, se_b2,
                                                      running_mean, running_var, training, eps, weigh=False)
        return out, mean, var, z_mean


@torch.library.custom_op("fanet_triton::bn_se_residual_backward", mutates_args=())
def bn_se_residual_backward(
        grad_out: torch.Tensor, x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
        se_w1: torch.Tensor, se_b1: torch.Tensor, se_w2: torch.Tensor, se_b2: torch.Tensor, mean: torch.Tensor,
        var: torch.Tensor, z_mean: torch.Tensor, training: bool,
        eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                             torch.Tensor, torch.Tensor]:
    """(grad_x, grad_z, grad_weight, grad_bias, grad_se_w1, grad_se_b1, grad_se_w2, grad_se_b2)."""
    opdefs.OPS["bn_se_residual_backward"].check(grad_out, x, z, weight, bias, se_w1, se_b1, se_w2, se_b2, mean, var,
                                                z_mean, training, eps)
    with device_of(x):
        gx, gz, _, *grads = _se_backward_impl(grad_out, None, x, z, x.new_empty((x.shape[0],)), weight, bias, se_w1,
                                              se_b1, se_w2, se_b2, mean, var, z_mean, training, eps, weigh=False)
        return (gx, gz, *grads)


opdefs.register_fakes("fanet_triton", ["bn_se_residual_gate_pool", "bn_se_residual_gate_pool_backward",
                                       "bn_se_residual", "bn_se_residual_backward"])


def _se_setup_context(ctx, inputs, output):
    if len(inputs) == 13:  # with the gate: x, z, k, weight, bias, w1, b1, w2, b2, rm, rv, training, eps
        tensors, (training, eps), stats = inputs[:9], inputs[11:], output[2:5]
    else:  # x, z, weight, bias, w1, b1, w2, b2, rm, rv, training, eps
        tensors, (training, eps), stats = inputs[:8], inputs[10:], output[1:4]
    ctx.save_for_backward(*tensors, *stats)
    ctx.training, ctx.eps = training, eps
    ctx.mark_non_differentiable(*stats)  # mean, var for the running stats; z's plane means for the backward
    ctx.set_materialize_grads(False)


def _se_gate_backward(ctx, grad_out, grad_pooled, *_):
    grads = bn_se_residual_gate_pool_backward(grad_out, grad_pooled, *ctx.saved_tensors, ctx.training, ctx.eps)
    return (*grads, None, None, None, None)


def _se_backward(ctx, grad_out, *_):
    if grad_out is None:
        return (None,) * 12
    grads = bn_se_residual_backward(grad_out, *ctx.saved_tensors, ctx.training, ctx.eps)
    return (*grads, None, None, None, None)


bn_se_residual_gate_pool.register_autograd(_se_gate_backward, setup_context=_se_setup_context)
bn_se_residual.register_autograd(_se_backward, setup_context=_se_setup_context)
