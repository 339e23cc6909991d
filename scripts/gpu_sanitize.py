"""Calls every fused op of one backend, forward and backward, on small inputs that reach each kernel
variant: both layouts, float32 and bfloat16, packed and scalar (misaligned) paths, one plane per warp
and per block, channels_last splits, and an empty batch.  Small enough to run under compute-sanitizer:

    compute-sanitizer --tool memcheck python3 scripts/gpu_sanitize.py
    compute-sanitizer --tool racecheck python3 scripts/gpu_sanitize.py
    python3 scripts/gpu_sanitize.py --device cpu --backend cpu     # the same calls on the CPU (a dry run)

Exits 1 if an op call raised (each one's error is printed), 0 otherwise; the sanitizer reports the
kernels' own memory errors and races.  ``call`` is also what scripts/gpu_determinism.py runs.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

import torch

import fanet_kernels as fk
from fanet_kernels import ops

OPS = ("gate", "gate_pool", "residual_gate_pool", "bn_residual_gate_pool", "bn_residual_gate_pool_eval", "focus",
       "mlp")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
LAYOUTS = ("contiguous", "channels_last")
# (N, C, H, W): odd sizes (scalar path), a plane per warp (H*W <= 512) and per block, channels_last
# row splits (H*W well past one block's rows), and an empty batch.
SHAPES = [(2, 8, 5, 7), (2, 16, 8, 8), (2, 32, 40, 40), (0, 4, 3, 3)]
MISALIGNED_SHAPES = [(2, 8, 5, 7), (2, 16, 8, 8)]
EMPTY_OK = ("gate", "gate_pool", "residual_gate_pool", "focus")  # ops defined on N = 0


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def activation(shape: tuple[int, ...], dtype: torch.dtype, layout: str, device: str, gen: torch.Generator,
               misaligned: bool = False) -> torch.Tensor:
    """A random (N, C, H, W) tensor in ``layout``; ``misaligned``: its data starts one element into
    its storage, so it is not 16-byte aligned."""
    n, c, h, w = shape
    numel = n * c * h * w
    flat = torch.randn(numel + int(misaligned), generator=gen).to(device=device, dtype=dtype)[int(misaligned):]
    if layout == "channels_last":
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(shape)


def _like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random tensor shaped, typed and laid out like ``t`` (a gradient for it)."""
    g = torch.randn(t.shape, generator=gen).to(device=t.device, dtype=t.dtype)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        g = g.contiguous(memory_format=torch.channels_last)
    return g


def call(op: str, backend: str, shape: tuple[int, ...], dtype: torch.dtype, layout: str, device: str,
         seed: int = 0, misaligned: bool = False) -> dict[str, torch.Tensor]:
    """``op`` forward on fresh random inputs drawn from ``seed``, then its backward for random output
    gradients: {"out0": ..., "grad_<input>": ..., "running_mean": ...}, in the order computed."""
    gen = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    acc = _acc(dtype)

    def small(*size: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(size, generator=gen) * scale + shift).to(device=device, dtype=acc)

    running: dict[str, torch.Tensor] = {}
    if op == "mlp":
        l = torch.randn(n, c, generator=gen).to(device=device, dtype=dtype)
        h1 = max(1, c // 4)
        leaves = {"l": l, "w1": small(h1, c, scale=c ** -0.5), "b1": small(h1, scale=0.1, shift=0.3),
                  "w2": small(1, h1, scale=h1 ** -0.5), "b2": small(1, scale=0.1)}
    elif op == "focus":
        h1 = max(1, c // 4)
        leaves = {"x": activation(shape, dtype, layout, device, gen, misaligned),
                  "w1": small(h1, c, scale=c ** -0.5), "b1": small(h1, scale=0.1, shift=0.3),
                  "w2": small(1, h1, scale=h1 ** -0.5), "b2": small(1, scale=0.1)}
    else:
        second = {"gate": "u", "gate_pool": "u", "residual_gate_pool": "branch"}.get(op, "z")
        leaves = {"x": activation(shape, dtype, layout, device, gen, misaligned),
                  second: activation(shape, dtype, layout, device, gen, misaligned),
                  "k": torch.rand(n, generator=gen).to(device=device, dtype=acc)}
        if op.startswith("bn_"):
            leaves["weight"], leaves["bias"] = small(c, scale=0.1, shift=1.0), small(c, scale=0.1)
            running = {"running_mean": small(c, scale=0.1), "running_var": small(c, scale=0.1, shift=1.0).abs()}
    for t in leaves.values():
        t.requires_grad_(True)
    args = list(leaves.values())
    if op == "bn_residual_gate_pool":
        outs = ops.bn_residual_gate_pool(*args, running["running_mean"], running["running_var"], True, backend=backend)
    elif op == "bn_residual_gate_pool_eval":
        outs = ops.bn_residual_gate_pool(*args, running["running_mean"], running["running_var"], False,
                                        backend=backend)
    else:
        outs = getattr(ops, op)(*args, backend=backend)
    outs = outs if isinstance(outs, tuple) else (outs,)
    result = {f"out{i}": o.detach() for i, o in enumerate(outs)}
    grads = torch.autograd.grad(outs, args, [_like(o, gen) for o in outs], allow_unused=True)
    for name, g in zip(leaves, grads):
        if g is not None:
            result[f"grad_{name}"] = g
    result.update({name: t.detach().clone() for name, t in running.items()})  # updated in training
    return result


def cases(shapes: list[tuple[int, ...]], dtypes: list[str], misaligned_shapes: list[tuple[int, ...]]) -> list[tuple]:
    """(op, shape, dtype name, layout, misaligned) for every op, shape, dtype and layout (mlp, which
    has no layout, once per shape and dtype)."""
    out = []
    for shape in shapes:
        for dname in dtypes:
            for layout in LAYOUTS:
                for mis in (False, True) if shape in misaligned_shapes else (False,):
                    for op in OPS:
                        if (op == "mlp" and (layout != "contiguous" or mis)) or (shape[0] == 0 and op not in EMPTY_OK):
                            continue
                        out.append((op, shape, dname, layout, mis))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="device of the tensors (default cuda)")
    parser.add_argument("--backend", default=None, help="fanet backend (default: cuda on a GPU, cpu on the CPU)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated (default float32,bfloat16)")
    args = parser.parse_args(argv)
    backend = args.backend or ("cpu" if args.device == "cpu" else "cuda")
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        parser.error(f"--dtypes: unknown {', '.join(bad)} (choose from {', '.join(DTYPES)})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_sanitize: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if backend not in fk.available_backends(args.device):
        print(f"gpu_sanitize: --backend {backend} is not available for {args.device} tensors: "
              f"{fk.backends.unavailable_reason(backend)}", file=sys.stderr)
        return 2
    start, failures = time.perf_counter(), []
    todo = cases(SHAPES, dtypes, MISALIGNED_SHAPES)
    for op, shape, dname, layout, mis in todo:
        what = f"{op} {'x'.join(map(str, shape))} {dname} {layout}{' misaligned' if mis else ''}"
        try:
            call(op, backend, shape, DTYPES[dname], layout, args.device, misaligned=mis)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
        except Exception as exc:  # report every failing call, not just the first
            failures.append(what)
            print(f"gpu_sanitize: FAILED {what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                  flush=True)
    print(f"gpu_sanitize: {len(todo) - len(failures)} of {len(todo)} op calls (forward+backward) ran on backend "
          f"{backend}, {args.device} tensors, in {time.perf_counter() - start:.1f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
