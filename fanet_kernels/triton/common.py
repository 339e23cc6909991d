"""What the Triton backend's kernel families (gate, bn_gate, focus) share: the interpreter/driver
guard, the device guard and launch, the launch heuristic, the int64-offset rule, IEEE-rounding math
helpers, and the channel-block pool kernel (gate_pool's forward; focus pools with it, bn_gate
gates with its NORM flag).

Layouts: both NCHW and channels_last keep one sample's C*H*W elements contiguous at
``n * C*H*W``, so the element-wise kernels are flat sweeps that only need the layout to find an
element's channel.  The pool kernel tiles (channels x positions) with the stride pattern of the
layout, so its loads are coalesced in both.
"""
from __future__ import annotations

import ast
import contextlib
import inspect
import os
import textwrap
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl

from .. import _validate

# ---- interpreter / driver guard ------------------------------------------------------------
# TRITON_INTERPRET=1 runs every kernel as a numpy simulation on the CPU (tensors may then live
# on the CPU).  triton.jit reads it when a kernel is decorated, so it must be set before
# fanet_kernels.triton is first imported.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

# @triton.autotune benchmarks configs on the GPU and fails under the interpreter: it is used only
# with a real driver, and only on kernels that do not reduce (see maybe_autotune).
AUTOTUNE: bool = not INTERPRET and torch.cuda.is_available()

# exp as CUDA's expf/exp (libdevice, within 2 ulp), not tl.exp's ex2.approx on float32: the focus
# sigmoid then rounds as the cuda backend's.  The interpreter has no libdevice.
if INTERPRET:
    @triton.jit
    def exp_accurate(x):
        return tl.exp(x)
else:
    from triton.language.extra import libdevice

    @triton.jit
    def exp_accurate(x):
        return libdevice.exp(x)

@triton.jit
def div_ieee(a, b):
    """a / b rounded as IEEE division, as C++ and eager PyTorch divide (Triton's float32 '/' is
    div.full, within 2 ulp; its float64 '/' is already IEEE)."""
    if a.dtype == tl.float32:
        return tl.math.div_rn(a, b)
    else:
        return a / b


# Offsets and loop bounds are int32 unless a value they reach can be this large (then int64).  A
# module variable so that tests can force the int64 path on small tensors.
INT64_THRESHOLD: int = 2**31


def need_int64(*reach: int) -> bool:
    """Whether a kernel's offsets and loop bounds must be int64: ``reach`` bounds every value they take
    (masked lanes included, as the kernels compute those too): an element count plus the span one
    step or tile goes past it, or a split's end (see PoolConfig.reach)."""
    return max(reach, default=0) >= INT64_THRESHOLD


def acc_tl(dtype: torch.dtype):
    """The Triton accumulation type: float64 for float64 inputs, else float32 (SPEC §4)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_device(x: torch.Tensor) -> None:
    if x.device.type == "cpu" and not INTERPRET:
        raise RuntimeError("fanet: the triton backend runs on CPU tensors only under TRITON_INTERPRET=1 "
                           f"(argument 'x' is on {x.device})")


# ---- the tensors' device ---------------------------------------------------------------------
# Triton launches on the current CUDA device and its current stream, not on the device of the
# pointers it is given: every op runs its launches inside device_of(x), as the cuda backend's
# CUDAGuard does.  launch() refuses to run outside it, so an op that forgets fails on any device.
_guarded = threading.local()


@contextlib.contextmanager
def device_of(t: torch.Tensor) -> Iterator[None]:
    """Makes t's device current (CUDA tensors) for the block, and records it for launch()."""
    previous = getattr(_guarded, "device", None)
    _guarded.device = t.device
    try:
        if t.device.type == "cuda":
            with torch.cuda.device(t.device):
                yield
        else:
            yield
    finally:
        _guarded.device = previous


def guarded_device() -> Optional[torch.device]:
    """The device the innermost device_of() of this thread made current, or None outside one."""
    return getattr(_guarded, "device", None)


# ---- launch configs: a function of shapes and dtypes alone -------------------------------------
# num_warps changes how tl.sum associates (the layout of the reduced tile), so a kernel that reduces
# must get it from the shape heuristic: a timing-based choice would make sums differ between
# processes and DDP ranks.  Only kernels that reduce nothing may be autotuned.
REDUCTIONS = frozenset({"sum", "reduce", "max", "min", "argmax", "argmin", "cumsum", "cumprod",
                        "associative_scan", "dot", "xor_sum", "atomic_add", "atomic_max", "atomic_min",
                        "atomic_cas", "atomic_xchg", "atomic_and", "atomic_or", "atomic_xor"})


