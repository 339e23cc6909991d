"""focus (k' from x's channel means) and mlp (the same MLP head on (N, C) inputs) of every fused
backend against the reference (SPEC §4), on every target (op_cases.py): values, gradients,
determinism, NaN, the op contract (opcheck, gradcheck) and bad input.
"""
from __future__ import annotations

import pytest
import torch
from op_cases import (BAD_ERRORS, DTYPES, LAYOUTS, TOL, assert_names_argument, assert_same_bits_at_any_thread_count,
                     fused_and_reference_grads, grad_tol, grads, k_dtype, make, make_focus_weights, opcheck,
                     other_device, over_cases, shape_of)

from fanet_kernels import ops, reference


def _focus_inputs(shape, dtype, layout, dev, requires_grad=False, **kw):
    """[x, w1, b1, w2, b2], the weights in k_dtype(dtype)."""
    return [make(shape, dtype, layout, device=dev, requires_grad=requires_grad),
            *make_focus_weights(shape[1], k_dtype(dtype), device=dev, requires_grad=requires_grad, **kw)]


@over_cases()
def test_forward_matches_reference(target, sname, dname, layout):
    (backend, dev), dtype, shape = target, DTYPES[dname], shape_of(sname, target)
    inputs = _focus_inputs(shape, dtype, layout, dev)
    kf = ops.focus(*inputs, backend=backend)
    torch.testing.assert_close(kf, reference.focus(*inputs), **TOL[dtype])
    assert kf.dtype == dtype and kf.device == inputs[0].device and kf.shape == shape[:1]


@over_cases(empty_batch=False)
def test_backward_matches_reference(target, sname, dname, layout):
    (backend, dev), dtype, shape = target, DTYPES[dname], shape_of(sname, target)
    inputs = _focus_inputs(shape, dtype, layout, dev, requires_grad=True)
    fused, ref = fused_and_reference_grads("focus", backend, inputs)
    hw = shape[2] * shape[3]
    for i, (a, b) in enumerate(zip(fused, ref)):
        if i == 0:
            # grad_x is grad_l / (H*W) per element, tiny at large maps: compared times H*W (i.e. as
            # grad_l) at the elementwise tolerance, so that a zero or misplaced one fails.
            a, b = a * hw, b * hw
        tol = TOL[dtype] if i == 0 else grad_tol(dtype)
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"gradient {i} of focus: {m}")


@pytest.mark.parametrize("dname", ["f32", "bf16"])
def test_backward_is_deterministic(target, dname):
    """The channel means and the weight gradients are reduced without atomics: identical bits
    across runs and thread counts."""
    backend, dev = target
    for layout in ("contiguous", "channels_last"):
        x = make(shape_of("large", target), DTYPES[dname], layout, device=dev, requires_grad=True)
        inputs = [x, *make_focus_weights(x.shape[1], device=dev, requires_grad=True)]
        assert_same_bits_at_any_thread_count(lambda: [ops.focus(*inputs, backend=backend),
                                                      *grads(lambda *a: ops.focus(*a, backend=backend), inputs)])


def test_nan_in_x_reaches_k_as_in_reference(target):
    """relu passes NaN (torch.relu's rule), so a NaN in x makes k NaN on every backend, and the
    gradients' NaNs sit where the reference's do (threshold_backward passes the gradient at NaN)."""
    backend, dev = target
    x = torch.rand(3, 8, 4, 4, device=dev)
    x[1, 2, 0, 3] = float("nan")
    w = [t.requires_grad_() for t in make_focus_weights(8, device=dev)]
    for op, inp in (("focus", x), ("mlp", x.mean((2, 3)))):
        results = []
        for be in (backend, "reference"):
            leaf = inp.detach().requires_grad_()
            k = getattr(ops, op)(leaf, *w, backend=be)
            results.append([k.isnan(), *(g.isnan() for g in torch.autograd.grad(k.sum(), [leaf, *w]))])
        assert results[0][0].tolist() == [False, True, False], op
        for i, (a, b) in enumerate(zip(*results)):
            assert torch.equal(a, b), (op, i)


# ---- torch.library.opcheck, gradcheck ------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(target, layout):
    backend, dev = target
    opcheck(backend, "focus", tuple(_focus_inputs((2, 6, 3, 5), torch.float32, layout, dev, requires_grad=True)))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_backward_op(target, layout):
    backend, dev = target
    opcheck(backend, "focus_backward", (torch.randn(2, device=dev),
                                        *_focus_inputs((2, 4, 3, 3), torch.float32, layout, dev)))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_float64(target, layout):
    backend, dev = target
    inputs = _focus_inputs((2, 3, 4, 5), torch.float64, layout, dev, requires_grad=True, r1=1)
    assert torch.autograd.gradcheck(lambda *a: ops.focus(*a, backend=backend), tuple(inputs))


