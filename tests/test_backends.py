"""The backend switch and the wiring behind it: ``set_backend``/``use_backend``, FANET_BACKEND,
``auto``, a missing extension, torch.func transforms, each fused backend running its own kernels,
and the C++ ops' autograd (SPEC §4).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from op_cases import NATIVE_TARGETS, NEEDS_CPU, cuda_skip_reason, make, make_focus_weights, make_k
from torch.utils._python_dispatch import TorchDispatchMode

import fanet_kernels as fk
from fanet_kernels import ops, reference

OPS = ["gate", "gate_pool", "residual_gate_pool", "bn_residual_gate_pool", "focus", "mlp"]


def _inputs(op: str, dev: str) -> tuple[torch.Tensor, ...]:
    """Small inputs of ops.<op> that require gradients."""
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


class _OpLog(TorchDispatchMode):
    """Records "namespace::name" of every op that reaches dispatch."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(f"{func.namespace}::{func._opname}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op", OPS)
def test_backend_runs_its_own_kernels(target, op):
    """The value tests compare a backend with the reference, so a backend whose table pointed at
    the reference (or at a fallback built from other ops) would pass them all: a fused backend's
    forward and backward must reach its own ops (torch.ops.fanet for cpu and cuda,
    torch.ops.fanet_triton for triton).  Triton's mlp is documented as plain PyTorch (a few tiny
    matrix products)."""
    backend, dev = target
    ns = "fanet_triton" if backend == "triton" else "fanet"
    inputs = _inputs(op, dev)
    with _OpLog() as log:
        outs = getattr(ops, op)(*inputs, backend=backend)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.grad(sum(o.sum() for o in outs), inputs)
    if backend == "triton" and op == "mlp":
        assert not any(n.startswith("fanet") for n in log.names), log.names
        return
    assert {f"{ns}::{op}", f"{ns}::{op}_backward"} <= log.names, log.names


@pytest.mark.parametrize("target", NATIVE_TARGETS)
@pytest.mark.parametrize("op", OPS[:3] + ["bn_residual_gate_pool-train", "bn_residual_gate_pool-eval"] + OPS[4:])
def test_native_autograd_is_a_cpp_node_of_first_derivatives(target, op):
    """csrc/autograd.cpp, not a Python formula, differentiates the C++ ops (a Python autograd formula
    would cost ~50 us more per forward + backward, more than the kernels at small shapes).  First
    derivatives only: with create_graph=True the gradients are the usual ones, and a backward
    through them raises instead of treating them as constants (a silently wrong result)."""
    name, _, mode = op.partition("-")
    inputs = _inputs(name, target[1])
    fn = getattr(torch.ops.fanet, name)
    if mode:
        stats = (torch.zeros(4, device=target[1]), torch.ones(4, device=target[1]))
        outs = fn(*inputs, *stats, mode == "train", 1e-5)[:2]
    else:
        outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    assert outs[0].grad_fn.name().startswith("torch::autograd::CppNode<fanet::"), outs[0].grad_fn.name()
    loss = sum(o.sum() for o in outs)
    first = torch.autograd.grad(loss, inputs, create_graph=True)
    expected = torch.autograd.grad(loss, inputs, retain_graph=True)
    for a, b in zip(first, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match=f"fanet::{name}_backward is not differentiable"):
        sum(g.sum() for g in first).backward()


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


# ---- the switch -----------------------------------------------------------------------------
@NEEDS_CPU
def test_auto_resolves_to_compiled_cpu_backend():
    assert fk.get_backend("cpu") == "cpu"


@pytest.mark.cuda
@pytest.mark.skipif(cuda_skip_reason("cuda") is not None, reason=cuda_skip_reason("cuda") or "")
def test_auto_picks_a_fused_backend_for_cuda_tensors():
    assert fk.get_backend("cuda") in ("triton", "cuda")


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
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, **env_extra), timeout=300)


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
