"""bn_residual_gate_pool: the last BatchNorm of a residual branch folded into the FA gate.

``ops.bn_residual_gate_pool(x, z, k, weight, bias, running_mean, running_var, training, momentum,
eps)`` is ``residual_gate_pool(x, F.batch_norm(z, ...), k)`` with the BatchNorm computed in the
accumulation dtype and the result rounded once; running stats are updated as F.batch_norm does.
The fused "cpu" and "cuda" backends (torch.ops.fanet.bn_residual_gate_pool and its backward op) are
tested against reference.bn_residual_gate_pool, and the FA chains' fold against the unfused blocks; so
is the fused "triton" backend (torch.ops.fanet_triton.bn_residual_gate_pool), on every target
(op_cases.py).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fanet_kernels as fk
from fanet_kernels import ops, reference, zoo
from fanet_kernels.modules import FAGate, FASequential, ResidualBlock
from op_cases import (BAD_ERRORS, CPU_TARGETS, DTYPES, LAYOUTS, NEEDS_CPU, SHAPES, TOL,
                      assert_same_bits_at_any_thread_count, cuda_skip_reason, grad_tol, grads, k_dtype, make, make_k,
                      native_ops, opcheck, shape_of)

MODES = ("train", "eval")
GRAD_NAMES = ("x", "z", "k", "weight", "bias")
EPS = 1e-5
# op_cases' shapes and three for the channels_last paths of the BatchNorm sums: C > 256 with H*W > 1
# (several channel blocks), and C = 8, 4 dividing the SIMD step with a masked last step.
BN_SHAPES = {**SHAPES, "C300": (2, 300, 5, 7), "C8": (3, 8, 5, 7), "C4": (3, 4, 3, 5)}


def raw_op(backend: str):
    """The fused op itself, torch.ops.<namespace>.bn_residual_gate_pool (it leaves the running stats alone)."""
    return native_ops(backend).bn_residual_gate_pool


def cases(shapes, dtypes=DTYPES):
    """(shape name, dtype name) params; "large" (4 MiB in float32) only in float32 and bfloat16."""
    return [pytest.param(s, d, id=f"{s}-{d}") for s in shapes for d in dtypes
            if s != "large" or d in ("f32", "bf16")]


def make_bn(c: int, dtype: torch.dtype = torch.float32, *, device: str = "cpu", requires_grad: bool = False,
            seed: int = 3) -> tuple[torch.Tensor, ...]:
    """weight ~ 1, bias ~ 0 (requires_grad as asked), running_mean ~ 0, running_var in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    w, b = 1 + 0.2 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g)
    rm, rv = 0.3 * torch.randn(c, generator=g), 0.5 + torch.rand(c, generator=g)
    w, b = (t.to(dtype).to(device).requires_grad_(requires_grad) for t in (w, b))
    return w, b, rm.to(dtype).to(device), rv.to(dtype).to(device)


def make_inputs(shape, dtype, layout, dev="cpu", *, requires_grad=False, offset=-0.25, scale=1.5, param_dtype=None):
    """[x, z, k, weight, bias] and (running_mean, running_var); z = offset + scale * randn, laid
    out like x.  Parameters and stats default to k's dtype (float64 for float64 inputs).  x is
    moved off the ReLU's kink (see away_from_kink)."""
    x = make(shape, dtype, layout, device=dev, seed=0)
    z = make(shape, dtype, layout, device=dev, seed=1, scale=scale)
    with torch.no_grad():
        z.add_(offset)  # in place: keeps z's strides
    k = make_k(shape[0], k_dtype(dtype), device=dev)
    w, b, rm, rv = make_bn(shape[1], param_dtype or k_dtype(dtype), device=dev)
    away_from_kink(x, z, w, b, rm, rv)
    inputs = [t.requires_grad_(requires_grad) for t in (x, z, k, w, b)]
    return inputs, (rm, rv)


