"""The fused ops of every backend against the reference (SPEC §4).

Each op test runs once per target, a (backend, device) pair: every fused backend that runs on CPU
tensors here ("cpu", and "triton" under TRITON_INTERPRET=1), and the CUDA targets ("cuda" and
"triton" on CUDA tensors), which are marked ``cuda`` and skipped, with the reason, without a GPU.
Test ids start with "<backend>-<device>": ``-k cpu-cpu`` selects the C++ CPU kernels,
``-k triton-cpu`` the Triton interpreter, ``-m cuda -rs`` the CUDA targets.  CUDA-only tests
(alignment, streams, devices) are in test_cuda.py.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fanet_kernels as fk
from fanet_kernels import ops, reference
from op_cases import (DTYPES, LAYOUTS, SHAPES, TOL, cuda_skip_reason, grad_tol, grads, k_dtype, make,
                      make_focus_weights, make_k)

FUSED = [b for b in fk.available_backends("cpu") if b != "reference"]
pytestmark = pytest.mark.skipif(not FUSED, reason="no fused backend built (see README: pip install -e .)")


def _cuda_target(backend: str):
    reason = cuda_skip_reason(backend)
    return pytest.param((backend, "cuda"), id=f"{backend}-cuda",
                        marks=[pytest.mark.cuda, pytest.mark.skipif(reason is not None, reason=reason or "")])


TARGETS = [pytest.param((b, "cpu"), id=f"{b}-cpu") for b in FUSED] + \
    [_cuda_target(b) for b in ("cuda", "triton")]
# The raw C++ ops (torch.ops.fanet.*) behind the "cpu" and "cuda" backends.
NATIVE_TARGETS = [t for t in TARGETS if t.values[0][0] in ("cpu", "cuda")]

# The Triton interpreter simulates every program in numpy: give it a smaller "large" case.
LARGE_FOR = {("triton", "cpu"): (2, 64, 64, 64)}


def shape_of(name: str, target: tuple[str, str]) -> tuple[int, ...]:
    return LARGE_FOR.get(target, SHAPES[name]) if name == "large" else SHAPES[name]


@pytest.fixture(params=TARGETS)
def target(request) -> tuple[str, str]:
    """(backend, device): the backend under test and the device its tensors are created on."""
    return request.param


def native_ops(backend: str):
    """The op namespace behind a backend (for opcheck)."""
    return {"cpu": torch.ops.fanet, "cuda": torch.ops.fanet}.get(backend) or getattr(torch.ops, f"fanet_{backend}")


# ---- forward ----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("sname", list(SHAPES))
def test_forward_matches_reference(target, sname, dname, layout):
    (backend, dev), dtype, shape = target, DTYPES[dname], shape_of(sname, target)
    x, u = make(shape, dtype, layout, device=dev, seed=0), make(shape, dtype, layout, device=dev, seed=1)
    k = make_k(shape[0], k_dtype(dtype), device=dev)
    ws = make_focus_weights(shape[1], k_dtype(dtype), device=dev)

    out = ops.gate(x, u, k, backend=backend)
    out2, pooled = ops.gate_pool(x, u, k, backend=backend)
    kf = ops.focus(x, *ws, backend=backend)
    ref_out, ref_pooled = reference.gate_pool(x, u, k)

    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(out2, ref_out, **TOL[dtype])
    torch.testing.assert_close(pooled, ref_pooled, **TOL[dtype])
    torch.testing.assert_close(kf, reference.focus(x, *ws), **TOL[dtype])
    assert out.dtype == pooled.dtype == kf.dtype == dtype
    assert out.device == pooled.device == kf.device == x.device
    assert pooled.shape == shape[:2] and kf.shape == shape[:1]
    # out keeps x's memory format; any other stride pattern comes back contiguous.
    want = torch.channels_last if layout == "channels_last" and not x.is_contiguous() else torch.contiguous_format
    assert out.is_contiguous(memory_format=want) and out2.is_contiguous(memory_format=want)


# ---- backward ---------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("sname", [s for s in SHAPES if s != "N0"])
@pytest.mark.parametrize("op", ["gate", "gate_pool", "focus"])
def test_backward_matches_reference(target, op, sname, dname, layout):
    (backend, dev), dtype, shape = target, DTYPES[dname], shape_of(sname, target)
    if op == "focus":
        inputs = [make(shape, dtype, layout, device=dev, requires_grad=True),
                  *make_focus_weights(shape[1], k_dtype(dtype), device=dev, requires_grad=True)]
    else:
        inputs = [make(shape, dtype, layout, device=dev, requires_grad=True, seed=0),
                  make(shape, dtype, layout, device=dev, requires_grad=True, seed=1),
                  make_k(shape[0], k_dtype(dtype), device=dev, requires_grad=True)]
    fused = grads(lambda *a: getattr(ops, op)(*a, backend=backend), inputs)
    ref = grads(getattr(reference, op), inputs)
    hw = shape[2] * shape[3]
    for i, (a, b) in enumerate(zip(fused, ref)):
        if op == "focus" and i == 0:
            # focus's grad_x is grad_l / (H*W) per element, tiny at large maps: compared times H*W
            # (i.e. as grad_l) at the elementwise tolerance, so that a zero or misplaced one fails.
            a, b = a * hw, b * hw
        elementwise = i < 2 if op != "focus" else i == 0
        tol = TOL[dtype] if elementwise else grad_tol(dtype)
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
    x = make((2, 3, 5, 4), torch.float32, "contiguous", device=dev, requires_grad=True, seed=0)
    u = make((2, 3, 5, 4), torch.float32, "contiguous", device=dev, requires_grad=True, seed=1)
    k = make_k(2, device=dev, requires_grad=True)
    pick = 0 if used == "out" else 1
    fused = grads(lambda *a: ops.gate_pool(*a, backend=backend)[pick], [x, u, k])
    ref = grads(lambda *a: reference.gate_pool(*a)[pick], [x, u, k])
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, **grad_tol(torch.float32))


@pytest.mark.parametrize("dname", ["f32", "bf16"])
def test_backward_is_deterministic(target, dname):
    """grad_k and the pools are reduced without atomics: identical bits across runs and thread counts."""
    (backend, dev), shape = target, shape_of("large", target)
    for layout in ("contiguous", "channels_last"):
        x = make(shape, DTYPES[dname], layout, device=dev, requires_grad=True, seed=0)
        u = make(shape, DTYPES[dname], layout, device=dev, requires_grad=True, seed=1)
        k = make_k(shape[0], device=dev, requires_grad=True)
        ws = make_focus_weights(shape[1], device=dev, requires_grad=True)
        threads = torch.get_num_threads()
        runs = []
        for n in (max(threads, 2), 1, 3):  # the thread count matters to the CPU kernels only
            torch.set_num_threads(n)
            try:
                fwd = ops.gate_pool(x, u, k, backend=backend)
                gate_grads = grads(lambda *a: ops.gate_pool(*a, backend=backend), [x, u, k])
                focus_grads = grads(lambda *a: ops.focus(*a, backend=backend), [x, *ws])
                runs.append((*fwd, *gate_grads, *focus_grads))
            finally:
                torch.set_num_threads(threads)
        for other in runs[1:]:
            for a, b in zip(runs[0], other):
                assert torch.equal(a, b)


# ---- residual_gate_pool: gate_pool with the block's add and ReLU folded in ----------------
def _residual_inputs(shape, dtype, layout, dev, requires_grad=False):
    return [make(shape, dtype, layout, device=dev, requires_grad=requires_grad, seed=0),
            make(shape, dtype, layout, device=dev, requires_grad=requires_grad, seed=1),
            make_k(shape[0], k_dtype(dtype), device=dev, requires_grad=requires_grad)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("sname", list(SHAPES))
def test_residual_forward_matches_reference(target, sname, dname, layout):
    (backend, dev), dtype, shape = target, DTYPES[dname], shape_of(sname, target)
    x, b, k = _residual_inputs(shape, dtype, layout, dev)
    out, pooled = ops.residual_gate_pool(x, b, k, backend=backend)
    ref_out, ref_pooled = reference.residual_gate_pool(x, b, k)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(pooled, ref_pooled, **TOL[dtype])
    assert out.dtype == pooled.dtype == dtype and pooled.shape == shape[:2]
    want = torch.channels_last if layout == "channels_last" and not x.is_contiguous() else torch.contiguous_format
    assert out.is_contiguous(memory_format=want)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("sname", [s for s in SHAPES if s != "N0"])
def test_residual_backward_matches_reference(target, sname, dname, layout):
    (backend, dev), dtype, shape = target, DTYPES[dname], shape_of(sname, target)
    inputs = _residual_inputs(shape, dtype, layout, dev, requires_grad=True)
    fused = grads(lambda *a: ops.residual_gate_pool(*a, backend=backend), inputs)
    ref = grads(reference.residual_gate_pool, inputs)
    for i, (a, b) in enumerate(zip(fused, ref)):
        tol = TOL[dtype] if i < 2 else grad_tol(dtype)  # grad_x, grad_branch are per element
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"gradient {i} of residual_gate_pool: {m}")


def test_residual_relu_boundary_follows_torch(target):
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


@pytest.mark.parametrize("used", ["out", "pooled"])
def test_residual_backward_with_one_output_unused(target, used):
    backend, dev = target
    inputs = _residual_inputs((2, 3, 5, 4), torch.float32, "contiguous", dev, requires_grad=True)
    pick = 0 if used == "out" else 1
    fused = grads(lambda *a: ops.residual_gate_pool(*a, backend=backend)[pick], inputs)
    ref = grads(lambda *a: reference.residual_gate_pool(*a)[pick], inputs)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, **grad_tol(torch.float32))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_residual_opcheck(target, layout):
    backend, dev = target
    args = _residual_inputs((2, 6, 3, 5), torch.float32, layout, dev, requires_grad=True)
    torch.library.opcheck(native_ops(backend).residual_gate_pool.default, tuple(args))


@pytest.mark.parametrize("target", NATIVE_TARGETS)
def test_residual_opcheck_backward_op(target):
    dev, shape = target[1], (2, 4, 3, 3)
    x, b, g = (make(shape, torch.float32, "contiguous", device=dev, seed=s) for s in range(3))
    args = (g, torch.randn(2, 4, device=dev), x, b, make_k(2, device=dev))
    torch.library.opcheck(torch.ops.fanet.residual_gate_pool_backward.default, args)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_residual_gradcheck_float64(target, layout):
    backend, dev = target
    args = _residual_inputs((2, 3, 4, 5), torch.float64, layout, dev, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.residual_gate_pool(*a, backend=backend), tuple(args))


def test_residual_bad_branch_names_argument(target):
    backend, dev = target
    x = torch.randn(2, 3, 4, 4, device=dev)
    k = torch.rand(2, device=dev)
    for branch in (x[:, :2], x.double(), x.to(_other_device(dev)), x[0]):
        with pytest.raises(BAD_ERRORS, match="'branch'"):
            ops.residual_gate_pool(x, branch, k, backend=backend)
        with pytest.raises(BAD_ERRORS, match="'branch'"):
            native_ops(backend).residual_gate_pool(x, branch, k)


# ---- mlp: the MLP head of focus and association on (N, C) inputs ------------------------
MLP_SHAPES = {"N0": (0, 8), "N1": (1, 3), "C1": (5, 1), "assoc": (7, 4), "focus64": (128, 64), "bigC": (6, 1024)}


def _mlp_inputs(shape, dtype, dev, requires_grad=False):
    g = torch.Generator().manual_seed(3)
    l = torch.randn(shape, generator=g).to(dtype).to(dev).requires_grad_(requires_grad)
    return [l, *make_focus_weights(shape[1], k_dtype(dtype), device=dev, requires_grad=requires_grad)]


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
    fused = grads(lambda *a: ops.mlp(*a, backend=backend), inputs)
    ref = grads(reference.mlp, inputs)
    for i, (a, b) in enumerate(zip(fused, ref)):
        torch.testing.assert_close(a, b, **TOL[dtype] if i == 0 else grad_tol(dtype),
                                   msg=lambda m: f"gradient {i} of mlp: {m}")


def test_mlp_opcheck_and_gradcheck(target):
    backend, dev = target
    inputs = _mlp_inputs((3, 5), torch.float64, dev, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.mlp(*a, backend=backend), tuple(inputs))
    if backend in ("cpu", "cuda"):
        torch.library.opcheck(torch.ops.fanet.mlp.default, tuple(_mlp_inputs((3, 5), torch.float32, dev, True)))
        args = (torch.randn(3, device=dev), *_mlp_inputs((3, 5), torch.float32, dev))
        torch.library.opcheck(torch.ops.fanet.mlp_backward.default, args)


def test_mlp_bad_input_names_argument(target):
    backend, dev = target
    l, w1, b1, w2, b2 = _mlp_inputs((4, 12), torch.float32, dev)  # H1 = 3
    cases = {"'l'": (l[0], w1, b1, w2, b2), "'w1'": (l, w1[:, :11], b1, w2, b2), "'b2'": (l, w1, b1, w2, b1)}
    for name, args in cases.items():
        with pytest.raises(BAD_ERRORS, match=name):
            ops.mlp(*args, backend=backend)
        if backend in ("cpu", "cuda"):
            with pytest.raises(BAD_ERRORS, match=name):
                torch.ops.fanet.mlp(*args)


# ---- torch.library.opcheck, gradcheck, torch.compile --------------------------------------
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("op", ["gate", "gate_pool", "focus"])
def test_opcheck(target, op, layout):
    (backend, dev), shape = target, (2, 6, 3, 5)
    x = make(shape, torch.float32, layout, device=dev, requires_grad=True)
    if op == "focus":
        args = (x, *make_focus_weights(6, device=dev, requires_grad=True))
    else:
        args = (x, make(shape, torch.float32, layout, device=dev, requires_grad=True, seed=1),
                make_k(2, device=dev, requires_grad=True))
    torch.library.opcheck(getattr(native_ops(backend), op).default, args)


@pytest.mark.parametrize("op", ["gate_backward", "gate_pool_backward", "focus_backward"])
@pytest.mark.parametrize("target", NATIVE_TARGETS)  # overrides the fixture: the C++ backward ops only
def test_opcheck_backward_ops(target, op):
    dev, shape = target[1], (2, 4, 3, 3)
    x, u, g = (make(shape, torch.float32, "contiguous", device=dev, seed=s) for s in range(3))
    k = make_k(2, device=dev)
    if op == "gate_backward":
        args = (g, x, u, k)
    elif op == "gate_pool_backward":
        args = (g, torch.randn(2, 4, device=dev), x, u, k)
    else:
        args = (torch.randn(2, device=dev), x, *make_focus_weights(4, device=dev))
    torch.library.opcheck(getattr(torch.ops.fanet, op).default, args)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_float64(target, layout):
    (backend, dev), shape = target, (2, 3, 4, 5)
    x = make(shape, torch.float64, layout, device=dev, requires_grad=True)
    u = make(shape, torch.float64, layout, device=dev, requires_grad=True, seed=1)
    k = make_k(2, torch.float64, device=dev, requires_grad=True)
    ws = make_focus_weights(3, torch.float64, device=dev, requires_grad=True, r1=1)
    assert torch.autograd.gradcheck(lambda *a: ops.gate(*a, backend=backend), (x, u, k))
    assert torch.autograd.gradcheck(lambda *a: ops.gate_pool(*a, backend=backend), (x, u, k))
    assert torch.autograd.gradcheck(lambda *a: ops.focus(*a, backend=backend), (x, *ws))


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
def _other_device(dev: str) -> str:
    """A device the inputs of a ``dev`` call must not be on ("meta" stands in for a second device on CPU)."""
    return "meta" if dev == "cpu" else "cpu"


def _bad_gate_cases(dev: str):
    x = torch.randn(2, 3, 4, 4, device=dev)
    u, k = torch.randn_like(x), torch.rand(2, device=dev)
    other = _other_device(dev)
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


def _bad_focus_cases(dev: str):
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
        "w1 device": ((x, w1.to(_other_device(dev)), b1, w2, b2), "'w1'"),
    }


BAD_ERRORS = (ValueError, TypeError, RuntimeError)


@pytest.mark.parametrize("case", list(_bad_gate_cases("cpu")))
@pytest.mark.parametrize("op", ["gate", "gate_pool"])
def test_bad_gate_input_names_argument(target, op, case):
    backend, dev = target
    args, name = _bad_gate_cases(dev)[case]
    with pytest.raises(BAD_ERRORS, match=name):
        getattr(ops, op)(*args, backend=backend)
    with pytest.raises(BAD_ERRORS, match=name):  # the raw op, bypassing the Python checks
        getattr(native_ops(backend), op)(*args)


@pytest.mark.parametrize("case", list(_bad_focus_cases("cpu")))
def test_bad_focus_input_names_argument(target, case):
    backend, dev = target
    args, name = _bad_focus_cases(dev)[case]
    with pytest.raises(BAD_ERRORS, match=name):
        ops.focus(*args, backend=backend)
    with pytest.raises(BAD_ERRORS, match=name):
        native_ops(backend).focus(*args)


@pytest.mark.parametrize("target", NATIVE_TARGETS)
def test_bad_input_messages_are_the_references(target):
    """The C++ checks (csrc/common/checks.h) say word for word what _validate.py says for the
    reference backend, dtypes spelled as in Python (torch.float32)."""
    backend, dev = target
    calls = [(op, args) for op in ("gate", "gate_pool") for args, _ in _bad_gate_cases(dev).values()]
    calls += [("focus", args) for args, _ in _bad_focus_cases(dev).values()]
    for op, args in calls:
        errors = []
        for be in ("reference", backend):
            with pytest.raises(BAD_ERRORS) as e:
                getattr(ops, op)(*args, backend=be)
            errors.append((e.type, str(e.value)))
        assert errors[0] == errors[1], op


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


def native_calls(dev: str) -> dict[str, tuple]:
    """Each differentiable C++ op with inputs that require gradients: {name: (op, inputs)}."""
    x, u = (make((2, 4, 3, 3), torch.float32, "contiguous", device=dev, requires_grad=True, seed=s) for s in (0, 1))
    k = make_k(2, device=dev, requires_grad=True)
    w = [t.detach().requires_grad_() for t in make_focus_weights(4, device=dev)]
    return {"gate": (torch.ops.fanet.gate, [x, u, k]), "gate_pool": (torch.ops.fanet.gate_pool, [x, u, k]),
            "residual_gate_pool": (torch.ops.fanet.residual_gate_pool, [x, u, k]),
            "focus": (torch.ops.fanet.focus, [x, *w]), "mlp": (torch.ops.fanet.mlp, [x.mean((2, 3)), *w])}


@pytest.mark.skipif("cpu" not in FUSED, reason="compiled CPU backend not built")
def test_native_autograd_is_a_cpp_node():
    """csrc/autograd.cpp, not a Python formula, differentiates the C++ ops: a Python autograd
    formula would cost ~50 us more per forward + backward, more than the kernels at small shapes."""
    for name, (fn, inputs) in native_calls("cpu").items():
        outs = fn(*inputs)
        out = outs[0] if isinstance(outs, tuple) else outs
        assert out.grad_fn.name().startswith("torch::autograd::CppNode<fanet::"), (name, out.grad_fn.name())


@pytest.mark.parametrize("target", NATIVE_TARGETS)
@pytest.mark.parametrize("op", ["gate", "gate_pool", "residual_gate_pool", "focus", "mlp"])
def test_double_backward_raises(target, op):
    """First derivatives only: with create_graph=True the gradients are the usual ones, and a
    backward through them raises instead of treating them as constants (a silently wrong result)."""
    fn, inputs = native_calls(target[1])[op]
    outs = fn(*inputs)
    loss = sum(o.sum() for o in (outs if isinstance(outs, tuple) else (outs,)))
    first = torch.autograd.grad(loss, inputs, create_graph=True)
    expected = torch.autograd.grad(loss, inputs, retain_graph=True)
    for a, b in zip(first, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match=f"fanet::{op}_backward is not differentiable"):
        sum(g.sum() for g in first).backward()


# ---- every backend runs its own kernels ------------------------------------------------------
class _OpLog(TorchDispatchMode):
    """Records "namespace::name" of every op that reaches dispatch."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(f"{func.namespace}::{func._opname}")
        return func(*args, **(kwargs or {}))


