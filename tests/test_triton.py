"""Triton-specific tests: the launch heuristic, the int64-offset path, split reductions, the
two-kernel focus path and the interpreter-vs-driver guard.  The op contract itself (every op,
dtype and layout against the reference, opcheck, gradcheck) is tested by test_ops.py.

Without a GPU these run under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import fanet_kernels as fk  # noqa: E402
from fanet_kernels import reference  # noqa: E402
from op_cases import TOL, make, make_focus_weights, make_k  # noqa: E402

if "triton" not in fk.available_backends("cpu") and not torch.cuda.is_available():
    pytest.skip("the triton backend runs neither on CPU (no TRITON_INTERPRET=1) nor on a GPU here",
                allow_module_level=True)

import fanet_kernels.triton as ft  # noqa: E402
from fanet_kernels.triton import focus as ft_focus  # noqa: E402
from fanet_kernels.triton import gate as ft_gate  # noqa: E402

DEVICE = "cpu" if "triton" in fk.available_backends("cpu") else "cuda"
OPS = torch.ops.fanet_triton


def _check_all_ops(shape, dtype=torch.float32, layouts=("contiguous", "channels_last")):
    """Forward and gradients of all three ops against the reference."""
    for layout in layouts:
        x = make(shape, dtype, layout, device=DEVICE, requires_grad=True, seed=0)
        u = make(shape, dtype, layout, device=DEVICE, requires_grad=True, seed=1)
        k = make_k(shape[0], device=DEVICE, requires_grad=True)
        ws = make_focus_weights(shape[1], device=DEVICE, requires_grad=True)
        for op, args in (("gate", (x, u, k)), ("gate_pool", (x, u, k)), ("focus", (x, *ws))):
            got = getattr(fk.ops, op)(*args, backend="triton")
            want = getattr(reference, op)(*args)
            got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
            torch.testing.assert_close(got, want, **TOL[dtype])
            loss_g = sum((o.float() * (i + 1)).sum() for i, o in enumerate(got))
            loss_w = sum((o.float() * (i + 1)).sum() for i, o in enumerate(want))
            for a, b in zip(torch.autograd.grad(loss_g, args), torch.autograd.grad(loss_w, args)):
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
        for a, b in zip(torch.autograd.grad(got.sum(), [x, *ws]), torch.autograd.grad(want.sum(), [x, *ws])):
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
    out, pooled = OPS.gate_pool(x, x.detach(), k)
    (gk,) = torch.autograd.grad((out.float().sum() + pooled.float().sum()), [k])
    assert gk.dtype == torch.float64
    ws = make_focus_weights(4, torch.float16, device=DEVICE, requires_grad=True)
    grads = torch.autograd.grad(OPS.focus(x, *ws).float().sum(), [x, *ws])
    assert [g.dtype for g in grads] == [torch.bfloat16] + [torch.float16] * 4


# ---- opcheck of the backward ops (the forward ones are in test_ops.py) ----------------------
@pytest.mark.parametrize("case", ["gate_backward", "gate_pool_backward", "gate_pool_backward_no_out",
                                  "gate_pool_backward_no_pooled", "focus_backward"])
def test_opcheck_backward_ops(case):
    shape = (2, 4, 3, 3)
    x, u, g = (make(shape, torch.float32, "channels_last", device=DEVICE, seed=s) for s in range(3))
    k, gp = make_k(2, device=DEVICE), torch.randn(2, 4, device=DEVICE)
    op, args = {
        "gate_backward": (OPS.gate_backward, (g, x, u, k)),
        "gate_pool_backward": (OPS.gate_pool_backward, (g, gp, x, u, k)),
        "gate_pool_backward_no_out": (OPS.gate_pool_backward, (None, gp, x, u, k)),
        "gate_pool_backward_no_pooled": (OPS.gate_pool_backward, (g, None, x, u, k)),
        "focus_backward": (OPS.focus_backward, (torch.randn(2, device=DEVICE), x, *make_focus_weights(4, device=DEVICE))),
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
    assert sorted(c.num_warps for c in kernel.configs) == [2, 4, 8]
    assert all(not c.kwargs for c in kernel.configs)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **env), cwd=os.path.dirname(__file__))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour without the interpreter")
def test_without_interpreter_cpu_tensors_are_refused():
    r = _run("import torch, fanet_kernels as fk, fanet_kernels.triton as ft\n"
             "print(ft.BACKEND.devices, ft.AUTOTUNE, 'triton' in fk.available_backends('cpu'))\n"
             "x = torch.randn(1, 2, 3, 3)\n"
             "try:\n    torch.ops.fanet_triton.gate(x, x, torch.rand(1))\nexcept RuntimeError as e:\n    print('refused', e)\n",
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
from fanet_kernels.triton import focus as Fo, gate as G

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
    for gate in (False, True):
        compile_(G.pool_kernel, {"x_ptr": x, "u_ptr": x, "k_ptr": a, "out_ptr": x, "sums_ptr": a,
                                 **{k: i[k] for k in ("N", "C", "HW", "hw_per", "divisor")}},
                 {"GATE": gate, "CHANNELS_LAST": cl, "INT64": int64, "BLOCK_C": 64 if cl else 4,
                  "BLOCK_HW": 32 if cl else 512, "ACC": acc})
    for has_g, fold in [(True, True), (False, True), (True, False)]:
        compile_(G._gate_bwd_kernel, {"g_ptr": x, "gp_ptr": a, "x_ptr": x, "u_ptr": x, "k_ptr": a, "gx_ptr": x,
                                      "gu_ptr": x, "partial_ptr": a, **{k: i[k] for k in ("M", "C", "HW", "P", "iters")}},
                 {"HAS_G": has_g, "FOLD": fold, "CHANNELS_LAST": cl, "INT64": int64, "BLOCK": 1024, "ACC": acc})
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
