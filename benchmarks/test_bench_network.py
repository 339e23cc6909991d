"""Network-level benchmark: one training step (forward + backward + SGD step) of ResNet-56
against SE-ResNet-56, FA-ResNet-56 and FA-SE-ResNet-56 on CIFAR shapes.

One group per (batch, device); rows, in run order: ``resnet56`` eager and compiled;
``se_resnet56`` eager without the fold (every block's BatchNorm, SE, add and ReLU as eager
ops: ``create_model(..., fuse=False)``) and with the fold on each fused backend (the block tail
in one ``bn_se_residual`` op, the zoo's default); then for each FA network the fused backend(s)
of the device, the ``reference`` backend (eager FA), ``compiled`` (torch.compile of the model on
the reference backend) and ``compiled-<fused>`` (torch.compile of the model on a fused backend:
Inductor compiles everything around the fused ops, which it calls as they are); FA-SE-ResNet-56
also on each fused backend without the fold (every block's BatchNorm, SE, add and ReLU eager, only
the FA gate and pool fused); compiled rows are compiled and warmed up before timing.  Rows without the
fold have ids ending ``-nofold`` and ``fold: false`` in extra_info.  Each row's extra_info has the
model's parameters and multiply-adds and its time overhead over ResNet-56 in the same mode (eager
for fused/reference, compiled for compiled), beside the parameter and multiply-add overheads; eager FA rows also get
``paired_time_vs_resnet56``: the median ratio of the two steps timed back to back (15 pairs;
``paired_iqr`` its quartiles), so a load change between rows
(shared machine) does not enter the ratio.
"""
from __future__ import annotations

import importlib
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

import fanet_kernels as fk

from _common import devices, fused_backends, is_quick, median_seconds, sync, thp_setting

try:
    zoo = importlib.import_module("fanet_kernels.zoo")
    ZOO_ERROR = ""
except Exception as exc:  # the zoo lands in its own issue; skip, saying why
    zoo = None
    ZOO_ERROR = f"fanet_kernels.zoo is not importable ({type(exc).__name__}: {exc})"

BASE = "resnet56"
SE_BASE = "se_resnet56"  # for context: FA-SE-ResNet-56's overhead over plain SE
FA_MODELS = ("fa_resnet56", "fa_se_resnet56")
NUM_CLASSES = 10


@dataclass(frozen=True)
class NetCase:
    model: str
    impl: str  # eager | compiled (resnet56); <fused backend> | reference | compiled | compiled-<fused> (FA)
    batch: int
    device: str
    fold: bool = True  # False: create_model(..., fuse=False), every block's tail as eager ops

    @property
    def compiled(self) -> bool:
        return self.impl.startswith("compiled")

    @property
    def backend(self) -> str:
        """The fanet backend the step runs on: "compiled-<backend>" names it; eager and compiled
        (of ResNet-56 or of an FA model) run the reference."""
        return self.impl.partition("-")[2] or ("reference" if self.impl in ("eager", "compiled") else self.impl)

    @property
    def group(self) -> str:
        return f"train_step cifar10 b{self.batch} 3x32x32 float32 {self.device}"

    @property
    def id(self) -> str:
        return f"{self.model}-{self.impl}-b{self.batch}-{self.device}" + ("" if self.fold else "-nofold")


def net_cases(config: pytest.Config) -> list[NetCase]:
    """Quick mode: batch 32 and no compiled rows (compiling a whole training step takes
    minutes on a 2-core CPU)."""
    quick = is_quick(config)
    batch = 32 if quick else 128
    compiled = () if quick else ("compiled",)
    out = []
    for device in devices(config):
        fused = fused_backends(device)
        compiled_fused = () if quick else tuple(f"compiled-{b}" for b in fused)
        out += [NetCase(BASE, impl, batch, device) for impl in ("eager", *compiled)]
        out.append(NetCase(SE_BASE, "eager", batch, device, fold=False))
        out += [NetCase(SE_BASE, impl, batch, device) for impl in fused]
        for model in FA_MODELS:
            out += [NetCase(model, impl, batch, device)
                    for impl in (*fused, "reference", *compiled, *compiled_fused)]
            if model == "fa_se_resnet56":
                out += [NetCase(model, impl, batch, device, fold=False) for impl in fused]
    return out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "net_case" in metafunc.fixturenames:
        all_cases = net_cases(metafunc.config)
        metafunc.parametrize("net_case", all_cases, ids=[c.id for c in all_cases])