def _wiring_call(op: str, dev: str):
    """(a call of ops.<op> on small inputs that require gradients, its inputs)."""
    x, u = (make((2, 4, 3, 3), torch.float32, "contiguous", device=dev, requires_grad=True, seed=s) for s in (0, 1))
    k = make_k(2, device=dev, requires_grad=True)
    ws = make_focus_weights(4, device=dev, requires_grad=True)
    if op == "focus":
        return (x, *ws)
    if op == "mlp":
        return (x.detach().mean((2, 3)).requires_grad_(), *ws)
    if op == "bn_residual_gate_pool":
        w, b = torch.ones(4, device=dev, requires_grad=True), torch.zeros(4, device=dev, requires_grad=True)
        return (x, u, k, w, b)
    return (x, u, k)


@pytest.mark.parametrize("op", ["gate", "gate_pool", "residual_gate_pool", "bn_residual_gate_pool", "focus", "mlp"])
def test_backend_runs_its_own_kernels(target, op):
    """The value tests compare a backend with the reference, so a backend whose table pointed at
    the reference would pass them all: a fused backend's forward and backward must reach its own
    ops (torch.ops.fanet for cpu and cuda, torch.ops.fanet_triton for triton).  Triton's mlp is
    documented as plain PyTorch (a few tiny matrix products)."""
    backend, dev = target
    ns = "fanet_triton" if backend == "triton" else "fanet"
    inputs = _wiring_call(op, dev)
    with _OpLog() as log:
        outs = getattr(ops, op)(*inputs, backend=backend)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.grad(sum(o.sum() for o in outs), inputs)
    if backend == "triton" and op == "mlp":
        assert not any(n.startswith("fanet") for n in log.names), log.names
        return
    assert {f"{ns}::{op}", f"{ns}::{op}_backward"} <= log.names, log.names


