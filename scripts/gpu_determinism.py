"""Cross-process determinism: every fused op, forward and backward, on the triton and cuda backends,
run in two separate processes and compared bit for bit.

    python3 scripts/gpu_determinism.py --out determinism.json [--budget 120]
    python3 scripts/gpu_determinism.py --device cpu --backends cpu --out /tmp/det.json   # a dry run

The second process runs other work first (matrix products, allocations of other sizes), runs the
cases in reverse order, and keeps a side stream busy while each case first runs, so whatever depends
on timing (an autotuner's choice) or on the allocator's state gets a chance to differ.  The outputs,
gradients and updated running stats of each case are saved with torch.save and compared bitwise.
Exit status: 0 all identical, 1 some tensor differs, 2 a process failed or nothing was compared.
"""
from __future__ import annotations

import time

T0 = time.time()  # before torch's import, which takes seconds: --budget counts from here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_sanitize import DTYPES, call, cases  # noqa: E402  (the op calls, shared with the sanitizer run)

GPU_SHAPES = [(128, 16, 32, 32), (2, 8, 192, 192), (3, 24, 7, 9)]  # ResNet-56's first stage; long planes; odd
CPU_SHAPES = [(4, 16, 8, 8), (2, 8, 24, 24), (3, 5, 7, 9)]
MAX_LISTED = 50


def case_id(backend: str, case: tuple) -> str:
    op, shape, dname, layout, mis = case
    return f"{backend} {op} {'x'.join(map(str, shape))} {dname} {layout}{' misaligned' if mis else ''}"


def perturb(device: str) -> Optional[torch.cuda.Stream]:
    """Other work before the cases: a different allocator state and warm clocks; on a GPU, a side
    stream for busy work during each case's first run."""
    keep = [torch.randn(n, device=device) for n in (1 << 20, 3 << 18, 5 << 16)]
    a = torch.randn(2048, 2048, device=device)
    for _ in range(10):
        a = torch.tanh(a @ a.T / 2048)
    del keep
    return torch.cuda.Stream() if device.startswith("cuda") else None


def busy(side: Optional[torch.cuda.Stream], device: str) -> None:
    if side is None:
        return
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        m = torch.randn(4096, 4096, device=device)
        for _ in range(8):
            m = m @ m / 64


def child(args: argparse.Namespace) -> int:
    """Runs the cases (or those of --cases-from, in reverse with --perturb) and saves the results."""
    deadline = args.deadline
    backends = [b for b in args.backends.split(",") if b]
    if args.cases_from:
        todo = torch.load(args.cases_from, weights_only=False)["done"]
    else:
        shapes = CPU_SHAPES if args.device == "cpu" else GPU_SHAPES
        todo = [(b, c) for c in cases(shapes, args.dtypes.split(","), []) for b in backends]
    side = perturb(args.device) if args.perturb else None
    if args.perturb:
        todo = todo[::-1]
    results, done, skipped, errors = {}, [], [], {}
    for backend, case in todo:
        if time.time() > deadline:
            skipped.append((backend, case))
            continue
        op, shape, dname, layout, mis = case
        busy(side, args.device)
        try:
            out = call(op, backend, shape, DTYPES[dname], layout, args.device, seed=hash_seed(case), misaligned=mis)
            results[case_id(backend, case)] = {k: v.cpu() for k, v in out.items()}
        except Exception as exc:  # recorded: the case is then not compared, and the check fails
            errors[case_id(backend, case)] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"gpu_determinism: ERROR {case_id(backend, case)}: {errors[case_id(backend, case)]}", flush=True)
        done.append((backend, case))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    meta = {"pid": os.getpid(), "perturbed": args.perturb, "torch": torch.__version__}
    torch.save({"results": results, "done": done, "skipped": skipped, "errors": errors, "meta": meta}, args.save)
    print(f"gpu_determinism: process {os.getpid()}{' (perturbed)' if args.perturb else ''}: {len(done)} cases run, "
          f"{len(skipped)} left for time", flush=True)
    return 0


def hash_seed(case: tuple) -> int:
    """A seed that depends on the case only (Python's hash() of strings differs between processes)."""
    text = repr(case).encode()
    return sum((i + 1) * b for i, b in enumerate(text)) % (2 ** 31)


