"""Accuracy of the long reductions (pools, grad_k, the BatchNorm's sums, the focus pool) at plane
sizes up to 2048x2048, against float64.

Every quantity is computed three ways from the same float32 inputs: by the backend under test, by
the reference backend in float32 (ATen: torch.mean's cascade sum) and by the reference backend in
float64 (the truth).  The backend's worst error must be within 4x ATen's, or within a few ulp of the
result where ATen happens to land closer.  A sum kept in one float32 accumulator over a whole plane
(or over a sample's rows in channels_last) drifts far past that as H*W grows.  Inputs carry a mean
offset (randn + 3) so that the rounding of a growing running sum shows.
"""
from __future__ import annotations

import pytest
import torch
from op_cases import TARGETS

from fanet_kernels import ops

ULPS = 4  # the floor of the bound, in units of float32 eps times the result's magnitude
# (C, layout): an NCHW plane, channels_last rows shorter than a SIMD step (walked row by row) and
# channels_last with C dividing the step (walked as one stream, csrc/cpu spans_rows).
LAYOUTS = [(3, "contiguous"), (3, "channels_last"), (8, "channels_last")]
SIDES = (64, 512, 2048)
SMALL_SIDES = (64, 256)  # the Triton interpreter simulates every program in numpy


def _cases():
    for target in TARGETS:
        (backend, device), marks = target.values[0], target.marks
        for side in SMALL_SIDES if (backend, device) == ("triton", "cpu") else SIDES:
            for c, layout in LAYOUTS:
                yield pytest.param((backend, device), side, c, layout, marks=marks,
                                   id=f"{backend}-{device}-{side}x{side}-C{c}-{layout}")


CASES = list(_cases())


def _randn(shape, layout: str, gen: torch.Generator, device: str, offset: float = 0.0,
           scale: float = 1.0) -> torch.Tensor:
    t = (torch.randn(shape, generator=gen) * scale + offset).to(device)
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


def _check(name: str, ours: torch.Tensor, aten: torch.Tensor, truth: torch.Tensor) -> list[str]:
    """[] if ours is within the bound, else [what is off]."""
    truth = truth.detach().double()
    err = (ours.detach().double() - truth).abs().max().item()
    aten_err = (aten.detach().double() - truth).abs().max().item()
    floor = ULPS * torch.finfo(torch.float32).eps * truth.abs().max().item()
    if err <= max(4 * aten_err, floor):
        return []
    bound = f"max(4 x ATen's, {ULPS} ulp = {floor:.3g})"
    return [f"{name}: max error {err:.3g}, ATen's float32 {aten_err:.3g}, bound {bound}"]


def _run(backend: str, fn, inputs, cotangents):
    """fn's outputs on inputs (made leaves, cast to float64 for the truth) and the gradients of
    sum(out_i * cotangent_i) with respect to the inputs."""
    dtype = torch.float64 if backend == "truth" else torch.float32
    leaves = [t.detach().to(dtype).requires_grad_(t.dtype.is_floating_point) for t in inputs]
    outs = fn(*leaves, backend="reference" if backend in ("truth", "aten") else backend)
    loss = sum((o * c.to(dtype)).sum() for o, c in zip(outs, cotangents))
    return outs, torch.autograd.grad(loss, leaves)


def _compare(backend: str, fn, inputs, cotangents, outs: dict[str, int], grads: dict[str, int]) -> list[str]:
    """_check of fn's outputs outs[name] and of its gradients with respect to inputs[grads[name]]."""
    ours, aten, truth = (_run(b, fn, inputs, cotangents) for b in (backend, "aten", "truth"))
    return [m for part, names in enumerate((outs, grads)) for name, i in names.items()
            for m in _check(name, ours[part][i], aten[part][i], truth[part][i])]


@pytest.mark.parametrize("op, seed, u_scale, k_value",
                         [("gate_pool", 0, 5.0, 0.3), ("residual_gate_pool", 1, 1.0, 0.6)])
@pytest.mark.parametrize("target,side,c,layout", CASES)
def test_gate_pools(target, side, c, layout, op, seed, u_scale, k_value):
    """gate_pool (u) and residual_gate_pool (the branch): pooled means and grad_k."""
    backend, dev = target
    fn = getattr(ops, op)
    gen = torch.Generator().manual_seed(seed)
    shape = (1, c, side, side)
    x, u = _randn(shape, layout, gen, dev, 3.0), _randn(shape, layout, gen, dev, u_scale)
    k = torch.full((1,), k_value, device=dev)
    out, pooled = fn(x, u, k, backend=backend)
    bad = _check("pooled", pooled, out.mean((2, 3)), out.double().mean((2, 3)))  # torch.mean on the same floats
    cot = (_randn(shape, layout, gen, dev, 1.0), torch.randn((1, c), generator=gen).to(dev))
    bad += _compare(backend, fn, (x, u, k), cot, {}, {"grad_k": 2})
    assert not bad, "; ".join(bad)


@pytest.mark.parametrize("target,side,c,layout", CASES)
def test_bn_residual_gate_pool(target, side, c, layout):
    backend, dev = target
    gen = torch.Generator().manual_seed(2)
    shape = (1, c, side, side)
    x, z = _randn(shape, layout, gen, dev, 3.0), _randn(shape, layout, gen, dev, 5.0, 2.0)
    k = torch.full((1,), 0.6, device=dev)
    weight = (1 + 0.1 * torch.randn(c, generator=gen)).to(dev)
    bias = (0.5 + 0.1 * torch.randn(c, generator=gen)).to(dev)

    def fn(x, z, k, weight, bias, *, backend):
        # momentum 1: the running stats become the batch mean and the unbiased batch variance
        mean, var = torch.zeros(c, dtype=x.dtype, device=dev), torch.ones(c, dtype=x.dtype, device=dev)
        out, pooled = ops.bn_residual_gate_pool(x, z, k, weight, bias, mean, var, True, 1.0, backend=backend)
        return out, pooled, mean, var

    out, pooled, _, _ = fn(x, z, k, weight, bias, backend=backend)
    bad = _check("pooled", pooled, out.mean((2, 3)), out.double().mean((2, 3)))
    cot = (_randn(shape, layout, gen, dev, 1.0), torch.randn((1, c), generator=gen).to(dev),
           torch.zeros(c, device=dev), torch.zeros(c, device=dev))
    bad += _compare(backend, fn, (x, z, k, weight, bias), cot,
                    {"batch mean": 2, "batch var": 3}, {"grad_k": 2, "grad_weight": 3, "grad_bias": 4})
    assert not bad, "; ".join(bad)


@pytest.mark.parametrize("target,side,c,layout", CASES)
def test_focus(target, side, c, layout):
    """k' = sigmoid(w2 . relu(w1 . l + b1) + b2) with w1 = I, w2 = 1 / C, b2 = -mean(l): k' is near 1/2 and
    moves with every channel mean l[c]; grad_w1[j, c] = grad_h[j] * l[c] carries l itself."""
    backend, dev = target
    gen = torch.Generator().manual_seed(3)
    x = _randn((1, c, side, side), layout, gen, dev, 3.0)
    w1, b1 = torch.eye(c, device=dev), torch.zeros(c, device=dev)
    w2, b2 = torch.full((1, c), 1.0 / c, device=dev), torch.full((1,), -3.0, device=dev)
    bad = _compare(backend, lambda *a, backend: (ops.focus(*a, backend=backend),), (x, w1, b1, w2, b2),
                   (torch.ones(1, device=dev),), {"k'": 0}, {"grad_w1": 1})
    assert not bad, "; ".join(bad)