def test_func_transforms_run_the_reference(target):
    """torch.func transforms cannot run the fused ops' autograd: inside one, ``auto`` picks the
    reference backend (modules included), and naming a fused backend raises an error that says so."""
    backend, dev = target
    x, u = (make((2, 3, 4, 4), torch.float32, "contiguous", device=dev, seed=s) for s in (0, 1))
    k = make_k(2, device=dev)
    g = torch.func.grad(lambda a: ops.gate(a, u, k).sum())(x)
    torch.testing.assert_close(g, (1 - k).view(-1, 1, 1, 1).expand_as(x))
    with pytest.raises(RuntimeError, match=f"backend '{backend}' cannot run inside torch.func's grad"):
        torch.func.grad(lambda a: ops.gate(a, u, k, backend=backend).sum())(x)
    # vmap alone runs the fused ops (ensembles of models): as the reference, batch entry by entry
    xs = torch.stack([x, u])
    with fk.use_backend(backend):
        got = torch.func.vmap(lambda a: ops.gate_pool(a, u, k))(xs)
    for g_, r_ in zip(got, torch.func.vmap(lambda a: reference.gate_pool(a, u, k))(xs)):
        torch.testing.assert_close(g_, r_)
    gate = fk.FAGate(3, 1).to(dev)
    params = dict(gate.named_parameters())
    got = torch.func.grad(lambda p: torch.func.functional_call(gate, p, (x, u)).out.sum())(params)
    gate(x, u).out.sum().backward()  # the same gate outside the transform: the fused backend
    for name, p in gate.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-6)


