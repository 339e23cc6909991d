"""The BatchNorm -> SE tail ops of the fused backends (bn_se_residual_gate_pool, bn_se_residual):
the C++ cpu backend (csrc/common/op_drivers.h, bn_se_*) and Triton on the CPU (under its
interpreter, small shapes only) against fanet_kernels.reference, forward and backward, train and
eval, every dtype, NCHW and channels_last; running stats, opcheck, gradcheck, torch.compile,
determinism, argument errors, and the cpu backend's use of the fused op."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fanet_kernels import opdefs, ops, reference
from op_cases import (CPU_TARGETS, DTYPES, NEEDS_CPU, TOL, assert_same_bits_at_any_thread_count, grad_tol, grads,
                      k_dtype, make, make_k, opcheck)

EPS = 1e-5
SE_SHAPES = {"N1": (1, 3, 7, 7), "C16": (3, 16, 5, 7), "7x7": (2, 5, 7, 7), "C300": (2, 300, 3, 5),
             "13x17": (2, 3, 13, 17), "HW1": (3, 8, 1, 1)}
TRITON_SHAPES = ("N1", "7x7")  # the interpreter is slow
GATED = {"gate": True, "nogate": False}


def make_se(c: int, dtype: torch.dtype, *, seed: int = 7, r: int = 4) -> list[torch.Tensor]:
    """weight ~ 1, bias ~ 0, and the SE weights se_w1 (R, C), se_b1 (R,) around 0.3 (live hidden
    units), se_w2 (C, R), se_b2 (C,); running_mean ~ 0, running_var in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    rr = max(1, c // r)
    ts = [1 + 0.2 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g),
          torch.randn(rr, c, generator=g) / c ** 0.5, 0.3 + 0.1 * torch.randn(rr, generator=g),
          torch.randn(c, rr, generator=g) / rr ** 0.5, 0.1 * torch.randn(c, generator=g)]
    stats = [0.3 * torch.randn(c, generator=g), 0.5 + torch.rand(c, generator=g)]
    return [t.to(dtype) for t in ts], [t.to(dtype) for t in stats]


def make_inputs(shape, dtype, layout, training):
    """[x, z, k, weight, bias, se_w1, se_b1, se_w2, se_b2], (running_mean, running_var); x moved off
    the ReLU's kink (|S + x| >= 1e-3 for the S of the batch or running stats)."""
    x = make(shape, dtype, layout, seed=0)
    z = make(shape, dtype, layout, seed=1, scale=1.5)
    k = make_k(shape[0], k_dtype(dtype))
    params, stats = make_se(shape[1], k_dtype(dtype))
    if x.numel():
        w, b, w1, b1, w2, b2 = (t.double() for t in params)
        with torch.no_grad():
            for _ in range(10):
                bn = F.batch_norm(z.double(), stats[0].double(), stats[1].double(), w, b, training, 0.0, EPS)
                s = bn * reference.excite(bn.mean((2, 3)), w1, b1, w2, b2)[:, :, None, None]
                near = (s + x.double()).abs() < 1e-3
                if not near.any():
                    break
                x.add_(near.to(x.dtype) * 0.5)
    return [x, z, k, *params], stats


def call(backend, gated, inputs, stats, training):
    """The public op on fresh copies of the stats: (out, pooled) or (out,)."""
    st = [s.clone() for s in stats]
    if gated:
        return ops.bn_se_residual_gate_pool(*inputs, *st, training=training, eps=EPS, backend=backend)
    x, z, _, *rest = inputs
    return (ops.bn_se_residual(x, z, *rest, *st, training=training, eps=EPS, backend=backend),)


def reference_call(gated, inputs, stats, training):
    st = [s.clone() for s in stats]
    if gated:
        return reference.bn_se_residual_gate_pool(*inputs, *st, training=training, eps=EPS)
    x, z, _, *rest = inputs
    return (reference.bn_se_residual(x, z, *rest, *st, training=training, eps=EPS),)


