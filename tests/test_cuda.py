"""The CUDA backend against the reference: the cases of test_ops.py, on CUDA tensors (SPEC §4).

Run with ``pytest -m cuda -rs``.  Without a GPU (or without the CUDA kernels built into
fanet_kernels._C) the whole module is skipped and ``-rs`` prints why.
"""
from __future__ import annotations

import pytest
import torch

import fanet_kernels as fk
from fanet_kernels import ops, reference
from op_cases import DTYPES, LAYOUTS, SHAPES, TOL, make, make_focus_weights, make_k


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU: torch.cuda.is_available() is False"
    if "cuda" not in fk.available_backends("cuda"):
        return f"CUDA kernels not built: {fk.backends.unavailable_reason('cuda')}"
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

DEV = "cuda"
B = "cuda"


def k_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def grad_tol(dtype: torch.dtype) -> dict:
    """Gradients reduced over H*W (pooled, grad_k, weight grads) get a looser bound."""
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-3)


def _grads(fn, inputs, seed=5):
    """Gradients of sum(out_i * random_i) over fn's outputs, w.r.t. inputs."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    return torch.autograd.grad(loss, inputs)


# ---- forward ----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("sname", list(SHAPES))
def test_forward_matches_reference(sname, dname, layout):
    dtype, shape = DTYPES[dname], SHAPES[sname]
    x, u = make(shape, dtype, layout, device=DEV, seed=0), make(shape, dtype, layout, device=DEV, seed=1)
    k = make_k(shape[0], k_dtype(dtype), device=DEV)
    ws = make_focus_weights(shape[1], k_dtype(dtype), device=DEV)

    out = ops.gate(x, u, k, backend=B)
    out2, pooled = ops.gate_pool(x, u, k, backend=B)
    kf = ops.focus(x, *ws, backend=B)
    ref_out, ref_pooled = reference.gate_pool(x, u, k)

    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(out2, ref_out, **TOL[dtype])
    torch.testing.assert_close(pooled, ref_pooled, **TOL[dtype])
    torch.testing.assert_close(kf, reference.focus(x, *ws), **TOL[dtype])
    assert out.dtype == pooled.dtype == kf.dtype == dtype
    assert out.device == pooled.device == kf.device == x.device
    assert pooled.shape == shape[:2] and kf.shape == shape[:1]
    want = torch.channels_last if layout == "channels_last" and not x.is_contiguous() else torch.contiguous_format
    assert out.is_contiguous(memory_format=want) and out2.is_contiguous(memory_format=want)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dname", list(DTYPES))
def test_misaligned_inputs_take_the_scalar_path(dname, layout):
    """A view starting one element into its storage is not 16-byte aligned."""
    dtype, shape = DTYPES[dname], (3, 16, 8, 8)
    base_x, base_u = make((4, *shape[1:]), dtype, layout, device=DEV), make((4, *shape[1:]), dtype, layout,
                                                                             device=DEV, seed=1)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    flat_x, flat_u = base_x.flatten()[1:1 + base_x[:3].numel()], base_u.flatten()[1:1 + base_u[:3].numel()]
    x = flat_x.view(shape) if fmt == torch.contiguous_format else \
        flat_x.view(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)
    u = flat_u.view(shape) if fmt == torch.contiguous_format else \
        flat_u.view(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)
    assert x.data_ptr() % 16 != 0 and x.is_contiguous(memory_format=fmt)
    k = make_k(3, device=DEV)
    out, pooled = ops.gate_pool(x, u, k, backend=B)
    ref_out, ref_pooled = reference.gate_pool(x, u, k)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(pooled, ref_pooled, **TOL[dtype])
    gx, gu, gk = torch.ops.fanet.gate_pool_backward(x, torch.ones(3, 16, device=DEV, dtype=dtype), x, u, k)
    rx, ru, rk = torch.ops.fanet.gate_pool_backward(x.cpu(), torch.ones(3, 16, dtype=dtype), x.cpu(), u.cpu(),
                                                    k.cpu())
    for a, b in ((gx, rx), (gu, ru)):
        torch.testing.assert_close(a.cpu(), b, **TOL[dtype])
    torch.testing.assert_close(gk.cpu(), rk, **grad_tol(dtype))


def test_mixed_dtypes_k_and_weights():
    """k and the focus weights may have another floating dtype than x (converted to acc)."""
    x = make((2, 8, 5, 5), torch.float16, "channels_last", device=DEV)
    u = make((2, 8, 5, 5), torch.float16, "channels_last", device=DEV, seed=1)
    k = make_k(2, torch.float64, device=DEV)
    ws = make_focus_weights(8, torch.bfloat16, device=DEV)
    torch.testing.assert_close(ops.gate(x, u, k, backend=B), reference.gate(x, u, k), **TOL[torch.float16])
    torch.testing.assert_close(ops.focus(x, *ws, backend=B), reference.focus(x, *ws), **TOL[torch.float16])


# ---- backward ---------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("sname", [s for s in SHAPES if s != "N0"])
@pytest.mark.parametrize("op", ["gate", "gate_pool", "focus"])
def test_backward_matches_reference(op, sname, dname, layout):
    dtype, shape = DTYPES[dname], SHAPES[sname]
    if op == "focus":
        inputs = [make(shape, dtype, layout, device=DEV, requires_grad=True),
                  *make_focus_weights(shape[1], k_dtype(dtype), device=DEV, requires_grad=True)]
    else:
        inputs = [make(shape, dtype, layout, device=DEV, requires_grad=True, seed=0),
                  make(shape, dtype, layout, device=DEV, requires_grad=True, seed=1),
                  make_k(shape[0], k_dtype(dtype), device=DEV, requires_grad=True)]
    fused = _grads(lambda *a: getattr(ops, op)(*a, backend=B), inputs)
    ref = _grads(getattr(reference, op), inputs)
    for i, (a, b) in enumerate(zip(fused, ref)):
        elementwise = op != "focus" and i < 2
        tol = TOL[dtype] if elementwise else grad_tol(dtype)
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"gradient {i} of {op}: {m}")


@pytest.mark.parametrize("op", ["gate", "gate_pool", "focus"])
def test_backward_empty_batch(op):
    shape = SHAPES["N0"]
    if op == "focus":
        inputs = [make(shape, torch.float32, "contiguous", device=DEV, requires_grad=True),
                  *make_focus_weights(shape[1], device=DEV, requires_grad=True)]
    else:
        inputs = [make(shape, torch.float32, "contiguous", device=DEV, requires_grad=True, seed=s) for s in (0, 1)]
        inputs.append(make_k(0, device=DEV, requires_grad=True))
    fused = _grads(lambda *a: getattr(ops, op)(*a, backend=B), inputs)
    ref = _grads(getattr(reference, op), inputs)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("used", ["out", "pooled"])
def test_gate_pool_backward_with_one_output_unused(used):
    x = make((2, 3, 5, 4), torch.float32, "contiguous", device=DEV, requires_grad=True, seed=0)
    u = make((2, 3, 5, 4), torch.float32, "contiguous", device=DEV, requires_grad=True, seed=1)
    k = make_k(2, device=DEV, requires_grad=True)
    pick = 0 if used == "out" else 1
    fused = _grads(lambda *a: ops.gate_pool(*a, backend=B)[pick], [x, u, k])
    ref = _grads(lambda *a: reference.gate_pool(*a)[pick], [x, u, k])
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, **grad_tol(torch.float32))


@pytest.mark.parametrize("dname", ["f32", "bf16"])
def test_backward_is_deterministic(dname):
    """grad_k and the pools are reduced without atomics: identical bits on every run."""
    shape = SHAPES["large"]
    for layout in ("contiguous", "channels_last"):
        x = make(shape, DTYPES[dname], layout, device=DEV, requires_grad=True, seed=0)
        u = make(shape, DTYPES[dname], layout, device=DEV, requires_grad=True, seed=1)
        k = make_k(shape[0], device=DEV, requires_grad=True)
        ws = make_focus_weights(shape[1], device=DEV, requires_grad=True)
        runs = []
        for _ in range(3):
            fwd = ops.gate_pool(x, u, k, backend=B)
            grads = _grads(lambda *a: ops.gate_pool(*a, backend=B), [x, u, k])
            fgrads = _grads(lambda *a: ops.focus(*a, backend=B), [x, *ws])
            runs.append((*fwd, *grads, *fgrads))
        for other in runs[1:]:
            for a, b in zip(runs[0], other):
                assert torch.equal(a, b)


# ---- streams and devices ----------------------------------------------------------------------
def test_runs_on_the_current_stream():
    x, u = make((4, 32, 9, 9), torch.float32, "contiguous", device=DEV), \
        make((4, 32, 9, 9), torch.float32, "contiguous", device=DEV, seed=1)
    k = make_k(4, device=DEV)
    want_out, want_pooled = reference.gate_pool(x, u, k)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out, pooled = ops.gate_pool(x, u, k, backend=B)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out, want_out, **TOL[torch.float32])
    torch.testing.assert_close(pooled, want_pooled, **TOL[torch.float32])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on the tensors' device."""
    x, u = make((2, 8, 6, 6), torch.float32, "channels_last", device="cuda:1"), \
        make((2, 8, 6, 6), torch.float32, "channels_last", device="cuda:1", seed=1)
    k = make_k(2, device="cuda:1")
    ws = make_focus_weights(8, device="cuda:1")
    with torch.cuda.device(0):
        out, pooled = ops.gate_pool(x, u, k, backend=B)
        kf = ops.focus(x, *ws, backend=B)
    assert out.device == pooled.device == kf.device == x.device
    ref_out, ref_pooled = reference.gate_pool(x, u, k)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    torch.testing.assert_close(pooled, ref_pooled, **TOL[torch.float32])
    torch.testing.assert_close(kf, reference.focus(x, *ws), **TOL[torch.float32])