def _jit_fn(kernel):
    """The jit function (JITFunction; InterpretedFunction under the interpreter) under an
    Autotuner/Heuristics wrapper, or kernel itself: the object whose .fn is the Python function."""
    while hasattr(kernel, "fn") and not inspect.isfunction(kernel.fn):
        kernel = kernel.fn
    return kernel


def _is_jit(obj) -> bool:
    return inspect.isfunction(getattr(obj, "fn", None))


def reductions_in(kernel, _seen: Optional[set] = None) -> set[str]:
    """The tl reductions (and atomics) a kernel performs, through the jit functions it calls."""
    fn = _jit_fn(kernel).fn
    seen = set() if _seen is None else _seen
    if fn in seen:
        return set()
    seen.add(fn)
    found: set[str] = set()
    for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(fn)))):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in REDUCTIONS:
            found.add(f.attr)
        elif isinstance(f, ast.Name) and _is_jit(fn.__globals__.get(f.id)):
            found |= reductions_in(fn.__globals__[f.id], seen)
    return found


TUNED: list = []  # the kernels maybe_autotune wraps (with a driver) or would wrap (without)


def maybe_autotune(key: list[str], restore_value: Optional[list[str]] = None):
    """@triton.autotune over num_warps (the heuristic fixes every block size, hence the grid and
    buffer shapes) when a GPU driver is present; the plain kernel otherwise.  For kernels that
    reduce nothing only: it refuses one that does.  restore_value: the arguments a kernel updates
    in place, which the tuner's repeated runs must find unchanged."""
    def wrap(fn):
        found = reductions_in(fn)
        if found:
            raise TypeError(f"fanet: kernel {fn.__name__} reduces ({', '.join(sorted(found))}): its num_warps "
                            "must come from the shape heuristic, not from timing")
        TUNED.append(fn)
        if not AUTOTUNE:
            return fn
        # not 2 warps: a 1024-element step would be 16 values per thread (over 128 registers)
        configs = [triton.Config({}, num_warps=w) for w in (4, 8)]
        return triton.autotune(configs=configs, key=key, restore_value=restore_value)(fn)
    return wrap


def launch(kernel, grid, *args, num_warps: int, **meta) -> None:
    """Launch on the device device_of() made current, with the heuristic's warps unless the
    kernel is autotuned.  No fp fusion: a * b + c rounds twice, as on the CPU backend and in
    eager PyTorch (the kernels write tl.fma where the C++ kernels fuse)."""
    device = guarded_device()
    if device is None:
        raise RuntimeError(f"fanet: internal error: Triton kernel {_jit_fn(kernel).fn.__name__} launched outside "
                           "device_of() (it would run on the current device, not the tensors')")
    if isinstance(kernel, triton.runtime.Autotuner):
        kernel[grid](*args, **meta, enable_fp_fusion=False)
    else:
        kernel[grid](*args, **meta, num_warps=num_warps, enable_fp_fusion=False)


