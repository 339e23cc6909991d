"""Shapes, dtypes, layouts and tolerances shared by the op test suites (CPU, Triton, CUDA)."""
from __future__ import annotations

import torch

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


def cuda_skip_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run on CUDA tensors here (None if it can)."""
    import fanet_kernels as fk

    if not torch.cuda.is_available():
        return "no CUDA GPU: torch.cuda.is_available() is False"
    if backend not in fk.available_backends("cuda"):
        reason = fk.backends.unavailable_reason(backend) or "it does not support CUDA tensors"
        return f"backend {backend!r} not available for CUDA tensors: {reason}"
    return None
