"""Thread safety: one model called from several threads at once gives each call its own result,
and use_backend is a per-thread setting (as torch.no_grad)."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn

import fanet_kernels as fk
from fanet_kernels import backends


class _Order:
    """Makes two threads interleave inside a stage: thread 0 runs block 0's shortcut, then thread 1
    runs its own, then thread 0 finishes its whole call while thread 1 waits, then thread 1 goes on."""

    def __init__(self) -> None:
        self.shortcut0, self.shortcut1, self.call0 = threading.Event(), threading.Event(), threading.Event()

    def after_shortcut(self) -> None:
        if threading.current_thread().name == "t0":
            self.shortcut0.set()
            assert self.shortcut1.wait(30)
        else:
            self.shortcut1.set()
            assert self.call0.wait(30)

    def before_shortcut(self) -> None:
        if threading.current_thread().name == "t1":
            assert self.shortcut0.wait(30)


class _Block(nn.Module):
    """conv + shortcut (a 1x1 conv 'downsample' when channels change), with an optional _Order
    around the shortcut."""

    def __init__(self, cin: int, cout: int, order: _Order | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.downsample = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.order = order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.order is not None:
            self.order.before_shortcut()
        s = x if self.downsample is None else self.downsample(x)
        if self.order is not None:
            self.order.after_shortcut()
        return torch.relu(self.conv(x) + s)


def _run_in_threads(fn, inputs):
    results, errors = [None] * len(inputs), []

    def work(i):
        try:
            results[i] = fn(inputs[i])
        except Exception as exc:  # reported below, with the thread's traceback lost: name it
            errors.append(f"thread {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(i,), name=f"t{i}") for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return results


def test_stage_called_from_two_threads_at_once():
    """Both threads run block 0 (and its shortcut P) before either reaches the stage gate, which
    takes P(X_s): each must get its own, not the other thread's."""
    torch.manual_seed(0)
    order = _Order()
    stage = fk.FAStage([_Block(4, 8, order), _Block(8, 8)], index=1, channels=[8], stage_channels=8,
                       last=True).eval()
    xs = [torch.randn(2, 4, 6, 6), torch.randn(3, 4, 6, 6)]  # different batch sizes: a mix-up shows

    def call(x):
        out = stage(x)
        if threading.current_thread().name == "t0":
            order.call0.set()
        return out

    with torch.no_grad():
        got = _run_in_threads(call, xs)
        stage[0].order = None
        want = [stage(x) for x in xs]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_stage_runs_block0_shortcut_once_and_keeps_nothing():
    """The stage gate reuses block 0's shortcut output (P runs once per call) and no tensor of the
    call stays on the module afterwards."""
    stage = fk.FAStage([_Block(4, 8), _Block(8, 8)], index=1, channels=[8], stage_channels=8, last=True)
    calls = []
    stage[0].downsample.register_forward_hook(lambda m, a, o: calls.append(o.shape))
    stage(torch.randn(2, 4, 5, 5))
    assert len(calls) == 1
    assert not any(isinstance(v, torch.Tensor) and v.dim() == 4 for v in vars(stage).values())


def test_use_backend_overlapping_threads():
    """A enters, B enters, A leaves, B leaves: each thread sees its own block's backend throughout,
    and the process setting is unchanged afterwards."""
    before = backends.active_setting()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with fk.use_backend("reference"):
            a_in.set()
            b_in.wait(10)
            seen["a"] = backends.active_setting()
        a_out.set()

    def thread_b():
        a_in.wait(10)
        with fk.use_backend("cpu" if "cpu" in fk.available_backends("cpu") else "reference"):
            b_in.set()
            a_out.wait(10)
            seen["b"] = backends.active_setting()
        seen["b_after"] = backends.active_setting()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen["a"] == "reference"
    assert seen["b"] == ("cpu" if "cpu" in fk.available_backends("cpu") else "reference")
    assert seen["b_after"] == before and backends.active_setting() == before


def test_use_backend_does_not_leak_into_other_threads():
    seen = []
    with fk.use_backend("reference"):
        t = threading.Thread(target=lambda: seen.append(backends.active_setting()))
        t.start()
        t.join(10)
        assert backends.active_setting() == "reference"
    assert seen == [backends.active_setting()]


def test_set_backend_is_process_wide_and_use_backend_wins_in_its_thread():
    before = backends.active_setting()
    try:
        fk.set_backend("reference")
        seen = []
        t = threading.Thread(target=lambda: seen.append(backends.active_setting()))
        t.start()
        t.join(10)
        assert seen == ["reference"]
        with fk.use_backend("auto"):
            assert backends.active_setting() == "auto"
        assert backends.active_setting() == "reference"
    finally:
        fk.set_backend(before)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_model_from_many_threads_matches_serial(backend):
    """A zoo FA network (stages, gates, fused ops) called from four threads at once."""
    if backend not in fk.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} not built here")
    from fanet_kernels import zoo

    torch.manual_seed(0)
    model = zoo.create_model("fa_resnet20", backend=backend).eval()
    xs = [torch.randn(n, 3, 32, 32) for n in (1, 2, 3, 4)]
    with torch.no_grad():
        want = [model(x) for x in xs]
        got = _run_in_threads(model, xs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