# ---- launch heuristic ------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """The knobs of the heuristic.  On a GPU: 1024-element steps for the flat kernels (8 per
    thread at 4 warps), 2048-element pool tiles, about 1024 programs per launch (a few waves;
    a constant, not the SM count, so that how sums are split, hence their rounding, depends on
    shapes only).  The interpreter runs programs one after another in Python at a cost per
    program step almost independent of its size, so it gets 16x larger steps and few programs:
    same kernels, same code paths, just other constants (tests cover splits explicitly)."""

    block: int            # elements per loop step of the flat kernels
    tile: int             # elements of one (channels x positions) pool tile
    max_block_hw: int     # positions per NCHW pool tile
    max_block_c: int      # channels per channels_last pool tile
    target_programs: int  # programs a launch aims for
    max_iters: int = 16   # loop steps per program of the flat reductions
    # Loop steps per program of the pool kernels: each lane of a channel sum adds at most this many
    # values before the tile's tree sum, and the splits' partial sums are added in float64, so the
    # sums' rounding error does not grow with H*W (as a plain running sum's would).
    max_steps: int = 32


GPU_SIZES = Sizes(block=1024, tile=2048, max_block_hw=512, max_block_c=128, target_programs=1024)
INTERPRETER_SIZES = Sizes(block=16384, tile=32768, max_block_hw=8192, max_block_c=2048, target_programs=8)


def sizes() -> Sizes:
    return INTERPRETER_SIZES if INTERPRET else GPU_SIZES


@dataclass(frozen=True)
class PoolConfig:
    block_c: int   # channels per program
    block_hw: int  # positions per loop step
    split: int     # programs along H*W per (sample, channel block); > 1 means partial sums
    hw_per: int    # positions per split (a multiple of block_hw)
    num_warps: int

    def reach(self, n: int, c: int, hw: int, channels_last: bool, rows: int = 1) -> int:
        """A bound on the values the channel-block kernels' offsets and loop bounds take for an
        (n, c, hw) tensor: element offsets of the last, partly masked tile (channel blocks round C
        up; a step goes up to block_hw past the last position), the last split's end
        (split * hw_per), and offsets into the (split, n, rows, c) sums."""
        c_span = triton.cdiv(c, self.block_c) * self.block_c
        hw_span = max(self.split * self.hw_per, hw) + self.block_hw
        last = hw_span * c + c_span if channels_last else c_span * hw + hw_span
        return max((n - 1) * c * hw + last, hw_span, (self.split * n + 1) * rows * c_span)


def tile_for(per_thread: int, sz: Optional[Sizes] = None) -> int:
    """The tile (elements) for a kernel that may hold per_thread of them per thread: sz.tile is
    PER_THREAD per thread at 8 warps; kernels that keep more values alive per element get a
    proportionally smaller tile (still 8 warps)."""
    sz = sz or sizes()
    return max(1, sz.tile * per_thread // PER_THREAD)


def pool_config(n: int, c: int, hw: int, channels_last: bool, sz: Optional[Sizes] = None,
                per_thread: int = 8) -> PoolConfig:
    """Tiles for a program per (sample, channel block) sweeping H*W.

    NCHW: an (n, c) plane is contiguous, so a tile spans many positions of few channels;
    channels_last: a position's channels are contiguous, so a tile spans many channels.
    When N * channel blocks gives fewer than target_programs programs, H*W is split too (each
    split at least 4 loop steps), and so it is when a split would take more than max_steps loop
    steps; the per-split sums are added by a second, tiny reduction in float64, in a fixed order.
    per_thread: at most this many tile elements per thread (tile_for): what keeps the kernel under
    128 registers (scripts/triton_compile_check.py measures it).
    """
    sz = sz or sizes()
    tile = tile_for(per_thread, sz)
    p2 = triton.next_power_of_2
    if channels_last:
        block_c = min(p2(max(c, 1)), sz.max_block_c)
        block_hw = max(1, min(p2(hw), tile // block_c))
    else:
        block_hw = min(p2(hw), sz.max_block_hw)
        block_c = max(1, min(p2(max(c, 1)), tile // block_hw))
    programs = max(1, n * triton.cdiv(c, block_c))
    split = max(1, min(triton.cdiv(sz.target_programs, programs), triton.cdiv(hw, 4 * block_hw)),
                triton.cdiv(hw, sz.max_steps * block_hw))
    hw_per = triton.cdiv(triton.cdiv(hw, split), block_hw) * block_hw
    split = triton.cdiv(hw, hw_per)
    return PoolConfig(block_c, block_hw, split, hw_per, warps_for(block_c * block_hw, per_thread))


def flat_config(n: int, m: int, sz: Optional[Sizes] = None) -> tuple[int, int, int]:
    """(BLOCK, iters, programs per sample) for the per-sample flat reductions over m = C*H*W
    elements: enough programs to fill the GPU, at most max_iters loop steps each."""
    sz = sz or sizes()
    block = min(sz.block, triton.next_power_of_2(max(m, 1)))
    steps = triton.cdiv(m, block)
    iters = max(1, min(sz.max_iters, (n * steps) // sz.target_programs))
    return block, iters, triton.cdiv(steps, iters)


# Elements per thread of a full tile (Sizes.tile at 8 warps), and at most 8 warps per program: a
# program of 256 threads may use up to 255 registers per thread, so the checked limit (128, two
# programs per SM) comes from the values per thread alone.
PER_THREAD = 8


def warps_for(elements: int, per_thread: int = PER_THREAD) -> int:
    """Warps for a program handling this many elements per step: 4-8 elements per thread, at most
    per_thread (kernels that keep more values alive per element ask for fewer), 2 to 8 warps."""
    warps = 8 if elements >= 2048 else 4 if elements >= 512 else 2
    return min(8, max(warps, triton.next_power_of_2(triton.cdiv(elements, 32 * per_thread))))


# ---- the channel-block pool kernel --------------------------------------------------------
@triton.jit
def residual_output(xv, bv):
    """u = relu(b + x) with torch's rule (0 where b + x <= 0; NaN passes), and the mask b + x <= 0."""
    r = bv + xv
    off = r <= 0
    return tl.where(off, 0, r), off


