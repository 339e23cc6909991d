"""Triton internals: the launch heuristic, the int64-offset path, split reductions, the two-kernel
focus path, the interpreter-vs-driver guard and the kernels compiled for a GPU.  The op contract
(every op, dtype and layout against the reference, opcheck, gradcheck) runs on the "triton" targets
of the per-op files (test_gate.py, test_residual.py, test_bn_gate.py, test_focus.py).

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
from op_cases import LAYOUTS, TOL, grads, k_dtype, make, make_focus_weights, make_k, triton_device

import fanet_kernels as fk
from fanet_kernels import reference

DEVICE = triton_device()

import fanet_kernels.triton as ft  # noqa: E402
from fanet_kernels.triton import bn_gate as ft_bn  # noqa: E402
from fanet_kernels.triton import common  # noqa: E402
from fanet_kernels.triton import focus as ft_focus  # noqa: E402
from fanet_kernels.triton import gate as ft_gate  # noqa: E402

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
@pytest.mark.parametrize("sz", [common.GPU_SIZES, common.INTERPRETER_SIZES], ids=["gpu", "interpreter"])
@pytest.mark.parametrize("shape", [(1, 3, 7, 7), (2, 64, 64, 64), (256, 2048, 7, 7), (1, 16, 512, 512),
                                   (8, 5000, 1, 1), (2, 1, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pool_config_covers_the_tensor(sz, shape, channels_last):
    n, c, h, w = shape
    cfg = common.pool_config(n, c, h * w, channels_last, sz)
    assert cfg.block_c * cfg.block_hw <= max(sz.tile, cfg.block_c)  # a tile, or one position's channels
    assert cfg.hw_per % cfg.block_hw == 0
    assert (cfg.split - 1) * cfg.hw_per < h * w <= cfg.split * cfg.hw_per  # every split has work
    assert cfg.num_warps in (2, 4, 8)
    for per_thread in (2, 4):  # kernels with more values per element: smaller tiles, still at most 8 warps
        small = common.pool_config(n, c, h * w, channels_last, sz, per_thread)
        assert small.block_c * small.block_hw <= max(common.tile_for(per_thread, sz), small.block_c)
        assert small.num_warps in (2, 4, 8)
        if sz is common.GPU_SIZES:
            assert small.block_c * small.block_hw <= per_thread * 32 * small.num_warps
    block, iters, per_sample = common.flat_config(n, c * h * w, sz)
    assert (per_sample - 1) * iters * block < c * h * w <= per_sample * iters * block
    assert 1 <= iters <= sz.max_iters


def test_pool_config_gpu_choices():
    """The documented choices on a GPU: coalesced tiles per layout, H*W split when N*C is small."""
    sz = common.GPU_SIZES
    nchw = common.pool_config(2, 64, 4096, False, sz)
    assert (nchw.block_c, nchw.block_hw, nchw.split) == (4, 512, 2)   # long runs along a plane
    nhwc = common.pool_config(2, 64, 4096, True, sz)
    assert (nhwc.block_c, nhwc.block_hw) == (64, 32)                  # a position's channels
    big = common.pool_config(256, 2048, 49, True, sz)
    assert big.split == 1 and big.block_c == 128                      # enough programs already
    small = common.pool_config(1, 16, 512 * 512, False, sz)
    assert small.split > 1 and small.split * (16 // small.block_c) <= 2 * sz.target_programs
    assert common.flat_config(256, 64 * 56 * 56, sz) == (1024, 16, 13)


def test_config_depends_on_shape_only():
    """How sums are split (hence rounding) must not depend on the device, only on shapes."""
    a = common.pool_config(3, 40, 300, False, common.GPU_SIZES)
    assert a == common.pool_config(3, 40, 300, False, common.GPU_SIZES)
    assert "target_programs" in common.Sizes.__dataclass_fields__


# ---- code paths the suite's shapes may not reach ------------------------------------------
def test_int64_offsets_path(monkeypatch):
    """Force the int64-offset kernels (used from 2**31 elements) on small tensors."""
    monkeypatch.setattr(common, "INT64_THRESHOLD", 0)
    assert common.need_int64(1)
    _check_all_ops((2, 5, 3, 7))


def test_int64_threshold():
    assert not common.need_int64(2**31 - 1) and common.need_int64(2**31)
    assert common.need_int64(10, 2**31 + 5)


def _record_int64(monkeypatch) -> dict[str, set]:
    """Replaces the launches of every Triton module by a recorder of each kernel's INT64 flag."""
    seen: dict[str, set] = {}

    def record(kernel, grid, *args, num_warps, **meta):
        seen.setdefault(kernel.fn.__name__, set()).add(meta.get("INT64"))

    for mod in (common, ft_gate, ft_bn, ft_focus):
        monkeypatch.setattr(mod, "launch", record)
    return seen


