"""Triton kernels for ``focus`` and its backward (SPEC §1 focus step, §4).

Forward, C <= FUSED_MAX_C and H*W within max_steps pool tiles (every network of the zoo at its
input sizes): one kernel, a program per sample, pools x[n] channel block by channel block into a
row of a small (N, C) scratch buffer, then runs both Linear layers, the ReLU and the sigmoid on that
row.  Beyond that one program per sample would pool too much alone (slowly, and with long running
sums): the split channel-block pool kernel of common.py runs first (many programs), then the MLP
kernel.  Backward recomputes the pool (focus returns only k'), does the tiny MLP
backward as torch matmuls, and broadcasts grad_l / HW into grad_x in x's layout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import _validate, opdefs
from .common import (PER_THREAD, acc_tl, channel_sums, check_device, device_of, div_ieee, exp_accurate,
                     in_kernel_format, launch, maybe_autotune, need_int64, pool_config, register_autograd, sizes,
                     tile_for, tile_sum, warps_for)

FUSED_MAX_C = 2048


def mlp_config(c: int, h1: int, per_thread: int = PER_THREAD) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_CM): w1 is read in tiles of (hidden units x channels) of a pool tile's size
    (common.tile_for), at most 256 channels wide so that wide layers still get several hidden units
    per step."""
    block_cm = min(triton.next_power_of_2(max(c, 1)), 256)
    block_h = max(1, min(triton.next_power_of_2(h1), tile_for(per_thread) // block_cm))
    return block_h, block_cm


@triton.jit
def _focus_mlp(l_row, w1_ptr, b1_ptr, w2_ptr, b2_ptr, C, H1,
               BLOCK_H: tl.constexpr, BLOCK_CM: tl.constexpr, ACC: tl.constexpr):
    """k' = sigmoid(w2 . relu(w1 . l + b1) + b2) for one sample's channel means at l_row."""
    z = tl.load(b2_ptr).to(ACC)
    for h0 in range(0, H1, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        h_mask = h < H1
        dot = tl.zeros([BLOCK_H, BLOCK_CM], dtype=ACC)
        for c0 in range(0, C, BLOCK_CM):
            c = c0 + tl.arange(0, BLOCK_CM)
            c_mask = c < C
            w = tl.load(w1_ptr + h[:, None] * C + c[None, :], mask=h_mask[:, None] & c_mask[None, :], other=0)
            lv = tl.load(l_row + c, mask=c_mask, other=0)
            dot += w * lv[None, :]
        pre = tl.sum(dot, axis=1) + tl.load(b1_ptr + h, mask=h_mask, other=0)
        hidden = tl.where(pre <= 0, 0, pre)  # relu with NaN passing, as torch.relu (tl.maximum may drop it)
        z += tl.sum(tl.load(w2_ptr + h, mask=h_mask, other=0) * hidden, axis=0)
    e = exp_accurate(-z)
    return div_ieee(tl.full([], 1.0, ACC), 1.0 + e)  # IEEE division and expf, as the C++ sigmoid


@triton.jit
def _focus_fused_kernel(x_ptr, l_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, k_ptr, C, HW, H1,
                        CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_HW: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_CM: tl.constexpr,
                        ACC: tl.constexpr):
    """Program n: channel means of x[n] into l[n, :], then k[n] from them."""
    n = tl.program_id(0)
    hw_hi = HW
    if INT64:
        n = n.to(tl.int64)
        hw_hi = HW.to(tl.int64)  # the loop's bound too: the last hw0 + BLOCK_HW may pass 2**31
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        if INT64:
            c = c.to(tl.int64)
        c_mask = c < C
        s = tile_sum(x_ptr, x_ptr, x_ptr, 0.0, n * C * HW, c, c_mask, C, HW, 0, hw_hi,
                     False, CHANNELS_LAST, BLOCK_C, BLOCK_HW, ACC)
        tl.store(l_ptr + n * C + c, div_ieee(s, tl.full([BLOCK_C], HW, ACC)), mask=c_mask)
    tl.debug_barrier()  # the row is read back below by other threads of this program
    k = _focus_mlp(l_ptr + n * C, w1_ptr, b1_ptr, w2_ptr, b2_ptr, C, H1, BLOCK_H, BLOCK_CM, ACC)
    tl.store(k_ptr + n, k.to(k_ptr.dtype.element_ty))


@triton.jit
def _focus_mlp_kernel(l_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, k_ptr, C, H1,
                      BLOCK_H: tl.constexpr, BLOCK_CM: tl.constexpr, ACC: tl.constexpr):
    """Program n: k[n] from the channel means l[n, :] (the path for C > FUSED_MAX_C)."""
    n = tl.program_id(0).to(tl.int64)  # n * C can exceed 2**31 only here, where C is large
    k = _focus_mlp(l_ptr + n * C, w1_ptr, b1_ptr, w2_ptr, b2_ptr, C, H1, BLOCK_H, BLOCK_CM, ACC)
    tl.store(k_ptr + n, k.to(k_ptr.dtype.element_ty))


@maybe_autotune(key=["M", "C", "HW"])
@triton.jit
def _broadcast_kernel(src_ptr, out_ptr, numel, M, C, HW, CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr,
                      BLOCK: tl.constexpr):
    """out[n, c, h, w] = src[n, c] in out's layout (grad_x of the pool)."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    n = offs // M
    j = offs - n * M
    if CHANNELS_LAST:
        c = j % C
    else:
        c = j // HW
    v = tl.load(src_ptr + n * C + c, mask=mask, other=0)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


# ---- launch code -----------------------------------------------------------------------------
def _prepare(x, w1, b1, w2, b2):
    _validate.check_focus(x, w1, b1, w2, b2)
    check_device(x)
    fmt = _validate.out_memory_format(x)
    acc = _validate.acc_dtype(x.dtype)
    ws = [w.to(acc).contiguous() for w in (w1, b1, w2, b2)]
    return in_kernel_format(x, fmt), ws, fmt, acc


def _focus_impl(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                b2: torch.Tensor) -> torch.Tensor:
    x, ws, fmt, acc = _prepare(x, w1, b1, w2, b2)
    n, c, h, w = x.shape
    h1 = ws[0].shape[0]
    k = torch.empty((n,), dtype=x.dtype, device=x.device)
    if n == 0:
        return k
    cl = fmt == torch.channels_last
    per_thread = 4 if x.dtype == torch.float64 else PER_THREAD
    block_h, block_cm = mlp_config(c, h1, per_thread)
    # warps for the larger of the two tiles a program holds: the pool's and w1's
    warps = warps_for(block_h * block_cm, per_thread)
    cfg = pool_config(1, c, h * w, cl, per_thread=per_thread)
    # One program per sample pools x[n] alone: only while that is a short loop (sizes().max_steps
    # steps, so the pool's sums stay accurate) over few channels; else the split pool kernel.
    if c <= FUSED_MAX_C and triton.cdiv(h * w, cfg.block_hw) <= sizes().max_steps:
        scratch = torch.empty((n, c), dtype=acc, device=x.device)
        launch(_focus_fused_kernel, (n,), x, scratch, *ws, k, c, h * w, h1,
               CHANNELS_LAST=cl, INT64=need_int64(cfg.reach(n, c, h * w, cl)), BLOCK_C=cfg.block_c,
               BLOCK_HW=cfg.block_hw, BLOCK_H=block_h, BLOCK_CM=block_cm, ACC=acc_tl(x.dtype),
               num_warps=max(warps, cfg.num_warps))
    else:
        pooled = channel_sums(x, None, None, None, fmt, acc)
        launch(_focus_mlp_kernel, (n,), pooled, *ws, k, c, h1, BLOCK_H=block_h, BLOCK_CM=block_cm,
               ACC=acc_tl(x.dtype), num_warps=warps)
    return k


def _focus_backward_impl(grad_k, x, w1, b1, w2, b2):
    x, (w1a, b1a, w2a, b2a), fmt, acc = _prepare(x, w1, b1, w2, b2)
    _validate.check_grad_k(grad_k, x)
    n, c, h, w = x.shape
    hw = h * w
    # Recompute the pool and the MLP's activations (N x C and N x H1: tiny), then backprop.
    l = channel_sums(x, None, None, None, fmt, acc)
    hidden = F.relu(F.linear(l, w1a, b1a))
    kf = torch.sigmoid(F.linear(hidden, w2a, b2a)).squeeze(1)
    grad_z = grad_k.to(acc) * kf * (1 - kf)                                # (N,)
    grad_h = (grad_z[:, None] * w2a).masked_fill(hidden <= 0, 0)          # (N, H1); NaN passes, as in relu's
    grad_l = grad_h @ w1a                                                  # (N, C)
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    numel = x.numel()
    if numel:
        src = (grad_l / hw).contiguous()  # d mean / d x = 1 / HW, divided as autograd of mean does
        block = min(sizes().block, triton.next_power_of_2(numel))
        launch(_broadcast_kernel, (triton.cdiv(numel, block),), src, gx, numel, c * hw, c, hw,
               CHANNELS_LAST=fmt == torch.channels_last, INT64=need_int64(numel + block), BLOCK=block,
               num_warps=warps_for(block))
    wdt = w1.dtype
    return (gx, (grad_h.t() @ l).to(wdt), grad_h.sum(0).to(wdt), (grad_z[None, :] @ hidden).to(wdt),
            grad_z.sum(0, keepdim=True).to(wdt))


# ---- custom ops ------------------------------------------------------------------------------
@torch.library.custom_op("fanet_triton::focus", mutates_args=())
def focus(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    with device_of(x):
        return _focus_impl(x, w1, b1, w2, b2)


@torch.library.custom_op("fanet_triton::focus_backward", mutates_args=())
def focus_backward(grad_k: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                   b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with device_of(x):
        return _focus_backward_impl(grad_k, x, w1, b1, w2, b2)


opdefs.register_fakes("fanet_triton", ["focus", "focus_backward"])
register_autograd(focus, focus_backward)