def away_from_kink(x, z, w, b, rm, rv, margin=1e-3):
    """Shifts x, in place, where batch_norm(z) + x is within ``margin`` of 0 (batch or running
    stats): there the ReLU's gradient jumps, and batch_norm(z) differs between the fused kernel and
    ATen by float32 roundings, so one element on the other side of the kink (~1 in 10^6 elements
    at 1e-6) would change grad_x, grad_z and the reduced gradients by O(1)."""
    if z.numel() == 0:
        return
    zd, wd, bd = z.double(), w.double(), b.double()
    norms = [F.batch_norm(zd, rm.double(), rv.double(), wd, bd, False, 0.0, EPS)]
    if z.numel() // z.shape[1] > 1:
        norms.append(F.batch_norm(zd, None, None, wd, bd, True, 0.0, EPS))
    with torch.no_grad():
        for _ in range(10):
            near = sum(((n + x.double()).abs() < margin).to(x.dtype) for n in norms)
            if not near.any():
                return
            x.add_(near.clamp(max=1) * 0.5)
    raise AssertionError("could not move x off the ReLU's kink")


def fused_fn(backend, stats, training, **kw):
    """The public op with fresh copies of ``stats`` on every call (so repeated calls agree)."""
    def fn(*a):
        return ops.bn_residual_gate_pool(*a, *[None if s is None else s.clone() for s in stats],
                                         training=training, **kw, backend=backend)
    return fn


def reference_fn(stats, training, **kw):
    def fn(*a):
        return reference.bn_residual_gate_pool(*a, *[None if s is None else s.clone() for s in stats],
                                               training=training, **kw)
    return fn


def conditioning(z: torch.Tensor, w: torch.Tensor, training: bool, eps: float = EPS):
    """(out_scale, grad_z_scale), each (1, C, 1, 1) or None (eval, empty z): per channel, how much
    wider than TOL's atol the float32 rounding error of out and grad_z may legitimately be when
    training.  The rounding of z - mean (an ulp of |z|) reaches out amplified by kappa = |w| max|z|
    / sqrt(var + eps), and grad_z = w invstd (g - mean g - z_hat mean(g z_hat)) cancels terms that
    carry it times another invstd, in ATen's batch_norm as in a fused kernel.  TOL's atol (~80
    float32 ulps) covers kappa up to 16 in out and kappa invstd up to 8 in grad_z: scale 1 but
    where a channel's few values nearly coincide (HW1: 3 values per channel, bigC_HW1: 2, kappa
    up to ~700; there the kernel and ATen differ by ~0.04 atol kappa (invstd)).  Compared divided
    by the scale."""
    if not training or z.numel() == 0:
        return None, None
    zd = z.detach().double()
    invstd = (zd.var((0, 2, 3), unbiased=False) + eps).rsqrt()
    kappa = w.detach().double().abs() * zd.abs().amax((0, 2, 3)) * invstd
    return tuple(t.clamp(min=1).view(1, -1, 1, 1) for t in (kappa / 16, kappa * invstd / 8))


def assert_close_scaled(a, b, tol, scale=None, what=""):
    """assert_close of a / scale and b / scale (scale: (1, C, 1, 1) or None), i.e. with atol
    widened per channel by ``scale``; pooled (N, C) outputs take the same scale."""
    if scale is not None:
        scale = scale.view(1, -1) if a.dim() == 2 else scale
        a, b = a.double() / scale, b.double() / scale
    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")


def check_grads(fused, ref, dtype, param_tol=None, z_scale=None):
    """grad_x and grad_z are per element (one rounding of a float32 value): TOL, grad_z with atol
    widened by ``z_scale`` (see conditioning); the reduced ones (k, weight, bias) grad_tol, or
    ``param_tol`` for parameters in a low-precision dtype."""
    for name, a, b in zip(GRAD_NAMES, fused, ref):
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
        if name in ("x", "z"):
            tol = TOL[dtype]
        elif name in ("weight", "bias") and param_tol is not None:
            tol = param_tol
        else:
            tol = grad_tol(dtype)
        assert_close_scaled(a, b, tol, z_scale if name == "z" else None, f"gradient of {name}")


