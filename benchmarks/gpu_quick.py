"""Quick GPU benchmarks in one process, inside a time budget, written as JSON.

    python3 benchmarks/gpu_quick.py --out bench.json [--budget 150]
    python3 benchmarks/gpu_quick.py --device cpu --out /tmp/bench.json     # a dry run of the code paths

Every fused op (gate, gate_pool, residual_gate_pool, bn_residual_gate_pool, focus), forward and
forward+backward, on each fused backend of the device, beside a copy of the same bytes (``clone``, the
copy bound), the eager reference and torch.compile of the reference; then one training step of
FA-ResNet-56 against ResNet-56 (batch 128, 32x32 inputs), eager and compiled.  Bytes per call are
SPEC §5's (test_bench_ops.BYTES_IN_S); each row's ``copy_fraction`` is the copy's time over its time
(1.0: as fast as a copy of its bytes).  GPU timing: torch.cuda.Event around each call, a warm-up
first, the median of the repeats, and a 512 MB buffer written before every repeat so that no input
is served from the 50 MB L2 (the activations are 64 MB or more as well), then a short GPU spin so
that the host's launches of the call are queued before its start event is reached.

The work runs in priority order and each item is skipped, and named in the JSON's "skipped", when
the budget no longer holds its estimated cost; the JSON is rewritten after every row, so a run cut
short keeps what it measured.
"""
from __future__ import annotations

import time

T0 = time.time()  # before torch's import: --budget counts from here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Optional  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmark modules beside this file

import torch  # noqa: E402

import test_bench_network as bnet  # noqa: E402
import test_bench_ops as bops  # noqa: E402
from _common import fused_backends  # noqa: E402

OPS = ("gate_pool", "residual_gate_pool", "bn_residual_gate_pool", "gate", "focus")
PASSES = ("fwd+bwd", "fwd")
# (dtype, layout) configurations, in priority order.
CONFIGS = (("float32", "nchw"), ("bfloat16", "channels_last"))
GPU_SHAPE = (128, 256, 32, 32)  # 128 MiB per float32 activation: far past the L2
CPU_SHAPE = (8, 32, 16, 16)
FLUSH_BYTES = 512 << 20
NET_BATCH = {"cuda": 128, "cpu": 2}  # the CPU run only tries the code paths


class Run:
    """The results so far, written to --out after every change."""

    def __init__(self, out: Path, budget: float, device: str):
        self.out, self.end, self.device = out, T0 + budget, device
        self.data: dict = {"schema": 1, "device": device, "budget_s": budget, "complete": False, "ops": [],
                           "network": [], "skipped": [], "errors": [], **versions(device)}
        self.spent: dict[str, float] = {}  # what kinds of work cost, to estimate the next one

    def left(self) -> float:
        return self.end - time.time()

    def fits(self, what: str, estimate: float) -> bool:
        if self.left() >= estimate:
            return True
        self.data["skipped"].append(what)
        self.save()
        return False

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.time() - T0, 1)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.out)

    def error(self, what: str, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        print(f"gpu_quick: ERROR in {what}: {text}", flush=True)
        self.data["errors"].append({"what": what, "error": text[:500]})
        self.save()


def versions(device: str) -> dict:
    import importlib.metadata as md

    try:
        triton_version = md.version("triton")
    except md.PackageNotFoundError:
        triton_version = "not installed"
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or platform.machine()
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton_version, "python": platform.python_version()}


