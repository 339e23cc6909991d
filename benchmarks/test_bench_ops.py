"""Op-level benchmarks of fanet::gate_pool, residual_gate_pool, bn_residual_gate_pool,
bn_se_residual_gate_pool, bn_se_residual, gate and focus (SPEC §5).

One pytest-benchmark group per (op, pass, shape, dtype, layout, device); its rows, in run
order: ``clone`` (torch.clone of activation-sized tensors moving the same bytes: the copy
bound), ``reference``
(eager plain PyTorch), ``compiled`` (torch.compile of the reference, compiled and warmed
up before timing) and one row per fused backend (``cpu``; ``cuda``/``triton`` on a GPU).

Bytes per call, with S the bytes of one activation tensor (SPEC §5):
  gate_pool, gate: forward 3·S (read x, u; write out), forward+backward 3·S + 5·S = 8·S.
  residual_gate_pool: the same, with the branch B in place of u (its reference is the block's
  add + ReLU followed by gate_pool, which is what an unfused residual FA block runs).
  focus: forward 1·S (read x); forward+backward 3·S (the backward re-reads x for the pool,
  since focus returns only k', and writes grad_x).
  bn_residual_gate_pool (training mode): forward 4·S (the batch statistics read z, then the gate
  reads x, z and writes out), forward+backward 4·S + 8·S = 12·S (its first backward pass reads
  grad_out, x, z and writes grad_x, grad_B; the second reads grad_B, z and writes grad_z).  Its
  reference is F.batch_norm followed by the residual block's add + ReLU and gate_pool.
  bn_se_residual_gate_pool (training mode): the same bytes, 4·S forward (z read twice: the batch
  statistics with the SE squeeze, then the output pass with x; out written; the pool is (N, C)) and
  4·S + 8·S = 12·S forward+backward.  Its reference is the eager tail of an SE residual block:
  F.batch_norm, the SE block (mean, two linear layers, sigmoid, scale), the add + ReLU, then gate_pool.
  bn_se_residual (no gate, no pool: an SE network without FA): the same 4·S and 12·S; its reference
  is that tail without the gate_pool.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import fanet_kernels as fk
from fanet_kernels import reference

from _common import (compile_fresh, devices, fused_backends, is_quick, op_families, record, run_benchmark, thp_setting,
                     time_median)

# Activation shapes (N, C, H, W) of the networks FA is deployed in.
SHAPES = {
    "resnet56": [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8)],
    "resnext29": [(128, 256, 32, 32), (128, 1024, 8, 8)],
    "resnet50": [(32, 256, 56, 56)],
}
QUICK_SHAPES = {"resnet56": [(128, 32, 16, 16)], "resnext29": [(128, 1024, 8, 8)], "resnet50": [(32, 256, 56, 56)]}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
PASSES = ("fwd", "fwd+bwd")
FULL_OPS = ("gate_pool", "residual_gate_pool", "bn_residual_gate_pool", "bn_se_residual_gate_pool", "bn_se_residual",
            "gate", "focus")
SE_OPS = ("bn_se_residual_gate_pool", "bn_se_residual")
# The SE block's hidden width C // r: the zoo's r = 8 for the CIFAR ResNets, the usual 16 elsewhere.
SE_REDUCTION = {"resnet56": 8, "resnext29": 16, "resnet50": 16}
QUICK_OPS = ("gate_pool",)
# Bytes moved per call, in units of S (see the module docstring).
BYTES_IN_S = {("gate_pool", "fwd"): 3, ("gate_pool", "fwd+bwd"): 8, ("gate", "fwd"): 3, ("gate", "fwd+bwd"): 8,
              ("residual_gate_pool", "fwd"): 3, ("residual_gate_pool", "fwd+bwd"): 8,
              ("focus", "fwd"): 1, ("focus", "fwd+bwd"): 3,
              ("bn_residual_gate_pool", "fwd"): 4, ("bn_residual_gate_pool", "fwd+bwd"): 12,
              **{(op, p): b for op in SE_OPS for p, b in (("fwd", 4), ("fwd+bwd", 12))}}


@dataclass(frozen=True)
class Case:
    op: str
    passes: str
    family: str
    shape: tuple[int, int, int, int]
    dtype: str
    layout: str
    device: str
    impl: str  # clone | reference | compiled | <fused backend name>

    @property
    def group(self) -> str:
        n, c, h, w = self.shape
        return f"{self.op} {self.passes} {self.family} {n}x{c}x{h}x{w} {self.dtype} {self.layout} {self.device}"

    @property
    def id(self) -> str:
        n, c, h, w = self.shape
        return f"{self.op}-{self.passes}-{n}x{c}x{h}x{w}-{self.dtype}-{self.layout}-{self.device}-{self.impl}"

    @property
    def activation_bytes(self) -> int:
        n, c, h, w = self.shape
        return n * c * h * w * DTYPES[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return BYTES_IN_S[(self.op, self.passes)] * self.activation_bytes


def cases(config: pytest.Config) -> list[Case]:
    quick = is_quick(config)
    shapes = QUICK_SHAPES if quick else SHAPES
    out = []
    for device in devices(config):
        impls = ["clone", "reference", "compiled", *fused_backends(device)]
        for op in op_families(config, QUICK_OPS if quick else FULL_OPS):
            for family, family_shapes in shapes.items():
                for shape in family_shapes:
                    for dtype in DTYPES:
                        for layout in LAYOUTS:
                            for passes in PASSES:
                                out += [Case(op, passes, family, shape, dtype, layout, device, i) for i in impls]
    return out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        all_cases = cases(metafunc.config)
        metafunc.parametrize("case", all_cases, ids=[c.id for c in all_cases])


# Inputs of the group being run (rows of a group run one after another): made once per group,
# dropped when the next group starts, so at most one case's tensors are alive.
_inputs: dict[str, dict[str, torch.Tensor]] = {}


def inputs(case: Case) -> dict[str, torch.Tensor]:
    if case.group not in _inputs:
        _inputs.clear()
        gen = torch.Generator().manual_seed(0)
        dt, fmt = DTYPES[case.dtype], LAYOUTS[case.layout]
        n, c = case.shape[:2]

        def act() -> torch.Tensor:
            t = torch.randn(case.shape, generator=gen).to(case.device, dt)
            return t.contiguous(memory_format=fmt)

        t = {"x": act(), "u": act(), "k": torch.rand(n, generator=gen).to(case.device, dt)}
        h1 = max(1, c // 4)
        t["w1"] = (torch.randn(h1, c, generator=gen) / c ** 0.5).to(case.device, dt)
        t["b1"] = torch.zeros(h1).to(case.device, dt)
        t["w2"] = (torch.randn(1, h1, generator=gen) / h1 ** 0.5).to(case.device, dt)
        t["b2"] = torch.zeros(1).to(case.device, dt)
        t["grad_out"] = act()
        t["grad_pooled"] = torch.randn(n, c, generator=gen).to(case.device, dt)
        t["grad_k"] = torch.randn(n, generator=gen).to(case.device, dt)
        t["bn_weight"] = (1 + 0.1 * torch.randn(c, generator=gen)).to(case.device, dt)
        t["bn_bias"] = (0.1 * torch.randn(c, generator=gen)).to(case.device, dt)
        t["running_mean"], t["running_var"] = torch.zeros(c, device=case.device), torch.ones(c, device=case.device)
        hidden = max(1, c // SE_REDUCTION[case.family])
        t["se_w1"] = (torch.randn(hidden, c, generator=gen) / c ** 0.5).to(case.device, dt)
        t["se_b1"] = (0.1 * torch.randn(hidden, generator=gen)).to(case.device, dt)
        t["se_w2"] = (torch.randn(c, hidden, generator=gen) / hidden ** 0.5).to(case.device, dt)
        t["se_b2"] = (0.1 * torch.randn(c, generator=gen)).to(case.device, dt)
        _inputs[case.group] = t
    return _inputs[case.group]


def make_clone(case: Case):
    """Clones that read and write case.nbytes in total (nbytes / 2 each way), in tensors of at
    most one activation each, like the ops' outputs: one large clone would get its memory from a
    fresh mapping (glibc serves blocks of 32 MiB and more by mmap) and pay page faults on every
    call that activation-sized outputs, reused from the heap, do not pay."""
    dt = DTYPES[case.dtype]
    left, piece = case.nbytes // 2 // dt.itemsize, case.activation_bytes // dt.itemsize
    sizes = [piece] * (left // piece) + ([left % piece] if left % piece else [])
    srcs = [torch.empty(n, dtype=dt, device=case.device).fill_(1.0) for n in sizes]
    return lambda: [s.clone() for s in srcs]


def make_call(case: Case):
    """The timed callable of a non-clone row: forward alone, or forward then the backward
    (torch.autograd.grad, so no .grad accumulates between rounds)."""
    t = inputs(case)
    if case.impl == "reference":
        fn = getattr(reference, case.op)
    elif case.impl == "compiled":
        fn = compile_fresh(getattr(reference, case.op))
    else:
        public = getattr(fk, case.op)
        fn = lambda *a: public(*a, backend=case.impl)  # noqa: E731
    train = case.passes == "fwd+bwd"
    if case.op == "focus":
        leaves = [t[k].detach().requires_grad_(train) for k in ("x", "w1", "b1", "w2", "b2")]
        grads = (t["grad_k"],)
    elif case.op == "bn_residual_gate_pool":  # u as z, the branch before its BatchNorm (training mode)
        leaves = [t[k].detach().requires_grad_(train) for k in ("x", "u", "k", "bn_weight", "bn_bias")]
        grads = (t["grad_out"], t["grad_pooled"])
        bn_fn, stats = fn, (t["running_mean"], t["running_var"])
        fn = lambda *a: bn_fn(*a, *stats)  # noqa: E731
    elif case.op in SE_OPS:  # u as z, the branch before its BatchNorm (training mode)
        gated = case.op == "bn_se_residual_gate_pool"
        names = ("x", "u", *("k",) * gated, "bn_weight", "bn_bias", "se_w1", "se_b1", "se_w2", "se_b2")
        leaves = [t[k].detach().requires_grad_(train) for k in names]
        grads = (t["grad_out"], t["grad_pooled"]) if gated else (t["grad_out"],)
        se_fn, stats = fn, (t["running_mean"], t["running_var"])
        fn = lambda *a: se_fn(*a, *stats)  # noqa: E731
    else:
        leaves = [t[k].detach().requires_grad_(train) for k in ("x", "u", "k")]
        grads = (t["grad_out"],) if case.op == "gate" else (t["grad_out"], t["grad_pooled"])

    if not train:
        return lambda: fn(*leaves)

    def step():
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        return torch.autograd.grad(outs, leaves, grads)

    return step


def test_op(benchmark, case: Case, request: pytest.FixtureRequest) -> None:
    benchmark.group = case.group
    benchmark.extra_info.update(op=case.op, passes=case.passes, family=case.family, shape=list(case.shape),
                                dtype=case.dtype, layout=case.layout, device=case.device, impl=case.impl,
                                bytes_in_S=BYTES_IN_S[(case.op, case.passes)], thp_mem_alloc_enable=thp_setting())
    if case.impl not in ("clone", "reference", "compiled"):  # a backend without the op runs the reference
        benchmark.extra_info["fused_kernel"] = getattr(fk.backends.load(case.impl), case.op, None) is not None
    fn = make_clone(case) if case.impl == "clone" else make_call(case)
    # Warm-up outside the timed region: compiles (torch.compile), autotunes, first-touches memory.
    for _ in range(2 if case.impl == "compiled" else 1):
        fn()
    run_benchmark(benchmark, fn, case.device, request.config)
    record(benchmark, case.group, case.impl, case.nbytes,
           baseline=lambda: time_median(make_clone(case), case.device))