def exact(inputs, stats, training, with_grads=True):
    """The reference evaluated on float64 copies: (out, pooled), running stats and gradients (or
    None), each cast back to its input's dtype, i.e. the exact values rounded once."""
    inputs64 = [t.detach().double().requires_grad_(with_grads) for t in inputs]
    stats64 = [None if s is None else s.double() for s in stats]
    dtype = inputs[0].dtype
    # through .to(dtype), grad_out and grad_pooled are rounded to the outputs' dtype as they are
    # for the op's own outputs
    g64 = grads(lambda *a: tuple(o.to(dtype).double() for o in reference_fn(stats64, training)(*a)), inputs64) \
        if with_grads else [None] * len(inputs)
    out, pooled = reference.bn_residual_gate_pool(*inputs64, *stats64, training=training)
    return ((out.detach().to(dtype), pooled.detach().to(dtype)),
            [None if s is None else s64.to(s.dtype) for s, s64 in zip(stats, stats64)],
            [None if g is None else g.to(t.dtype) for g, t in zip(g64, inputs)])


# ---- forward ----------------------------------------------------------------------------
def test_exported():
    assert fk.bn_residual_gate_pool is ops.bn_residual_gate_pool


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sname,dname", cases(BN_SHAPES))
def test_forward_matches_reference(target, sname, dname, layout, mode):
    """out, pooled and the updated running stats (separate copies per side) as the reference."""
    (backend, dev), dtype, shape, training = target, DTYPES[dname], shape_of(sname, target, BN_SHAPES), mode == "train"
    if training and shape[0] * shape[2] * shape[3] == 1:
        pytest.skip("one value per channel: F.batch_norm raises when training (test_one_value_per_channel_raises)")
    (x, z, k, w, b), (rm, rv) = make_inputs(shape, dtype, layout, dev)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    out, pooled = ops.bn_residual_gate_pool(x, z, k, w, b, rm, rv, training=training, backend=backend)
    ref_out, ref_pooled = reference.bn_residual_gate_pool(x, z, k, w, b, rm_ref, rv_ref, training=training)
    out_scale = conditioning(z, w, training)[0]
    assert_close_scaled(out, ref_out, TOL[dtype], out_scale, "out")
    assert_close_scaled(pooled, ref_pooled, TOL[dtype], out_scale, "pooled")
    torch.testing.assert_close(rm, rm_ref, **TOL[rm.dtype], msg=lambda m: f"running_mean: {m}")
    torch.testing.assert_close(rv, rv_ref, **TOL[rv.dtype], msg=lambda m: f"running_var: {m}")
    assert out.dtype == pooled.dtype == dtype and out.shape == shape and pooled.shape == shape[:2]
    assert out.device == pooled.device == x.device
    want = torch.channels_last if layout == "channels_last" and not x.is_contiguous() else torch.contiguous_format
    assert out.is_contiguous(memory_format=want)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("sname,dname", cases(["7x7", "13x17", "large"]))
def test_variance_of_offset_z(target, sname, dname, layout):
    """z = 3 + 0.5 randn: a variance formed as E[z^2] - E[z]^2, or sums run in the input dtype,
    lose the digits a two-pass float32 computation keeps.  Compared with the exact values (the
    reference in float64): ATen's own float32 channels_last batch_norm, which sums in order, is off
    by ~2e-5 here ("large"), more than TOL allows."""
    (backend, dev), dtype, shape = target, DTYPES[dname], shape_of(sname, target, BN_SHAPES)
    inputs, (rm, rv) = make_inputs(shape, dtype, layout, dev, requires_grad=True, offset=3.0, scale=0.5)
    (ex_out, ex_pooled), (ex_rm, ex_rv), ex_grads = exact(inputs, (rm, rv), True)
    out, pooled = ops.bn_residual_gate_pool(*inputs, rm, rv, training=True, backend=backend)
    torch.testing.assert_close(out, ex_out, **TOL[dtype])
    torch.testing.assert_close(pooled, ex_pooled, **TOL[dtype])
    torch.testing.assert_close(rm, ex_rm, **TOL[rm.dtype], msg=lambda m: f"running_mean: {m}")
    torch.testing.assert_close(rv, ex_rv, **TOL[rv.dtype], msg=lambda m: f"running_var: {m}")
    check_grads(grads(fused_fn(backend, (None, None), True), inputs), ex_grads, dtype)


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("case", ["no_stats", "momentum_eps", "eval_eps"])
def test_forward_arguments(target, case, dname):
    """Training without running stats, a momentum and an eps other than the defaults: outputs,
    running stats and gradients (the backward reads eps too)."""
    (backend, dev), dtype = target, DTYPES[dname]
    inputs, (rm, rv) = make_inputs(SHAPES["7x7"], dtype, "contiguous", dev, requires_grad=True)
    stats, training, kw = {"no_stats": ((None, None), True, {}),
                           "momentum_eps": ((rm, rv), True, dict(momentum=0.3, eps=1e-2)),
                           "eval_eps": ((rm, rv), False, dict(eps=0.5))}[case]
    ref_stats = [None if s is None else s.clone() for s in stats]
    out, pooled = ops.bn_residual_gate_pool(*inputs, *stats, training=training, **kw, backend=backend)
    ref_out, ref_pooled = reference.bn_residual_gate_pool(*inputs, *ref_stats, training=training, **kw)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(pooled, ref_pooled, **TOL[dtype])
    for s, r in zip(stats, ref_stats):
        if s is not None:
            torch.testing.assert_close(s, r, **TOL[s.dtype])
    fused = grads(fused_fn(backend, ref_stats, training, **kw), inputs)
    ref = grads(reference_fn(ref_stats, training, **kw), inputs)
    check_grads(fused, ref, dtype, z_scale=conditioning(inputs[1], inputs[3], training, kw.get("eps", EPS))[1])


