"""The fused ops of every backend against the reference (SPEC §4).

Backends under test: every one that runs on CPU tensors here ("cpu", and "triton" under
TRITON_INTERPRET=1).  The CUDA backend runs the same cases in test_cuda.py.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fanet_kernels as fk
from fanet_kernels import ops, reference
from op_cases import DTYPES, LAYOUTS, SHAPES, TOL, make, make_focus_weights, make_k

FUSED = [b for b in fk.available_backends("cpu") if b != "reference"]
pytestmark = pytest.mark.skipif(not FUSED, reason="no fused backend built (see README: pip install -e .)")

# The Triton interpreter simulates every program in numpy: give it a smaller "large" case.
LARGE_FOR = {"triton": (2, 64, 64, 64)}


def shape_of(name: str, backend: str) -> tuple[int, ...]:
    return LARGE_FOR.get(backend, SHAPES[name]) if name == "large" else SHAPES[name]


def k_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def grad_tol(dtype: torch.dtype) -> dict:
    """Gradients reduced over H*W (pooled, grad_k, weight grads) get a looser bound."""
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-3)


@pytest.fixture(params=FUSED)
def backend(request) -> str:
    return request.param


def native_ops(backend: str):
    """The op namespace behind a backend (for opcheck)."""
    return {"cpu": torch.ops.fanet, "cuda": torch.ops.fanet}.get(backend) or getattr(torch.ops, f"fanet_{backend}")


# ---- forward ----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("sname", list(SHAPES))
def test_forward_matches_reference(backend, sname, dname, layout):
    dtype, shape = DTYPES[dname], shape_of(sname, backend)
    x, u = make(shape, dtype, layout, seed=0), make(shape, dtype, layout, seed=1)
    k = make_k(shape[0], k_dtype(dtype))
    ws = make_focus_weights(shape[1], k_dtype(dtype))

    out = ops.gate(x, u, k, backend=backend)
    out2, pooled = ops.gate_pool(x, u, k, backend=backend)
    kf = ops.focus(x, *ws, backend=backend)
    ref_out, ref_pooled = reference.gate_pool(x, u, k)

    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(out2, ref_out, **TOL[dtype])
    torch.testing.assert_close(pooled, ref_pooled, **TOL[dtype])
    torch.testing.assert_close(kf, reference.focus(x, *ws), **TOL[dtype])
    assert out.dtype == pooled.dtype == kf.dtype == dtype
    assert pooled.shape == shape[:2] and kf.shape == shape[:1]
    # out keeps x's memory format; any other stride pattern comes back contiguous.
    want = torch.channels_last if layout == "channels_last" and not x.is_contiguous() else torch.contiguous_format
    assert out.is_contiguous(memory_format=want) and out2.is_contiguous(memory_format=want)


# ---- backward ---------------------------------------------------------------------------
def _grads(fn, inputs, seed=5):
    """Gradients of sum(out_i * random_i) over fn's outputs, w.r.t. inputs."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("sname", [s for s in SHAPES if s != "N0"])
@pytest.mark.parametrize("op", ["gate", "gate_pool", "focus"])
def test_backward_matches_reference(backend, op, sname, dname, layout):
    dtype, shape = DTYPES[dname], shape_of(sname, backend)
    if op == "focus":
        inputs = [make(shape, dtype, layout, requires_grad=True),
                  *make_focus_weights(shape[1], k_dtype(dtype), requires_grad=True)]
    else:
        inputs = [make(shape, dtype, layout, requires_grad=True, seed=0),
                  make(shape, dtype, layout, requires_grad=True, seed=1),
                  make_k(shape[0], k_dtype(dtype), requires_grad=True)]
    fused = _grads(lambda *a: getattr(ops, op)(*a, backend=backend), inputs)
    ref = _grads(getattr(reference, op), inputs)
    for i, (a, b) in enumerate(zip(fused, ref)):
        elementwise = op != "focus" and i < 2  # grad_x, grad_u of the gate are per element
        tol = TOL[dtype] if elementwise else grad_tol(dtype)
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"gradient {i} of {op}: {m}")


@pytest.mark.parametrize("used", ["out", "pooled"])
def test_gate_pool_backward_with_one_output_unused(backend, used):
    x, u = make((2, 3, 5, 4), torch.float32, "contiguous", requires_grad=True, seed=0), \
        make((2, 3, 5, 4), torch.float32, "contiguous", requires_grad=True, seed=1)
    k = make_k(2, requires_grad=True)
    pick = 0 if used == "out" else 1
    fused = _grads(lambda *a: ops.gate_pool(*a, backend=backend)[pick], [x, u, k])
    ref = _grads(lambda *a: reference.gate_pool(*a)[pick], [x, u, k])
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, **grad_tol(torch.float32))


def test_backward_is_deterministic(backend):
    """grad_k is reduced without atomics: identical bits across runs and thread counts."""
    shape = shape_of("large", backend)
    for layout in ("contiguous", "channels_last"):
        x = make(shape, torch.float32, layout, requires_grad=True, seed=0)
        u = make(shape, torch.float32, layout, requires_grad=True, seed=1)
        k = make_k(shape[0], requires_grad=True)
        threads = torch.get_num_threads()
        results = []
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            try:
                results.append(_grads(lambda *a: ops.gate_pool(*a, backend=backend), [x, u, k]))
            finally:
                torch.set_num_threads(threads)
        for other in results[1:]:
            for a, b in zip(results[0], other):
                assert torch.equal(a, b)


