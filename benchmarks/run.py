"""Run the benchmark suite and write benchmarks/RESULTS.md.

    python benchmarks/run.py            # full matrix (slow on a 2-core CPU)
    python benchmarks/run.py --quick    # one shape per family, fewer rounds, batch 32 networks
    python benchmarks/run.py --from-json benchmarks/results.json   # only re-render the tables

RESULTS.md holds the machine, the versions, the date, the performance targets with the measured
ratios (saying where a target is missed and by how much), and the tables of every group.
The pytest-benchmark JSON is kept beside it (results.json) for comparison across machines, with
each row's summary statistics but not its per-round samples (a million lines in a full run, which
would make every re-run a diff of tens of megabytes in the repository).
Extra arguments after ``--`` go to pytest (e.g. ``-- -k gate_pool``).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent

# Performance targets (goals for the kernels, not assertions).
TARGET_OPS = ("gate_pool", "residual_gate_pool", "bn_residual_gate_pool")  # fwd+bwd rows with the targets below
TARGET_VS_EAGER = 3.0      # gate_pool fwd+bwd: fused at least 3x faster than the eager reference
TARGET_VS_COMPILED = 1.5   # ... and at least 1.5x faster than torch.compile of it
TARGET_COPY_RATIO = 1.5    # ... and within 1.5x of the copy bound (time / clone of the same bytes)
TARGET_NET_OVERHEAD = 1.05  # FA-ResNet-56 step (fused) at most 1.05x the ResNet-56 step
FUSED_ORDER = ("cpu", "cuda", "triton")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict:
    import torch

    env = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "pytest-benchmark": version("pytest-benchmark"),
        "fanet_kernels": version("fanet_kernels"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    return env


def run_suite(args: argparse.Namespace, json_path: Path) -> dict:
    cmd = [sys.executable, "-m", "pytest", str(HERE), "--benchmark-only", f"--benchmark-json={json_path}",
           "-p", "no:cacheprovider", "-q", "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name"]
    if args.quick:
        cmd.append("--fanet-quick")
    if args.threads:
        cmd.append(f"--fanet-threads={args.threads}")
    cmd += args.pytest_args
    load_before = os.getloadavg()
    start = time.perf_counter()
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=HERE.parent)
    wall = time.perf_counter() - start
    load_after = os.getloadavg()
    if proc.returncode not in (0, 5):  # 5: nothing collected
        print(f"pytest exited with {proc.returncode}; tables are written from what ran", file=sys.stderr)
    return {"wall_seconds": round(wall, 1), "load_before": load_before, "load_after": load_after,
            "command": " ".join(cmd[1:]), "returncode": proc.returncode}


# ---- rendering ----------------------------------------------------------------------------
def ms(seconds: Optional[float]) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.2f}"


def ratio(x: Optional[float], digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def op_groups(benchmarks: list[dict]) -> dict[str, dict[str, dict]]:
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in benchmarks:
        info = b.get("extra_info", {})
        if "op" in info:
            groups[b["group"]][info["impl"]] = b
    return groups


def fused_of(rows: dict[str, dict]) -> list[str]:
    return [n for n in FUSED_ORDER if n in rows]


def verdict(value: Optional[float], target: float, higher_is_better: bool) -> str:
    if value is None:
        return "not measured"
    if higher_is_better:
        return "met" if value >= target else f"**missed** (needs {target / value:.2f}x more)"
    return "met" if value <= target else f"**missed** (by {value / target:.2f}x)"


def median(row: Optional[dict]) -> Optional[float]:
    return None if row is None else row["stats"]["median"]


def render_ops(groups: dict[str, dict[str, dict]]) -> tuple[dict[str, list[str]], list[str]]:
    """({op: target lines}, table lines)."""
    head = ["| case | fused | vs eager (>= 3x) | vs compiled (>= 1.5x) | time / copy bound (<= 1.5) |",
            "|---|---|---|---|---|"]
    targets: dict[str, list[str]] = {op: list(head) for op in TARGET_OPS}
    tables: list[str] = []
    by_section: dict[tuple, list[tuple[str, dict]]] = defaultdict(list)
    for name, rows in groups.items():
        info = next(iter(rows.values()))["extra_info"]
        by_section[(info["op"], info["passes"], info["device"])].append((name, rows))
    for (op, passes, device), items in sorted(by_section.items()):
        fused = sorted({f for _, rows in items for f in fused_of(rows)}, key=FUSED_ORDER.index)
        tables += ["", f"### {op} {passes} ({device})", "",
                   "| family | shape | dtype | layout | clone ms | reference ms | compiled ms | "
                   + " | ".join(f"{f} ms | {f} GB/s | {f} / copy | {f} vs ref | {f} vs compiled" for f in fused)
                   + " |",
                   "|" + "---|" * (7 + 5 * len(fused))]
        for name, rows in items:
            info = next(iter(rows.values()))["extra_info"]
            t_clone, t_ref = median(rows.get("clone")), median(rows.get("reference"))
            t_comp = median(rows.get("compiled"))
            cells = [info["family"], "x".join(map(str, info["shape"])), info["dtype"], info["layout"],
                     ms(t_clone), ms(t_ref), ms(t_comp)]
            for f in fused:
                t = median(rows.get(f))
                gbps = None if t is None else info["bytes"] / t / 1e9 if "bytes" in info else None
                row_info = rows[f]["extra_info"] if f in rows else {}
                gbps = row_info.get("gbps", gbps)
                cells += [ms(t), ratio(gbps, 1), ratio(None if t is None or t_clone is None else t / t_clone),
                          ratio(None if t is None or t_ref is None else t_ref / t),
                          ratio(None if t is None or t_comp is None else t_comp / t)]
                if op in TARGET_OPS and passes == "fwd+bwd":
                    vs_ref = None if t is None or t_ref is None else t_ref / t
                    vs_comp = None if t is None or t_comp is None else t_comp / t
                    copy = None if t is None or t_clone is None else t / t_clone
                    targets[op].append(
                        f"| {'x'.join(map(str, info['shape']))} {info['dtype']} {info['layout']} | {f} | "
                        f"{ratio(vs_ref)} {verdict(vs_ref, TARGET_VS_EAGER, True)} | "
                        f"{ratio(vs_comp)} {verdict(vs_comp, TARGET_VS_COMPILED, True)} | "
                        f"{ratio(copy)} {verdict(copy, TARGET_COPY_RATIO, False)} |")
            tables.append("| " + " | ".join(cells) + " |")
    return targets, tables


def iqr(info: dict) -> str:
    q = info.get("paired_iqr")
    return f" [{q[0]:.3f}–{q[1]:.3f}]" if q else ""


def render_network(benchmarks: list[dict]) -> tuple[list[str], list[str]]:
    rows = [b for b in benchmarks if "model" in b.get("extra_info", {})]
    if not rows:
        return (["Network benchmarks did not run (see the pytest output: the zoo may be missing)."], [])
    meds = {(b["extra_info"]["model"], b["extra_info"]["impl"]): b["stats"]["median"] for b in rows}
    table = ["| model | impl | step ms | time / ResNet-56 (same mode) | paired time / ResNet-56 eager | params | "
             "params overhead | MACs / image | MACs overhead |", "|---|---|---|---|---|---|---|---|---|"]
    for b in rows:
        i = b["extra_info"]
        base = meds.get(("resnet56", "compiled" if i["impl"].startswith("compiled") else "eager"))
        t = b["stats"]["median"]
        table.append(f"| {i['model']} | {i['impl']} | {ms(t)} | {ratio(None if base is None else t / base, 3)} | "
                     f"{ratio(i.get('paired_time_vs_resnet56'), 3)}{iqr(i)} | "
                     f"{i['params']:,} | {100 * i['params_overhead']:.2f}% | {i['macs_per_image']:,} | "
                     f"{100 * i['macs_overhead']:.2f}% |")
    group = rows[0]["group"]
    targets = [f"Group `{group}`.", ""]
    base = meds.get(("resnet56", "eager"))
    paired = {(b["extra_info"]["model"], b["extra_info"]["impl"]): b["extra_info"].get("paired_time_vs_resnet56")
              for b in rows}
    infos = {(b["extra_info"]["model"], b["extra_info"]["impl"]): b["extra_info"] for b in rows}
    targets += ["Ratios use the paired measurement when present (the median over pairs of steps timed "
                "back to back, its quartiles in brackets), else the two rows' medians.", ""]
    for model in ("fa_resnet56", "fa_se_resnet56"):
        for impl in (*FUSED_ORDER, "reference"):
            t = meds.get((model, impl))
            r = paired.get((model, impl)) or (t / base if t is not None and base else None)
            if r is None:
                continue
            mark = verdict(r, TARGET_NET_OVERHEAD, False) if model == "fa_resnet56" and impl in FUSED_ORDER \
                else "(for comparison)"
            info = infos.get((model, impl), {})
            targets.append(f"- {model} [{impl}] step / ResNet-56 eager step: **{r:.3f}**{iqr(info)} "
                           f"(target <= {TARGET_NET_OVERHEAD} for the fused FA-ResNet-56) {mark}")
    se = meds.get(("se_resnet56", "eager"))
    for impl in (*FUSED_ORDER, "reference"):
        t = meds.get(("fa_se_resnet56", impl))
        if t and se:
            targets.append(f"- fa_se_resnet56 [{impl}] / SE-ResNet-56 eager: {t / se:.3f} (for comparison)")
    bc = meds.get(("resnet56", "compiled"))
    for impl in ("compiled", *(f"compiled-{f}" for f in FUSED_ORDER)):
        tc = meds.get(("fa_resnet56", impl))
        if tc and bc:
            targets.append(f"- fa_resnet56 [{impl}] / ResNet-56 [compiled]: {tc / bc:.3f} (for comparison)")
    return targets, table


def without_samples(data: dict) -> dict:
    """``data`` with each row's per-round samples (``stats.data``) dropped; the summary statistics
    (median, quartiles, rounds, ...) that RESULTS.md is rendered from stay."""
    for row in data.get("benchmarks", []):
        row.get("stats", {}).pop("data", None)
    return data


def render(data: dict, env: dict, run: dict) -> str:
    benchmarks = data.get("benchmarks", [])
    quick = "--fanet-quick" in run.get("command", "")
    op_targets, op_tables = render_ops(op_groups(benchmarks))
    net_targets, net_table = render_network(benchmarks)
    lines = [
        "# fanet_kernels benchmark results", "",
        f"Written by `benchmarks/run.py{' --quick' if quick else ''}` on {env['date']}. "
        "Each group (one case) was measured in one run: median of the rounds; "
        "ratios are between rows of the same group. Data (summary statistics per row): `benchmarks/results.json`.", "",
        "## Machine and versions", "",
        f"- CPU: {env['cpu']}, {env['cores']} cores (torch threads: {env['torch_threads']}); GPU: {env['gpu']}",
        f"- Platform: {env['platform']}",
        f"- Python {env['python']}, torch {env['torch']}, triton {env['triton']}, "
        f"pytest-benchmark {env['pytest-benchmark']}, fanet_kernels {env['fanet_kernels']}",
        f"- Mode: {'quick (one shape per family, fewer rounds, network batch 32)' if quick else 'full matrix'}; "
        f"suite wall time {run.get('wall_seconds', '?')} s",
        f"- Load average (1/5/15 min) before: {fmt_load(run.get('load_before'))}, after: "
        f"{fmt_load(run.get('load_after'))} (other work on the machine perturbs the numbers)",
        f"- Command: `{run.get('command', '?')}`",
        *busy_warning(run, env), "",
        "Bytes per call (SPEC §5, S = bytes of one activation): gate_pool, residual_gate_pool and gate "
        "forward 3·S, forward+backward 8·S; bn_residual_gate_pool forward 4·S, forward+backward 12·S; focus "
        "forward 1·S, forward+backward 3·S. *copy* = `torch.clone` of "
        "activation-sized tensors moving the same bytes in the same run (sized like the ops' outputs, so "
        "both get their memory the same way), so `time / copy` is the distance to the copy bound.", "",
        "## Targets", "",
        "### gate_pool forward+backward", "", *op_targets["gate_pool"], "",
        "### residual_gate_pool forward+backward", "",
        "The op the FA chains run for residual blocks with an identity shortcut (the block's add and ReLU "
        "folded into the gate). Its eager reference is that add + ReLU followed by gate_pool, the work of "
        "an unfused FA residual block; same targets as gate_pool.", "",
        *op_targets["residual_gate_pool"], "",
        "### bn_residual_gate_pool forward+backward", "",
        "residual_gate_pool with the branch's last BatchNorm (training mode) folded in: what the FA chains "
        "run for the zoo's residual blocks on the CPU backend. Its eager reference is F.batch_norm, the add + "
        "ReLU and gate_pool; the issue sets no target for it, the columns apply gate_pool's.", "",
        *op_targets["bn_residual_gate_pool"], "",
        "### FA-ResNet-56 training step", "", *net_targets, "",
    ]
    profile = HERE / "PROFILE.md"
    if profile.exists():
        lines += ["## Why targets are missed (profile)", "", profile.read_text().strip(), ""]
    lines += ["## Op tables", "", "Times in ms (median).", *op_tables, ""]
    if net_table:
        lines += ["## Training step (forward + backward + SGD)", "", *net_table, ""]
    return "\n".join(lines) + "\n"


def busy_warning(run: dict, env: dict) -> list[str]:
    load = max(run.get("load_before") or [0], default=0)
    if load > (env.get("cores") or 1):
        return [f"- **Warning: the machine was busy (load {load:.1f} on {env.get('cores')} cores): ratios "
                "within a group are indicative, absolute times and GB/s are not.**"]
    return []


def fmt_load(load) -> str:
    return "?" if not load else "/".join(f"{v:.2f}" for v in load)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="quick mode (FANET_BENCH_QUICK=1 also works)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the run (default: torch's)")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--json", type=Path, default=HERE / "results.json", help="pytest-benchmark JSON output")
    parser.add_argument("--from-json", type=Path, help="skip running; render RESULTS.md from this JSON")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    args.quick = args.quick or os.environ.get("FANET_BENCH_QUICK", "0") not in ("", "0")

    env = environment()
    if args.threads:
        env["torch_threads"] = args.threads
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        run, env = data.get("fanet_run", {}), data.get("fanet_env", env)
    else:
        run = run_suite(args, args.json)
        if not args.json.exists():
            print(f"no results at {args.json}", file=sys.stderr)
            return 1
        data = json.loads(args.json.read_text())
        data["fanet_run"], data["fanet_env"] = run, env
        args.json.write_text(json.dumps(without_samples(data), indent=1))
    args.output.write_text(render(data, env, run))
    print(f"wrote {args.output}")
    return 0 if run.get("returncode", 0) in (0, 5) else int(run["returncode"])


if __name__ == "__main__":
    sys.exit(main())
