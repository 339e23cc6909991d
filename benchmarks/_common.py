"""Helpers shared by the benchmark modules (timing, sync, bookkeeping of ratios)."""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Optional

import pytest
import torch

import fanet_kernels as fk
from fanet_kernels.cli import thp


def is_quick(config: pytest.Config) -> bool:
    return bool(config.getoption("--fanet-quick")) or os.environ.get("FANET_BENCH_QUICK", "0") not in ("", "0")


# This run's THP setting, set by conftest.pytest_configure (None: not Linux).
THP_STATUS: Optional[thp.Status] = None


def thp_setting() -> str:
    """This run's THP_MEM_ALLOC_ENABLE as PyTorch read it: "1", "0" or "n/a" (not Linux); "1, without
    effect" where it was set after PyTorch's first CPU allocation."""
    if THP_STATUS is None:
        return "n/a"
    return THP_STATUS.value + (", without effect" if THP_STATUS.active is False else "")


def op_families(config: pytest.Config, default: tuple[str, ...]) -> tuple[str, ...]:
    """--fanet-ops as a tuple (``default`` when not given)."""
    chosen = config.getoption("--fanet-ops")
    return default if not chosen else tuple(op.strip() for op in chosen.split(",") if op.strip())


def devices(config: pytest.Config) -> list[str]:
    chosen = config.getoption("--fanet-device")
    if chosen:
        return chosen
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def fused_backends(device: str) -> list[str]:
    """The fused backends that run natively on ``device`` (Triton on the CPU is only its
    interpreter, a simulation: not a benchmark)."""
    names = [b for b in fk.available_backends(device) if b != "reference"]
    return [b for b in names if not (device == "cpu" and b == "triton")]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def synced(fn: Callable[[], object], device: str) -> Callable[[], None]:
    """``fn`` followed by a device synchronisation, so the clock read after it (and the one
    before the next round) sees finished work."""
    if not device.startswith("cuda"):
        return fn  # type: ignore[return-value]

    def run() -> None:
        fn()
        torch.cuda.synchronize()

    return run


def run_benchmark(benchmark, fn: Callable[[], object], device: str, config: pytest.Config,
                  warmup: int = 1) -> None:
    """Time ``fn`` (already warmed up by the caller if it compiles).  Quick mode: a fixed
    3 rounds; full mode: pytest-benchmark's calibration (``--benchmark-min-rounds`` etc.)."""
    fn = synced(fn, device)
    if is_quick(config):
        benchmark.pedantic(fn, rounds=3, warmup_rounds=warmup, iterations=1)
    else:
        for _ in range(warmup):
            fn()
        benchmark(fn)


def median_seconds(benchmark) -> Optional[float]:
    """The median of the rounds just measured (None with --benchmark-disable)."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return None
    return float(stats.stats.median)


def time_median(fn: Callable[[], object], device: str, repeat: int = 5) -> float:
    """A plain median timer, for a clone baseline that its own row did not measure (-k)."""
    fn = synced(fn, device)
    fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


# Medians measured in this run: {group: {row: seconds}}.
_MEDIANS: dict[str, dict[str, float]] = {}


def record(benchmark, group: str, row: str, nbytes: int, baseline: Optional[Callable[[], float]] = None) -> None:
    """Store the row's median and put GB/s and ratios into its extra_info.

    ``copy_ratio`` = time / time of a clone of the same bytes (1.0 is the copy bound);
    ``speedup_vs_<row>`` = that row's time / this row's time, for rows of the group
    measured before this one (reference and compiled run before the fused backends)."""
    t = median_seconds(benchmark)
    benchmark.extra_info["bytes"] = nbytes
    if t is None or t <= 0:
        return
    seen = _MEDIANS.setdefault(group, {})
    seen[row] = t
    benchmark.extra_info["gbps"] = round(nbytes / t / 1e9, 3)
    if "clone" not in seen and baseline is not None:
        seen["clone"] = baseline()
    if "clone" in seen:
        benchmark.extra_info["clone_gbps"] = round(nbytes / seen["clone"] / 1e9, 3)
        benchmark.extra_info["copy_ratio"] = round(t / seen["clone"], 3)
    for other, t_other in seen.items():
        if other not in (row, "clone"):
            benchmark.extra_info[f"speedup_vs_{other}"] = round(t_other / t, 3)


def compile_fresh(fn: Callable, **kwargs) -> Callable:
    """``torch.compile(fn)`` with Dynamo's caches cleared first, so each case gets its own
    static-shape graph (no recompile limit, no automatic dynamic shapes across cases)."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False, **kwargs)