# ---- the backend switch ---------------------------------------------------------------------
def test_auto_resolves_to_compiled_cpu_backend():
    assert fk.get_backend("cpu") == "cpu"


def test_set_and_use_backend():
    before = fk.backends.active_setting()
    with fk.use_backend("reference"):
        assert fk.get_backend() == "reference"
    assert fk.backends.active_setting() == before
    with pytest.raises(ValueError, match="'name'"):
        fk.set_backend("fastest")
    with pytest.raises(ValueError, match="'backend'"):
        ops.gate(torch.randn(1, 1, 1, 1), torch.randn(1, 1, 1, 1), torch.rand(1), backend="gpu")


def _run_python(code: str, env_extra: dict) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_env_variable_selects_backend():
    r = _run_python("import fanet_kernels as f; print(f.get_backend())", {"FANET_BACKEND": "reference"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "reference"
    r = _run_python("import fanet_kernels", {"FANET_BACKEND": "bogus"})
    assert r.returncode != 0 and "FANET_BACKEND" in r.stderr


def test_missing_extension_falls_back_with_one_warning():
    code = (
        "import sys, warnings; sys.modules['fanet_kernels._C'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import fanet_kernels as f, torch\n"
        "    x = torch.randn(1, 2, 3, 3); out = f.gate(x, x, torch.rand(1)); f.gate(x, x, torch.rand(1))\n"
        "print(f.get_backend(), sum('pip install -e .' in str(m.message) for m in w))\n")
    r = _run_python(code, {})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["reference", "1"]
