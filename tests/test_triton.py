"""Triton-specific tests: the launch heuristic, the int64-offset path, split reductions, the
two-kernel focus path and the interpreter-vs-driver guard.  The op contract itself (every op,
dtype and layout against the reference, opcheck, gradcheck) is tested by test_ops.py; the
residual_gate_pool op pair (the RESIDUAL flag of the gate kernels) is tested here in full.

Without a GPU these run under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1).
"""
from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import fanet_kernels as fk  # noqa: E402
from fanet_kernels import reference  # noqa: E402
from op_cases import (DTYPES, LAYOUTS, SHAPES, TOL, grad_tol, grads, k_dtype, make,  # noqa: E402
                      make_focus_weights, make_k)

if "triton" not in fk.available_backends("cpu") and not torch.cuda.is_available():
    pytest.skip("the triton backend runs neither on CPU (no TRITON_INTERPRET=1) nor on a GPU here",
                allow_module_level=True)

import fanet_kernels.triton as ft  # noqa: E402
from fanet_kernels.triton import bn_gate as ft_bn  # noqa: E402
from fanet_kernels.triton import focus as ft_focus  # noqa: E402
from fanet_kernels.triton import gate as ft_gate  # noqa: E402

DEVICE = "cpu" if "triton" in fk.available_backends("cpu") else "cuda"
OPS = torch.ops.fanet_triton


def _check_all_ops(shape, dtype=torch.float32, layouts=("contiguous", "channels_last")):
    """Forward and gradients of all the ops against the reference."""
    for layout in layouts:
        x = make(shape, dtype, layout, device=DEVICE, requires_grad=True, seed=0)
        u = make(shape, dtype, layout, device=DEVICE, requires_grad=True, seed=1)
        k = make_k(shape[0], device=DEVICE, requires_grad=True)
        ws = make_focus_weights(shape[1], device=DEVICE, requires_grad=True)
        for op, args in (("gate", (x, u, k)), ("gate_pool", (x, u, k)), ("residual_gate_pool", (x, u, k)),
                         ("focus", (x, *ws))):
            got = getattr(fk.ops, op)(*args, backend="triton")
            want = getattr(reference, op)(*args)
            got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
            torch.testing.assert_close(got, want, **TOL[dtype])
            # random upstream gradients (op_cases.grads), so that a load from a wrong offset shows
            fused = grads(lambda *a: getattr(fk.ops, op)(*a, backend="triton"), args)
            for a, b in zip(fused, grads(getattr(reference, op), args)):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ---- the heuristic ----------------------------------------------------------------------------