# ---- torch.library.opcheck, gradcheck, torch.compile --------------------------------------
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("op", ["gate", "gate_pool", "focus"])
def test_opcheck(op, layout):
    shape = (2, 6, 3, 5)
    x = make(shape, torch.float32, layout, device=DEV, requires_grad=True)
    if op == "focus":
        args = (x, *make_focus_weights(6, device=DEV, requires_grad=True))
    else:
        args = (x, make(shape, torch.float32, layout, device=DEV, requires_grad=True, seed=1),
                make_k(2, device=DEV, requires_grad=True))
    torch.library.opcheck(getattr(torch.ops.fanet, op).default, args)


@pytest.mark.parametrize("op", ["gate_backward", "gate_pool_backward", "focus_backward"])
def test_opcheck_backward_ops(op):
    shape = (2, 4, 3, 3)
    x, u, g = (make(shape, torch.float32, "contiguous", device=DEV, seed=s) for s in range(3))
    k = make_k(2, device=DEV)
    if op == "gate_backward":
        args = (g, x, u, k)
    elif op == "gate_pool_backward":
        args = (g, torch.randn(2, 4, device=DEV), x, u, k)
    else:
        args = (torch.randn(2, device=DEV), x, *make_focus_weights(4, device=DEV))
    torch.library.opcheck(getattr(torch.ops.fanet, op).default, args)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_float64(layout):
    shape = (2, 3, 4, 5)
    x = make(shape, torch.float64, layout, device=DEV, requires_grad=True)
    u = make(shape, torch.float64, layout, device=DEV, requires_grad=True, seed=1)
    k = make_k(2, torch.float64, device=DEV, requires_grad=True)
    ws = make_focus_weights(3, torch.float64, device=DEV, requires_grad=True, r1=1)
    assert torch.autograd.gradcheck(lambda *a: ops.gate(*a, backend=B), (x, u, k))
    assert torch.autograd.gradcheck(lambda *a: ops.gate_pool(*a, backend=B), (x, u, k))
    assert torch.autograd.gradcheck(lambda *a: ops.focus(*a, backend=B), (x, *ws))