# ---- torch.library.opcheck, gradcheck, torch.compile --------------------------------------
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("op", ["gate", "gate_pool", "focus"])
def test_opcheck(backend, op, layout):
    shape = (2, 6, 3, 5)
    x = make(shape, torch.float32, layout, requires_grad=True)
    if op == "focus":
        args = (x, *make_focus_weights(6, requires_grad=True))
    else:
        args = (x, make(shape, torch.float32, layout, requires_grad=True, seed=1), make_k(2, requires_grad=True))
    torch.library.opcheck(getattr(native_ops(backend), op).default, args)


@pytest.mark.parametrize("op", ["gate_backward", "gate_pool_backward", "focus_backward"])
def test_opcheck_backward_ops(op):
    if "cpu" not in FUSED:
        pytest.skip("the C++ ops are not built")
    shape = (2, 4, 3, 3)
    x, u, g = (make(shape, torch.float32, "contiguous", seed=s) for s in range(3))
    k = make_k(2)
    if op == "gate_backward":
        args = (g, x, u, k)
    elif op == "gate_pool_backward":
        args = (g, torch.randn(2, 4), x, u, k)
    else:
        args = (torch.randn(2), x, *make_focus_weights(4))
    torch.library.opcheck(getattr(torch.ops.fanet, op).default, args)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_float64(backend, layout):
    shape = (2, 3, 4, 5)
    x = make(shape, torch.float64, layout, requires_grad=True)
    u = make(shape, torch.float64, layout, requires_grad=True, seed=1)
    k = make_k(2, torch.float64, requires_grad=True)
    ws = make_focus_weights(3, torch.float64, requires_grad=True, r1=1)
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


def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    model = _TinyFA(4, backend)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    (g_eager,) = torch.autograd.grad(eager.sum(), x)
    (g_comp,) = torch.autograd.grad(compiled.sum(), x)
    torch.testing.assert_close(g_comp, g_eager, rtol=1e-5, atol=1e-5)


# ---- bad input: an error that names the argument, never a crash ---------------------------
def _bad_gate_cases():
    x = torch.randn(2, 3, 4, 4)
    u, k = torch.randn_like(x), torch.rand(2)
    return {
        "x 3-D": ((x[0], u[0], k), "'x'"),
        "x integer": ((x.long(), u.long(), k), "'x'"),
        "u shape": ((x, u[:, :2], k), "'u'"),
        "u dtype": ((x, u.double(), k), "'u'"),
        "u device": ((x, u.to("meta"), k), "'u'"),
        "k shape": ((x, u, torch.rand(3)), "'k'"),
        "k 2-D": ((x, u, torch.rand(2, 1)), "'k'"),
        "k integer": ((x, u, torch.ones(2, dtype=torch.int64)), "'k'"),
        "H*W = 0": ((x[:, :, :0], u[:, :, :0], k), "'x'"),
    }


def _bad_focus_cases():
    x = torch.randn(2, 8, 4, 4)
    w1, b1, w2, b2 = make_focus_weights(8)
    return {
        "x 2-D": ((x[:, :, 0, 0], w1, b1, w2, b2), "'x'"),
        "x integer": ((x.int(), w1, b1, w2, b2), "'x'"),
        "w1 C": ((x, w1[:, :7], b1, w2, b2), "'w1'"),
        "b1 shape": ((x, w1, b1[:1], w2, b2), "'b1'"),
        "w2 shape": ((x, w1, b1, w2.t(), b2), "'w2'"),
        "b2 shape": ((x, w1, b1, w2, torch.zeros(2)), "'b2'"),
        "b1 dtype": ((x, w1, b1.double(), w2, b2), "'b1'"),
    }


BAD_ERRORS = (ValueError, TypeError, RuntimeError)


@pytest.mark.parametrize("case", list(_bad_gate_cases()))
@pytest.mark.parametrize("op", ["gate", "gate_pool"])
def test_bad_gate_input_names_argument(backend, op, case):
    args, name = _bad_gate_cases()[case]
    with pytest.raises(BAD_ERRORS, match=name):
        getattr(ops, op)(*args, backend=backend)
    with pytest.raises(BAD_ERRORS, match=name):  # the raw op, bypassing the Python checks
        getattr(native_ops(backend), op)(*args)


@pytest.mark.parametrize("case", list(_bad_focus_cases()))
def test_bad_focus_input_names_argument(backend, case):
    args, name = _bad_focus_cases()[case]
    with pytest.raises(BAD_ERRORS, match=name):
        ops.focus(*args, backend=backend)
    with pytest.raises(BAD_ERRORS, match=name):
        native_ops(backend).focus(*args)


# ---- the backend switch ---------------------------------------------------------------------
def test_auto_resolves_to_compiled_cpu_backend():
    assert fk.get_backend("cpu") == "cpu"


def test_set_and_use_backend():
    before = fk.backends.active_setting()
    with fk.use_backend("reference"):
        assert fk.get_backend() == "reference"
    assert fk.backends.active_setting() == before
    with pytest.raises(ValueError, match="'backend'"):
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