def grad_inputs(inputs, gated):
    return inputs if gated else [inputs[0], inputs[1], *inputs[3:]]


def fwd_bwd(fn, inputs, gated):
    ins = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(ins)
    gs = grads(lambda *_: outs, grad_inputs(ins, gated))
    return [o.detach() for o in outs], gs


def cases():
    out = []
    for target in CPU_TARGETS:
        backend = target.values[0][0]
        for s in SE_SHAPES:
            if backend == "triton" and s not in TRITON_SHAPES:
                continue
            for d in DTYPES:
                for mode in ("train", "eval"):
                    if s == "HW1" and mode == "train":
                        continue  # 3 values per channel: ill-conditioned batch statistics (eval only)
                    for op in GATED:
                        if backend == "triton" and (d in ("f16", "bf16") or op == "nogate" and mode == "eval"):
                            continue
                        out.append(pytest.param(backend, s, d, mode, op, marks=target.marks,
                                                id=f"{backend}-{s}-{d}-{mode}-{op}"))
    return out


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("backend,shape,dt,mode,op", cases())
def test_matches_reference(backend, shape, dt, mode, op, layout):
    if backend == "triton" and layout == "channels_last" and shape != "7x7":
        pytest.skip("interpreter: one channels_last case")
    dtype, training, gated = DTYPES[dt], mode == "train", GATED[op]
    inputs, stats = make_inputs(SE_SHAPES[shape], dtype, layout, training)
    outs, gs = fwd_bwd(lambda ins: call(backend, gated, ins, stats, training), inputs, gated)
    ref_outs, ref_gs = fwd_bwd(lambda ins: reference_call(gated, ins, stats, training), inputs, gated)
    low = dtype in (torch.float16, torch.bfloat16)
    for o, r in zip(outs, ref_outs):
        assert o.dtype == r.dtype and o.shape == r.shape
        torch.testing.assert_close(o, r, **TOL[dtype])
    if layout == "channels_last":
        assert outs[0].is_contiguous(memory_format=torch.channels_last)
    names = ["x", "z", "k", "weight", "bias", "se_w1", "se_b1", "se_w2", "se_b2"]
    names = names if gated else [n for n in names if n != "k"]
    for name, a, b in zip(names, gs, ref_gs):
        assert a.dtype == b.dtype, name
        if name in ("x", "z"):
            tol = dict(rtol=4 * TOL[dtype]["rtol"], atol=4 * TOL[dtype]["atol"]) if training else TOL[dtype]
        else:  # reduced over the batch and H*W; float16/bfloat16 inputs round grad_S before pass 2
            tol = dict(rtol=2e-2, atol=2e-2) if low else grad_tol(dtype)
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"grad_{n}: {m}")