def count_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of one forward: fanet_kernels.complexity if it offers a counter, else
    torch's FlopCounterMode (matmul/conv FLOPs / 2) on the reference backend, where the FA
    MLPs are plain Linear calls it can see."""
    complexity = None
    try:
        complexity = importlib.import_module("fanet_kernels.complexity")
    except ImportError:
        pass
    for name in ("count_macs", "macs", "multiply_adds"):
        fn = getattr(complexity, name, None)
        if callable(fn):
            try:
                return int(fn(model, tuple(x.shape[1:])))
            except Exception:
                break
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), fk.use_backend("reference"), FlopCounterMode(display=False) as counter:
        model.eval()(x[:1])
    model.train()
    return counter.get_total_flops() // 2


# Per model: (parameters, multiply-adds per image), and the step medians of the run.
_complexity: dict[str, tuple[int, int]] = {}
_medians: dict[tuple[str, str, bool], float] = {}


def complexity_of(name: str, device: str, model: Optional[torch.nn.Module] = None) -> tuple[int, int]:
    """(parameters, multiply-adds per image) of zoo model ``name``, counted once."""
    if name not in _complexity:
        model = model or zoo.create_model(name, num_classes=NUM_CLASSES).to(device)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        _complexity[name] = (params, count_macs(model, torch.randn(1, 3, 32, 32, device=device)))
    return _complexity[name]


def build(case: NetCase):
    torch.manual_seed(0)
    model = zoo.create_model(case.model, num_classes=NUM_CLASSES, fuse=case.fold).to(case.device)
    complexity_of(case.model, case.device, model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    backend = case.backend
    if case.compiled:
        torch._dynamo.reset()
        forward = torch.compile(model)
    else:
        forward = model
    x = torch.randn(case.batch, 3, 32, 32, device=case.device)
    y = torch.randint(0, NUM_CLASSES, (case.batch,), device=case.device)

    def step() -> None:
        with fk.use_backend(backend):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(forward(x), y).backward()
            opt.step()
        sync(case.device)

    return step


_base_steps: dict[tuple[int, str], object] = {}


def paired_ratio(step, case: NetCase, rounds: int) -> tuple[float, float, float]:
    """This row's step time / the eager ResNet-56 step time, the two timed back to back ``rounds``
    times: (median, first and third quartile) of the per-pair ratios.  A pair shares the same
    second of machine load, so drift between rows or rounds (shared machine) stays out of it."""
    key = (case.batch, case.device)
    if key not in _base_steps:
        _base_steps[key] = build(NetCase(BASE, "eager", case.batch, case.device))
        _base_steps[key]()
    base = _base_steps[key]
    ratios = []
    for _ in range(rounds):
        times = []
        for fn in (step, base):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        ratios.append(times[0] / times[1])
    q1, q2, q3 = statistics.quantiles(ratios, n=4)
    return q2, q1, q3


@pytest.mark.skipif(zoo is None, reason=ZOO_ERROR or "zoo missing")
def test_train_step(benchmark, net_case: NetCase, request: pytest.FixtureRequest) -> None:
    case = net_case
    compiled = case.compiled
    benchmark.group = case.group
    step = build(case)
    # Warm-up outside the timed region: compilation (forward and backward graphs), allocator.
    for _ in range(2):
        step()
    quick = is_quick(request.config)
    benchmark.pedantic(step, rounds=3 if quick else 5, warmup_rounds=0, iterations=1)

    params, macs = complexity_of(case.model, case.device)
    base_params, base_macs = complexity_of(BASE, case.device)
    info = benchmark.extra_info
    info.update(model=case.model, impl=case.impl, fold=case.fold, batch=case.batch, device=case.device,
                thp_mem_alloc_enable=thp_setting(), params=params,
                macs_per_image=macs, params_overhead=round(params / base_params - 1, 5),
                macs_overhead=round(macs / base_macs - 1, 5))
    if "se_" in case.model and case.backend != "reference":  # without its kernels the fold runs the reference
        impl = fk.backends.load(case.backend)
        info["fused_se_kernel"] = None not in (impl.bn_se_residual, impl.bn_se_residual_gate_pool)
    t: Optional[float] = median_seconds(benchmark)
    if t is None:
        return
    _medians[(case.model, case.impl, case.fold)] = t
    if case.model != BASE and not compiled:
        med, q1, q3 = paired_ratio(step, case, rounds=3 if quick else 15)
        info["paired_time_vs_resnet56"] = round(med, 4)
        info["paired_iqr"] = [round(q1, 4), round(q3, 4)]
    base_impl = "compiled" if compiled else "eager"
    if (BASE, base_impl, True) in _medians:
        info["time_vs_resnet56"] = round(t / _medians[(BASE, base_impl, True)], 4)
        info["time_vs_resnet56_mode"] = base_impl
    if case.model.startswith("fa_se_") and not compiled and (SE_BASE, "eager", False) in _medians:
        info["time_vs_se_resnet56"] = round(t / _medians[(SE_BASE, "eager", False)], 4)