@triton.jit
def tile_offsets(base, c, c_mask, C, HW, hw0, hw_hi, CHANNELS_LAST: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Offsets and mask of the (channels c x positions [hw0, hw0 + BLOCK_HW) below hw_hi) tile of
    the sample at base, in either layout."""
    hw = (hw0 + tl.arange(0, BLOCK_HW)).to(c.dtype)  # int64 when c is (large tensors)
    if CHANNELS_LAST:
        offs = base + hw[None, :] * C + c[:, None]
    else:
        offs = base + c[:, None] * HW + hw[None, :]
    return offs, c_mask[:, None] & (hw < hw_hi)[None, :]


@triton.jit
def unit_channels(C, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """(n, channel offsets, their mask) of program (n * channel blocks + block, split) of the
    channel-block kernels."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(C, BLOCK_C)
    n = pid // blocks
    c = (pid % blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    if INT64:
        n = n.to(tl.int64)
        c = c.to(tl.int64)
    return n, c, c < C


# Rows of a BatchNorm table (csrc/cpu NormRow): B = z * ALPHA + BETA, xhat = z * INVSTD + SHIFT.
ALPHA, BETA, INVSTD, SHIFT = range(4)
NORM_ROWS: tl.constexpr = tl.constexpr(4)


@triton.jit
def tile_sum(x_ptr, u_ptr, out_ptr, kn, base, c, c_mask, C, HW, hw_lo, hw_hi,
             GATE: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr,
             BLOCK_HW: tl.constexpr, ACC: tl.constexpr, RESIDUAL: tl.constexpr = False,
             NORM: tl.constexpr = False, alpha=None, beta=None, WEIGH: tl.constexpr = True):
    """Sum over positions [hw_lo, hw_hi) of channels c (BLOCK_C of them) of one sample at base:
    of out = gate(x, u, kn), which it also writes, if GATE, else of x.  Returns (BLOCK_C,).
    If RESIDUAL, u_ptr holds the residual branch b and u = relu(b + x); if NORM too, u_ptr holds z
    and b = z * alpha + beta (alpha, beta: (BLOCK_C,) coefficients).  WEIGH=False (with GATE): out = u,
    no weighting (bn_se_residual; the sum is then not used)."""
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
        offs, mask = tile_offsets(base, c, c_mask, C, HW, hw0, hw_hi, CHANNELS_LAST, BLOCK_HW)
        v = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC)
        if GATE:
            uv = tl.load(u_ptr + offs, mask=mask, other=0).to(ACC)
            if NORM:
                uv = tl.fma(uv, alpha[:, None], beta[:, None])  # fused, as the C++ norm_branch
            if RESIDUAL:
                uv, _ = residual_output(v, uv)
            if WEIGH:
                v = v + (uv - v) * kn
            else:
                v = uv
            tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)
            v = tl.where(mask, v, 0)
        acc += v
    return tl.sum(acc, axis=1)


@triton.jit
def pool_kernel(x_ptr, u_ptr, k_ptr, out_ptr, sums_ptr, norm_ptr, N, C, HW, hw_per, divisor,
                GATE: tl.constexpr, RESIDUAL: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                INT64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ACC: tl.constexpr,
                NORM: tl.constexpr = False, PER_SAMPLE: tl.constexpr = False, WEIGH: tl.constexpr = True):
    """Program (n * channel blocks + block, split): channel sums of out = gate(x, u, k) (writing
    out) if GATE, else of x, over the split's positions, divided by `divisor` (H*W for the means
    when there is one split, 1 for partial sums), into sums[split, n, c].  RESIDUAL: u_ptr holds
    the branch b, u = relu(b + x).  NORM (with RESIDUAL; bn_residual_gate_pool): u_ptr holds z and
    b = z * alpha[c] + beta[c], rows 0 and 1 of the (NORM_ROWS, C) table at norm_ptr; PER_SAMPLE: of
    sample n's table in an (N, NORM_ROWS, C) one (the SE tail: alpha and beta scaled by e[n, c]).
    WEIGH=False: out = u (the SE tail without a gate)."""
    n, c, c_mask = unit_channels(C, BLOCK_C, INT64)
    split = tl.program_id(1)
    if INT64:  # the split's bounds too: hw_lo + hw_per and the last hw0 + BLOCK_HW may pass 2**31
        split = split.to(tl.int64)
    kn = 0.0
    if GATE and WEIGH:
        kn = tl.load(k_ptr + n)
    alpha = tl.zeros([BLOCK_C], dtype=ACC)
    beta = alpha
    if NORM:
        table = norm_ptr
        if PER_SAMPLE:
            table += n * (NORM_ROWS * C)
        alpha = tl.load(table + c, mask=c_mask, other=0)
        beta = tl.load(table + C + c, mask=c_mask, other=0)
    hw_lo = split * hw_per
    hw_hi = tl.minimum(hw_lo + hw_per, HW)
    s = tile_sum(x_ptr, u_ptr, out_ptr, kn, n * C * HW, c, c_mask, C, HW, hw_lo, hw_hi,
                 GATE, CHANNELS_LAST, BLOCK_C, BLOCK_HW, ACC, RESIDUAL, NORM, alpha, beta, WEIGH)
    mean = div_ieee(s, tl.full([BLOCK_C], divisor, ACC))
    tl.store(sums_ptr + (split * N + n) * C + c, mean.to(sums_ptr.dtype.element_ty), mask=c_mask)