@pytest.mark.parametrize("target", CPU_TARGETS)
@pytest.mark.parametrize("mode", MODES)
def test_native_op_with_empty_batch(target, mode):
    """N = 0 through the op itself (ops.bn_residual_gate_pool hands empty inputs to F.batch_norm,
    which leaves the running stats alone): empty out and pooled; statistics of zeros when training
    (both ops alike), the running stats in eval; empty gradients."""
    (x, z, k, w, b), (rm, rv) = make_inputs((0, 3, 4, 4), torch.float32, "contiguous", requires_grad=True)
    out, pooled, mean, var = raw_op(target[0])(x, z, k, w, b, rm, rv, mode == "train", EPS)
    assert out.shape == x.shape and pooled.shape == (0, 3)
    if mode == "train":
        assert not mean.any() and not var.any()
    else:
        assert torch.equal(mean, rm) and torch.equal(var, rv)
    gx, gz, gk, gw, gb = torch.autograd.grad(out.sum() + pooled.sum(), [x, z, k, w, b])
    assert gx.shape == x.shape and gz.shape == z.shape and gk.shape == (0,)
    assert not gw.any() and not gb.any()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stats_dtype", ["float32", "bfloat16"])
def test_bfloat16_parameters(target, stats_dtype, mode):
    """weight and bias in bfloat16 (as model.to(torch.bfloat16) makes them, running stats too
    for "bfloat16"): outputs, running stats and gradients, those of weight and bias in bfloat16."""
    (backend, dev), dtype, training = target, torch.bfloat16, mode == "train"
    inputs, (rm, rv) = make_inputs(SHAPES["C16"], dtype, "channels_last", dev, requires_grad=True,
                                   param_dtype=torch.bfloat16)
    rm, rv = (s.float().to(getattr(torch, stats_dtype)) for s in (rm, rv))
    rm_ref, rv_ref = rm.clone(), rv.clone()
    out, pooled = ops.bn_residual_gate_pool(*inputs, rm, rv, training=training, backend=backend)
    ref_out, ref_pooled = reference.bn_residual_gate_pool(*inputs, rm_ref, rv_ref, training=training)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(pooled, ref_pooled, **TOL[dtype])
    torch.testing.assert_close(rm, rm_ref, **TOL[rm.dtype])
    torch.testing.assert_close(rv, rv_ref, **TOL[rv.dtype])
    fused = grads(fused_fn(backend, (rm, rv), training), inputs)
    ref = grads(reference_fn((rm, rv), training), inputs)
    assert fused[3].dtype == fused[4].dtype == torch.bfloat16
    check_grads(fused, ref, dtype, param_tol=TOL[torch.bfloat16],
                z_scale=conditioning(inputs[1], inputs[3], training)[1])


@pytest.mark.parametrize("target", CPU_TARGETS)
def test_one_value_per_channel_raises_when_training(target):
    """N*H*W == 1 raises as F.batch_norm does when training; eval mode is fine."""
    backend = target[0]
    (x, z, k, w, b), (rm, rv) = make_inputs((1, 4, 1, 1), torch.float32, "contiguous")
    for fn in (lambda *a, **kw: ops.bn_residual_gate_pool(*a, **kw, backend=backend), reference.bn_residual_gate_pool):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            fn(x, z, k, w, b, rm.clone(), rv.clone(), training=True)
    out, pooled = ops.bn_residual_gate_pool(x, z, k, w, b, rm, rv, training=False, backend=backend)
    ref_out, ref_pooled = reference.bn_residual_gate_pool(x, z, k, w, b, rm, rv, training=False)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    torch.testing.assert_close(pooled, ref_pooled, **TOL[torch.float32])


