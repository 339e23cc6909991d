"""CUDA-only tests of the CUDA backend (SPEC §4): alignment, mixed dtypes, empty batch, streams, devices.

The op cases shared with the CPU backends (forward/backward vs the reference, opcheck, gradcheck,
torch.compile, bad inputs) run on CUDA tensors in the per-op files (test_gate.py, test_residual.py,
test_bn_gate.py, test_focus.py: targets "cuda-cuda", "triton-cuda").
Run with ``pytest -m cuda -rs``.  Without a GPU (or without the CUDA kernels built into
fanet_kernels._C) the whole module is skipped and ``-rs`` prints why.
"""
from __future__ import annotations

import pytest
import torch
from op_cases import DTYPES, SHAPES, TOL, cuda_skip_reason, grad_tol, grads, k_dtype, make, make_focus_weights, make_k

from fanet_kernels import backends, native, ops, reference

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
# only (no fold), grad_pooled only and both (fold).  The backward of the shared cases
# vs the reference (test_residual.py) covers the math; this covers the CUDA instantiations.
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


# ---- bit-identity with the CPU kernels (csrc/common/fa_math.h) ----------------------------------
# Both builds round every operation as written (-ffp-contract=off, --fmad=false) and fuse only where
# fa_math.h asks, so every element-wise output of the cuda backend equals the cpu backend's bit for
# bit on the same inputs.  Sums are added in another order on each device: those outputs (pooled,
# grad_k, the batch statistics, the weight gradients, and grad_z in training, which is formed from
# channel sums) are compared at the usual tolerances, and the largest difference in ulp is reported.
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}
_IDENTITY_SHAPES = [(2, 16, 8, 8), (3, 40, 5, 7), (4, 64, 14, 14), (2, 24, 33, 33), (3, 8, 1, 1), (1, 3, 7, 9)]
_max_ulps: dict[str, int] = {}  # what -> the largest difference seen, over all cases


def _ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """t's values as integers (int64) that are as many steps apart as the values are ulps apart."""
    bits = t.detach().cpu().contiguous().view(_BITS[t.dtype]).to(torch.int64)
    lowest = torch.iinfo(_BITS[t.dtype]).min  # sign-magnitude to two's complement; -0.0 maps to 0
    return torch.where(bits < 0, lowest - bits, bits)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance in ulps between a and b (same dtype); NaN against NaN counts 0, NaN
    against a number raises."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    a, b = a.detach().cpu(), b.detach().cpu()
    nan = a.isnan()
    assert torch.equal(nan, b.isnan()), "NaN in different places"
    if a.numel() == 0 or bool(nan.all()):
        return 0
    keep = ~nan.contiguous().view(-1)
    diff = (_ordered_bits(a).view(-1)[keep] - _ordered_bits(b).view(-1)[keep]).abs()
    return int(diff.max())


def _bn_params(c: int, dtype: torch.dtype, dev: str) -> list[torch.Tensor]:
    """weight, bias, running_mean, running_var of a BatchNorm over c channels (acc dtype)."""
    g = torch.Generator().manual_seed(7)
    acc = k_dtype(dtype)
    w, b, rm = (torch.randn(c, generator=g) * s + o for s, o in ((0.3, 1.0), (0.2, 0.0), (0.5, 0.0)))
    rv = torch.rand(c, generator=g) + 0.5
    return [t.to(acc).to(dev) for t in (w, b, rm, rv)]


Pairs = list[tuple[str, torch.Tensor, torch.Tensor]]


