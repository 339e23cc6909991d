"""residual_gate_pool (gate_pool with u = relu(branch + x) formed in the kernels: the residual
block's add and ReLU folded in) of every fused backend against the reference (SPEC §4), on every
target (op_cases.py): values, gradients, the ReLU's boundary and NaN, the backward op with an
output unused, the op contract (opcheck, gradcheck) and bad input.
"""
from __future__ import annotations

import pytest
import torch
from op_cases import (BAD_ERRORS, DTYPES, LAYOUTS, TOL, fused_and_reference_grads, grad_tol, grads, make,
                     make_gate_inputs, make_k, memory_format_of, native_ops, opcheck, other_device, over_cases,
                     shape_of)

from fanet_kernels import ops, reference


@over_cases()
def test_forward_matches_reference(target, sname, dname, layout):
    """The public op, and the raw op (torch.ops.<namespace>.residual_gate_pool) but at the largest
    shape, as the reference."""
    (backend, dev), dtype, shape = target, DTYPES[dname], shape_of(sname, target)
    x, b, k = make_gate_inputs(shape, dtype, layout, dev)
    ref_out, ref_pooled = reference.residual_gate_pool(x, b, k)
    results = [ops.residual_gate_pool(x, b, k, backend=backend)]
    if sname != "large":
        results.append(native_ops(backend).residual_gate_pool(x, b, k))
    for got_out, got_pooled in results:
        torch.testing.assert_close(got_out, ref_out, **TOL[dtype])
        torch.testing.assert_close(got_pooled, ref_pooled, **TOL[dtype])
    out, pooled = results[0]
    assert out.dtype == pooled.dtype == dtype and pooled.shape == shape[:2]
    assert out.is_contiguous(memory_format=memory_format_of(x, layout))


@over_cases(empty_batch=False)
def test_backward_matches_reference(target, sname, dname, layout):
    (backend, dev), dtype, shape = target, DTYPES[dname], shape_of(sname, target)
    inputs = make_gate_inputs(shape, dtype, layout, dev, requires_grad=True)
    fused, ref = fused_and_reference_grads("residual_gate_pool", backend, inputs)
    for i, (a, b) in enumerate(zip(fused, ref)):
        tol = TOL[dtype] if i < 2 else grad_tol(dtype)  # grad_x, grad_branch are per element
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"gradient {i} of residual_gate_pool: {m}")
        assert a.dtype == inputs[i].dtype


def test_relu_boundary_follows_torch(target):
    """At branch + x = 0 the ReLU passes no gradient and NaN propagates, as torch.relu does."""
    backend, dev = target
    x = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0, -1.0], device=dev).view(1, 1, 2, 3)
    b = torch.tensor([-1.0, 1.0, float("nan"), -4.0, 0.0, 2.0], device=dev).view(1, 1, 2, 3)
    k = torch.tensor([0.25], device=dev)
    inputs = [t.clone().requires_grad_() for t in (x, b, k)]
    out, _ = ops.residual_gate_pool(*inputs, backend=backend)
    ref_inputs = [t.clone().requires_grad_() for t in (x, b, k)]
    ref_out, _ = reference.residual_gate_pool(*ref_inputs)
    torch.testing.assert_close(out, ref_out, equal_nan=True)
    g = torch.ones_like(out)
    gx, gb = torch.autograd.grad(out, inputs[:2], g)
    rgx, rgb = torch.autograd.grad(ref_out, ref_inputs[:2], g)
    torch.testing.assert_close(gx, rgx, equal_nan=True)
    torch.testing.assert_close(gb, rgb, equal_nan=True)
    assert gb.view(-1)[0] == 0 and gb.view(-1)[4] == 0  # r = 0 exactly: no gradient