class Timer:
    """Median seconds of ``fn``: CUDA events around each call after an L2 flush on a GPU, the host
    clock on the CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.float32, device=device) if self.cuda else None
        self.min_reps = 5 if self.cuda else 3

    def median(self, fn: Callable[[], object], warmup: int = 2, max_reps: int = 30, target_s: float = 0.4) -> float:
        for _ in range(warmup):
            fn()
        once = self._times(fn, 1)[0]
        reps = int(max(self.min_reps, min(max_reps, target_s / max(once, 1e-6))))
        return statistics.median(self._times(fn, reps))

    def _times(self, fn: Callable[[], object], reps: int) -> list[float]:
        if not self.cuda:
            out = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
            return out
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            self.flush.zero_()  # evicts the L2
            if hasattr(torch.cuda, "_sleep"):
                torch.cuda._sleep(1_000_000)  # ~0.5 ms of GPU spin: the host gets ahead with fn's launches
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]


# ---- op rows ----------------------------------------------------------------------------------------
_shared_inputs: dict[tuple, dict] = {}


def case_for(op: str, passes: str, dtype: str, layout: str, device: str, impl: str) -> bops.Case:
    shape = CPU_SHAPE if device == "cpu" else GPU_SHAPE
    return bops.Case(op, passes, "gpu-quick", shape, dtype, layout, device, impl)


def use_shared_inputs(case: bops.Case) -> None:
    """test_bench_ops makes a group's inputs on first use; its ops and passes share them here (one
    set per dtype and layout), which saves drawing 128 MiB tensors on the host for every group."""
    key = (case.shape, case.dtype, case.layout, case.device)
    if key not in _shared_inputs:
        _shared_inputs.clear()
        bops._inputs.clear()
        if case.device.startswith("cuda"):
            torch.cuda.empty_cache()
        _shared_inputs[key] = bops.inputs(case)
    bops._inputs.clear()
    bops._inputs[case.group] = _shared_inputs[key]


def op_row(run: Run, timer: Timer, op: str, passes: str, dtype: str, layout: str, impl: str,
           copy_s: Optional[float]) -> Optional[float]:
    """Measures one row and records it; returns its median seconds (None on error)."""
    case = case_for(op, passes, dtype, layout, run.device, impl)
    what = f"{op} {passes} {dtype} {layout} {impl}"
    t0 = time.time()
    try:
        use_shared_inputs(case)
        fn = bops.make_clone(case) if impl == "clone" else bops.make_call(case)
        seconds = timer.median(fn, warmup=3 if impl == "compiled" else 2)
    except Exception as exc:  # one broken row must not cost the others
        run.error(what, exc)
        return None
    finally:
        run.spent[impl] = time.time() - t0
    if impl != "clone":
        run.data["ops"].append({
            "op": op, "passes": passes, "shape": list(case.shape), "dtype": dtype, "layout": layout, "impl": impl,
            "bytes": case.nbytes, "ms": seconds * 1e3, "gbps": case.nbytes / seconds / 1e9,
            "copy_ms": None if copy_s is None else copy_s * 1e3,
            "copy_fraction": None if copy_s is None else copy_s / seconds})
        run.save()
        frac = "" if copy_s is None else f" ({copy_s / seconds:.0%} of copy bandwidth)"
        print(f"gpu_quick: {what}: {seconds * 1e3:.3f} ms{frac}", flush=True)
    return seconds


_copy_times: dict[tuple, float] = {}


def op_rows(run: Run, timer: Timer, dtype: str, layout: str, impls: list[str], ops: tuple = OPS,
            passes_list: tuple = PASSES) -> None:
    for op in ops:
        for passes in passes_list:
            key = (op, passes, dtype, layout)
            if key not in _copy_times:
                if not run.fits(f"{op} {passes} {dtype} {layout} (all rows)", 3):
                    continue
                copy_s = op_row(run, timer, op, passes, dtype, layout, "clone", None)
                if copy_s is None:
                    continue
                _copy_times[key] = copy_s
            for impl in impls:
                if any(r["impl"] == impl and (r["op"], r["passes"], r["dtype"], r["layout"]) == key
                       for r in run.data["ops"]):
                    continue  # measured by an earlier, narrower call
                estimate = run.spent.get(impl, 20 if impl == "compiled" else 3)
                if run.fits(f"{op} {passes} {dtype} {layout} {impl}", estimate):
                    op_row(run, timer, op, passes, dtype, layout, impl, _copy_times[key])


def copy_peak(run: Run, timer: Timer) -> None:
    """The device's copy bandwidth on 1 GiB (bytes read + written), the ceiling for the ratios."""
    n = (1 << 30) // 4 if run.device.startswith("cuda") else (64 << 20) // 4
    src = torch.randn(n, device=run.device)
    dst = torch.empty_like(src)
    seconds = timer.median(lambda: dst.copy_(src))
    run.data["copy_peak"] = {"bytes": 2 * n * 4, "ms": seconds * 1e3, "gbps": 2 * n * 4 / seconds / 1e9}
    run.save()
    print(f"gpu_quick: device copy: {run.data['copy_peak']['gbps']:.0f} GB/s", flush=True)