@pytest.mark.parametrize("target", CPU_TARGETS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dname", ["f32", "f64", "bf16"])
def test_native_op_returns_stats_and_leaves_running_stats(target, dname, mode):
    """The op (C++, or Triton's with the same contract) returns the batch mean and biased variance
    (training) or the running stats (eval) in the accumulation dtype, and does not touch the
    running stats (the Python function updates them)."""
    dtype, training, shape = DTYPES[dname], mode == "train", SHAPES["7x7"]
    (x, z, k, w, b), (rm, rv) = make_inputs(shape, dtype, "channels_last")
    rm0, rv0 = rm.clone(), rv.clone()
    out, pooled, mean, var = raw_op(target[0])(x, z, k, w, b, rm, rv, training, EPS)
    acc = k_dtype(dtype)
    za = z.to(acc)
    want_mean, want_var = (za.mean((0, 2, 3)), za.var((0, 2, 3), unbiased=False)) if training else (rm0, rv0)
    assert mean.dtype == var.dtype == acc and mean.shape == var.shape == shape[1:2]
    torch.testing.assert_close(mean, want_mean.to(acc), **TOL[acc])
    torch.testing.assert_close(var, want_var.to(acc), **TOL[acc])
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    ref_out, ref_pooled = reference.bn_residual_gate_pool(x, z, k, w, b, rm0, rv0, training=training)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(pooled, ref_pooled, **TOL[dtype])


# A map larger than SHAPES has: 16384 values per channel and sample.
BIG_MAP = (1, 64, 128, 128)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dname", ["f32", "bf16"])
@pytest.mark.parametrize("shape", [SHAPES["large"], BIG_MAP], ids=["large", "big_map"])
@NEEDS_CPU
def test_batch_statistics_are_accurate(shape, dname, layout):
    """The batch mean and variance (float32 sums of 65536 and 16384 values per channel) and the
    outputs they normalize against the exact values: float32 sums split into short runs keep them
    well within TOL (the contiguous path: ~3e-7 relative for the variance, torch.var ~5e-8), one
    long sequential run per SIMD lane does not."""
    dtype = DTYPES[dname]
    inputs, (rm, rv) = make_inputs(shape, dtype, layout)
    x, z, k, w, b = inputs
    _, _, mean, var = torch.ops.fanet.bn_residual_gate_pool(x, z, k, w, b, rm, rv, True, EPS)
    zd = z.double()
    torch.testing.assert_close(mean.double(), zd.mean((0, 2, 3)), **TOL[torch.float32], msg=lambda m: f"mean: {m}")
    torch.testing.assert_close(var.double(), zd.var((0, 2, 3), unbiased=False), **TOL[torch.float32],
                               msg=lambda m: f"var: {m}")
    (ex_out, ex_pooled), _, _ = exact(inputs, (rm, rv), True, with_grads=False)
    out, pooled = ops.bn_residual_gate_pool(*inputs, rm, rv, training=True, backend="cpu")
    torch.testing.assert_close(out, ex_out, **TOL[dtype], msg=lambda m: f"out: {m}")
    torch.testing.assert_close(pooled, ex_pooled, **TOL[dtype], msg=lambda m: f"pooled: {m}")


# ---- backward ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sname,dname", cases(["C16", "7x7", "large"]) +
                         [pytest.param(s, "f32", id=f"{s}-f32") for s in ("N1", "C1", "HW1", "bigC_HW1")] +
                         cases(["C300", "C8", "C4"], ["f32", "f64", "bf16"]))