def test_int64_decision_at_hw_near_2_31(monkeypatch):
    """One sample, one channel, H*W just under 2**31: fewer than 2**31 elements, yet the pool
    kernels' last split ends at split * hw_per = 2**31 (the GPU launch config), so int32 bounds would
    wrap (the last split would sum nothing): every channel-block kernel must get int64 offsets (focus
    pools such a plane with the split pool kernel, not its one-program-per-sample kernel).  Meta
    tensors: the launch code runs, no memory is allocated and no kernel runs."""
    seen = _record_int64(monkeypatch)
    monkeypatch.setattr(common, "sizes", lambda: common.GPU_SIZES)
    n, c, h, w = shape = (1, 1, 1, 2**31 - 1000)
    assert n * c * h * w < 2**31 and not common.need_int64(n * c * h * w)  # the element count says int32
    for cl in (False, True):
        cfg = common.pool_config(n, c, h * w, cl)
        assert cfg.split * cfg.hw_per >= 2**31  # hw_lo + hw_per of the last split, in int32, would wrap
        assert common.need_int64(cfg.reach(n, c, h * w, cl))
    fmt = torch.channels_last

    def meta(s, cl=False):
        return torch.empty(s, device="meta", memory_format=fmt if cl and len(s) == 4 else torch.contiguous_format)

    for cl in (False, True):
        x, z, g = meta(shape, cl), meta(shape, cl), meta(shape, cl)
        k, gp, wb = meta((n,)), meta((n, c)), meta((c,))
        ws = [meta((1, c)), meta((1,)), meta((1, 1)), meta((1,))]
        ft_gate.gate_pool_impl(x, z, k)
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
    tiny = common.Sizes(block=64, tile=64, max_block_hw=16, max_block_c=8, target_programs=8, max_iters=4)
    monkeypatch.setattr(common, "INTERPRETER_SIZES", tiny)
    monkeypatch.setattr(common, "GPU_SIZES", tiny)
    flags = []
    real = common.launch

    def spy(kernel, grid, *args, **meta):
        flags.append(meta.get("INT64"))
        real(kernel, grid, *args, **meta)

    for mod in (common, ft_gate, ft_bn, ft_focus):
        monkeypatch.setattr(mod, "launch", spy)
    shape = (2, 6, 9, 11)
    assert all(common.pool_config(2, 6, 99, cl).split > 1 for cl in (False, True))
    assert common.flat_config(2, 6 * 99)[1] > 1

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
    monkeypatch.setattr(common, "INT64_THRESHOLD", 0)
    got = run()
    assert flags and all(f for f in flags if f is not None)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_split_and_multi_step_reductions(monkeypatch):
    """Tiny sizes force H*W splits (partial sums + second reduction) and multi-step flat loops."""
    tiny = common.Sizes(block=32, tile=32, max_block_hw=8, max_block_c=4, target_programs=16, max_iters=4)
    monkeypatch.setattr(common, "INTERPRETER_SIZES", tiny)
    monkeypatch.setattr(common, "GPU_SIZES", tiny)
    shape = (2, 6, 9, 11)
    for cl in (False, True):
        assert common.pool_config(2, 6, 99, cl).split > 1
    assert common.flat_config(2, 6 * 99)[1] > 1
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


