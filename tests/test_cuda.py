"""CUDA-only tests of the CUDA backend (SPEC §4): alignment, mixed dtypes, empty batch, streams, devices.

The op cases shared with the CPU backends (forward/backward vs the reference, opcheck, gradcheck,
torch.compile, bad inputs) run on CUDA tensors in test_ops.py (targets "cuda-cuda", "triton-cuda").
Run with ``pytest -m cuda -rs``.  Without a GPU (or without the CUDA kernels built into
fanet_kernels._C) the whole module is skipped and ``-rs`` prints why.
"""
from __future__ import annotations

import pytest
import torch

import fanet_kernels as fk
from fanet_kernels import ops, reference
from op_cases import DTYPES, SHAPES, TOL, cuda_skip_reason, grad_tol, grads, make, make_focus_weights, make_k

_REASON = cuda_skip_reason("cuda")
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

DEV = "cuda"
B = "cuda"


def _misaligned(shape, dtype, layout, seed=0):
    """A tensor of ``shape`` in ``layout`` whose data starts one element into its storage, so it is
    not 16-byte aligned (the kernels' scalar path)."""
    n, c, h, w = shape
    flat = make((n + 1, c, h, w), dtype, layout, device=DEV, seed=seed).flatten()[1:1 + n * c * h * w]
    t = flat.view(shape) if layout == "contiguous" else flat.view(n, h, w, c).permute(0, 3, 1, 2)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert t.data_ptr() % 16 != 0 and t.is_contiguous(memory_format=fmt)
    return t


# ---- forward (CUDA-only cases) -------------------------------------------------------------
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dname", list(DTYPES))
def test_misaligned_inputs_take_the_scalar_path(dname, layout):
    """A view starting one element into its storage is not 16-byte aligned."""
    dtype, shape = DTYPES[dname], (3, 16, 8, 8)
    x, u = _misaligned(shape, dtype, layout), _misaligned(shape, dtype, layout, seed=1)
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


# residual_gate_pool against the CPU kernels (the same fa_math.h arithmetic): every kernel variant
# of the residual op, i.e. both layouts, packed and scalar paths, and its backward with grad_out
# only (no fold), grad_pooled only and both (fold).  The backward of the shared test_ops.py cases
# vs the reference covers the math; this covers the CUDA instantiations.
@pytest.mark.parametrize("grads_of", ["out", "pooled", "both"])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dname", list(DTYPES))
def test_residual_gate_pool_matches_cpu_kernels(dname, layout, aligned, grads_of):
    dtype, shape = DTYPES[dname], (3, 16, 8, 8)
    if aligned:
        x, b = make(shape, dtype, layout, device=DEV), make(shape, dtype, layout, device=DEV, seed=1)
    else:
        x, b = _misaligned(shape, dtype, layout), _misaligned(shape, dtype, layout, seed=1)
    k = make_k(3, device=DEV)
    out, pooled = torch.ops.fanet.residual_gate_pool(x, b, k)
    want_out, want_pooled = torch.ops.fanet.residual_gate_pool(x.cpu(), b.cpu(), k.cpu())
    torch.testing.assert_close(out.cpu(), want_out, **TOL[dtype])
    torch.testing.assert_close(pooled.cpu(), want_pooled, **TOL[dtype])
    g = make(shape, dtype, layout, device=DEV, seed=3) if grads_of != "pooled" else None
    gp = make((3, 16, 1, 1), dtype, "contiguous", device=DEV, seed=4).view(3, 16) if grads_of != "out" else None
    got = torch.ops.fanet.residual_gate_pool_backward(g, gp, x, b, k)
    want = torch.ops.fanet.residual_gate_pool_backward(None if g is None else g.cpu(), None if gp is None else gp.cpu(),
                                                       x.cpu(), b.cpu(), k.cpu())
    for a, w in zip(got[:2], want[:2]):
        torch.testing.assert_close(a.cpu(), w, **TOL[dtype])
    torch.testing.assert_close(got[2].cpu(), want[2], **grad_tol(dtype))


def test_residual_gate_pool_relu_boundary():
    """branch + x == 0 exactly: relu's gradient is 0 there (torch's rule); NaN propagates."""
    x = make((2, 8, 4, 4), torch.float32, "contiguous", device=DEV)
    b = make((2, 8, 4, 4), torch.float32, "contiguous", device=DEV, seed=1)
    tie = torch.zeros_like(x, dtype=torch.bool)
    tie[:, ::2] = True
    b = torch.where(tie, -x, b)
    b[1, 1, 0, 0] = float("nan")
    k = make_k(2, device=DEV)
    g = torch.ones_like(x)
    gx, gb, gk = torch.ops.fanet.residual_gate_pool_backward(g, None, x, b, k)
    assert (gb[tie] == 0).all()
    assert gb[1, 1, 0, 0] == k[1]  # NaN > 0 is false but NaN passes (threshold_backward)
    want = torch.ops.fanet.residual_gate_pool_backward(g.cpu(), None, x.cpu(), b.cpu(), k.cpu())
    for a, w in zip((gx, gb), want[:2]):
        torch.testing.assert_close(a.cpu(), w, **TOL[torch.float32], equal_nan=True)
    torch.testing.assert_close(gk.cpu(), want[2], **grad_tol(torch.float32), equal_nan=True)
    assert torch.isnan(gk[1]) and not torch.isnan(gk[0])
    out, pooled = torch.ops.fanet.residual_gate_pool(x, b, k)
    torch.testing.assert_close(out.cpu(), reference.residual_gate_pool(x, b, k)[0].cpu(), **TOL[torch.float32],
                               equal_nan=True)


def test_mixed_dtypes_k_and_weights():
    """k and the focus weights may have another floating dtype than x (converted to acc)."""
    x = make((2, 8, 5, 5), torch.float16, "channels_last", device=DEV)
    u = make((2, 8, 5, 5), torch.float16, "channels_last", device=DEV, seed=1)
    k = make_k(2, torch.float64, device=DEV)
    ws = make_focus_weights(8, torch.bfloat16, device=DEV)
    torch.testing.assert_close(ops.gate(x, u, k, backend=B), reference.gate(x, u, k), **TOL[torch.float16])
    torch.testing.assert_close(ops.focus(x, *ws, backend=B), reference.focus(x, *ws), **TOL[torch.float16])


# ---- backward (CUDA-only cases) ------------------------------------------------------------
@pytest.mark.parametrize("op", ["gate", "gate_pool", "residual_gate_pool", "focus"])
def test_backward_empty_batch(op):
    shape = SHAPES["N0"]
    if op == "focus":
        inputs = [make(shape, torch.float32, "contiguous", device=DEV, requires_grad=True),
                  *make_focus_weights(shape[1], device=DEV, requires_grad=True)]
    else:
        inputs = [make(shape, torch.float32, "contiguous", device=DEV, requires_grad=True, seed=s) for s in (0, 1)]
        inputs.append(make_k(0, device=DEV, requires_grad=True))
    fused = grads(lambda *a: getattr(ops, op)(*a, backend=B), inputs)
    ref = grads(getattr(reference, op), inputs)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b)


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


# ---- the backend switch ---------------------------------------------------------------------
def test_auto_picks_a_fused_backend_for_cuda_tensors():
    assert fk.get_backend("cuda") in ("triton", "cuda")
