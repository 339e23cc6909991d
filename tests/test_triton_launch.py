"""How the Triton backend launches, which a GPU would expose and the interpreter hides:
every launch runs on the tensors' device, and no launch config of a kernel that reduces is chosen
by timing (so sums depend on shapes and dtypes alone, in every process).

Without a GPU these run under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from op_cases import make, make_focus_weights, make_k, triton_device

DEVICE = triton_device()

import triton  # noqa: E402

from fanet_kernels.triton import bn_gate as ft_bn  # noqa: E402
from fanet_kernels.triton import common  # noqa: E402
from fanet_kernels.triton import focus as ft_focus  # noqa: E402
from fanet_kernels.triton import gate as ft_gate  # noqa: E402

MODULES = (common, ft_gate, ft_bn, ft_focus)


def _op_calls():
    """(name, call) for every fanet_triton op, forward and backward, on small inputs of DEVICE."""
    shape = (2, 5, 3, 4)
    x, u, z = (make(shape, torch.float32, "channels_last", device=DEVICE, seed=s) for s in (0, 1, 2))
    k = make_k(2, device=DEVICE)
    g, gp = make(shape, torch.float32, "contiguous", device=DEVICE, seed=3), torch.randn(2, 5, device=DEVICE)
    ws = make_focus_weights(5, device=DEVICE)
    w, b = torch.rand(5, device=DEVICE) + 0.5, torch.randn(5, device=DEVICE)
    rm, rv = torch.zeros(5, device=DEVICE), torch.ones(5, device=DEVICE)
    mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False)
    se = (torch.randn(2, 5, device=DEVICE), torch.randn(2, device=DEVICE), torch.randn(5, 2, device=DEVICE),
          torch.randn(5, device=DEVICE))
    z_mean = torch.randn(2, 5, device=DEVICE)
    ops = torch.ops.fanet_triton
    return [
        ("gate", lambda: ops.gate(x, u, k)),
        ("gate_pool", lambda: ops.gate_pool(x, u, k)),
        ("residual_gate_pool", lambda: ops.residual_gate_pool(x, u, k)),
        ("bn_residual_gate_pool", lambda: ops.bn_residual_gate_pool(x, z, k, w, b, rm, rv, True, 1e-5)),
        ("focus", lambda: ops.focus(x, *ws)),
        ("gate_backward", lambda: ops.gate_backward(g, x, u, k)),
        ("gate_pool_backward", lambda: ops.gate_pool_backward(g, gp, x, u, k)),
        ("residual_gate_pool_backward", lambda: ops.residual_gate_pool_backward(g, gp, x, u, k)),
        ("bn_residual_gate_pool_backward",
         lambda: ops.bn_residual_gate_pool_backward(g, gp, x, z, k, w, b, mean, var, True, 1e-5)),
        ("focus_backward", lambda: ops.focus_backward(torch.randn(2, device=DEVICE), x, *ws)),
        ("bn_se_residual_gate_pool", lambda: ops.bn_se_residual_gate_pool(x, z, k, w, b, *se, rm, rv, True, 1e-5)),
        ("bn_se_residual", lambda: ops.bn_se_residual(x, z, w, b, *se, rm, rv, True, 1e-5)),
        ("bn_se_residual_gate_pool_backward",
         lambda: ops.bn_se_residual_gate_pool_backward(g, gp, x, z, k, w, b, *se, mean, var, z_mean, True, 1e-5)),
        ("bn_se_residual_backward",
         lambda: ops.bn_se_residual_backward(g, x, z, w, b, *se, mean, var, z_mean, True, 1e-5)),
    ]


def test_every_op_is_covered():
    """_op_calls names every op the backend registers, so a new op cannot skip the checks here."""
    registered = {v._name for m in MODULES for v in vars(m).values()
                  if isinstance(v, torch._library.custom_ops.CustomOpDef)}
    assert registered == {name for name, _ in _op_calls()}


@pytest.mark.parametrize("name, call", _op_calls(), ids=[n for n, _ in _op_calls()])
def test_every_launch_runs_under_the_tensors_device(name, call, monkeypatch):
    """Triton launches on the current device, so each op must make its tensors' device current
    (device_of) around its launches: launch() records the device it finds."""
    seen = []
    real = common.guarded_device

    def spy():
        seen.append(real())
        return seen[-1]

    monkeypatch.setattr(common, "guarded_device", spy)
    call()
    assert seen, f"{name} launched no kernel"
    assert all(d == torch.device(DEVICE) or (d is not None and d.type == DEVICE) for d in seen), seen


def test_launch_outside_device_of_fails():
    x = torch.zeros(4, device=DEVICE)
    with pytest.raises(RuntimeError, match="outside device_of"):
        common.launch(ft_gate._gate_flat_kernel, (1,), x, x, x, x, 4, 4, INT64=False, BLOCK=4,
                       ACC=common.acc_tl(x.dtype), num_warps=1)


def test_device_of_makes_a_cuda_tensors_device_current(monkeypatch):
    """On CUDA tensors device_of enters torch.cuda.device(t.device) (shown without a GPU with a
    stand-in tensor on cuda:1 and a recording torch.cuda.device)."""
    entered = []

    @contextlib.contextmanager
    def fake_cuda_device(device):
        entered.append(torch.device(device))
        yield

    class OnCuda1:
        device = torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "device", fake_cuda_device)
    with common.device_of(OnCuda1()):
        assert common.guarded_device() == torch.device("cuda", 1)
        with common.device_of(torch.zeros(1)):  # nested: the inner tensor's device, then back
            assert common.guarded_device() == torch.device("cpu")
        assert common.guarded_device() == torch.device("cuda", 1)
    assert entered == [torch.device("cuda", 1)] and common.guarded_device() is None


def _kernels():
    return {name: v for m in MODULES for name, v in vars(m).items()
            if common._is_jit(v) and name.endswith("kernel")}


def test_no_reducing_kernel_is_autotuned():
    """num_warps decides how tl.sum associates: a kernel that reduces must get it from the shape
    heuristic (pool_config, flat_config, warps_for), never from timing, or its sums could differ
    between processes and DDP ranks.  maybe_autotune refuses such kernels; this checks that the
    kernels it wraps reduce nothing, and that the detection sees reductions inside helpers."""
    kernels = _kernels()
    reducing = {n for n, k in kernels.items() if common.reductions_in(k)}
    assert {"pool_kernel", "_gate_bwd_kernel", "_moments_kernel", "_norm_gate_bwd_kernel",
            "_focus_fused_kernel", "_focus_mlp_kernel"} <= reducing  # via tile_sum / _focus_mlp too
    tuned = {common._jit_fn(k).fn.__name__ for k in common.TUNED}
    assert tuned and not (tuned & reducing)
    for name, kernel in kernels.items():  # with a driver, only the tuned ones become Autotuners
        if isinstance(kernel, triton.runtime.Autotuner):
            assert name in tuned


def test_maybe_autotune_refuses_a_reducing_kernel(monkeypatch):
    monkeypatch.setattr(common, "AUTOTUNE", True)
    with pytest.raises(TypeError, match="reduces"):
        common.maybe_autotune(key=["C"])(common.pool_kernel)


@pytest.mark.parametrize("shape", [(1, 3, 7, 7), (8, 64, 32, 32), (256, 2048, 7, 7), (1, 16, 512, 512)])
def test_launch_configs_are_functions_of_the_shape(shape, monkeypatch):
    """The heuristic reads shapes only: not the device, the SM count or the clock."""
    n, c, h, w = shape
    first = [common.pool_config(n, c, h * w, cl, common.GPU_SIZES) for cl in (False, True)]
    first.append(common.flat_config(n, c * h * w, common.GPU_SIZES))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: pytest.fail("read the device"))
    again = [common.pool_config(n, c, h * w, cl, common.GPU_SIZES) for cl in (False, True)]
    again.append(common.flat_config(n, c * h * w, common.GPU_SIZES))
    assert first == again