@pytest.mark.parametrize("dname", ["f32", "bf16"])
def test_relu_boundary_and_nan(target, dname):
    """torch's ReLU rule on a whole tensor: u = 0 and grad_branch = 0 where branch + x == 0
    exactly; NaN passes through both (as relu and threshold_backward let it), into pooled and
    grad_k of its sample only."""
    (backend, dev), dtype = target, DTYPES[dname]
    x, b, k = make_gate_inputs((2, 3, 4, 5), dtype, "contiguous", dev)
    with torch.no_grad():
        b[:, :, :2] = -x[:, :, :2]  # branch + x == +0 exactly
        b[1, 2, 3, 4] = float("nan")
    x, b, k = (t.requires_grad_() for t in (x, b, k))
    out, pooled = ops.residual_gate_pool(x, b, k, backend=backend)
    ref_out, ref_pooled = reference.residual_gate_pool(x, b, k)
    torch.testing.assert_close(out, ref_out, **TOL[dtype], equal_nan=True)
    torch.testing.assert_close(pooled, ref_pooled, **TOL[dtype], equal_nan=True)
    assert out[1, 2, 3, 4].isnan() and pooled[1, 2].isnan() and not pooled[0].isnan().any()
    g = make(x.shape, dtype, "contiguous", device=dev, seed=3)
    got = torch.autograd.grad(out, (x, b, k), g)
    want = torch.autograd.grad(ref_out, (x, b, k), g)
    for i, (a, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, w, **(TOL[dtype] if i < 2 else grad_tol(dtype)), equal_nan=True)
    gb = got[1]
    assert (gb[:, :, :2] == 0).all()
    torch.testing.assert_close(gb[1, 2, 3, 4], (g[1, 2, 3, 4].float() * k[1].float()).to(dtype))
    assert got[2][1].isnan() and not got[2][0].isnan()  # grad_k of the sample holding the NaN


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dname", ["f32", "f64", "bf16"])
def test_backward_with_one_output_unused(target, dname, layout):
    """The raw backward op with grad_out or grad_pooled None (an output unused) equals autograd of
    the reference with a zero gradient for that output; so does autograd through the public op
    with only out or only pooled used."""
    (backend, dev), dtype = target, DTYPES[dname]
    x, b, k = inputs = make_gate_inputs((2, 3, 5, 4), dtype, layout, dev, requires_grad=True)
    ref_out, ref_pooled = reference.residual_gate_pool(x, b, k)
    g = make(x.shape, dtype, layout, device=dev, seed=3)
    gp = torch.randn(2, 3, generator=torch.Generator().manual_seed(4)).to(dtype).to(dev)
    for go, gpo in ((g, gp), (None, gp), (g, None)):
        got = native_ops(backend).residual_gate_pool_backward(go, gpo, x.detach(), b.detach(), k.detach())
        want = torch.autograd.grad((ref_out, ref_pooled), inputs, retain_graph=True,
                                   grad_outputs=(torch.zeros_like(g) if go is None else go,
                                                 torch.zeros_like(gp) if gpo is None else gpo))
        for i, (a, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, w, **(TOL[dtype] if i < 2 else grad_tol(dtype)))
        assert got[0].is_contiguous(memory_format=memory_format_of(x, layout))
    for pick in (0, 1):
        fused = grads(lambda *a: ops.residual_gate_pool(*a, backend=backend)[pick], inputs)
        ref = grads(lambda *a: reference.residual_gate_pool(*a)[pick], inputs)
        for i, (a, w) in enumerate(zip(fused, ref)):
            torch.testing.assert_close(a, w, **(TOL[dtype] if i < 2 else grad_tol(dtype)))


# ---- torch.library.opcheck, gradcheck ------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(target, layout):
    backend, dev = target
    opcheck(backend, "residual_gate_pool",
            tuple(make_gate_inputs((2, 6, 3, 5), torch.float32, layout, dev, requires_grad=True)))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("given", ["both", "out", "pooled"])
def test_opcheck_backward_op(target, given, layout):
    backend, dev = target
    x, b, g = (make((2, 4, 3, 3), torch.float32, layout, device=dev, seed=s) for s in range(3))
    gp = torch.randn(2, 4, device=dev)
    opcheck(backend, "residual_gate_pool_backward",
            (g if given != "pooled" else None, gp if given != "out" else None, x, b, make_k(2, device=dev)))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_float64(target, layout):
    backend, dev = target
    inputs = make_gate_inputs((2, 3, 4, 5), torch.float64, layout, dev, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.residual_gate_pool(*a, backend=backend), tuple(inputs))


# ---- bad input: an error that names the argument ('branch', not 'u'), never a crash ----------
def _bad_cases(dev: str):
    x = torch.randn(2, 3, 4, 4, device=dev)
    b, k = torch.randn_like(x), torch.rand(2, device=dev)
    return {
        "branch shape": ((x, b[:, :2], k), "'branch'"),
        "branch 3-D": ((x, b[0], k), "'branch'"),
        "branch dtype": ((x, b.double(), k), "'branch'"),
        "branch integer": ((x, b.long(), k), "'branch'"),
        "branch device": ((x, b.to(other_device(dev)), k), "'branch'"),
        "k shape": ((x, b, torch.rand(3, device=dev)), "'k'"),
        "x 3-D": ((x[0], b, k), "'x'"),
    }


@pytest.mark.parametrize("case", list(_bad_cases("cpu")))
def test_bad_input_names_argument(target, case):
    """From the public op, the raw forward and backward ops and their fake kernels (meta tensors)."""
    backend, dev = target
    args, name = _bad_cases(dev)[case]
    raw, g = native_ops(backend), torch.randn(2, 3, 4, 4, device=dev)
    calls = [lambda: ops.residual_gate_pool(*args, backend=backend), lambda: raw.residual_gate_pool(*args),
             lambda: raw.residual_gate_pool_backward(g, None, *args)]
    if all(t.device.type != "meta" for t in args):  # the fake kernels see the same arguments on meta
        meta = [t.to("meta") for t in args]
        calls += [lambda: raw.residual_gate_pool(*meta),
                  lambda: raw.residual_gate_pool_backward(g.to("meta"), None, *meta)]
    for call in calls:
        with pytest.raises(BAD_ERRORS, match=name):
            call()
