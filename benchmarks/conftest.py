"""Shared setup of the benchmarks (SPEC §5).

Every benchmark group compares, in one run, the rows of one case: a ``torch.clone`` of the
same number of bytes (the copy bound), the eager reference, ``torch.compile`` of the
reference, and each fused backend of the device.  Rows run in that order, so each row's
``extra_info`` carries its achieved GB/s, its ratio to the clone and its speed-up over the
rows measured before it (see ``record``).  No test here asserts a timing.

Quick mode (``--fanet-quick`` or ``FANET_BENCH_QUICK=1``) keeps one shape per network
family, fewer rounds and a smaller network batch; the full matrix is the default.
"""
from __future__ import annotations

import os

import pytest
import torch



def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fanet", "fanet_kernels benchmarks")
    group.addoption("--fanet-quick", action="store_true", default=False,
                    help="one shape per network family, fewer rounds (also: FANET_BENCH_QUICK=1)")
    group.addoption("--fanet-device", action="append", default=None,
                    help="device(s) to benchmark (default: cpu, and cuda when available)")
    group.addoption("--fanet-threads", type=int, default=None,
                    help="torch.set_num_threads for the run (also: FANET_BENCH_THREADS; default: torch's)")


def pytest_configure(config: pytest.Config) -> None:
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