# ---- bad input: an error that names the argument, never a crash ---------------------------
def _bad_cases(dev: str):
    x = torch.randn(2, 8, 4, 4, device=dev)
    w1, b1, w2, b2 = make_focus_weights(8, device=dev)
    return {
        "x 2-D": ((x[:, :, 0, 0], w1, b1, w2, b2), "'x'"),
        "x integer": ((x.int(), w1, b1, w2, b2), "'x'"),
        "w1 C": ((x, w1[:, :7], b1, w2, b2), "'w1'"),
        "b1 shape": ((x, w1, b1[:1], w2, b2), "'b1'"),
        "w2 shape": ((x, w1, b1, w2.t(), b2), "'w2'"),
        "b2 shape": ((x, w1, b1, w2, torch.zeros(2, device=dev)), "'b2'"),
        "b1 dtype": ((x, w1, b1.double(), w2, b2), "'b1'"),
        "w1 device": ((x, w1.to(other_device(dev)), b1, w2, b2), "'w1'"),
    }


@pytest.mark.parametrize("case", list(_bad_cases("cpu")))
def test_bad_input_names_argument(target, case):
    backend, dev = target
    assert_names_argument("focus", *_bad_cases(dev)[case], backend)


# ---- mlp: the MLP head of focus and association on (N, C) inputs ------------------------
MLP_SHAPES = {"N0": (0, 8), "N1": (1, 3), "C1": (5, 1), "assoc": (7, 4), "focus64": (128, 64), "bigC": (6, 1024)}


def _mlp_inputs(shape, dtype, dev, requires_grad=False):
    g = torch.Generator().manual_seed(3)
    inputs = torch.randn(shape, generator=g).to(dtype).to(dev).requires_grad_(requires_grad)
    return [inputs, *make_focus_weights(shape[1], k_dtype(dtype), device=dev, requires_grad=requires_grad)]


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("sname", list(MLP_SHAPES))
def test_mlp_matches_reference(target, sname, dname):
    (backend, dev), dtype = target, DTYPES[dname]
    inputs = _mlp_inputs(MLP_SHAPES[sname], dtype, dev, requires_grad=True)
    k = ops.mlp(*inputs, backend=backend)
    torch.testing.assert_close(k, reference.mlp(*inputs), **TOL[dtype])
    assert k.dtype == dtype and k.shape == MLP_SHAPES[sname][:1]
    if MLP_SHAPES[sname][0] == 0:
        return
    fused, ref = fused_and_reference_grads("mlp", backend, inputs)
    for i, (a, b) in enumerate(zip(fused, ref)):
        torch.testing.assert_close(a, b, **TOL[dtype] if i == 0 else grad_tol(dtype),
                                   msg=lambda m: f"gradient {i} of mlp: {m}")


def test_mlp_opcheck_and_gradcheck(target):
    """gradcheck of the public op; opcheck of the C++ op and its backward op (Triton's mlp is
    plain PyTorch, no op of its own)."""
    backend, dev = target
    inputs = _mlp_inputs((3, 5), torch.float64, dev, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.mlp(*a, backend=backend), tuple(inputs))
    if backend in ("cpu", "cuda"):
        opcheck(backend, "mlp", tuple(_mlp_inputs((3, 5), torch.float32, dev, True)))
        opcheck(backend, "mlp_backward", (torch.randn(3, device=dev), *_mlp_inputs((3, 5), torch.float32, dev)))


def test_mlp_bad_input_names_argument(target):
    backend, dev = target
    inputs, w1, b1, w2, b2 = _mlp_inputs((4, 12), torch.float32, dev)  # H1 = 3
    cases = {"'inputs'": (inputs[0], w1, b1, w2, b2), "'w1'": (inputs, w1[:, :11], b1, w2, b2),
             "'b2'": (inputs, w1, b1, w2, b1)}
    for name, args in cases.items():
        with pytest.raises(BAD_ERRORS, match=name):
            ops.mlp(*args, backend=backend)
        if backend in ("cpu", "cuda"):
            with pytest.raises(BAD_ERRORS, match=name):
                torch.ops.fanet.mlp(*args)
