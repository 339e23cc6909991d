"""gate and gate_pool of every fused backend against the reference (SPEC §4), on every target
(op_cases.py): values, gradients, layouts, rounding, determinism, the op contract (opcheck,
gradcheck, torch.compile) and bad input.  CUDA-only cases (alignment, streams, devices) are in
test_cuda.py.
"""
from __future__ import annotations

import pytest
import torch
from op_cases import (DTYPES, LAYOUTS, NATIVE_TARGETS, TOL, assert_names_argument, assert_same_bits_at_any_thread_count,
                     fused_and_reference_grads, grad_tol, grads, make, make_gate_inputs, make_k, memory_format_of,
                     opcheck, other_device, over_cases, shape_of)

from fanet_kernels import ops, reference


@over_cases()
def test_forward_matches_reference(target, sname, dname, layout):
    (backend, dev), dtype, shape = target, DTYPES[dname], shape_of(sname, target)
    x, u, k = make_gate_inputs(shape, dtype, layout, dev)
    out = ops.gate(x, u, k, backend=backend)
    out2, pooled = ops.gate_pool(x, u, k, backend=backend)
    ref_out, ref_pooled = reference.gate_pool(x, u, k)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(out2, ref_out, **TOL[dtype])
    torch.testing.assert_close(pooled, ref_pooled, **TOL[dtype])
    assert out.dtype == pooled.dtype == dtype
    assert out.device == pooled.device == x.device
    assert pooled.shape == shape[:2]
    want = memory_format_of(x, layout)
    assert out.is_contiguous(memory_format=want) and out2.is_contiguous(memory_format=want)


@over_cases(empty_batch=False)
@pytest.mark.parametrize("op", ["gate", "gate_pool"])
def test_backward_matches_reference(target, op, sname, dname, layout):
    (backend, dev), dtype, shape = target, DTYPES[dname], shape_of(sname, target)
    inputs = make_gate_inputs(shape, dtype, layout, dev, requires_grad=True)
    fused, ref = fused_and_reference_grads(op, backend, inputs)
    for i, (a, b) in enumerate(zip(fused, ref)):
        tol = TOL[dtype] if i < 2 else grad_tol(dtype)  # grad_x, grad_u per element; grad_k a sum
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"gradient {i} of {op}: {m}")


@pytest.mark.parametrize("target", NATIVE_TARGETS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bfloat16_rounding_is_atens(target, layout):
    """bfloat16 outputs are rounded exactly as ATen rounds (to nearest even, denormals kept, NaN
    stays NaN): with k = 1/2 the float32 result is exact, so fused and reference agree bit for bit;
    with k = 0 too, denormals and NaN included (the CPU kernels round with an
    AVX512-BF16 instruction, which would flush denormals, where the build machine has it)."""
    backend, dev = target
    x = make((3, 40, 5, 7), torch.bfloat16, layout, device=dev, seed=0)
    u = make((3, 40, 5, 7), torch.bfloat16, layout, device=dev, seed=1)
    half = torch.full((3,), 0.5, dtype=torch.bfloat16, device=dev)
    expected = (x.float() + (u.float() - x.float()) * 0.5).to(torch.bfloat16)
    torch.testing.assert_close(ops.gate(x, u, half, backend=backend), expected, rtol=0, atol=0)
    torch.testing.assert_close(ops.gate_pool(x, u, half, backend=backend)[0], expected, rtol=0, atol=0)

    special = torch.tensor([1e-39, -3e-40, 9.2e-41, float("nan"), float("inf"), -float("inf"), 3.0e38, 0.0])

    def in_memory_order(t: torch.Tensor) -> torch.Tensor:  # a flat view
        return (t.permute(0, 2, 3, 1) if layout == "channels_last" else t).view(-1)

    in_memory_order(x)[: special.numel() * 5 : 5] = special.to(torch.bfloat16).to(dev)
    zero = torch.zeros(3, dtype=torch.bfloat16, device=dev)
    expected = reference.gate(x, u, zero)
    assert in_memory_order(expected)[0] != 0 and expected.isnan().sum() == 3  # a denormal kept; NaN, inf * 0
    torch.testing.assert_close(ops.gate(x, u, zero, backend=backend), expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("used", ["out", "pooled"])
def test_gate_pool_backward_with_one_output_unused(target, used):
    backend, dev = target
    inputs = make_gate_inputs((2, 3, 5, 4), torch.float32, "contiguous", dev, requires_grad=True)
    pick = 0 if used == "out" else 1
    fused = grads(lambda *a: ops.gate_pool(*a, backend=backend)[pick], inputs)
    ref = grads(lambda *a: reference.gate_pool(*a)[pick], inputs)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, **grad_tol(torch.float32))


@pytest.mark.parametrize("dname", ["f32", "bf16"])
def test_backward_is_deterministic(target, dname):
    """grad_k and the pools are reduced without atomics: identical bits across runs and thread counts."""
    backend, dev = target
    for layout in ("contiguous", "channels_last"):
        inputs = make_gate_inputs(shape_of("large", target), DTYPES[dname], layout, dev, requires_grad=True)
        assert_same_bits_at_any_thread_count(lambda: [*ops.gate_pool(*inputs, backend=backend),
                                                      *grads(lambda *a: ops.gate_pool(*a, backend=backend), inputs)])


# ---- torch.library.opcheck, gradcheck, torch.compile --------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", ["gate", "gate_pool"])
def test_opcheck(target, op, layout):
    backend, dev = target
    opcheck(backend, op, tuple(make_gate_inputs((2, 6, 3, 5), torch.float32, layout, dev, requires_grad=True)))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op,given", [("gate_backward", "out"), ("gate_pool_backward", "both"),
                                      ("gate_pool_backward", "out"), ("gate_pool_backward", "pooled")])
