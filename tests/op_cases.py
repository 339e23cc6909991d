"""The cases the op suites share: the (backend, device) targets, shapes, dtypes, layouts,
tolerances and input makers.  conftest.py sets TRITON_INTERPRET before this module is imported and
makes ``target`` a fixture over TARGETS.  (Not in conftest.py itself: test files import these names,
and ``conftest`` is also the name of benchmarks/conftest.py, which one pytest run over both folders
loads under the same module name.)

A target is a (backend, device) pair: every fused backend on CPU tensors ("cpu", and "triton" under
TRITON_INTERPRET=1) and on CUDA tensors ("cuda", "triton"), the CUDA ones marked ``cuda``; a target
that cannot run here is skipped with the reason.  Test ids start with "<backend>-<device>":
``-k cpu-cpu`` selects the C++ CPU kernels, ``-k triton-cpu`` the Triton interpreter, ``-m cuda -rs``
the CUDA targets.
"""
from __future__ import annotations

import pytest
import torch

import fanet_kernels as fk

# (N, C, H, W): empty batch, single sample, single channel, 1x1 maps, odd sizes, a large C with
# H*W = 1, and (last) a tensor of several MB.
SHAPES = {
    "N0": (0, 4, 5, 5),
    "N1": (1, 3, 7, 7),
    "C1": (2, 1, 5, 5),
    "C16": (3, 16, 5, 7),  # channels_last: rows shorter than a SIMD step (csrc/cpu spans_rows)
    "HW1": (3, 8, 1, 1),
    "7x7": (2, 5, 7, 7),
    "13x17": (2, 3, 13, 17),
    "bigC_HW1": (2, 2048, 1, 1),
    "large": (4, 64, 64, 64),  # 4 MiB in float32
}
# The Triton interpreter simulates every program in numpy: it gets a smaller "large" case.
LARGE_FOR = {("triton", "cpu"): (2, 64, 64, 64)}

DTYPES = {"f32": torch.float32, "f64": torch.float64, "f16": torch.float16, "bf16": torch.bfloat16}

# Explicit tolerances: the kernels and the reference both compute in float32 (float64) and
# round once, so they differ by summation order only, i.e. at most an ulp of the output dtype.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}

LAYOUTS = ("contiguous", "channels_last", "strided")
# What bad input may raise: the error must name the argument, whatever its type.
BAD_ERRORS = (ValueError, TypeError, RuntimeError)


def over_cases(*, empty_batch: bool = True):
    """Parametrizes a test over every shape of SHAPES (without N = 0 if not ``empty_batch``), dtype of
    DTYPES and layout of LAYOUTS, as the arguments ``sname``, ``dname`` and ``layout``."""
    shapes = list(SHAPES) if empty_batch else [s for s in SHAPES if s != "N0"]
    marks = (pytest.mark.parametrize("sname", shapes), pytest.mark.parametrize("dname", list(DTYPES)),
             pytest.mark.parametrize("layout", LAYOUTS))

    def apply(fn):
        for mark in marks:  # the innermost first, as stacked decorators apply
            fn = mark(fn)
        return fn
    return apply


def shape_of(name: str, target: tuple[str, str], shapes: dict = SHAPES) -> tuple[int, ...]:
    """shapes[name], or the target's own "large" case."""
    return LARGE_FOR.get(target, shapes[name]) if name == "large" else shapes[name]


def cuda_skip_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run on CUDA tensors here (None if it can)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU: torch.cuda.is_available() is False"
    if backend not in fk.available_backends("cuda"):
        reason = fk.backends.unavailable_reason(backend) or "it does not support CUDA tensors"
        return f"backend {backend!r} not available for CUDA tensors: {reason}"
    return None