@NEEDS_CPU
@pytest.mark.parametrize("op", list(GATED))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_running_stats_and_raw_outputs(op, mode):
    """The public op updates the running stats as F.batch_norm; the raw op returns (mean, var) in the
    accumulation dtype and z's plane means, and leaves the running stats alone."""
    training, gated = mode == "train", GATED[op]
    inputs, stats = make_inputs((3, 6, 5, 4), torch.float16, "contiguous", training)
    mine, ref = [s.clone() for s in stats], [s.clone() for s in stats]
    if gated:
        ops.bn_se_residual_gate_pool(*inputs, *mine, training=training, momentum=0.3, eps=EPS, backend="cpu")
    else:
        x, z, _, *rest = inputs
        ops.bn_se_residual(x, z, *rest, *mine, training=training, momentum=0.3, eps=EPS, backend="cpu")
    F.batch_norm(inputs[1].float(), ref[0], ref[1], None, None, training, 0.3, EPS)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    before = [s.clone() for s in stats]
    x, z, k, *rest = inputs
    res = (torch.ops.fanet.bn_se_residual_gate_pool(x, z, k, *rest, *stats, training, EPS) if gated
           else torch.ops.fanet.bn_se_residual(x, z, *rest, *stats, training, EPS))
    mean, var, z_mean = res[-3:]
    assert mean.dtype == var.dtype == z_mean.dtype == torch.float32 and z_mean.shape == (3, 6)
    torch.testing.assert_close(z_mean, z.float().mean((2, 3)), rtol=1e-5, atol=1e-5)
    if training:
        torch.testing.assert_close(mean, z.float().mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(var, z.float().var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-5)
    for a, b in zip(stats, before):
        assert torch.equal(a, b)


def raw_args(gated, training, shape=(2, 5, 3, 4), dtype=torch.float64, layout="contiguous", grad=False):
    inputs, stats = make_inputs(shape, dtype, layout, training)
    inputs = [t.requires_grad_(grad) for t in inputs]
    if gated:
        return (*inputs, *stats, training, EPS)
    x, z, _, *rest = inputs
    return (x, z, *rest, *stats, training, EPS)


@NEEDS_CPU
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("op", list(GATED))
def test_opcheck(op, mode):
    gated, training = GATED[op], mode == "train"
    name = "bn_se_residual_gate_pool" if gated else "bn_se_residual"
    args = raw_args(gated, training, dtype=torch.float32, layout="channels_last", grad=True)
    opcheck("cpu", name, args)
    x = args[0]
    res = getattr(torch.ops.fanet, name)(*args)
    g = torch.randn_like(x)
    if gated:
        x, z, k, w, b, w1, b1, w2, b2, _, _, tr, eps = args
        bargs = (g, torch.randn(x.shape[:2]), x, z, k, w, b, w1, b1, w2, b2, res[2], res[3], res[4], tr, eps)
    else:
        x, z, w, b, w1, b1, w2, b2, _, _, tr, eps = args
        bargs = (g, x, z, w, b, w1, b1, w2, b2, res[1], res[2], res[3], tr, eps)
    opcheck("cpu", name + "_backward", tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in bargs))


@NEEDS_CPU
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("op", list(GATED))
def test_gradcheck(op, mode):
    gated, training = GATED[op], mode == "train"
    args = raw_args(gated, training, shape=(2, 3, 3, 2), grad=True)
    name = "bn_se_residual_gate_pool" if gated else "bn_se_residual"
    n_diff = 9 if gated else 8
    n_out = 2 if gated else 1

    def fn(*diff):
        return getattr(torch.ops.fanet, name)(*diff, *args[n_diff:])[:n_out]

    assert torch.autograd.gradcheck(fn, args[:n_diff], eps=1e-6, atol=1e-7)


@NEEDS_CPU
@pytest.mark.parametrize("op", list(GATED))
def test_compile_fullgraph(op):
    gated = GATED[op]
    inputs, stats = make_inputs((2, 4, 5, 5), torch.float32, "contiguous", True)

    def fn(*ins):
        return call("cpu", gated, list(ins), stats, True)

    want = fn(*inputs)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@NEEDS_CPU
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op", list(GATED))
def test_deterministic(op, layout):
    gated = GATED[op]
    inputs, stats = make_inputs((3, 300, 9, 11), torch.float32, layout, True)

    def run():
        outs, gs = fwd_bwd(lambda ins: call("cpu", gated, ins, stats, True), inputs, gated)
        return [*outs, *gs]

    assert_same_bits_at_any_thread_count(run)