def test_backward_matches_reference(target, sname, dname, layout, mode):
    """Gradients of x, z, k, weight and bias for random grad_out and grad_pooled."""
    (backend, dev), dtype, shape, training = target, DTYPES[dname], shape_of(sname, target, BN_SHAPES), mode == "train"
    inputs, stats = make_inputs(shape, dtype, layout, dev, requires_grad=True)
    fused = grads(fused_fn(backend, stats, training), inputs)
    ref = grads(reference_fn(stats, training), inputs)
    check_grads(fused, ref, dtype, z_scale=conditioning(inputs[1], inputs[3], training)[1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("used", ["out", "pooled"])
def test_backward_with_one_output_unused(target, used, mode):
    """Only out or only pooled gets a gradient: the op receives an undefined grad for the other."""
    backend, dev = target
    inputs, stats = make_inputs((2, 3, 5, 4), torch.float32, "contiguous", dev, requires_grad=True)
    pick = 0 if used == "out" else 1
    training = mode == "train"
    fused = grads(lambda *a: fused_fn(backend, stats, training)(*a)[pick], inputs)
    ref = grads(lambda *a: reference_fn(stats, training)(*a)[pick], inputs)
    for name, a, b in zip(GRAD_NAMES, fused, ref):
        torch.testing.assert_close(a, b, **grad_tol(torch.float32), msg=lambda m: f"gradient of {name}: {m}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dname", ["f32", "bf16"])
@NEEDS_CPU
def test_backward_is_deterministic(dname, mode):
    """The batch statistics, grad_k and the weight and bias gradients are reduced without
    atomics: identical bits across runs and thread counts."""
    training = mode == "train"
    for layout in ("contiguous", "channels_last"):
        inputs, stats = make_inputs(SHAPES["large"], DTYPES[dname], layout, requires_grad=True)

        def run():
            rm, rv = (s.clone() for s in stats)
            fwd = ops.bn_residual_gate_pool(*inputs, rm, rv, training=training, backend="cpu")
            return [*fwd, rm, rv, *grads(fused_fn("cpu", stats, training), inputs)]

        assert_same_bits_at_any_thread_count(run)


# ---- torch.library.opcheck, gradcheck ------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["train", "train_no_stats", "eval"])
def test_opcheck(target, mode, layout):
    backend, dev = target
    inputs, stats = make_inputs((2, 6, 3, 5), torch.float32, layout, dev, requires_grad=True)
    stats = (None, None) if mode == "train_no_stats" else stats
    opcheck(backend, "bn_residual_gate_pool", (*inputs, *stats, mode != "eval", EPS))


@pytest.mark.parametrize("mode,grads_given", [("train", "both"), ("eval", "both"), ("train", "out"),
                                              ("train", "pooled"), ("eval", "pooled")])
def test_opcheck_backward_op(target, mode, grads_given):
    backend, dev = target
    shape, training = (2, 4, 3, 3), mode == "train"
    (x, z, k, w, b), (rm, rv) = make_inputs(shape, torch.float32, "contiguous", dev)
    mean, var = (z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False)) if training else (rm, rv)
    g_out = make(shape, torch.float32, "contiguous", device=dev, seed=2) if grads_given in ("both", "out") else None
    g_pooled = torch.randn(2, 4, device=dev) if grads_given in ("both", "pooled") else None
    opcheck(backend, "bn_residual_gate_pool_backward", (g_out, g_pooled, x, z, k, w, b, mean, var, training, EPS))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["train", "train_no_stats", "eval"])
def test_gradcheck_float64(target, mode, layout):
    backend, dev = target
    inputs, stats = make_inputs((2, 3, 4, 5), torch.float64, layout, dev, requires_grad=True)
    stats = (None, None) if mode == "train_no_stats" else stats
    # The interpreter: fast mode (random directions, a few evaluations instead of ~500, ~30 s each).
    assert torch.autograd.gradcheck(fused_fn(backend, stats, mode != "eval"), tuple(inputs),
                                    fast_mode=target == ("triton", "cpu"))


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["train", "train_no_stats", "eval"])
def test_cuda_is_deterministic(mode, layout):
    """The CUDA kernels reduce without atomics: identical bits run to run (the CPU's thread counts:
    test_backward_is_deterministic)."""
    reason = cuda_skip_reason("cuda")
    if reason:
        pytest.skip(reason)
    big, big_stats = make_inputs(SHAPES["large"], torch.float32, layout, "cuda", requires_grad=True)
    big_stats = (None, None) if mode == "train_no_stats" else big_stats
    fn = fused_fn("cuda", big_stats, mode != "eval")
    runs = [(*fn(*big), *grads(fn, big)) for _ in range(2)]
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