def differ(a: torch.Tensor, b: torch.Tensor) -> Optional[dict]:
    """None if a and b are the same bits (dtype, shape and every element), else how they differ."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return {"n_diff": -1, "numel": a.numel(), "max_abs": float("nan"), "max_ulp": -1,
                "note": f"{a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"}
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    ai, bi = a.contiguous().view(ints), b.contiguous().view(ints)
    ne = ai != bi
    n = int(ne.sum())
    if n == 0:
        return None
    diff = (a.double() - b.double()).abs()[ne]
    return {"n_diff": n, "numel": a.numel(), "max_abs": float(torch.nan_to_num(diff, nan=float("inf")).max()),
            "max_ulp": int((ai.long() - bi.long()).abs()[ne].max())}


def compare(first: dict, second: dict) -> dict:
    ra, rb = first["results"], second["results"]
    common = [k for k in ra if k in rb]
    differences, tensors, identical = [], 0, 0
    for key in common:
        for name in sorted(set(ra[key]) | set(rb[key])):
            tensors += 1
            if name not in ra[key] or name not in rb[key]:
                differences.append({"case": key, "tensor": name, "n_diff": -1, "numel": 0, "max_abs": float("nan"),
                                    "max_ulp": -1, "note": "present in one process only"})
                continue
            d = differ(ra[key][name], rb[key][name])
            if d is None:
                identical += 1
            else:
                differences.append({"case": key, "tensor": name, **d})
    return {"ok": not differences and bool(common), "cases_compared": len(common), "tensors_compared": tensors,
            "identical": identical, "differences": differences[:MAX_LISTED], "n_differences": len(differences),
            "not_compared": sorted(set(ra) ^ set(rb))}


def parent(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or Path(args.out).with_suffix(""))
    workdir.mkdir(parents=True, exist_ok=True)
    end = T0 + args.budget
    base = [sys.executable, os.path.abspath(__file__), "--child", "--device", args.device,
            "--backends", args.backends, "--dtypes", args.dtypes]
    runs, result = [], {"ok": None, "device": args.device, "backends": args.backends.split(",")}
    # The first process compiles (Triton) and runs every case it can in a little over half the
    # budget; the second, whose compiles hit the cache, reruns exactly those cases in what is left.
    # Each stops starting cases at its deadline and then saves what it has.
    plan = [("A", T0 + 0.55 * args.budget, []), ("B", end - 8, ["--perturb", "--cases-from", str(workdir / "A.pt")])]
    for name, deadline, extra in plan:
        cmd = base + ["--save", str(workdir / f"{name}.pt"), "--deadline", f"{deadline:.1f}"] + extra
        t0 = time.time()
        print(f"gpu_determinism: process {name}: {' '.join(cmd)}", flush=True)
        try:
            rc = subprocess.run(cmd, timeout=max(5.0, end + 3 - t0)).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        runs.append({"process": name, "rc": rc, "seconds": round(time.time() - t0, 1)})
        if rc != 0:
            result["error"] = f"process {name} failed (exit {rc}); its output is in the log"
            break
    result["children"] = runs
    if "error" not in result:
        first, second = (torch.load(workdir / f"{n}.pt", weights_only=False) for n in ("A", "B"))
        result.update(compare(first, second))
        result["not_run_for_time"] = len(first["skipped"])
        result["op_errors"] = {**first["errors"], **second["errors"]}
        if result["op_errors"]:
            result["ok"] = False
            result["error"] = f"{len(result['op_errors'])} op calls raised, e.g. " + \
                "; ".join(f"{k}: {v}" for k, v in list(result["op_errors"].items())[:2])
        elif not result["cases_compared"]:
            result["ok"], result["error"] = None, "no case was compared"
    Path(args.out).write_text(json.dumps(result, indent=1))
    summary = (f"{result.get('cases_compared', 0)} cases, {result.get('tensors_compared', 0)} tensors compared, "
               f"{result.get('identical', 0)} bitwise identical, {result.get('n_differences', 0)} differ")
    print(f"gpu_determinism: {summary}" + (f"; error: {result['error']}" if result.get("error") else ""), flush=True)
    for d in result.get("differences", [])[:10]:
        print(f"  DIFFERS {d['case']} {d['tensor']}: {d['n_diff']} of {d['numel']} elements, max |diff| "
              f"{d['max_abs']:.3g}, max {d['max_ulp']} ulp", flush=True)
    return 0 if result["ok"] else 1 if result["ok"] is False else 2


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="the result as JSON (required unless --child)")
    parser.add_argument("--workdir", help="where the two processes save their tensors (default: beside --out)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", default=None,
                        help="comma-separated (default: triton,cuda; cpu with --device cpu)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds for both processes (default 120)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--perturb", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cases-from", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)  # time.time()
    args = parser.parse_args(argv)
    args.backends = args.backends or ("cpu" if args.device == "cpu" else "triton,cuda")
    bad = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if bad:
        parser.error(f"--dtypes: unknown {', '.join(bad)} (choose from {', '.join(DTYPES)})")
    if args.budget <= 0:
        parser.error(f"--budget must be positive, got {args.budget}")
    if args.child:
        return child(args)
    if not args.out:
        parser.error("--out is required")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        Path(args.out).write_text(json.dumps({"ok": None, "error": "torch.cuda.is_available() is False"}))
        print("gpu_determinism: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
