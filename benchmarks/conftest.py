"""Shared setup of the benchmarks (SPEC §5).

Every benchmark group compares, in one run, the rows of one case: a ``torch.clone`` of the
same number of bytes (the copy bound), the eager reference, ``torch.compile`` of the
reference, and each fused backend of the device.  Rows run in that order, so each row's
``extra_info`` carries its achieved GB/s, its ratio to the clone and its speed-up over the
rows measured before it (see ``record``).  No test here asserts a timing.

Quick mode (``--fanet-quick`` or ``FANET_BENCH_QUICK=1``) keeps one shape per network
family, fewer rounds and a smaller network batch; the full matrix is the default.

On Linux the suite runs with PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` (large CPU tensors on transparent
huge pages) unless the environment sets the variable or ``--fanet-no-thp`` is given; it is set in
``pytest_configure``, before the first CPU tensor, checked on a fresh one, shown in the header and
recorded in every row (``extra_info["thp_mem_alloc_enable"]``) and in the machine info.
"""
from __future__ import annotations

import os

import pytest
import torch

import _common
from fanet_kernels.cli import thp


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fanet", "fanet_kernels benchmarks")
    group.addoption("--fanet-quick", action="store_true", default=False,
                    help="one shape per network family, fewer rounds (also: FANET_BENCH_QUICK=1)")
    group.addoption("--fanet-device", action="append", default=None,
                    help="device(s) to benchmark (default: cpu, and cuda when available)")
    group.addoption("--fanet-threads", type=int, default=None,
                    help="torch.set_num_threads for the run (also: FANET_BENCH_THREADS; default: torch's)")
    group.addoption("--fanet-ops", default=None,
                    help="comma-separated op families to run (default: gate_pool in quick mode, all in full)")
    group.addoption("--fanet-no-thp", action="store_true", default=False,
                    help="run with THP_MEM_ALLOC_ENABLE=0 (default on Linux: 1 unless the environment sets it)")


def pytest_configure(config: pytest.Config) -> None:
    # First: PyTorch reads the variable at its first CPU allocation.
    _common.THP_STATUS = thp.setup(off=config.getoption("--fanet-no-thp"), may_reexec=False)
    # Inductor otherwise starts a pool of compile worker processes that keep importing and
    # compiling in the background after a compiled row returns, stealing cores from the rows
    # measured next (seen here: a ResNet-56 step 20x slower right after the op benchmarks).
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1
    threads = config.getoption("--fanet-threads") or int(os.environ.get("FANET_BENCH_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """Op benchmarks first (minutes), then the network steps (compiles take much longer); the
    order inside each file is kept, since rows of a group must run one after another."""
    items.sort(key=lambda item: "test_bench_network" in item.nodeid)


def pytest_report_header(config: pytest.Config) -> str:
    status = _common.THP_STATUS
    return "fanet: THP_MEM_ALLOC_ENABLE not applicable (not Linux)" if status is None else status.line()


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    status = _common.THP_STATUS
    machine_info["thp_mem_alloc_enable"] = _common.thp_setting()
    if status is not None:
        machine_info["thp_kernel_mode"] = status.kernel