# ---- bad input: an error that names the argument, never a crash ---------------------------
def _bad_cases():
    (x, z, k, w, b), (rm, rv) = make_inputs((2, 3, 4, 4), torch.float32, "contiguous")
    return {
        "weight shape": ((x, z, k, w[:2], b, rm, rv), "argument 'weight'"),
        "weight 2-D": ((x, z, k, w.view(3, 1), b, rm, rv), "argument 'weight'"),
        "bias shape": ((x, z, k, w, torch.zeros(4), rm, rv), "argument 'bias'"),
        "running_mean shape": ((x, z, k, w, b, rm[:2], rv), "argument 'running_mean'"),
        "running_var shape": ((x, z, k, w, b, rm, torch.ones(4)), "argument 'running_var'"),
        "z shape": ((x, z[:, :2], k, w, b, rm, rv), "argument 'z'"),
        "z dtype": ((x, z.double(), k, w, b, rm, rv), "argument 'z'"),
        "z device": ((x, z.to("meta"), k, w, b, rm, rv), "argument 'z'"),
        "k shape": ((x, z, torch.rand(3), w, b, rm, rv), "argument 'k'"),
        "x 3-D": ((x[0], z[0], k, w, b, rm, rv), "argument 'x'"),
        "weight None": ((x, z, k, None, b, rm, rv), "argument 'weight'"),
        "bias None": ((x, z, k, w, None, rm, rv), "argument 'bias'"),
        "running_var None": ((x, z, k, w, b, rm, None), "'running_var' must both be given"),
        "running_mean None": ((x, z, k, w, b, None, rv), "'running_var' must both be given"),
    }


@pytest.mark.parametrize("target", CPU_TARGETS)
@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_names_argument(case, target):
    args, name = _bad_cases()[case]
    with pytest.raises(BAD_ERRORS, match=name):
        ops.bn_residual_gate_pool(*args, training=True, backend=target[0])
    with pytest.raises(BAD_ERRORS, match=name):  # the raw op, bypassing the Python checks
        raw_op(target[0])(*args, True, EPS)


@pytest.mark.parametrize("target", CPU_TARGETS)
def test_eval_without_running_stats_raises(target):
    backend = target[0]
    (x, z, k, w, b), (rm, rv) = make_inputs((2, 3, 4, 4), torch.float32, "contiguous")
    for stats, name in (((None, None), "running_mean"), ((rm, None), "running_var")):
        with pytest.raises(BAD_ERRORS, match=name):
            ops.bn_residual_gate_pool(x, z, k, w, b, *stats, training=False, backend=backend)
        with pytest.raises(BAD_ERRORS, match=name):
            raw_op(backend)(x, z, k, w, b, *stats, False, EPS)


@pytest.mark.parametrize("target", CPU_TARGETS)
@pytest.mark.parametrize("where", [(0, 1, 2, 2), (1, 1, 0, 3)], ids=["at_shift", "elsewhere"])
def test_inf_in_z_gives_statistics_as_batch_norm(target, where):
    """An inf in z: F.batch_norm's mean of that channel is inf and its variance NaN, which must
    reach the outputs and running stats as such (clamping the variance at 0 would hide it), also
    where the inf is the value the moments are shifted by (z[0, c, H/2, W/2])."""
    backend, _ = target
    (x, z, k, w, b), (rm, rv) = make_inputs((2, 3, 4, 4), torch.float32, "contiguous")
    z[where] = float("inf")
    runs = {}
    for name, fn in (("fused", lambda *a: ops.bn_residual_gate_pool(*a, training=True, backend=backend)),
                     ("reference", lambda *a: reference.bn_residual_gate_pool(*a, training=True))):
        stats = (rm.clone(), rv.clone())  # updated in place
        out, pooled = fn(x, z, k, w, b, *stats)
        runs[name] = [f(t) for t in (out, pooled, *stats) for f in (torch.isnan, torch.isinf)]
    for a, b_ in zip(runs["fused"], runs["reference"]):
        assert torch.equal(a, b_)
    assert runs["fused"][5].tolist() == [False, True, False]  # running_mean inf
    assert runs["fused"][6].tolist() == [False, True, False]  # running_var NaN