@pytest.mark.parametrize("sz", [ft_gate.GPU_SIZES, ft_gate.INTERPRETER_SIZES], ids=["gpu", "interpreter"])
@pytest.mark.parametrize("shape", [(1, 3, 7, 7), (2, 64, 64, 64), (256, 2048, 7, 7), (1, 16, 512, 512),
                                   (8, 5000, 1, 1), (2, 1, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pool_config_covers_the_tensor(sz, shape, channels_last):
    n, c, h, w = shape
    cfg = ft_gate.pool_config(n, c, h * w, channels_last, sz)
    assert cfg.block_c * cfg.block_hw <= max(sz.tile, cfg.block_c)  # a tile, or one position's channels
    assert cfg.hw_per % cfg.block_hw == 0
    assert (cfg.split - 1) * cfg.hw_per < h * w <= cfg.split * cfg.hw_per  # every split has work
    assert cfg.num_warps in (2, 4, 8)
    for per_thread in (2, 4):  # kernels with more values per element: smaller tiles, still at most 8 warps
        small = ft_gate.pool_config(n, c, h * w, channels_last, sz, per_thread)
        assert small.block_c * small.block_hw <= max(ft_gate.tile_for(per_thread, sz), small.block_c)
        assert small.num_warps in (2, 4, 8)
        if sz is ft_gate.GPU_SIZES:
            assert small.block_c * small.block_hw <= per_thread * 32 * small.num_warps
    block, iters, per_sample = ft_gate.flat_config(n, c * h * w, sz)
    assert (per_sample - 1) * iters * block < c * h * w <= per_sample * iters * block
    assert 1 <= iters <= sz.max_iters


def test_pool_config_gpu_choices():
    """The documented choices on a GPU: coalesced tiles per layout, H*W split when N*C is small."""
    sz = ft_gate.GPU_SIZES
    nchw = ft_gate.pool_config(2, 64, 4096, False, sz)
    assert (nchw.block_c, nchw.block_hw, nchw.split) == (4, 512, 2)   # long runs along a plane
    nhwc = ft_gate.pool_config(2, 64, 4096, True, sz)
    assert (nhwc.block_c, nhwc.block_hw) == (64, 32)                  # a position's channels
    big = ft_gate.pool_config(256, 2048, 49, True, sz)
    assert big.split == 1 and big.block_c == 128                      # enough programs already
    small = ft_gate.pool_config(1, 16, 512 * 512, False, sz)
    assert small.split > 1 and small.split * (16 // small.block_c) <= 2 * sz.target_programs
    assert ft_gate.flat_config(256, 64 * 56 * 56, sz) == (1024, 16, 13)


def test_config_depends_on_shape_only():
    """How sums are split (hence rounding) must not depend on the device, only on shapes."""
    a = ft_gate.pool_config(3, 40, 300, False, ft_gate.GPU_SIZES)
    assert a == ft_gate.pool_config(3, 40, 300, False, ft_gate.GPU_SIZES)
    assert "target_programs" in ft_gate.Sizes.__dataclass_fields__


# ---- code paths the suite's shapes may not reach ------------------------------------------
def test_int64_offsets_path(monkeypatch):
    """Force the int64-offset kernels (used from 2**31 elements) on small tensors."""
    monkeypatch.setattr(ft_gate, "INT64_THRESHOLD", 0)
    assert ft_gate.need_int64(1)
    _check_all_ops((2, 5, 3, 7))


def test_int64_threshold():
    assert not ft_gate.need_int64(2**31 - 1) and ft_gate.need_int64(2**31)
    assert ft_gate.need_int64(10, 2**31 + 5)


def _record_int64(monkeypatch) -> dict[str, set]:
    """Replaces the launches of every Triton module by a recorder of each kernel's INT64 flag."""
    seen: dict[str, set] = {}

    def record(kernel, grid, *args, num_warps, **meta):
        seen.setdefault(kernel.fn.__name__, set()).add(meta.get("INT64"))

    for mod in (ft_gate, ft_bn, ft_focus):
        monkeypatch.setattr(mod, "launch", record)
    return seen


def test_int64_decision_at_hw_near_2_31(monkeypatch):
    """One sample, one channel, H*W just under 2**31: fewer than 2**31 elements, yet the pool
    kernels' last split ends at split * hw_per = 2**31 (the GPU launch config), so int32 bounds would
    wrap (the last split would sum nothing): every channel-block kernel must get int64 offsets (focus
    pools such a plane with the split pool kernel, not its one-program-per-sample kernel).  Meta
    tensors: the launch code runs, no memory is allocated and no kernel runs."""
    seen = _record_int64(monkeypatch)
    monkeypatch.setattr(ft_gate, "sizes", lambda: ft_gate.GPU_SIZES)
    n, c, h, w = shape = (1, 1, 1, 2**31 - 1000)
    assert n * c * h * w < 2**31 and not ft_gate.need_int64(n * c * h * w)  # the element count says int32
    for cl in (False, True):
        cfg = ft_gate.pool_config(n, c, h * w, cl)
        assert cfg.split * cfg.hw_per >= 2**31  # hw_lo + hw_per of the last split, in int32, would wrap
        assert ft_gate.need_int64(cfg.reach(n, c, h * w, cl))
    fmt = torch.channels_last

    def meta(s, cl=False):
        return torch.empty(s, device="meta", memory_format=fmt if cl and len(s) == 4 else torch.contiguous_format)

    for cl in (False, True):
        x, z, g = meta(shape, cl), meta(shape, cl), meta(shape, cl)
        k, gp, wb = meta((n,)), meta((n, c)), meta((c,))
        ws = [meta((1, c)), meta((1,)), meta((1, 1)), meta((1,))]
        ft_gate._gate_pool_impl(x, z, k)
        ft_gate._gate_backward_impl(g, gp, x, z, k)
        ft_bn._forward_impl(x, z, k, wb, wb, wb, wb, True, 1e-5)
        ft_bn._backward_impl(g, gp, x, z, k, wb, wb, wb, wb, True, 1e-5)
        ft_focus._focus_impl(x, *ws)
    for name in ("pool_kernel", "_moments_kernel", "_norm_gate_bwd_kernel"):
        assert seen[name] == {True}, name
    assert "_focus_fused_kernel" not in seen


def test_int64_offsets_match_int32(monkeypatch):
    """The int64-offset kernels (every op, both layouts, split and multi-step reductions) give
    bit-identical results to the int32 ones: only the offsets' width differs."""
    dtype = torch.float32
    tiny = ft_gate.Sizes(block=64, tile=64, max_block_hw=16, max_block_c=8, target_programs=8, max_iters=4)
    monkeypatch.setattr(ft_gate, "INTERPRETER_SIZES", tiny)
    monkeypatch.setattr(ft_gate, "GPU_SIZES", tiny)
    flags = []
    real = ft_gate.launch

    def spy(kernel, grid, *args, **meta):
        flags.append(meta.get("INT64"))
        real(kernel, grid, *args, **meta)

    for mod in (ft_gate, ft_bn, ft_focus):
        monkeypatch.setattr(mod, "launch", spy)
    shape = (2, 6, 9, 11)
    assert all(ft_gate.pool_config(2, 6, 99, cl).split > 1 for cl in (False, True))
    assert ft_gate.flat_config(2, 6 * 99)[1] > 1

    def run() -> list[torch.Tensor]:
        results = []
        for layout in LAYOUTS:
            x = make(shape, dtype, layout, device=DEVICE, requires_grad=True, seed=0)
            u = make(shape, dtype, layout, device=DEVICE, requires_grad=True, seed=1)
            k = make_k(shape[0], k_dtype(dtype), device=DEVICE, requires_grad=True)
            ws = make_focus_weights(shape[1], k_dtype(dtype), device=DEVICE, requires_grad=True)
            wb = [make((shape[1],), dtype, "contiguous", device=DEVICE, requires_grad=True, seed=s) for s in (3, 4)]
            calls = [(fk.ops.gate, (x, u, k)), (fk.ops.gate_pool, (x, u, k)), (fk.ops.residual_gate_pool, (x, u, k)),
                     (fk.ops.focus, (x, *ws)), (fk.ops.bn_residual_gate_pool, (x, u, k, *wb))]
            for op, args in calls:
                def fn(*a, op=op):
                    return op(*a, backend="triton")
                out = fn(*args)
                results += list(out) if isinstance(out, tuple) else [out]
                results += grads(fn, args)
        return results

    want = run()
    assert flags and not any(f for f in flags if f is not None)
    flags.clear()
    monkeypatch.setattr(ft_gate, "INT64_THRESHOLD", 0)
    got = run()
    assert flags and all(f for f in flags if f is not None)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_split_and_multi_step_reductions(monkeypatch):
    """Tiny sizes force H*W splits (partial sums + second reduction) and multi-step flat loops."""
    tiny = ft_gate.Sizes(block=32, tile=32, max_block_hw=8, max_block_c=4, target_programs=16, max_iters=4)
    monkeypatch.setattr(ft_gate, "INTERPRETER_SIZES", tiny)
    monkeypatch.setattr(ft_gate, "GPU_SIZES", tiny)
    shape = (2, 6, 9, 11)
    for cl in (False, True):
        assert ft_gate.pool_config(2, 6, 99, cl).split > 1
    assert ft_gate.flat_config(2, 6 * 99)[1] > 1
    _check_all_ops(shape)


def test_focus_two_kernel_path():
    """C > FUSED_MAX_C: pool kernel, then the MLP kernel."""
    c = ft_focus.FUSED_MAX_C + 3
    for layout in ("contiguous", "channels_last"):
        x = make((2, c, 2, 3), torch.float32, layout, device=DEVICE, requires_grad=True)
        ws = make_focus_weights(c, device=DEVICE, requires_grad=True)
        got, want = OPS.focus(x, *ws), reference.focus(x, *ws)
        torch.testing.assert_close(got, want, **TOL[torch.float32])
        for a, b in zip(grads(OPS.focus, [x, *ws]), grads(reference.focus, [x, *ws])):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_zero_channels():
    """C = 0 is legal: empty out and pooled, and k' = sigmoid(w2 relu(b1) + b2)."""
    x = torch.randn(2, 0, 3, 3, device=DEVICE)
    k = make_k(2, device=DEVICE)
    out, pooled = OPS.gate_pool(x, x, k)
    assert out.shape == x.shape and pooled.shape == (2, 0)
    ws = [torch.randn(3, 0, device=DEVICE), torch.randn(3, device=DEVICE), torch.randn(1, 3, device=DEVICE),
          torch.randn(1, device=DEVICE)]
    torch.testing.assert_close(OPS.focus(x, *ws), reference.focus(x, *ws))


def test_mixed_k_and_weight_dtypes():
    """k and the focus weights may have another floating dtype than x: grads come back in theirs."""
    x = make((2, 4, 3, 3), torch.bfloat16, "channels_last", device=DEVICE, requires_grad=True)
    k = make_k(2, torch.float64, device=DEVICE, requires_grad=True)
    for op in (OPS.gate_pool, OPS.residual_gate_pool):
        out, pooled = op(x, x.detach(), k)
        (gk,) = torch.autograd.grad((out.float().sum() + pooled.float().sum()), [k])
        assert gk.dtype == torch.float64
    ws = make_focus_weights(4, torch.float16, device=DEVICE, requires_grad=True)
    grads = torch.autograd.grad(OPS.focus(x, *ws).float().sum(), [x, *ws])
    assert [g.dtype for g in grads] == [torch.bfloat16] + [torch.float16] * 4


# ---- opcheck of the backward ops (the forward ones are in test_ops.py) ----------------------
@pytest.mark.parametrize("case", ["gate_backward", "gate_pool_backward", "gate_pool_backward_no_out",
                                  "gate_pool_backward_no_pooled", "residual_gate_pool_backward",
                                  "residual_gate_pool_backward_no_out", "residual_gate_pool_backward_no_pooled",
                                  "focus_backward"])
def test_opcheck_backward_ops(case):
    shape = (2, 4, 3, 3)
    x, u, g = (make(shape, torch.float32, "channels_last", device=DEVICE, seed=s) for s in range(3))
    k, gp = make_k(2, device=DEVICE), torch.randn(2, 4, device=DEVICE)
    op, args = {
        "gate_backward": (OPS.gate_backward, (g, x, u, k)),
        "gate_pool_backward": (OPS.gate_pool_backward, (g, gp, x, u, k)),
        "gate_pool_backward_no_out": (OPS.gate_pool_backward, (None, gp, x, u, k)),
        "gate_pool_backward_no_pooled": (OPS.gate_pool_backward, (g, None, x, u, k)),
        "residual_gate_pool_backward": (OPS.residual_gate_pool_backward, (g, gp, x, u, k)),
        "residual_gate_pool_backward_no_out": (OPS.residual_gate_pool_backward, (None, gp, x, u, k)),
        "residual_gate_pool_backward_no_pooled": (OPS.residual_gate_pool_backward, (g, None, x, u, k)),
        "focus_backward": (OPS.focus_backward,
                           (torch.randn(2, device=DEVICE), x, *make_focus_weights(4, device=DEVICE))),
    }[case]
    torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_backward_ops_match_the_cpp_ops():
    """Same results as the C++ backward ops, None inputs included."""
    if "cpu" not in fk.available_backends("cpu") or DEVICE != "cpu":
        pytest.skip("needs the C++ CPU ops and the interpreter")
    x, u, g = (make((2, 3, 4, 5), torch.float32, "contiguous", seed=s) for s in range(3))
    k, gp = make_k(2), torch.randn(2, 3)
    for go, gpo in ((g, gp), (None, gp), (g, None)):
        for a, b in zip(OPS.gate_pool_backward(go, gpo, x, u, k), torch.ops.fanet.gate_pool_backward(go, gpo, x, u, k)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for a, b in zip(OPS.residual_gate_pool_backward(go, gpo, x, u, k),
                        torch.ops.fanet.residual_gate_pool_backward(go, gpo, x, u, k)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(OPS.residual_gate_pool(x, u, k), torch.ops.fanet.residual_gate_pool(x, u, k)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---- residual_gate_pool: gate_pool with u = relu(branch + x) formed in the kernels -------------
# Small cases (the interpreter is slow): one sample, one channel, 1x1 maps, odd H x W, empty batch.
RESIDUAL_SHAPES = ["N0", "N1", "C1", "HW1", "13x17"]


def _residual_inputs(shape, dtype, layout, requires_grad=False, margin=0.0):
    """x, branch, k; with a margin, branch is moved so that |branch + x| >= margin (away from
    the ReLU's kink, for finite differences)."""
    x = make(shape, dtype, layout, device=DEVICE, seed=0)
    b = make(shape, dtype, layout, device=DEVICE, seed=1)
    if margin:
        with torch.no_grad():
            b += torch.where((b + x).abs() < margin, 2 * margin, 0).to(dtype)
    k = make_k(shape[0], k_dtype(dtype), device=DEVICE)
    return [t.requires_grad_(requires_grad) for t in (x, b, k)]


def _expected_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if not x.is_contiguous() and \
        x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("sname", RESIDUAL_SHAPES)
def test_residual_forward_matches_reference(sname, dname, layout):
    dtype, shape = DTYPES[dname], SHAPES[sname]
    x, b, k = _residual_inputs(shape, dtype, layout)
    out, pooled = fk.ops.residual_gate_pool(x, b, k, backend="triton")
    raw_out, raw_pooled = OPS.residual_gate_pool(x, b, k)
    ref_out, ref_pooled = reference.residual_gate_pool(x, b, k)
    for got, want in ((out, ref_out), (raw_out, ref_out), (pooled, ref_pooled), (raw_pooled, ref_pooled)):
        torch.testing.assert_close(got, want, **TOL[dtype])
    assert out.dtype == pooled.dtype == dtype and pooled.shape == shape[:2]
    assert out.is_contiguous(memory_format=_expected_format(x))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dname", ["f32", "f64", "bf16"])
@pytest.mark.parametrize("sname", [s for s in RESIDUAL_SHAPES if s != "N0"])
def test_residual_backward_matches_reference(sname, dname, layout):
    dtype = DTYPES[dname]
    inputs = _residual_inputs(SHAPES[sname], dtype, layout, requires_grad=True)
    fused = grads(lambda *a: fk.ops.residual_gate_pool(*a, backend="triton"), inputs)
    ref = grads(reference.residual_gate_pool, inputs)
    for i, (a, b) in enumerate(zip(fused, ref)):
        tol = TOL[dtype] if i < 2 else grad_tol(dtype)  # grad_x, grad_branch per element; grad_k a sum
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"gradient {i} of residual_gate_pool: {m}")
        assert a.dtype == inputs[i].dtype


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dname", ["f32", "f64", "bf16"])
def test_residual_backward_op_with_missing_grads(dname, layout):
    """The backward op with grad_out or grad_pooled None (an output unused) equals autograd of the
    reference with a zero gradient for that output."""
    dtype = DTYPES[dname]
    x, b, k = _residual_inputs((2, 3, 5, 3), dtype, layout, requires_grad=True)
    ref_out, ref_pooled = reference.residual_gate_pool(x, b, k)
    g = make(x.shape, dtype, layout, device=DEVICE, seed=3)
    gp = torch.randn(2, 3, generator=torch.Generator().manual_seed(4)).to(dtype).to(DEVICE)
    for go, gpo in ((g, gp), (None, gp), (g, None)):
        got = OPS.residual_gate_pool_backward(go, gpo, x.detach(), b.detach(), k.detach())
        want = torch.autograd.grad((ref_out, ref_pooled), (x, b, k), retain_graph=True,
                                   grad_outputs=(torch.zeros_like(g) if go is None else go,
                                                 torch.zeros_like(gp) if gpo is None else gpo))
        for i, (a, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, w, **(TOL[dtype] if i < 2 else grad_tol(dtype)))
        assert got[0].is_contiguous(memory_format=_expected_format(x))
    for pick in (0, 1):  # autograd through the op with one output unused
        fused = grads(lambda *a: OPS.residual_gate_pool(*a)[pick], [x, b, k])
        ref = grads(lambda *a: reference.residual_gate_pool(*a)[pick], [x, b, k])
        for i, (a, w) in enumerate(zip(fused, ref)):
            torch.testing.assert_close(a, w, **(TOL[dtype] if i < 2 else grad_tol(dtype)))


@pytest.mark.parametrize("dname", ["f32", "bf16"])
def test_residual_relu_boundary_and_nan(dname):
    """torch's ReLU rule: u = 0 and grad_branch = 0 where branch + x == 0 exactly; NaN passes
    through both (as relu and threshold_backward let it)."""
    dtype = DTYPES[dname]
    x, b, k = _residual_inputs((2, 3, 4, 5), dtype, "contiguous")
    with torch.no_grad():
        b[:, :, :2] = -x[:, :, :2]  # branch + x == +0 exactly
        b[1, 2, 3, 4] = float("nan")
    x, b, k = (t.requires_grad_() for t in (x, b, k))
    out, pooled = OPS.residual_gate_pool(x, b, k)
    ref_out, ref_pooled = reference.residual_gate_pool(x, b, k)
    torch.testing.assert_close(out, ref_out, **TOL[dtype], equal_nan=True)
    torch.testing.assert_close(pooled, ref_pooled, **TOL[dtype], equal_nan=True)
    assert out[1, 2, 3, 4].isnan() and pooled[1, 2].isnan() and not pooled[0].isnan().any()
    g = make(x.shape, dtype, "contiguous", device=DEVICE, seed=3)
    got = torch.autograd.grad(out, (x, b, k), g)
    want = torch.autograd.grad(ref_out, (x, b, k), g)
    for i, (a, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, w, **(TOL[dtype] if i < 2 else grad_tol(dtype)), equal_nan=True)
    gb = got[1]
    assert (gb[:, :, :2] == 0).all()
    torch.testing.assert_close(gb[1, 2, 3, 4], (g[1, 2, 3, 4].float() * k[1].float()).to(dtype))
    assert got[2][1].isnan() and not got[2][0].isnan()  # grad_k of the sample holding the NaN


@pytest.mark.parametrize("layout", LAYOUTS)
def test_residual_opcheck(layout):
    x, b, k = _residual_inputs((2, 6, 3, 5), torch.float32, layout, requires_grad=True)
    torch.library.opcheck(OPS.residual_gate_pool.default, (x, b, k))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_residual_gradcheck_float64(layout):
    inputs = _residual_inputs((2, 2, 3, 3), torch.float64, layout, requires_grad=True, margin=1e-3)
    assert torch.autograd.gradcheck(lambda *a: fk.ops.residual_gate_pool(*a, backend="triton"), inputs)


def _bad_residual_cases(dev: str):
    x = torch.randn(2, 3, 4, 4, device=dev)
    b, k = torch.randn_like(x), torch.rand(2, device=dev)
    return {
        "branch shape": ((x, b[:, :2], k), "'branch'"),
        "branch 3-D": ((x, b[0], k), "'branch'"),
        "branch dtype": ((x, b.double(), k), "'branch'"),
        "branch integer": ((x, b.long(), k), "'branch'"),
        "branch device": ((x, b.to("meta"), k), "'branch'"),
        "k shape": ((x, b, torch.rand(3, device=dev)), "'k'"),
        "x 3-D": ((x[0], b, k), "'x'"),
    }


@pytest.mark.parametrize("case", list(_bad_residual_cases("cpu")))
def test_residual_bad_input_names_argument(case):
    """Errors name 'branch' (not 'u'), from the Python entry, the raw forward and backward ops and
    their fake kernels (meta tensors)."""
    args, name = _bad_residual_cases(DEVICE)[case]
    g = torch.randn(2, 3, 4, 4, device=DEVICE)
    calls = [lambda: fk.ops.residual_gate_pool(*args, backend="triton"), lambda: OPS.residual_gate_pool(*args),
             lambda: OPS.residual_gate_pool_backward(g, None, *args)]
    if all(t.device.type != "meta" for t in args):  # the fake kernels see the same arguments on meta
        meta = [t.to("meta") for t in args]
        calls += [lambda: OPS.residual_gate_pool(*meta),
                  lambda: OPS.residual_gate_pool_backward(g.to("meta"), None, *meta)]
    for call in calls:
        with pytest.raises((ValueError, TypeError, RuntimeError), match=name):
            call()


def test_residual_backend_entry():
    """The Backend exposes the fused op (not the add + ReLU + gate_pool fallback of ops.py)."""
    assert ft.BACKEND.residual_gate_pool is not None
    x, b, k = _residual_inputs((1, 2, 3, 3), torch.float32, "contiguous")
    out = ft.BACKEND.residual_gate_pool(x, b, k)
    assert isinstance(out, tuple) and len(out) == 2


# ---- the interpreter-vs-driver guard ---------------------------------------------------------
def test_guard_under_this_process():
    assert ft.INTERPRET == (os.environ.get("TRITON_INTERPRET") == "1")
    assert ("cpu" in ft.BACKEND.devices) == ft.INTERPRET and "cuda" in ft.BACKEND.devices
    assert ft.AUTOTUNE == (not ft.INTERPRET and torch.cuda.is_available())
    if not ft.AUTOTUNE:  # plain kernels: the heuristic's configs are used as they are
        import triton

        assert not isinstance(ft_gate.pool_kernel, triton.runtime.Autotuner)
    assert ft_gate.sizes() is (ft_gate.INTERPRETER_SIZES if ft.INTERPRET else ft_gate.GPU_SIZES)


def test_autotune_wrapper_builds_configs(monkeypatch):
    """With a driver, kernels are wrapped in @triton.autotune over num_warps only (so the grid and
    buffers the heuristic sized stay valid)."""
    import triton

    monkeypatch.setattr(ft_gate, "AUTOTUNE", True)

    @ft_gate.maybe_autotune(key=["n"])
    @triton.jit
    def kernel(p, n):
        pass

    assert isinstance(kernel, triton.runtime.Autotuner)
    assert sorted(c.num_warps for c in kernel.configs) == [4, 8]  # 2 warps: 16 values per thread, > 128 registers
    assert all(not c.kwargs for c in kernel.configs)


def test_autotune_restores_what_a_kernel_updates_in_place(monkeypatch):
    """The tuner runs each config on the live arguments: a kernel that updates a tensor in place
    (bn_residual_gate_pool's pass 2 turns grad_B into grad_z) must have it restored between runs,
    or the first call on a new shape would apply the update several times."""
    import triton

    monkeypatch.setattr(ft_gate, "AUTOTUNE", True)

    @ft_gate.maybe_autotune(key=["n"], restore_value=["p"])
    @triton.jit
    def kernel(p, n):
        pass

    assert kernel.restore_value == ["p"]
    src = inspect.getsource(importlib.import_module("fanet_kernels.triton.bn_gate"))
    assert 'restore_value=["gb_ptr"]' in src  # _norm_grad_kernel's decorator (gb_ptr is gz_ptr)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **env), cwd=os.path.dirname(__file__))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour without the interpreter")
def test_without_interpreter_cpu_tensors_are_refused():
    r = _run("import torch, fanet_kernels as fk, fanet_kernels.triton as ft\n"
             "print(ft.BACKEND.devices, ft.AUTOTUNE, 'triton' in fk.available_backends('cpu'))\n"
             "x = torch.randn(1, 2, 3, 3)\n"
             "try:\n    torch.ops.fanet_triton.gate(x, x, torch.rand(1))\n"
             "except RuntimeError as e:\n    print('refused', e)\n",
             TRITON_INTERPRET="0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("('cuda',) False False")
    assert "refused" in r.stdout and "TRITON_INTERPRET=1" in r.stdout


def test_missing_triton_makes_backend_unavailable():
    r = _run("import sys; sys.modules['triton'] = None\n"
             "import fanet_kernels as fk\n"
             "print(fk.backends.load('triton'), fk.backends.unavailable_reason('triton'))\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("None ImportError") and "'triton' package" in r.stdout


# ---- the real compiler path, without a GPU ------------------------------------------------------
_COMPILE_ALL = r'''
import itertools, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fanet_kernels.triton import bn_gate as B, focus as Fo, gate as G

def compile_(fn, sig, consts):
    fn = fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn
    sig = dict(sig, **{k: "constexpr" for k in consts})
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 80, 32),
                       options={"num_warps": 4})
    assert "cubin" in k.asm

for dt, cl, int64 in [("fp32", False, False), ("fp64", True, True), ("bf16", True, False), ("fp16", False, True)]:
    acc, a, x = (tl.float64, "*fp64", "*fp64") if dt == "fp64" else (tl.float32, "*fp32", "*" + dt)
    i = dict.fromkeys(["numel", "M", "N", "C", "HW", "hw_per", "divisor", "P", "iters", "H1"], "i32")
    compile_(G._gate_flat_kernel, {"x_ptr": x, "u_ptr": x, "k_ptr": a, "out_ptr": x, "numel": "i32", "M": "i32"},
             {"INT64": int64, "BLOCK": 1024, "ACC": acc})
    for gate, residual, norm in [(False, False, False), (True, False, False), (True, True, False), (True, True, True)]:
        compile_(G.pool_kernel, {"x_ptr": x, "u_ptr": x, "k_ptr": a, "out_ptr": x, "sums_ptr": a, "norm_ptr": a,
                                 **{k: i[k] for k in ("N", "C", "HW", "hw_per", "divisor")}},
                 {"GATE": gate, "RESIDUAL": residual, "CHANNELS_LAST": cl, "INT64": int64, "BLOCK_C": 64 if cl else 4,
                  "BLOCK_HW": 32 if cl else 512, "ACC": acc, "NORM": norm})
    for (has_g, fold), residual in itertools.product([(True, True), (False, True), (True, False)], (False, True)):
        compile_(G._gate_bwd_kernel, {"g_ptr": x, "gp_ptr": a, "x_ptr": x, "u_ptr": x, "k_ptr": a, "gx_ptr": x,
                                      "gu_ptr": x, "partial_ptr": a,
                                      **{k: i[k] for k in ("M", "C", "HW", "P", "iters")}},
                 {"HAS_G": has_g, "FOLD": fold, "RESIDUAL": residual, "CHANNELS_LAST": cl, "INT64": int64,
                  "BLOCK": 1024, "ACC": acc})
        compile_(B._norm_gate_bwd_kernel, {"g_ptr": x, "gp_ptr": a, "x_ptr": x, "z_ptr": x, "k_ptr": a, "norm_ptr": a,
                                           "gx_ptr": x, "gb_ptr": x, "sums_ptr": a,
                                           **{k: i[k] for k in ("N", "C", "HW", "hw_per")}},
                 {"HAS_G": has_g, "FOLD": fold, "CHANNELS_LAST": cl, "INT64": int64, "BLOCK_C": 64 if cl else 4,
                  "BLOCK_HW": 32 if cl else 512, "ACC": acc})
    compile_(B._moments_kernel, {"z_ptr": x, "shift_ptr": a, "sums_ptr": a,
                                 **{k: i[k] for k in ("N", "C", "HW", "hw_per")}},
             {"CHANNELS_LAST": cl, "INT64": int64, "BLOCK_C": 64 if cl else 4, "BLOCK_HW": 32 if cl else 512,
              "ACC": acc})
    compile_(B._norm_grad_kernel, {"gb_ptr": x, "z_ptr": x, "t_ptr": a, "gz_ptr": x, "numel": "i32", "C": "i32",
                                   "HW": "i32"}, {"CHANNELS_LAST": cl, "INT64": int64, "BLOCK": 1024, "ACC": acc})
    compile_(Fo._focus_fused_kernel, {"x_ptr": x, "l_ptr": a, "w1_ptr": a, "b1_ptr": a, "w2_ptr": a, "b2_ptr": a,
                                      "k_ptr": x, "C": "i32", "HW": "i32", "H1": "i32"},
             {"CHANNELS_LAST": cl, "INT64": int64, "BLOCK_C": 64, "BLOCK_HW": 32, "BLOCK_H": 8, "BLOCK_CM": 256,
              "ACC": acc})
    compile_(Fo._focus_mlp_kernel, {"l_ptr": a, "w1_ptr": a, "b1_ptr": a, "w2_ptr": a, "b2_ptr": a, "k_ptr": x,
                                    "C": "i32", "H1": "i32"}, {"BLOCK_H": 8, "BLOCK_CM": 256, "ACC": acc})
    compile_(Fo._broadcast_kernel, {"src_ptr": a, "out_ptr": x, "numel": "i32", "M": "i32", "C": "i32", "HW": "i32"},
             {"CHANNELS_LAST": cl, "INT64": int64, "BLOCK": 1024})
print("compiled")
'''


def test_kernels_compile_for_a_gpu():
    """The interpreter does not type-check like the compiler: compile every kernel (every dtype,
    both layouts, both offset widths, every mode) to a cubin for sm_80; needs no GPU, only the
    ptxas that ships with triton."""
    r = _run(_COMPILE_ALL, TRITON_INTERPRET="0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiled" in r.stdout


@pytest.mark.parametrize("sz", [ft_gate.GPU_SIZES, ft_gate.INTERPRETER_SIZES], ids=["gpu", "interpreter"])
@pytest.mark.parametrize("shape", [(1, 3, 2048, 2048), (64, 64, 512, 512), (256, 2048, 7, 7), (2, 8, 4096, 4096)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pool_sums_are_short_at_any_plane_size(sz, shape, channels_last):
    """Each lane of a pool kernel's channel sum adds at most max_steps values (then the tile's tree
    and a float64 sum over splits), whatever H*W and however many programs N*C gives: a running
    float32 sum over a whole plane would grow its error with H*W."""
    n, c, h, w = shape
    for per_thread in (2, 4, 8):
        cfg = ft_gate.pool_config(n, c, h * w, channels_last, sz, per_thread=per_thread)
        assert cfg.hw_per // cfg.block_hw <= sz.max_steps
        assert (cfg.split - 1) * cfg.hw_per < h * w <= cfg.split * cfg.hw_per


def test_pool_precision_at_a_long_plane(monkeypatch):
    """Tiny tiles make a 1x2x256x256 plane a long sum (thousands of loop steps per channel under the
    old running sum): pooled means within a few float32 ulps of float64, as torch.mean's."""
    tiny = ft_gate.Sizes(block=64, tile=64, max_block_hw=16, max_block_c=8, target_programs=8, max_steps=8)
    monkeypatch.setattr(ft_gate, "INTERPRETER_SIZES", tiny)
    monkeypatch.setattr(ft_gate, "GPU_SIZES", tiny)
    for cl in (False, True):
        x = make((1, 2, 256, 256), torch.float32, "channels_last" if cl else "contiguous", device=DEVICE) + 3
        u = make((1, 2, 256, 256), torch.float32, "contiguous", device=DEVICE, seed=1)
        k = torch.zeros(1, device=DEVICE)  # out = x: the pooled mean is x's
        pooled = OPS.gate_pool(x, u, k)[1]
        want = x.double().mean((2, 3))
        err, ref_err = (pooled.double() - want).abs().max(), (x.mean((2, 3)).double() - want).abs().max()
        assert err <= max(4 * ref_err, 4 * torch.finfo(torch.float32).eps * want.abs().max()), (err, ref_err)