def cpu_skip_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run on CPU tensors here (None if it can)."""
    if backend in fk.available_backends("cpu"):
        return None
    reason = fk.backends.unavailable_reason(backend) or "it does not support CPU tensors"
    return f"backend {backend!r} not available for CPU tensors: {reason}"


def triton_device() -> str:
    """The device the triton backend runs on here ("cpu" under TRITON_INTERPRET=1, else "cuda");
    skips the calling test module where it runs on neither."""
    pytest.importorskip("triton")
    if cpu_skip_reason("triton") is None:
        return "cpu"
    if cuda_skip_reason("triton") is None:
        return "cuda"
    pytest.skip("the triton backend runs neither on CPU (no TRITON_INTERPRET=1) nor on a GPU here",
                allow_module_level=True)


def _target(backend: str, device: str):
    reason = cpu_skip_reason(backend) if device == "cpu" else cuda_skip_reason(backend)
    marks = [pytest.mark.skipif(reason is not None, reason=reason or "")]
    return pytest.param((backend, device), id=f"{backend}-{device}",
                        marks=marks + ([pytest.mark.cuda] if device == "cuda" else []))


TARGETS = [_target(b, d) for b, d in (("cpu", "cpu"), ("triton", "cpu"), ("cuda", "cuda"), ("triton", "cuda"))]
CPU_TARGETS = [t for t in TARGETS if t.values[0][1] == "cpu"]
# The raw C++ ops (torch.ops.fanet.*) behind the "cpu" and "cuda" backends.
NATIVE_TARGETS = [t for t in TARGETS if t.values[0][0] in ("cpu", "cuda")]
NEEDS_CPU = pytest.mark.skipif(cpu_skip_reason("cpu") is not None, reason=cpu_skip_reason("cpu") or "")


def native_ops(backend: str):
    """The op namespace behind a fused backend: torch.ops.fanet (cpu, cuda) or torch.ops.fanet_<backend>."""
    if backend in ("cpu", "cuda"):
        return torch.ops.fanet
    if backend == "triton":
        import fanet_kernels.triton  # noqa: F401  (registers torch.ops.fanet_triton.*)
    return getattr(torch.ops, f"fanet_{backend}")


def opcheck(backend: str, op: str, args: tuple) -> None:
    """torch.library.opcheck of native_ops(backend).<op>.  Triton's backward ops have no autograd
    kernel (the C++ ones have one that raises on double backward), so opcheck's autograd-registration
    check does not apply to them."""
    utils = {}
    if backend == "triton" and op.endswith("_backward"):
        utils = dict(test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    torch.library.opcheck(getattr(native_ops(backend), op).default, args, **utils)


def assert_names_argument(op: str, args: tuple, name: str, backend: str) -> None:
    """ops.<op>(*args) raises an error that names the argument (the regex ``name``), with the reference
    backend's message word for word (the C++ checks, csrc/common/checks.h, say what _validate.py says,
    dtypes spelled as in Python); so does the raw op, bypassing the Python checks."""
    with pytest.raises(BAD_ERRORS, match=name) as got:
        getattr(fk.ops, op)(*args, backend=backend)
    with pytest.raises(BAD_ERRORS) as want:
        getattr(fk.ops, op)(*args, backend="reference")
    assert (got.type, str(got.value)) == (want.type, str(want.value))
    with pytest.raises(BAD_ERRORS, match=name):
        getattr(native_ops(backend), op)(*args)


def other_device(dev: str) -> str:
    """A device the inputs of a ``dev`` call must not be on ("meta" stands in for a second device on CPU)."""
    return "meta" if dev == "cpu" else "cpu"


def memory_format_of(x: torch.Tensor, layout: str) -> torch.memory_format:
    """The format an op's output takes for input x: x's, and contiguous for any other stride pattern."""
    return torch.channels_last if layout == "channels_last" and not x.is_contiguous() else torch.contiguous_format


def make(shape: tuple[int, ...], dtype: torch.dtype, layout: str, *, device: str = "cpu",
         requires_grad: bool = False, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """A random (N, C, H, W) tensor laid out as asked: 'strided' is a non-contiguous view."""
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":  # every other column of a twice-as-wide tensor
        n, c, h, w = shape
        t = (torch.randn(n, c, h, 2 * w, generator=g) * scale).to(dtype).to(device)[..., ::2]
    else:
        t = (torch.randn(shape, generator=g) * scale).to(dtype).to(device)
        if layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(requires_grad)


def make_k(n: int, dtype: torch.dtype = torch.float32, *, device: str = "cpu",
           requires_grad: bool = False, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g).to(dtype).to(device).requires_grad_(requires_grad)


def make_gate_inputs(shape: tuple[int, ...], dtype: torch.dtype, layout: str, dev: str = "cpu", *,
                     requires_grad: bool = False) -> list[torch.Tensor]:
    """[x, u, k] (or [x, branch, k]) as the gate ops take them, k in k_dtype(dtype)."""
    return [make(shape, dtype, layout, device=dev, requires_grad=requires_grad, seed=0),
            make(shape, dtype, layout, device=dev, requires_grad=requires_grad, seed=1),
            make_k(shape[0], k_dtype(dtype), device=dev, requires_grad=requires_grad)]


def make_focus_weights(c: int, dtype: torch.dtype = torch.float32, *, device: str = "cpu",
                       requires_grad: bool = False, r1: int = 4, seed: int = 2) -> list[torch.Tensor]:
    """w1 (H1, C), b1 (H1,), w2 (1, H1), b2 (1,) with H1 = max(1, C // r1).  b1 is drawn around
    0.3 so that hidden units are live and k' depends on x (with H1 = 1 a negative b1 made k'
    sigmoid(b2) whatever x was, and every gradient but b2's zero)."""
    g = torch.Generator().manual_seed(seed)
    h1 = max(1, c // r1)
    ws = [torch.randn(h1, c, generator=g) / max(1, c) ** 0.5, 0.3 + torch.randn(h1, generator=g) * 0.1,
          torch.randn(1, h1, generator=g) / h1 ** 0.5, torch.randn(1, generator=g) * 0.1]
    return [w.to(dtype).to(device).requires_grad_(requires_grad) for w in ws]


def k_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of k and the focus weights for inputs of ``dtype`` (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def grad_tol(dtype: torch.dtype) -> dict:
    """Gradients reduced over H*W (pooled, grad_k, weight grads) get a looser bound."""
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-3)


def grads(fn, inputs, seed: int = 5) -> tuple[torch.Tensor, ...]:
    """Gradients of sum(out_i * random_i) over fn's outputs, w.r.t. inputs."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    return torch.autograd.grad(loss, inputs)


def fused_and_reference_grads(op: str, backend: str, inputs) -> tuple[tuple[torch.Tensor, ...], ...]:
    """grads() of the public op ``op`` on ``backend`` and of the reference's ``op``, with the same grad_out."""
    return (grads(lambda *a: getattr(fk.ops, op)(*a, backend=backend), inputs),
            grads(getattr(fk.reference, op), inputs))


def assert_same_bits_at_any_thread_count(run) -> None:
    """run() (a list of tensors) gives identical bits with several threads, 1 and 3: sums reduced
    without atomics (the thread count matters to the CPU kernels only)."""
    threads = torch.get_num_threads()
    results = []
    for n in (max(threads, 2), 1, 3):
        torch.set_num_threads(n)
        try:
            results.append(run())
        finally:
            torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)