# ---- launch code -----------------------------------------------------------------------------
def in_kernel_format(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """t in the layout the kernels run in; a copy only when it is not already."""
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def channel_sums(x: torch.Tensor, u: Optional[torch.Tensor], k: Optional[torch.Tensor],
                 out: Optional[torch.Tensor], fmt: torch.memory_format, dtype: torch.dtype,
                 residual: bool = False, norm: Optional[torch.Tensor] = None,
                 weigh: bool = True) -> torch.Tensor:
    """Channel means (N, C) in `dtype` of gate(x, u, k) (writing it to out) if u is given, else of
    x: one pass over x (and u).  x, u, out are in layout fmt; k is contiguous in the acc dtype.
    residual: u is a residual branch and the gate's target is relu(u + x); norm (with residual):
    a contiguous (NORM_ROWS, C) acc-dtype table whose rows 0, 1 make the branch u * alpha + beta, or
    (N, NORM_ROWS, C): one per sample.  weigh=False: out = the gate's target (no k; the means are
    then of no use)."""
    n, c, h, w = x.shape
    hw = h * w
    cl = fmt == torch.channels_last
    # the branch's norm coefficients and float64 keep more registers per element: smaller tiles
    cfg = pool_config(n, c, hw, cl, per_thread=4 if norm is not None or x.dtype == torch.float64 else 8)
    acc = _validate.acc_dtype(x.dtype)
    if n * c == 0:
        return torch.zeros((n, c), dtype=dtype, device=x.device)
    # One split: the kernel writes the means; several: partial sums, reduced in split order.
    sums = torch.empty((cfg.split, n, c), dtype=dtype if cfg.split == 1 else acc, device=x.device)
    gate = u is not None
    grid = (n * triton.cdiv(c, cfg.block_c), cfg.split)
    launch(pool_kernel, grid, x, u if gate else x, k if gate else x, out if gate else x, sums,
           norm if norm is not None else sums, n, c, hw, cfg.hw_per, hw if cfg.split == 1 else 1,
           GATE=gate, RESIDUAL=residual, CHANNELS_LAST=cl, INT64=need_int64(cfg.reach(n, c, hw, cl)),
           BLOCK_C=cfg.block_c, BLOCK_HW=cfg.block_hw, ACC=acc_tl(x.dtype), NORM=norm is not None,
           PER_SAMPLE=norm is not None and norm.dim() == 3, WEIGH=weigh, num_warps=cfg.num_warps)
    if cfg.split == 1:
        return sums[0]
    return (sums.double().sum(0) / hw).to(dtype)


def pooled_grad_share(grad_pooled: torch.Tensor, acc: torch.dtype, hw: int) -> torch.Tensor:
    """grad_pooled * (1 / HW) in the acc dtype, d pooled / d out folded into grad_out by the backward
    kernels: 1 / HW rounded first, then the product, as the C++ kernels' fold_pooled_grad, so the
    gradients round alike on every backend."""
    inv_hw = torch.ones((), dtype=acc, device=grad_pooled.device) / hw
    return (grad_pooled.to(acc) * inv_hw).contiguous()


def register_autograd(op, backward_op) -> None:
    """The autograd of custom op ``op``: ``backward_op(*output grads, *op's inputs)``, which returns
    the gradients of op's inputs in order."""
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, *grads):
        return backward_op(*grads, *ctx.saved_tensors)

    op.register_autograd(backward, setup_context=setup_context)
