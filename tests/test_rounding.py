"""The C++ CPU kernels round every operation as written: no compiler contracts a * b + c into a
fused multiply-add (setup.py and CMakeLists.txt build the CPU sources with -ffp-contract=off, the
CUDA ones with --fmad=false; csrc/common/fa_math.h fuses only where it says so, on both devices).
So their element-wise outputs equal the reference's, which eager PyTorch computes one rounded op at
a time, bit for bit; tests/test_cuda.py checks the CUDA kernels against these on a GPU.
"""
from __future__ import annotations

import pytest
import torch
from op_cases import DTYPES, TOL, k_dtype, make, make_k

import fanet_kernels as fk
from fanet_kernels import ops, reference

pytestmark = pytest.mark.skipif("cpu" not in fk.available_backends("cpu"),
                                reason="compiled CPU backend not built (see README: pip install -e .)")

SHAPES = [(2, 16, 8, 8), (3, 40, 5, 7), (2, 3, 13, 17)]


def _inputs(shape, dtype, layout, requires_grad=False):
    x, u, g = (make(shape, dtype, layout, requires_grad=requires_grad and s < 2, seed=s) for s in (0, 1, 2))
    return x, u, make_k(shape[0], k_dtype(dtype)), g


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_outputs_equal_the_reference_bit_for_bit(shape, dname, layout):
    x, u, k, _ = _inputs(shape, DTYPES[dname], layout)
    assert torch.equal(ops.gate(x, u, k, backend="cpu"), reference.gate(x, u, k))
    assert torch.equal(ops.gate_pool(x, u, k, backend="cpu")[0], reference.gate_pool(x, u, k)[0])
    assert torch.equal(ops.residual_gate_pool(x, u, k, backend="cpu")[0], reference.residual_gate_pool(x, u, k)[0])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("op", ["gate", "residual_gate_pool"])
def test_backward_elementwise_gradients_equal_autograd_bit_for_bit(op, dname, layout):
    """grad_x and grad_u (grad_branch) of the backward ops against autograd of the reference.  Not the
    residual op's grad_x in float16/bfloat16: the reference casts x to float32 twice there, and autograd
    rounds each cast's share of the gradient to x's dtype before adding them (the kernels round once)."""
    x, u, k, g = _inputs((3, 40, 5, 7), DTYPES[dname], layout, requires_grad=True)
    if op == "gate":
        got = torch.ops.fanet.gate_backward(g, x.detach(), u.detach(), k)[:2]
        out = reference.gate(x, u, k)
    else:
        got = torch.ops.fanet.residual_gate_pool_backward(g, None, x.detach(), u.detach(), k)[:2]
        out = reference.residual_gate_pool(x, u, k)[0]
    want = torch.autograd.grad(out, [x, u], g)
    twice = op == "residual_gate_pool" and dname in ("f16", "bf16")
    for i, (a, b) in enumerate(zip(got, want)):
        if i == 0 and twice:
            continue
        assert torch.equal(a, b), f"gradient {i} of {op}"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dname", ["f32", "f64", "f16"])
def test_triton_elementwise_outputs_equal_the_cpu_backends(dname, layout):
    """The Triton kernels round as the C++ ones: no fp fusion at launch, and the pooled gradient
    folded in as grad_out + grad_pooled * (1 / HW).  Under the interpreter (numpy) this checks the
    formulas, not bfloat16 (the interpreter truncates float32 to bfloat16 where a GPU rounds to
    nearest even); tests/test_cuda.py checks the compiled kernels, bfloat16 too, on a GPU.  The
    sums (pooled, grad_k) are added in another order: equal within the tolerance of their dtype."""
    if "triton" not in fk.available_backends("cpu"):
        pytest.skip("the triton backend runs on CPU tensors only under TRITON_INTERPRET=1")
    x, u, k, g = _inputs((3, 40, 5, 7), DTYPES[dname], layout)
    gp = make((3, 40, 1, 1), DTYPES[dname], "contiguous", seed=3).view(3, 40)
    cpp, tri = torch.ops.fanet, torch.ops.fanet_triton
    assert torch.equal(tri.gate(x, u, k), cpp.gate(x, u, k))
    for op in ("gate_pool", "residual_gate_pool"):
        (out, pooled), (want_out, want_pooled) = getattr(tri, op)(x, u, k), getattr(cpp, op)(x, u, k)
        assert torch.equal(out, want_out), op
        torch.testing.assert_close(pooled, want_pooled, **TOL[pooled.dtype])
    for op in ("gate_pool_backward", "residual_gate_pool_backward"):
        for go, gpo in ((g, None), (None, gp), (g, gp)):
            got, want = getattr(tri, op)(go, gpo, x, u, k), getattr(cpp, op)(go, gpo, x, u, k)
            for i in range(2):  # grad_x, grad_u: element-wise
                assert torch.equal(got[i], want[i]), (op, i, go is None, gpo is None)
            torch.testing.assert_close(got[2], want[2], **TOL[got[2].dtype])  # grad_k
