"""THP_MEM_ALLOC_ENABLE=1 against 0 on one case: time and minor page faults per call.

    python benchmarks/thp_check.py [--shape 128 64 32 32] [--calls 10] [--pairs 3] [--threads 2]

PyTorch reads the variable once per process, so each setting runs in its own process; the
processes alternate (1, 0, 1, 0, ...) so that a change of machine load hits both.  Rows:
``gate_pool`` forward+backward on the fused ``cpu`` backend, the same on the eager reference, and a
``torch.clone`` of four activations; each cell is the median over the calls of one process.
Minor page faults are counted by the kernel (getrusage), so they do not depend on the load.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, statistics, sys, time
import torch
import fanet_kernels as fk
from fanet_kernels import reference
shape, calls, threads = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if threads:
    torch.set_num_threads(threads)
torch.manual_seed(0)
x, u, grad_out = torch.randn(shape), torch.randn(shape), torch.randn(shape)
k, grad_pooled = torch.rand(shape[0]), torch.randn(shape[:2])

def fwd_bwd(fn):
    leaves = [t.detach().requires_grad_() for t in (x, u, k)]
    return lambda: torch.autograd.grad(fn(*leaves), leaves, (grad_out, grad_pooled))

rows = {"fused (cpu)": fwd_bwd(lambda *a: fk.gate_pool(*a, backend="cpu")),
        "eager (reference)": fwd_bwd(reference.gate_pool),
        "clone of 4 activations": lambda: [t.clone() for t in (x, u, grad_out, x)]}
out = {}
for name, fn in rows.items():
    fn()
    times, faults = [], []
    for _ in range(calls):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    out[name] = [statistics.median(times), statistics.median(faults)]
print(json.dumps(out))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=4, default=[128, 64, 32, 32], metavar=("N", "C", "H", "W"))
    parser.add_argument("--calls", type=int, default=10, help="timed calls per row and process")
    parser.add_argument("--pairs", type=int, default=3, help="processes per setting (alternating)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    results: dict[str, list[dict]] = {"1": [], "0": []}
    for _ in range(args.pairs):
        for value in ("1", "0"):
            env = dict(os.environ, THP_MEM_ALLOC_ENABLE=value)
            proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args.shape), str(args.calls),
                                   str(args.threads)], env=env, capture_output=True, text=True, check=True)
            results[value].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"gate_pool forward+backward, float32 {'x'.join(map(str, args.shape))}, load average "
          f"{os.getloadavg()[0]:.1f}; per call: median ms of each process (faults: median minor page faults)")
    print("| row | THP=1 ms | THP=0 ms | THP=1 faults | THP=0 faults |\n|---|---|---|---|---|")
    for row in results["1"][0]:
        on = [r[row] for r in results["1"]]
        off = [r[row] for r in results["0"]]
        print(f"| {row} | {' '.join(f'{t * 1e3:.1f}' for t, _ in on)} | {' '.join(f'{t * 1e3:.1f}' for t, _ in off)} "
              f"| {' '.join(str(int(f)) for _, f in on)} | {' '.join(str(int(f)) for _, f in off)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
