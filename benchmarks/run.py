"""Run the benchmark suite and write benchmarks/RESULTS.md.

    python benchmarks/run.py            # full matrix (slow on a 2-core CPU)
    python benchmarks/run.py --quick    # one shape per family, fewer rounds, batch 32 networks
    python benchmarks/run.py --from-json benchmarks/results.json   # only re-render the tables
    python benchmarks/run.py --merge -- -k bn_se     # re-run some rows, keep the others of results.json
    python benchmarks/run.py --thp-both              # also every row with THP_MEM_ALLOC_ENABLE=0

The suite runs with PyTorch's THP_MEM_ALLOC_ENABLE=1 on Linux (benchmarks/conftest.py) unless the
environment sets it or --no-thp is given; every table records the setting of its rows.
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
SE_OPS = ("bn_se_residual_gate_pool", "bn_se_residual")
TARGET_SE_VS_COMPILED = 1.0   # SE tail ops fwd+bwd: at least as fast as torch.compile of the eager block tail
TARGET_SE_COPY_RATIO = 1.2    # ... and within 1.2x of the copy bound at activations of 32 MiB or more
SE_COPY_MIN_BYTES = 32 << 20
TARGET_SE_NET = 0.98          # SE-ResNet-56 and FA-SE-ResNet-56 with the fold: at most 0.98x the ResNet-56 step
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


def run_suite(args: argparse.Namespace, json_path: Path, thp: Optional[str] = None,
              select: Optional[str] = None) -> dict:
    """One pytest run of the suite.  ``thp``: THP_MEM_ALLOC_ENABLE for it (None: the environment's, else
    benchmarks/conftest.py's default 1); ``select`` replaces the run's -k."""
    cmd = [sys.executable, "-m", "pytest", str(HERE), "--benchmark-only", f"--benchmark-json={json_path}",
           "-p", "no:cacheprovider", "-q", "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name"]
    if args.quick:
        cmd.append("--fanet-quick")
    if args.threads:
        cmd.append(f"--fanet-threads={args.threads}")
    cmd += args.pytest_args
    if select:
        cmd += ["-k", select]
    load_before = os.getloadavg()
    start = time.perf_counter()
    env = dict(os.environ)
    if thp is not None:
        env["THP_MEM_ALLOC_ENABLE"] = thp
    print("+", *([f"THP_MEM_ALLOC_ENABLE={thp}"] if thp is not None else []), " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=HERE.parent, env=env)
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


def thp_of(row: Optional[dict]) -> str:
    """A row's THP_MEM_ALLOC_ENABLE; rows from runs before it was recorded ran with PyTorch's default."""
    if row is None:
        return "–"
    return row.get("extra_info", {}).get("thp_mem_alloc_enable", "unset (0)")


def thp_label(rows) -> str:
    return "THP_MEM_ALLOC_ENABLE=" + " / ".join(sorted({thp_of(r) for r in rows}))


def same_run(*rows: Optional[dict]) -> bool:
    """Whether the rows were measured in one run (ratios across runs are not reported)."""
    runs = {r.get("extra_info", {}).get("run_date") for r in rows if r is not None}
    return len(runs) <= 1


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
    head = ["| case | fused | vs eager (>= 3x) | vs compiled (>= 1.5x) | time / copy bound (<= 1.5) | THP |",
            "|---|---|---|---|---|---|"]
    targets: dict[str, list[str]] = {op: list(head) for op in TARGET_OPS}
    se_head = ["| case | op | fused | fused kernel | vs compiled (>= 1.0x) | time / copy bound (<= 1.2 at S >= 32 MiB) "
               "| vs eager | THP |", "|---|---|---|---|---|---|---|---|"]
    targets["se"] = list(se_head)
    tables: list[str] = []
    by_section: dict[tuple, list[tuple[str, dict]]] = defaultdict(list)
    for name, rows in groups.items():
        info = next(iter(rows.values()))["extra_info"]
        by_section[(info["op"], info["passes"], info["device"])].append((name, rows))
    for (op, passes, device), items in sorted(by_section.items()):
        fused = sorted({f for _, rows in items for f in fused_of(rows)}, key=FUSED_ORDER.index)
        all_rows = [r for _, rows in items for r in rows.values()]
        tables += ["", f"### {op} {passes} ({device}, {thp_label(all_rows)})", "",
                   "| family | shape | dtype | layout | clone ms | reference ms | compiled ms | "
                   + " | ".join(f"{f} ms | {f} GB/s | {f} / copy | {f} vs ref | {f} vs compiled" for f in fused)
                   + " |",
                   "|" + "---|" * (7 + 5 * len(fused))]
        for name, rows in items:
            info = next(iter(rows.values()))["extra_info"]
            t_clone, t_ref = median(rows.get("clone")), median(rows.get("reference"))
            t_comp = median(rows.get("compiled"))
            base_row = rows.get("clone") or rows.get("reference") or next(iter(rows.values()))
            t_ref = t_ref if same_run(base_row, rows.get("reference")) else None
            t_comp = t_comp if same_run(base_row, rows.get("compiled")) else None
            cells = [info["family"], "x".join(map(str, info["shape"])), info["dtype"], info["layout"],
                     ms(t_clone), ms(t_ref), ms(t_comp)]
            for f in fused:
                t = median(rows.get(f)) if same_run(base_row, rows.get(f)) else None
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
                        f"{ratio(copy)} {verdict(copy, TARGET_COPY_RATIO, False)} | {thp_of(rows.get(f))} |")
                if op in SE_OPS and passes == "fwd+bwd" and f in rows:
                    vs_ref = None if t is None or t_ref is None else t_ref / t
                    vs_comp = None if t is None or t_comp is None else t_comp / t
                    copy = None if t is None or t_clone is None else t / t_clone
                    activation = info["bytes"] // info["bytes_in_S"] if "bytes" in info else 0
                    copy_mark = (verdict(copy, TARGET_SE_COPY_RATIO, False) if activation >= SE_COPY_MIN_BYTES
                                 else "(S < 32 MiB: no target)")
                    kernel = rows[f]["extra_info"].get("fused_kernel")
                    kernel_text = "yes" if kernel else "no: reference fallback" if kernel is False else "?"
                    targets["se"].append(
                        f"| {'x'.join(map(str, info['shape']))} {info['dtype']} {info['layout']} | {op} | {f} | "
                        f"{kernel_text} | {ratio(vs_comp)} {verdict(vs_comp, TARGET_SE_VS_COMPILED, True)} | "
                        f"{ratio(copy)} {copy_mark} | {ratio(vs_ref)} | {thp_of(rows[f])} |")
            tables.append("| " + " | ".join(cells) + " |")
    return targets, tables


def iqr(info: dict) -> str:
    q = info.get("paired_iqr")
    return f" [{q[0]:.3f}–{q[1]:.3f}]" if q else ""


def net_key(info: dict) -> tuple[str, str, Optional[bool]]:
    """(model, impl, fold); fold None for rows from runs before the SE fold existed."""
    return info["model"], info["impl"], info.get("fold")


def render_network(benchmarks: list[dict]) -> tuple[list[str], list[str]]:
    """(target lines, table lines) of every training-step group."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in benchmarks:
        if "model" in b.get("extra_info", {}):
            groups[b["group"]].append(b)
    if not groups:
        return (["Network benchmarks did not run (see the pytest output: the zoo may be missing)."], [])
    targets: list[str] = []
    tables: list[str] = []
    for group, rows in groups.items():
        t, table = render_network_group(group, rows)
        targets += t + [""]
        tables += ([""] if tables else []) + [f"Group `{group}`:", ""] * (len(groups) > 1) + table
    return targets, tables


def render_network_group(group: str, rows: list[dict]) -> tuple[list[str], list[str]]:
    by_key = {net_key(b["extra_info"]): b for b in rows}
    latest = max(str(b["extra_info"].get("run_date")) for b in rows)

    def net_label(key: tuple[str, str, Optional[bool]]) -> str:
        model, impl, fold = key
        date = str(by_key[key]["extra_info"].get("run_date"))
        fold_text = {False: ", no fold", None: ", before the SE fold" if "se_" in model else ""}.get(fold, "")
        return (f"{model} [{impl}{fold_text}"
                f"{'' if date == latest else f', run of {date}'}]")

    paired = {k: b["extra_info"].get("paired_time_vs_resnet56") for k, b in by_key.items()}

    def base_of(key) -> Optional[dict]:
        return by_key.get(("resnet56", "compiled" if key[1].startswith("compiled") else "eager", True)) \
            or by_key.get(("resnet56", "compiled" if key[1].startswith("compiled") else "eager", None))

    def vs(key, other: Optional[dict]) -> Optional[float]:
        """Median ratio to ``other`` when both rows come from one run."""
        row = by_key.get(key)
        if row is None or other is None or not same_run(row, other):
            return None
        return row["stats"]["median"] / other["stats"]["median"]

    table = ["| model | impl | fold | step ms | time / ResNet-56 (same mode) | paired time / ResNet-56 eager | "
             "params | params overhead | MACs / image | MACs overhead | THP |", "|---" * 11 + "|"]
    for b in rows:
        i = b["extra_info"]
        key = net_key(i)
        fold = {True: "yes", False: "no", None: "none then"}[i.get("fold")] if "se_" in i["model"] else "–"
        table.append(f"| {i['model']} | {i['impl']} | {fold} | {ms(b['stats']['median'])} | "
                     f"{ratio(vs(key, base_of(key)), 3)} | "
                     f"{ratio(i.get('paired_time_vs_resnet56'), 3)}{iqr(i)} | "
                     f"{i['params']:,} | {100 * i['params_overhead']:.2f}% | {i['macs_per_image']:,} | "
                     f"{100 * i['macs_overhead']:.2f}% | {thp_of(b)} |")
    targets = [f"Group `{group}` ({thp_label(rows)}).", "",
               "Ratios use the paired measurement when present (the median over pairs of steps timed "
               "back to back, its quartiles in brackets), else the two rows' medians (same run only).", ""]

    def step_ratio(key) -> Optional[float]:
        return paired.get(key) or vs(key, base_of(key))

    for key in sorted(by_key, key=lambda k: (k[0] != "fa_resnet56", k[0], k[2] is False, k[1])):
        model, impl, fold = key
        if model == "resnet56" or impl.startswith("compiled"):
            continue
        r = step_ratio(key)
        if r is None:
            continue
        if model == "fa_resnet56" and impl in FUSED_ORDER:
            mark = f"(target <= {TARGET_NET_OVERHEAD}) {verdict(r, TARGET_NET_OVERHEAD, False)}"
        elif model in ("se_resnet56", "fa_se_resnet56") and impl in FUSED_ORDER and fold is True:
            mark = f"(target <= {TARGET_SE_NET}) {verdict(r, TARGET_SE_NET, False)}"
        else:
            mark = "(for comparison)"
        if by_key[key]["extra_info"].get("fused_se_kernel") is False and fold is not False:
            mark += f" (the {impl} backend had no SE kernels: its fold ran the reference composition)"
        targets.append(f"- {net_label(key)} step / ResNet-56 eager step: **{r:.3f}**{iqr(by_key[key]['extra_info'])} "
                       f"{mark}")
    se_eager = by_key.get(("se_resnet56", "eager", False)) or by_key.get(("se_resnet56", "eager", None))
    for key in by_key:
        if key[0] == "fa_se_resnet56" and not key[1].startswith("compiled"):
            r = vs(key, se_eager)
            if r is not None:
                targets.append(f"- {net_label(key)} / SE-ResNet-56 eager (no fold): {r:.3f} (for comparison)")
    for key in by_key:
        if key[0] == "fa_resnet56" and key[1].startswith("compiled"):
            r = vs(key, base_of(key))
            if r is not None:
                targets.append(f"- {net_label(key)} / ResNet-56 [compiled]: {r:.3f} (for comparison)")
    return targets, table


def without_samples(data: dict) -> dict:
    """``data`` with each row's per-round samples (``stats.data``) dropped; the summary statistics
    (median, quartiles, rounds, ...) that RESULTS.md is rendered from stay."""
    for row in data.get("benchmarks", []):
        row.get("stats", {}).pop("data", None)
    return data


def run_lines(env: dict, run: dict) -> list[str]:
    quick = "--fanet-quick" in run.get("command", "")
    selected = " -k " in run.get("command", "") or "--fanet-ops" in run.get("command", "")
    mode = 'quick (one shape per family, fewer rounds, network batch 32)' if quick else 'full matrix'
    return [
        f"- Mode: {mode}{', only the rows the command selects' if selected else ''}; "
        f"suite wall time {run.get('wall_seconds', '?')} s; {run.get('thp', 'THP_MEM_ALLOC_ENABLE not recorded')}",
        f"- Load average (1/5/15 min) before: {fmt_load(run.get('load_before'))}, after: "
        f"{fmt_load(run.get('load_after'))} (other work on the machine perturbs the numbers)",
        f"- Command: `{run.get('command', '?')}`",
        *busy_warning(run, env)]


def render_thp_both(data: dict) -> list[str]:
    """Every row measured with both THP settings: the main run's median beside the other run's."""
    other = data.get("fanet_thp_other")
    if not other:
        return []
    mine = {b["fullname"]: b for b in data.get("benchmarks", [])}
    lines = ["## THP_MEM_ALLOC_ENABLE both ways", "",
             "The rows below were measured again, right after their run, in a second run with the other setting "
             "(`run.py --thp-both`). PyTorch reads the variable once per process, so the two columns come from "
             "two runs minutes apart: on this shared machine compare the ratios of many rows, not one. "
             "Second runs:", "",
             *(f"- {r['env'].get('date', '?')}: `{r['run'].get('command', '?')}` ({r['run'].get('thp', '?')}; load "
               f"before {fmt_load(r['run'].get('load_before'))}, after {fmt_load(r['run'].get('load_after'))})"
               for r in other.get("runs", [])), "",
             "| group | row | ms (THP=1) | ms (THP=0) | THP=0 / THP=1 |", "|---|---|---|---|---|"]
    ratios = []
    for b in other.get("benchmarks", []):
        a = mine.get(b["fullname"])
        if a is None:
            continue
        on, off = (a, b) if thp_of(a).startswith("1") else (b, a)
        if not thp_of(on).startswith("1") or thp_of(off).startswith("1"):
            continue
        t_on, t_off = on["stats"]["median"], off["stats"]["median"]
        ratios.append(t_off / t_on)
        impl = b["extra_info"].get("impl", "?") + ("" if b["extra_info"].get("fold", True) else ", no fold")
        lines.append(f"| {b['group']} | {impl} | {ms(t_on)} | {ms(t_off)} | {t_off / t_on:.2f} |")
    if ratios:
        ratios.sort()
        lines += ["", f"{len(ratios)} rows; THP=0 / THP=1 median {ratios[len(ratios) // 2]:.2f}, "
                      f"range {ratios[0]:.2f}–{ratios[-1]:.2f}."]
    return lines + [""]


def se_fallback_note(benchmarks: list[dict]) -> list[str]:
    fallback = sorted({b["extra_info"]["impl"] for b in benchmarks
                       if b.get("extra_info", {}).get("op") in SE_OPS and b["extra_info"].get("fused_kernel") is False})
    if not fallback:
        return []
    return ["", f"**Backend(s) {', '.join(fallback)} had no kernels for these ops when measured**: their rows time "
                "the reference composition that `fanet_kernels.ops` falls back to, not a fused op, so their targets "
                "are not measured yet."]


def render(data: dict, env: dict, run: dict) -> str:
    benchmarks = data.get("benchmarks", [])
    quick = "--fanet-quick" in run.get("command", "")
    op_targets, op_tables = render_ops(op_groups(benchmarks))
    net_targets, net_table = render_network(benchmarks)
    earlier = [r for r in data.get("fanet_runs", []) if r.get("env", {}).get("date") != env.get("date")]
    lines = [
        "# fanet_kernels benchmark results", "",
        f"Written by `benchmarks/run.py{' --quick' if quick else ''}` on {env['date']}. "
        "Each group (one case) was measured in one run: median of the rounds; "
        "ratios are between rows of the same group (and of the same run). "
        "Data (summary statistics per row): `benchmarks/results.json`.", "",
        "## Machine and versions", "",
        f"- CPU: {env['cpu']}, {env['cores']} cores (torch threads: {env['torch_threads']}); GPU: {env['gpu']}",
        f"- Platform: {env['platform']}",
        f"- Python {env['python']}, torch {env['torch']}, triton {env['triton']}, "
        f"pytest-benchmark {env['pytest-benchmark']}, fanet_kernels {env['fanet_kernels']}",
        *run_lines(env, run),
    ]
    for r in earlier:
        lines += [f"- Rows kept from an earlier run ({r['env'].get('date', '?')}, `--merge`):",
                  *("  " + line for line in run_lines(r["env"], r["run"]))]
    lines += [
        "",
        "Bytes per call (SPEC §5, S = bytes of one activation): gate_pool, residual_gate_pool and gate "
        "forward 3·S, forward+backward 8·S; bn_residual_gate_pool, bn_se_residual_gate_pool and bn_se_residual "
        "forward 4·S, forward+backward 12·S; focus "
        "forward 1·S, forward+backward 3·S. *copy* = `torch.clone` of "
        "activation-sized tensors moving the same bytes in the same run (sized like the ops' outputs, so "
        "both get their memory the same way), so `time / copy` is the distance to the copy bound. "
        "THP: the run's THP_MEM_ALLOC_ENABLE (1: PyTorch allocates CPU tensors of 2 MiB or more on "
        "transparent huge pages).", "",
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
        "### bn_se_residual_gate_pool and bn_se_residual forward+backward", "",
        "The tail of a residual block whose branch ends BatchNorm -> SE (training mode), with the FA gate "
        "(bn_se_residual_gate_pool, what the FA chains run for SE blocks) and without (bn_se_residual, what "
        "SE-ResNet blocks run). The eager reference is F.batch_norm, the SE block, the add + ReLU (and "
        "gate_pool); *compiled* is torch.compile of it. Targets: >= 1.0x the compiled tail at every shape, "
        "time / copy bound <= 1.2 where one activation is 32 MiB or more. *fused kernel* says whether the "
        "backend had its own kernel for the op when measured (no: the backend fell back to the reference "
        "composition, so the row measures that, not a fused op).", "",
        *op_targets["se"], *se_fallback_note(benchmarks), "",
        "### Training steps (ResNet-56 family)", "", *net_targets,
    ]
    lines += render_thp_both(data)
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


def measured(args: argparse.Namespace, json_path: Path, thp: Optional[str],
             select: Optional[str] = None) -> Optional[tuple[dict, dict, dict]]:
    """Run the suite; (its JSON with the run's details, run, env), each row tagged with the run's date."""
    env = environment()
    if args.threads:
        env["torch_threads"] = args.threads
    run = run_suite(args, json_path, thp, select)
    if not json_path.exists():
        print(f"no results at {json_path}", file=sys.stderr)
        return None
    data = without_samples(json.loads(json_path.read_text()))
    run["thp"] = f"THP_MEM_ALLOC_ENABLE={data.get('machine_info', {}).get('thp_mem_alloc_enable', '?')}"
    for row in data.get("benchmarks", []):
        row.setdefault("extra_info", {})["run_date"] = env["date"]
    return data, run, env


def merge(old: dict, data: dict) -> None:
    """Add to ``data`` the rows of ``old`` it did not measure, and the runs they come from."""
    old_date = old.get("fanet_env", {}).get("date")
    new_names = {b["fullname"] for b in data["benchmarks"]}
    kept = [b for b in old.get("benchmarks", []) if b["fullname"] not in new_names]
    for b in kept:
        b.setdefault("extra_info", {}).setdefault("run_date", old_date)
    data["benchmarks"] = kept + data["benchmarks"]
    dates = {b["extra_info"].get("run_date") for b in kept}
    runs = old.get("fanet_runs") or [{"env": old.get("fanet_env", {}), "run": old.get("fanet_run", {})}]
    data["fanet_runs"] = [r for r in runs if r["env"].get("date") in dates] + data["fanet_runs"]
    if "fanet_thp_other" in old:  # the second-setting rows of both, this run's where both have a row
        mine = data.setdefault("fanet_thp_other", {"runs": [], "benchmarks": []})
        names = {b["fullname"] for b in mine["benchmarks"]}
        older = [b for b in old["fanet_thp_other"]["benchmarks"] if b["fullname"] not in names]
        mine["benchmarks"] = older + mine["benchmarks"]
        dates = {b["extra_info"].get("run_date") for b in older}
        mine["runs"] = [r for r in old["fanet_thp_other"]["runs"] if r["env"].get("date") in dates] + mine["runs"]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="quick mode (FANET_BENCH_QUICK=1 also works)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the run (default: torch's)")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--json", type=Path, default=HERE / "results.json", help="pytest-benchmark JSON output")
    parser.add_argument("--from-json", type=Path, help="skip running; render RESULTS.md from this JSON")
    parser.add_argument("--no-thp", action="store_true",
                        help="run with THP_MEM_ALLOC_ENABLE=0 (default on Linux: 1 unless the environment sets it)")
    parser.add_argument("--thp-both", action="store_true",
                        help="then run the same rows again with the other THP setting; RESULTS.md shows both")
    parser.add_argument("--thp-both-k", metavar="EXPR", help="with --thp-both: pytest -k of the second run "
                        "(default: the rows of the first)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of --json that this run does not measure (those it measures are replaced)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    args.quick = args.quick or os.environ.get("FANET_BENCH_QUICK", "0") not in ("", "0")

    if args.from_json:
        data = json.loads(args.from_json.read_text())
        run, env = data.get("fanet_run", {}), data.get("fanet_env", environment())
    else:
        old = json.loads(args.json.read_text()) if args.merge and args.json.exists() else None
        result = measured(args, args.json, "0" if args.no_thp else None)
        if result is None:
            return 1
        data, run, env = result
        data["fanet_run"], data["fanet_env"] = run, env
        data["fanet_runs"] = [{"env": env, "run": run}]
        if args.thp_both:
            other_thp = "0" if run["thp"].endswith("=1") else "1"
            other_json = args.json.with_name(args.json.stem + "-thp" + other_thp + ".json")
            other = measured(args, other_json, other_thp, args.thp_both_k)
            if other is not None:
                data["fanet_thp_other"] = {"runs": [{"env": other[2], "run": other[1]}],
                                           "benchmarks": other[0]["benchmarks"]}
                other_json.unlink()
        if old is not None:
            merge(old, data)
        args.json.write_text(json.dumps(data, indent=1))
    args.output.write_text(render(data, env, run))
    print(f"wrote {args.output}")
    return 0 if run.get("returncode", 0) in (0, 5) else int(run["returncode"])


if __name__ == "__main__":
    sys.exit(main())