# ---- the interpreter-vs-driver guard ---------------------------------------------------------
def test_guard_under_this_process():
    assert ft.INTERPRET == (os.environ.get("TRITON_INTERPRET") == "1")
    assert ("cpu" in ft.BACKEND.devices) == ft.INTERPRET and "cuda" in ft.BACKEND.devices
    assert ft.AUTOTUNE == (not ft.INTERPRET and torch.cuda.is_available())
    if not ft.AUTOTUNE:  # plain kernels: the heuristic's configs are used as they are
        import triton

        assert not isinstance(common.pool_kernel, triton.runtime.Autotuner)
    assert common.sizes() is (common.INTERPRETER_SIZES if ft.INTERPRET else common.GPU_SIZES)


def test_autotune_wrapper_builds_configs(monkeypatch):
    """With a driver, kernels are wrapped in @triton.autotune over num_warps only (so the grid and
    buffers the heuristic sized stay valid)."""
    import triton

    monkeypatch.setattr(common, "AUTOTUNE", True)

    @common.maybe_autotune(key=["n"])
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

    monkeypatch.setattr(common, "AUTOTUNE", True)

    @common.maybe_autotune(key=["n"], restore_value=["p"])
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
import inspect, itertools, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fanet_kernels.triton import bn_gate as B, common as C, focus as Fo, gate as G

def compile_(fn, sig, consts):
    fn = fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn
    # constexprs left out take their defaults (the launches that do not pass them)
    consts = {**{p.name: p.default for p in inspect.signature(fn.fn).parameters.values()
                 if p.default is not p.empty and p.name not in sig}, **consts}
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
        compile_(C.pool_kernel, {"x_ptr": x, "u_ptr": x, "k_ptr": a, "out_ptr": x, "sums_ptr": a, "norm_ptr": a,
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


@pytest.mark.parametrize("sz", [common.GPU_SIZES, common.INTERPRETER_SIZES], ids=["gpu", "interpreter"])
@pytest.mark.parametrize("shape", [(1, 3, 2048, 2048), (64, 64, 512, 512), (256, 2048, 7, 7), (2, 8, 4096, 4096)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pool_sums_are_short_at_any_plane_size(sz, shape, channels_last):
    """Each lane of a pool kernel's channel sum adds at most max_steps values (then the tile's tree
    and a float64 sum over splits), whatever H*W and however many programs N*C gives: a running
    float32 sum over a whole plane would grow its error with H*W."""
    n, c, h, w = shape
    for per_thread in (2, 4, 8):
        cfg = common.pool_config(n, c, h * w, channels_last, sz, per_thread=per_thread)
        assert cfg.hw_per // cfg.block_hw <= sz.max_steps
        assert (cfg.split - 1) * cfg.hw_per < h * w <= cfg.split * cfg.hw_per


def test_pool_precision_at_a_long_plane(monkeypatch):
    """Tiny tiles make a 1x2x256x256 plane a long sum (thousands of loop steps per channel under the
    old running sum): pooled means within a few float32 ulps of float64, as torch.mean's."""
    tiny = common.Sizes(block=64, tile=64, max_block_hw=16, max_block_c=8, target_programs=8, max_steps=8)
    monkeypatch.setattr(common, "INTERPRETER_SIZES", tiny)
    monkeypatch.setattr(common, "GPU_SIZES", tiny)
    for cl in (False, True):
        x = make((1, 2, 256, 256), torch.float32, "channels_last" if cl else "contiguous", device=DEVICE) + 3
        u = make((1, 2, 256, 256), torch.float32, "contiguous", device=DEVICE, seed=1)
        k = torch.zeros(1, device=DEVICE)  # out = x: the pooled mean is x's
        pooled = OPS.gate_pool(x, u, k)[1]
        want = x.double().mean((2, 3))
        err, ref_err = (pooled.double() - want).abs().max(), (x.mean((2, 3)).double() - want).abs().max()
        assert err <= max(4 * ref_err, 4 * torch.finfo(torch.float32).eps * want.abs().max()), (err, ref_err)