def test_opcheck_backward_ops(target, op, given, layout):
    """The backward ops, with grad_out or grad_pooled None (an output unused) where they take both."""
    backend, dev = target
    x, u, g = (make((2, 4, 3, 3), torch.float32, layout, device=dev, seed=s) for s in range(3))
    k, gp = make_k(2, device=dev), torch.randn(2, 4, device=dev)
    args = (g, x, u, k) if op == "gate_backward" else \
        (g if given != "pooled" else None, gp if given != "out" else None, x, u, k)
    opcheck(backend, op, args)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_float64(target, layout):
    backend, dev = target
    inputs = make_gate_inputs((2, 3, 4, 5), torch.float64, layout, dev, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.gate(*a, backend=backend), tuple(inputs))
    assert torch.autograd.gradcheck(lambda *a: ops.gate_pool(*a, backend=backend), tuple(inputs))


class _TinyFA(torch.nn.Module):
    """A conv block gated with the fused ops, as an FA chain uses them."""

    def __init__(self, c: int, backend: str):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)
        self.w1, self.b1 = torch.nn.Parameter(torch.randn(2, c) * 0.3), torch.nn.Parameter(torch.zeros(2))
        self.w2, self.b2 = torch.nn.Parameter(torch.randn(1, 2) * 0.3), torch.nn.Parameter(torch.zeros(1))
        self.backend = backend

    def forward(self, x):
        k = ops.focus(x, self.w1, self.b1, self.w2, self.b2, backend=self.backend)
        out, pooled = ops.gate_pool(x, torch.relu(self.conv(x)), k, backend=self.backend)
        return ops.gate(out, torch.relu(self.conv(out)), pooled.mean(1).sigmoid(), backend=self.backend)


def test_torch_compile_fullgraph(target):
    """focus, gate_pool and gate in one compiled graph, forward and backward, as in eager mode."""
    backend, dev = target
    torch._dynamo.reset()
    model = _TinyFA(4, backend).to(dev)
    x = torch.randn(2, 4, 6, 6, device=dev, requires_grad=True)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    (g_eager,) = torch.autograd.grad(eager.sum(), x)
    (g_comp,) = torch.autograd.grad(compiled.sum(), x)
    torch.testing.assert_close(g_comp, g_eager, rtol=1e-5, atol=1e-5)


# ---- bad input: an error that names the argument, never a crash ---------------------------
def _bad_cases(dev: str):
    x = torch.randn(2, 3, 4, 4, device=dev)
    u, k = torch.randn_like(x), torch.rand(2, device=dev)
    other = other_device(dev)
    return {
        "x 3-D": ((x[0], u[0], k), "'x'"),
        "x integer": ((x.long(), u.long(), k), "'x'"),
        "u shape": ((x, u[:, :2], k), "'u'"),
        "u dtype": ((x, u.double(), k), "'u'"),
        "u device": ((x, u.to(other), k), "'u'"),
        "k shape": ((x, u, torch.rand(3, device=dev)), "'k'"),
        "k 2-D": ((x, u, torch.rand(2, 1, device=dev)), "'k'"),
        "k integer": ((x, u, torch.ones(2, dtype=torch.int64, device=dev)), "'k'"),
        "k device": ((x, u, k.to(other)), "'k'"),
        "H*W = 0": ((x[:, :, :0], u[:, :, :0], k), "'x'"),
    }


@pytest.mark.parametrize("case", list(_bad_cases("cpu")))
@pytest.mark.parametrize("op", ["gate", "gate_pool"])
def test_bad_input_names_argument(target, op, case):
    backend, dev = target
    assert_names_argument(op, *_bad_cases(dev)[case], backend)