@NEEDS_CPU
@pytest.mark.parametrize("op", list(GATED))
def test_empty_batch(op):
    """N = 0: empty outputs and zero gradients from the raw ops."""
    gated = GATED[op]
    args = raw_args(gated, True, shape=(0, 4, 5, 5), dtype=torch.float32)
    name = "bn_se_residual_gate_pool" if gated else "bn_se_residual"
    res = getattr(torch.ops.fanet, name)(*args)
    assert res[0].shape == (0, 4, 5, 5) and res[-1].shape == (0, 4)
    x = args[0]
    if gated:
        x, z, k, w, b, w1, b1, w2, b2, _, _, tr, eps = args
        gs = torch.ops.fanet.bn_se_residual_gate_pool_backward(x, None, x, z, k, w, b, w1, b1, w2, b2, res[2], res[3],
                                                               res[4], tr, eps)
    else:
        x, z, w, b, w1, b1, w2, b2, _, _, tr, eps = args
        gs = torch.ops.fanet.bn_se_residual_backward(x, x, z, w, b, w1, b1, w2, b2, res[1], res[2], res[3], tr, eps)
    assert gs[0].shape == x.shape and gs[1].shape == x.shape
    for g in gs[2:]:
        assert not g.any()


def _bad(args, i, value):
    args = list(args)
    args[i] = value
    return tuple(args)


@NEEDS_CPU
def test_bad_arguments_name_the_argument():
    """Wrong shapes and dtypes of the SE weights, z_mean and the rest raise with _validate's message,
    on the raw ops and through the public ops (reference's message word for word)."""
    ga, na = raw_args(True, True, dtype=torch.float32), raw_args(False, True, dtype=torch.float32)
    cases = [(ga, na, 5, 4, lambda t: t[:, :-1], "se_w1"),  # (R, C - 1)
             (ga, na, 6, 5, lambda t: t[:-1], "se_b1"),
             (ga, na, 7, 6, lambda t: t.t(), "se_w2"),
             (ga, na, 8, 7, lambda t: t.double(), "se_b2"),
             (ga, na, 8, 7, lambda t: t.int(), "se_b2"),
             (ga, na, 1, 1, lambda t: t[:, :, :2], "z")]
    for gargs, nargs, gi, ni, bad, name in cases:
        for op, args, i in (("bn_se_residual_gate_pool", gargs, gi), ("bn_se_residual", nargs, ni)):
            b_args = _bad(args, i, bad(args[i]))
            with pytest.raises((ValueError, TypeError, RuntimeError), match=f"'{name}'") as got:
                getattr(torch.ops.fanet, op)(*b_args)
            with pytest.raises(type(got.value)) as want:  # what the Python-side backends raise
                opdefs.OPS[op].check(*b_args)
            assert str(got.value) == str(want.value)
    # the backward ops: z_mean of the wrong shape
    x, z, k, w, b, w1, b1, w2, b2, rm, rv, tr, eps = ga
    with pytest.raises(ValueError, match="'z_mean'"):
        torch.ops.fanet.bn_se_residual_gate_pool_backward(x, None, x, z, k, w, b, w1, b1, w2, b2, rm, rv,
                                                          torch.zeros(3, 5), tr, eps)
    with pytest.raises(ValueError, match="'z_mean'"):
        torch.ops.fanet.bn_se_residual_backward(x, x, z, w, b, w1, b1, w2, b2, rm, rv, torch.zeros(2, 4), tr, eps)


@NEEDS_CPU
def test_cpu_backend_runs_the_fused_op():
    """The cpu backend's public ops run fanet::bn_se_residual_gate_pool / fanet::bn_se_residual (and
    their backward ops) once per call."""
    inputs, stats = make_inputs((2, 8, 6, 6), torch.float32, "contiguous", True)
    ins = [t.requires_grad_(True) for t in inputs]
    with torch.profiler.profile() as prof:
        out, pooled = call("cpu", True, ins, stats, True)
        (out.sum() + pooled.sum()).backward()
        (out2,) = call("cpu", False, ins, stats, True)
        out2.sum().backward()
    counts = {e.key: e.count for e in prof.key_averages()}
    for name in ("bn_se_residual_gate_pool", "bn_se_residual"):
        assert counts.get(f"fanet::{name}", 0) == 1, counts
        assert counts.get(f"fanet::{name}_backward", 0) == 1, counts