class _TinyFA(torch.nn.Module):
    """A conv block gated with the fused ops, as an FA chain uses them."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)
        self.w1, self.b1 = torch.nn.Parameter(torch.randn(2, c) * 0.3), torch.nn.Parameter(torch.zeros(2))
        self.w2, self.b2 = torch.nn.Parameter(torch.randn(1, 2) * 0.3), torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        k = ops.focus(x, self.w1, self.b1, self.w2, self.b2, backend=B)
        out, pooled = ops.gate_pool(x, torch.relu(self.conv(x)), k, backend=B)
        return ops.gate(out, torch.relu(self.conv(out)), pooled.mean(1).sigmoid(), backend=B)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = _TinyFA(4).to(DEV)
    x = torch.randn(2, 4, 6, 6, device=DEV, requires_grad=True)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    (g_eager,) = torch.autograd.grad(eager.sum(), x)
    (g_comp,) = torch.autograd.grad(compiled.sum(), x)
    torch.testing.assert_close(g_comp, g_eager, rtol=1e-5, atol=1e-5)


# ---- bad input: an error that names the argument, never a crash ---------------------------
def _bad_gate_cases():
    x = torch.randn(2, 3, 4, 4, device=DEV)
    u, k = torch.randn_like(x), torch.rand(2, device=DEV)
    return {
        "x 3-D": ((x[0], u[0], k), "'x'"),
        "x integer": ((x.long(), u.long(), k), "'x'"),
        "u shape": ((x, u[:, :2], k), "'u'"),
        "u dtype": ((x, u.double(), k), "'u'"),
        "u device": ((x, u.cpu(), k), "'u'"),
        "k shape": ((x, u, torch.rand(3, device=DEV)), "'k'"),
        "k 2-D": ((x, u, torch.rand(2, 1, device=DEV)), "'k'"),
        "k integer": ((x, u, torch.ones(2, dtype=torch.int64, device=DEV)), "'k'"),
        "k device": ((x, u, k.cpu()), "'k'"),
        "H*W = 0": ((x[:, :, :0], u[:, :, :0], k), "'x'"),
    }


def _bad_focus_cases():
    x = torch.randn(2, 8, 4, 4, device=DEV)
    w1, b1, w2, b2 = make_focus_weights(8, device=DEV)
    return {
        "x 2-D": ((x[:, :, 0, 0], w1, b1, w2, b2), "'x'"),
        "x integer": ((x.int(), w1, b1, w2, b2), "'x'"),
        "w1 C": ((x, w1[:, :7], b1, w2, b2), "'w1'"),
        "b1 shape": ((x, w1, b1[:1], w2, b2), "'b1'"),
        "w2 shape": ((x, w1, b1, w2.t(), b2), "'w2'"),
        "b2 shape": ((x, w1, b1, w2, torch.zeros(2, device=DEV)), "'b2'"),
        "b1 dtype": ((x, w1, b1.double(), w2, b2), "'b1'"),
        "w1 device": ((x, w1.cpu(), b1, w2, b2), "'w1'"),
    }


BAD_ERRORS = (ValueError, TypeError, RuntimeError)


@pytest.mark.parametrize("case", list(_bad_gate_cases()) if _REASON is None else ["-"])
@pytest.mark.parametrize("op", ["gate", "gate_pool"])
def test_bad_gate_input_names_argument(op, case):
    args, name = _bad_gate_cases()[case]
    with pytest.raises(BAD_ERRORS, match=name):
        getattr(ops, op)(*args, backend=B)
    with pytest.raises(BAD_ERRORS, match=name):  # the raw op, bypassing the Python checks
        getattr(torch.ops.fanet, op)(*args)


@pytest.mark.parametrize("case", list(_bad_focus_cases()) if _REASON is None else ["-"])
def test_bad_focus_input_names_argument(case):
    args, name = _bad_focus_cases()[case]
    with pytest.raises(BAD_ERRORS, match=name):
        ops.focus(*args, backend=B)
    with pytest.raises(BAD_ERRORS, match=name):
        torch.ops.fanet.focus(*args)


# ---- the backend switch ---------------------------------------------------------------------
def test_auto_picks_a_fused_backend_for_cuda_tensors():
    assert fk.get_backend("cuda") in ("triton", "cuda")