# ---- the fold in the FA chains --------------------------------------------------------------
def set_backend(model: nn.Module, backend: str) -> None:
    for m in model.modules():
        if isinstance(m, FAGate):
            m.backend = backend


def _model(name: str, variant: str) -> nn.Module:
    """A zoo model with random BN affine parameters and running stats (the zoo initialises BN to
    the identity); "momentum_none": every BN a cumulative average; "untracked": BNs without running
    stats (batch statistics in eval mode too)."""
    torch.manual_seed(7)
    model = zoo.create_model(name)
    g = torch.Generator().manual_seed(8)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            if variant == "momentum_none":
                m.momentum = None
                m.num_batches_tracked.fill_(3)
            elif variant == "untracked":
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
    return model


def _step(model: nn.Module, backend: str, train: bool, fuse: bool = True):
    """logits, input gradient, parameter gradients and buffers after one forward + backward."""
    model = copy.deepcopy(model).train(train)
    set_backend(model, backend)
    for chain in model.modules():
        if isinstance(chain, FASequential):
            chain.fuse_residual = fuse
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(9)).requires_grad_()
    with fk.use_backend(backend):
        y = model(x)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(10))).sum().backward()
    return {"logits": y.detach(), "x.grad": x.grad,
            **{f"{n}.grad": p.grad for n, p in model.named_parameters() if p.grad is not None},
            **{n: b.clone() for n, b in model.named_buffers()}}


@pytest.mark.parametrize("name,variant,mode", [
    ("fa_resnet20", "default", "train"), ("fa_resnet20", "default", "eval"),
    ("fa_resnet20", "momentum_none", "train"), ("fa_resnet20", "untracked", "train"),
    ("fa_resnet20", "untracked", "eval"), ("fa_se_resnet20", "default", "train")])
@NEEDS_CPU
def test_fa_resnet_fold_matches_reference_and_unfused(name, variant, mode):
    """One step of the cpu backend (BN folded into the gate) against the reference backend and
    against the unfused blocks (fuse_residual=False): logits, gradients, every BN's running stats
    and num_batches_tracked (test_modules.py's tolerances)."""
    model = _model(name, variant)
    train = mode == "train"
    cpu = _step(model, "cpu", train)
    for other in (_step(model, "reference", train), _step(model, "reference", train, fuse=False)):
        assert cpu.keys() == other.keys()
        for key in cpu:
            torch.testing.assert_close(cpu[key], other[key], atol=2e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")
    if not train:  # eval mode leaves the running stats alone
        for n, b in model.named_buffers():
            assert torch.equal(cpu[n], b), n


def _gated_identity_blocks(model: nn.Module, with_se: bool) -> int:
    """Blocks i >= 1 of the FA chains with an identity shortcut (SE blocks only if ``with_se``)."""
    return sum(1 for chain in model.modules() if isinstance(chain, FASequential) and len(chain.fa)
               for i in range(1, len(chain))
               if isinstance(chain[i], ResidualBlock) and chain[i].shortcut is None
               and (with_se or getattr(chain[i], "se", None) is None))


@pytest.mark.parametrize("name", ["fa_resnet20", "fa_se_resnet20"])
@NEEDS_CPU
def test_cpu_backend_folds_the_batchnorm(name):
    """In train mode every gated block with an identity shortcut and no SE (whose last BN is then
    the end of its branch) runs fanet::bn_residual_gate_pool once, forward and backward, instead of
    residual_gate_pool; blocks with SE run fanet::bn_se_residual_gate_pool (test_bn_se.py)."""
    torch.manual_seed(11)
    model = zoo.create_model(name, backend="cpu").train()
    folded, gated = _gated_identity_blocks(model, with_se=False), _gated_identity_blocks(model, with_se=True)
    assert gated > 0
    x = torch.randn(2, 3, 16, 16)
    with fk.use_backend("cpu"), torch.profiler.profile() as prof:
        model(x).sum().backward()
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("fanet::bn_residual_gate_pool", 0) == folded, counts
    assert counts.get("fanet::bn_residual_gate_pool_backward", 0) == folded, counts
    assert counts.get("fanet::residual_gate_pool", 0) == 0, counts
    assert counts.get("fanet::bn_se_residual_gate_pool", 0) == gated - folded, counts