# ---- network rows --------------------------------------------------------------------------------
def net_row(run: Run, timer: Timer, model: str, impl: str) -> None:
    batch = NET_BATCH["cpu" if run.device == "cpu" else "cuda"]
    estimate = run.spent.get("net-compiled", 90) if impl.startswith("compiled") else run.spent.get("net-eager", 20)
    what = f"{model} {impl} training step, batch {batch}"
    if not run.fits(what, estimate):
        return
    t0 = time.time()
    try:
        bops._inputs.clear()
        _shared_inputs.clear()
        step = bnet.build(bnet.NetCase(model, impl, batch, run.device))
        seconds = timer.median(step, warmup=3 if timer.cuda else 1, max_reps=15, target_s=1.0)
    except Exception as exc:
        run.error(what, exc)
        return
    finally:
        kind = "net-compiled" if impl.startswith("compiled") else "net-eager"
        run.spent[kind] = max(run.spent.get(kind, 0), time.time() - t0)
        if run.device.startswith("cuda"):
            torch.cuda.empty_cache()
    mode = "compiled" if impl.startswith("compiled") else "eager"
    base = next((r["ms"] for r in run.data["network"] if r["model"] == bnet.BASE and r["impl"] == mode), None)
    row = {"model": model, "impl": impl, "batch": batch, "ms": seconds * 1e3, "base_impl": mode,
           "vs_resnet56": None if base is None or model == bnet.BASE else seconds * 1e3 / base}
    run.data["network"].append(row)
    run.save()
    ratio = "" if row["vs_resnet56"] is None else f" ({row['vs_resnet56']:.3f}x ResNet-56 {mode})"
    print(f"gpu_quick: {what}: {seconds * 1e3:.2f} ms{ratio}", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSON results")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds, import included (default 150)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile rows (default on the CPU)")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f"--budget must be positive, got {args.budget}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_quick: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    compile_rows = not args.no_compile and args.device == "cuda"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    run = Run(args.out, args.budget, args.device)
    run.save()
    timer = Timer(args.device)
    fused = fused_backends(args.device)
    eager_impls = [*fused, "reference"]
    fa = bnet.FA_MODELS[0]
    try:
        copy_peak(run, timer)
        # Priority: the fused rows of the first configuration, the eager training steps, the second
        # configuration, then what needs torch.compile (a network's compile takes a minute or more).
        op_rows(run, timer, *CONFIGS[0], eager_impls)
        net_row(run, timer, bnet.BASE, "eager")
        for impl in fused + ["reference"]:
            net_row(run, timer, fa, impl)
        op_rows(run, timer, *CONFIGS[1], eager_impls)
        if compile_rows:
            op_rows(run, timer, *CONFIGS[0], ["compiled"], ops=OPS[:1], passes_list=PASSES[:1])
            net_row(run, timer, bnet.BASE, "compiled")
            # The fused backend that `auto` picks for CUDA tensors (Triton first), inside the compiled model.
            for impl in [f"compiled-{'triton' if 'triton' in fused else fused[0]}"] if fused else []:
                net_row(run, timer, fa, impl)
            op_rows(run, timer, *CONFIGS[0], ["compiled"])
            net_row(run, timer, fa, "compiled")
            op_rows(run, timer, *CONFIGS[1], ["compiled"])
        else:
            run.data["notes"] = ["no torch.compile rows (--no-compile, or the CPU)"]
    except Exception as exc:  # an error outside a row (the copy, the timer): keep what was measured
        run.error("setup", exc)
    run.data["complete"] = not run.data["skipped"]
    run.save()
    print(f"gpu_quick: {len(run.data['ops'])} op rows, {len(run.data['network'])} network rows, "
          f"{len(run.data['skipped'])} items skipped, {len(run.data['errors'])} errors, in {time.time() - T0:.0f} s; "
          f"wrote {args.out}", flush=True)
    return 1 if run.data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