def compare_devices(shape: tuple[int, ...], dtype: torch.dtype, layout: str, dev: str = DEV,
                    eps: float = 1e-5, backend: str = "cuda") -> tuple[Pairs, Pairs]:
    """Every output of the ops of ``backend`` (cuda: torch.ops.fanet, which dispatches on the tensors'
    device; triton: torch.ops.fanet_triton) on ``dev`` tensors and of the C++ CPU kernels on the same
    values on CPU tensors, as (exact, reduced): lists of (what, on dev, on the CPU).  `exact` are the
    element-wise outputs, which must be bit-identical."""
    fanet = torch.ops.fanet
    n, c = shape[:2]
    x, u, g, z = (make(shape, dtype, layout, device=dev, seed=s) for s in (0, 1, 2, 4))
    k = make_k(n, k_dtype(dtype), device=dev)
    gp = make((n, c, 1, 1), dtype, "contiguous", device=dev, seed=3).view(n, c)
    w, b, rm, rv = _bn_params(c, dtype, dev)

    gpu = torch.ops.fanet_triton if backend == "triton" else fanet  # same schemas, minus momentum

    def on_both(name, *args):
        return (getattr(gpu, name)(*args),
                getattr(fanet, name)(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)))

    exact, reduced = [], []

    def add(names, pair, reduced_from=0):
        """names of the outputs of `pair` (results on dev, on the CPU); those from index
        reduced_from on (or named None) are reductions."""
        got, want = pair if isinstance(pair[0], tuple) else ((pair[0],), (pair[1],))
        for i, (what, a, e) in enumerate(zip(names, got, want)):
            if what is not None:
                (reduced if i >= reduced_from else exact).append((what, a, e))

    add(["gate out"], on_both("gate", x, u, k), 1)
    add(["gate_pool out", "gate_pool pooled"], on_both("gate_pool", x, u, k), 1)
    add(["residual out", "residual pooled"], on_both("residual_gate_pool", x, u, k), 1)
    add(["gate_backward grad_x", "gate_backward grad_u", "gate_backward grad_k"],
        on_both("gate_backward", g, x, u, k), 2)
    for tag, go, gpo in (("g", g, None), ("gp", None, gp), ("g+gp", g, gp)):
        add([f"gate_pool_backward({tag}) grad_x", f"gate_pool_backward({tag}) grad_u",
             f"gate_pool_backward({tag}) grad_k"], on_both("gate_pool_backward", go, gpo, x, u, k), 2)
        add([f"residual_backward({tag}) grad_x", f"residual_backward({tag}) grad_branch",
             f"residual_backward({tag}) grad_k"], on_both("residual_gate_pool_backward", go, gpo, x, u, k), 2)
    # BatchNorm gate, eval: the table comes from the running stats, the same on both devices.
    add(["bn eval out", "bn eval pooled", None, None],
        on_both("bn_residual_gate_pool", x, z, k, w, b, rm, rv, False, eps), 1)
    # Training: the batch statistics are sums (compared at a tolerance); given the device's own
    # statistics as running stats, the CPU's eval op must reproduce its out bit for bit.
    (out, pooled, mean, var), (_, _, mean_cpu, var_cpu) = on_both(
        fanet.bn_residual_gate_pool, x, z, k, w, b, None, None, True, eps)
    reduced += [("bn train mean", mean, mean_cpu), ("bn train var", var, var_cpu)]
    want = fanet.bn_residual_gate_pool(x.cpu(), z.cpu(), k.cpu(), w.cpu(), b.cpu(), mean.cpu(), var.cpu(), False, eps)
    exact.append(("bn train out (given its statistics)", out, want[0]))
    reduced.append(("bn train pooled (given its statistics)", pooled, want[1]))
    # Backward, given the same statistics on both devices: grad_x is element-wise in both modes,
    # grad_z too in eval; in training grad_z also takes the channel sums of grad_B.
    for training in (False, True):
        mode = "train" if training else "eval"
        add([f"bn {mode} grad_x", f"bn {mode} grad_z", f"bn {mode} grad_k", f"bn {mode} grad_weight",
             f"bn {mode} grad_bias"],
            on_both("bn_residual_gate_pool_backward", g, gp, x, z, k, w, b, mean_cpu.to(dev), var_cpu.to(dev),
                    training, eps), 1 if training else 2)
    return exact, reduced


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("shape", _IDENTITY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_elementwise_outputs_are_bit_identical_to_cpu(backend, shape, dname, layout):
    if reason := cuda_skip_reason(backend):
        pytest.skip(reason)
    if backend == "triton":
        import fanet_kernels.triton  # noqa: F401  (registers torch.ops.fanet_triton)
    dtype = DTYPES[dname]
    exact, reduced = compare_devices(shape, dtype, layout, backend=backend)
    worst = {}
    for what, got, want in exact:
        assert got.dtype == want.dtype and got.shape == want.shape, what
        worst[what] = ulp_distance(got, want)
    for what, got, want in reduced:
        tol = TOL[got.dtype]  # pooled, mean, var: the output dtype's rounding, in another order
        if "grad" in what:  # gradients: sums over H*W (and N) too, and grad_z's cancellations
            tol = {key: max(v, grad_tol(dtype)[key]) for key, v in tol.items()}
        torch.testing.assert_close(got.cpu(), want, **tol, msg=lambda m: f"{what}: {m}")
        worst[what] = ulp_distance(got, want)
    for what, ulps in worst.items():
        key = f"{backend} {dname} {what}"
        _max_ulps[key] = max(_max_ulps.get(key, 0), ulps)
    print(f"{backend} vs cpu, {dname} {layout} {shape}: element-wise max ulp "
          f"{max(worst[w] for w, _, _ in exact)}, reductions max ulp {max(worst[w] for w, _, _ in reduced)}")
    not_identical = {what: worst[what] for what, _, _ in exact if worst[what] != 0}
    assert not not_identical, f"element-wise outputs differ from the CPU's (ulps): {not_identical}"


@pytest.fixture(scope="module", autouse=True)
def _report_ulps(request):
    """After the module: the largest ulp difference per output and dtype, on the terminal."""
    yield
    if not _max_ulps:
        return
    lines = [f"  {what}: {ulps}" for what, ulps in sorted(_max_ulps.items())]
    text = "cuda/triton vs cpu backend, largest difference in ulp per output (0: bit-identical):\n" + "\n".join(lines)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("\n" + text)
    else:
        print(text)


def test_build_covers_this_gpu():
    """The archs the build recorded run on this GPU, and the cuda backend's device check agrees."""
    from fanet_kernels import cuda_arch

    archs = native.extension.cuda_archs()
    cc = torch.cuda.get_device_capability()
    assert cuda_arch.runs_on(cuda_arch.parse_arch_list(archs), cc), (archs, cc)
    assert backends.load("cuda").device_check(torch.device("cuda", torch.cuda.current_device())) is None
