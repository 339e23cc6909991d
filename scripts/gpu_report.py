"""Writes OUTDIR/summary.md (and a merged OUTDIR/junit.xml) from what scripts/gpu_check.sh left there,
and prints a one-screen summary.

    python3 scripts/gpu_report.py OUTDIR

Reads: steps.tsv (one line per step: name, status, seconds, exit code, log, note), env.txt,
junit_*.xml (pytest), memcheck.log / racecheck.log (compute-sanitizer), determinism.json
(scripts/gpu_determinism.py), bench.json (benchmarks/gpu_quick.py) and the steps' logs.
Standard library only: it runs in a second or two, GPU or not.  Exit status: 1 if a step failed,
else 0 (a skipped or timed-out step makes the verdict INCOMPLETE, not FAIL).
"""
from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# The steps of gpu_check.sh, in its order, with what each checks.
STEPS = {
    "build": "build in place against this machine's torch (pip -e, else setup.py build_ext --inplace)",
    "tests-cuda": "pytest tests/test_cuda.py -m cuda: CUDA-only cases, bit identity with the CPU backend",
    "tests-ops": "pytest tests/ -m cuda: every op target on CUDA tensors (cuda-cuda, triton-cuda)",
    "memcheck": "compute-sanitizer memcheck over every CUDA kernel (scripts/gpu_sanitize.py)",
    "racecheck": "compute-sanitizer racecheck over every CUDA kernel (scripts/gpu_sanitize.py)",
    "determinism": "every op forward+backward in two processes, outputs compared bitwise",
    "tests-triton": "pytest tests/test_triton*.py on CUDA tensors",
    "bench": "benchmarks/gpu_quick.py: fused ops vs a copy of the same bytes; FA-ResNet-56 vs ResNet-56",
}
JUNIT_OF = {"tests-cuda": "junit_cuda.xml", "tests-ops": "junit_ops.xml", "tests-triton": "junit_triton.xml"}
FIRST_LINES = 6  # lines of each failure shown
MAX_LISTED = 25  # failures listed in summary.md (the rest: junit.xml)
UNSUPPORTED = re.compile(r"Device not supported|not supported on this (?:device|platform)|"
                         r"Unable to find injection library|No supported devices found", re.I)
IMPL_ORDER = ("cuda", "triton", "cpu", "reference", "compiled")
# The first line of one compute-sanitizer report (without its "========= " prefix).
REPORT_START = re.compile(r"(Invalid|Error|Race|Program hit|Uninitialized|Barrier|Malloc|Leaked|Warning|Out-of-range)")


@dataclass
class Step:
    name: str
    status: str  # ok | failed | timeout | empty | skipped | dry-run | missing
    seconds: int = 0
    rc: str = "-"
    log: str = ""
    note: str = ""
    verdict: str = ""  # what the report concludes (PASS, FAIL, TIMEOUT, SKIPPED, ...)
    detail: str = ""  # one line for the step table
    failures: list[tuple[str, list[str]]] = field(default_factory=list)  # (what, first lines)


@dataclass
class Junit:
    tests: int = 0
    passed: int = 0
    failed: list[tuple[str, list[str]]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    ulp_lines: list[str] = field(default_factory=list)
    error: str = ""


# ---- readers ------------------------------------------------------------------------------------
def read_steps(outdir: Path) -> dict[str, Step]:
    steps: dict[str, Step] = {}
    path = outdir / "steps.tsv"
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split("\t")
            if len(parts) < 2 or not parts[0]:
                continue
            parts += [""] * (6 - len(parts))
            seconds = int(parts[2]) if parts[2].isdigit() else 0
            steps[parts[0]] = Step(parts[0], parts[1], seconds, parts[3] or "-", parts[4], parts[5])
    for name in STEPS:
        steps.setdefault(name, Step(name, "missing", note="never started (the run stopped before it)"))
    return steps


def read_env(outdir: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    path = outdir / "env.txt"
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(": ")
            if sep:
                env[key.strip()] = value.strip()
    return env


def first_lines(text: str, n: int = FIRST_LINES) -> list[str]:
    """The lines of a pytest failure that say what went wrong: its 'E ' lines if any, else its
    first non-empty lines."""
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.lstrip().startswith("E ")]
    return (errors or lines)[:n]


def read_junit(path: Path) -> Junit:
    result = Junit()
    if not path.exists():
        result.error = f"{path.name} was not written"
        return result
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        result.error = f"{path.name} is not readable XML ({exc})"
        return result
    seen_ulp: set[str] = set()
    for case in root.iter("testcase"):
        result.tests += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}".lstrip(":")
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            message = bad.get("message") or ""
            lines = first_lines(bad.text or "") or [message.splitlines()[0] if message else bad.tag]
            result.failed.append((name, lines))
        elif skip is not None:
            reason = (skip.get("message") or "no reason given").strip()
            result.skipped[reason] = result.skipped.get(reason, 0) + 1
        else:
            result.passed += 1
        out = case.find("system-out")
        for line in (out.text or "").splitlines() if out is not None else []:
            if "ulp" in line.lower() and line.strip() not in seen_ulp:
                seen_ulp.add(line.strip())
                result.ulp_lines.append(line.strip())
    return result


def merge_junit(paths: dict[str, Path], out: Path) -> None:
    """One JUnit file of every pytest step, each step a <testsuite> named after it."""
    merged = ET.Element("testsuites")
    for step, path in paths.items():
        if not path.exists():
            continue
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError:
            continue
        for suite in ([root] if root.tag == "testsuite" else root.findall("testsuite")):
            suite.set("name", step)
            merged.append(suite)
    ET.ElementTree(merged).write(out, encoding="utf-8", xml_declaration=True)


@dataclass
class Sanitizer:
    errors: Optional[int] = None  # None: no summary line (the tool did not finish)
    unsupported: str = ""
    first: list[str] = field(default_factory=list)


def read_sanitizer(path: Path) -> Sanitizer:
    """compute-sanitizer's verdict: the count in its ERROR SUMMARY (memcheck) or RACECHECK SUMMARY
    line, and the first lines of its first report."""
    result = Sanitizer()
    if not path.exists():
        return result
    text = path.read_text(errors="replace")
    m = UNSUPPORTED.search(text)
    if m:
        result.unsupported = m.group(0)
    counts = [int(x) for x in re.findall(r"ERROR SUMMARY:\s*(\d+) error", text)]
    races = re.findall(r"RACECHECK SUMMARY:\s*\d+ hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    if counts or races:
        result.errors = sum(counts) + sum(int(e) for e, _ in races)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        body = line.strip().lstrip("=").strip()
        if line.startswith("=========") and body and "SUMMARY" not in body and \
                REPORT_START.match(body):
            block = []
            for ln in lines[i:]:
                if not ln.startswith("=========") or not ln.strip().strip("=").strip() or len(block) == FIRST_LINES:
                    break
                block.append(ln.strip())
            result.first = block
            break
    return result


ULP_LINE = re.compile(r"(cuda|triton) vs cpu, (\w+) .*element-wise max ulp (\d+), reductions max ulp (\d+)")


def ulp_by_dtype(lines: list[str]) -> dict[str, tuple[int, int]]:
    """{"backend dtype": (element-wise max ulp, reductions max ulp)} over the bit-identity test's
    per-case lines (cuda and triton backends against the cpu backend)."""
    out: dict[str, tuple[int, int]] = {}
    for line in lines:
        m = ULP_LINE.search(line)
        if m:
            key = f"{m.group(1)} {m.group(2)}"
            e, r = out.get(key, (0, 0))
            out[key] = (max(e, int(m.group(3))), max(r, int(m.group(4))))
    return out


def ulp_block(log: Path) -> list[str]:
    """The per-output table a test writes to the terminal: a line with "ulp" ending in ":" and the
    indented lines under it."""
    if not log.exists():
        return []
    lines = log.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        if "ulp" in line.lower() and line.rstrip().endswith(":"):
            block = [line.strip()]
            for nxt in lines[i + 1:]:
                if not nxt.startswith((" ", "\t")) or not nxt.strip():
                    break
                block.append(nxt.rstrip())
            return block
    return []


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def log_first_errors(path: str, n: int = FIRST_LINES) -> list[str]:
    """The first lines of a log that look like an error, else its last lines."""
    p = Path(path) if path else None
    if p is None or not p.exists():
        return []
    lines = [ln.rstrip() for ln in p.read_text(errors="replace").splitlines() if ln.strip()]
    pat = re.compile(r"\berror\b|Error:|Traceback|FAILED|fatal|Killed|No such file", re.I)
    for i, line in enumerate(lines):
        if pat.search(line) and not line.startswith("+ "):
            return lines[i:i + n]
    return lines[-n:]


def spill_note(build_log: Path) -> str:
    """How many kernels ptxas reports as spilling (FANET_PTXAS_VERBOSE=1 puts its report in the log)."""
    if not build_log.exists():
        return ""
    text = build_log.read_text(errors="replace")
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not spills:
        return ""
    bad = sum(1 for s, l in spills if int(s) or int(l))
    return f"ptxas: {bad} of {len(spills)} kernel builds spill"


# ---- judging each step -------------------------------------------------------------------------
def judge(step: Step, outdir: Path, junits: dict[str, Junit]) -> None:
    s = step
    if s.status == "dry-run":
        s.verdict, s.detail = "DRY-RUN", "not run (dry run)"
        return
    if s.status in ("skipped", "missing"):
        s.verdict, s.detail = "SKIPPED", s.note
        return
    if s.name in JUNIT_OF:
        j = junits[s.name]
        skipped = sum(j.skipped.values())
        counts = f"{j.passed} passed, {len(j.failed)} failed, {skipped} skipped" if not j.error else j.error
        s.failures = [(name, lines) for name, lines in j.failed]
        if j.failed or (s.status == "failed" and not j.error):
            s.verdict = "FAIL"
        elif s.status == "failed":
            s.verdict = "FAIL"
            s.failures = [(f"{s.name} (pytest exit {s.rc})", log_first_errors(s.log))]
        elif s.status == "timeout":
            s.verdict = "TIMEOUT"
        elif s.status == "empty" or (j.tests == 0 and not j.error):
            s.verdict, counts = "EMPTY", "no tests collected"
        elif j.passed == 0 and skipped:
            top = max(j.skipped.items(), key=lambda kv: kv[1])[0]
            s.verdict, counts = "SKIPPED", f"all {skipped} tests skipped, e.g. because: {top}"
        else:
            s.verdict = "PASS"
        s.detail = counts + (" (stopped at its time limit)" if s.status == "timeout" else "")
        return
    if s.name in ("memcheck", "racecheck"):
        san = read_sanitizer(outdir / f"{s.name}.log")
        if san.unsupported:
            s.verdict, s.detail = "SKIPPED", f"compute-sanitizer cannot run on this machine ({san.unsupported})"
        elif san.errors:
            s.verdict, s.detail = "FAIL", f"{san.errors} error(s) reported"
            s.failures = [(s.name, san.first or log_first_errors(s.log))]
        elif s.status == "ok" and san.errors == 0:
            s.verdict, s.detail = "PASS", "0 errors"
        elif s.status == "timeout":
            s.verdict, s.detail = "TIMEOUT", "stopped at its time limit before its summary"
        elif san.errors == 0:
            s.verdict, s.detail = "FAIL", f"0 sanitizer errors, but op calls failed (exit {s.rc})"
            s.failures = [(s.name, log_first_errors(s.log))]
        else:
            s.verdict, s.detail = "FAIL", f"exit {s.rc}, no sanitizer summary"
            s.failures = [(s.name, log_first_errors(s.log))]
        return
    if s.name == "determinism":
        d = read_json(outdir / "determinism.json") or {}
        if d.get("ok") is True:
            s.verdict = "PASS"
        elif d.get("ok") is False:
            s.verdict = "FAIL"
            diffs = d.get("differences", [])
            s.failures = [("determinism", [f"{x['case']} {x['tensor']}: {x['n_diff']} of {x['numel']} elements "
                                           f"differ (max |diff| {x['max_abs']:.3g}, max {x['max_ulp']} ulp)"
                                           for x in diffs[:FIRST_LINES]] or [d.get("error") or "failed"])]
        else:
            s.verdict = "TIMEOUT" if s.status == "timeout" else "FAIL"
            if s.verdict == "FAIL":
                s.failures = [("determinism", [d["error"]] if d.get("error") else log_first_errors(s.log))]
        s.detail = determinism_line(d) if d else f"no result (exit {s.rc})"
        return
    if s.name == "bench":
        b = read_json(outdir / "bench.json") or {}
        errors = b.get("errors", [])
        if s.status == "ok" and not errors:
            s.verdict = "PASS"
        elif s.status == "timeout":
            s.verdict = "TIMEOUT"
        else:
            s.verdict = "FAIL"
            s.failures = [(f"bench: {e.get('what', '?')}", [e.get("error", "")]) for e in errors[:FIRST_LINES]] or \
                [("bench", log_first_errors(s.log))]
        s.detail = (f"{len(b.get('ops', []))} op rows, {len(b.get('network', []))} network rows, "
                    f"{len(b.get('skipped', []))} items skipped for time") if b else f"no result (exit {s.rc})"
        return
    # build, and any other plain step
    if s.status == "ok":
        s.verdict = "PASS"
        s.detail = spill_note(outdir / "build.log") if s.name == "build" else ""
    else:
        s.verdict = "TIMEOUT" if s.status == "timeout" else "FAIL"
        s.failures = [(s.name, log_first_errors(s.log))]
        s.detail = f"exit {s.rc}"


def determinism_line(d: dict) -> str:
    if d.get("error") and d.get("ok") is None:
        return f"error: {d['error']}"
    text = (f"{d.get('cases_compared', 0)} cases, {d.get('tensors_compared', 0)} tensors: "
            f"{d.get('identical', 0)} bitwise identical")
    if d.get("differences"):
        text += f", {len(d['differences'])} differ"
    if d.get("not_compared"):
        text += f"; {len(d['not_compared'])} cases not compared (time)"
    return text


# ---- benchmark tables ----------------------------------------------------------------------------
def fmt_ms(ms: Optional[float]) -> str:
    return "–" if ms is None else f"{ms:.3f}"


def bench_tables(b: dict) -> list[str]:
    lines: list[str] = []
    peak = b.get("copy_peak")
    if peak:
        lines += [(f"Device-to-device copy: {peak['gbps']:.0f} GB/s (bytes read + written, "
                   f"{peak['bytes'] / 1e9:.2f} GB in {peak['ms']:.3f} ms)."), ""]
    ops = b.get("ops", [])
    if ops:
        impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in ops)]
        lines += [("Each cell: median ms, and in brackets the fraction of the copy bandwidth reached "
                   "(time of a copy of the same bytes / time of the row; 100% = copy speed). Bytes per SPEC §5."), "",
                  "| op | pass | dtype, layout | MB | copy ms | " + " | ".join(impls) + " |",
                  "|---|---|---|---|---|" + "---|" * len(impls)]
        groups: dict[tuple, dict[str, dict]] = {}
        for r in ops:
            key = (r["op"], r["passes"], r["dtype"], r["layout"], tuple(r["shape"]))
            groups.setdefault(key, {})[r["impl"]] = r
        for (op, passes, dtype, layout, shape), rows in groups.items():
            any_row = next(iter(rows.values()))
            cells = []
            for impl in impls:
                r = rows.get(impl)
                frac = None if r is None else r.get("copy_fraction")
                cells.append("–" if r is None else f"{fmt_ms(r['ms'])} ({frac:.0%})" if frac else fmt_ms(r["ms"]))
            lines.append(f"| {op} | {passes} | {dtype}, {layout} | {any_row['bytes'] / 1e6:.0f} | "
                         f"{fmt_ms(any_row.get('copy_ms'))} | " + " | ".join(cells) + " |")
        shapes = sorted({"x".join(map(str, r["shape"])) for r in ops})
        lines += ["", f"Shapes (N x C x H x W): {', '.join(shapes)}.", ""]
    net = b.get("network", [])
    if net:
        lines += ["| model | impl | batch | step ms | vs ResNet-56 (same mode) |", "|---|---|---|---|---|"]
        for r in net:
            ratio = r.get("vs_resnet56")
            lines.append(f"| {r['model']} | {r['impl']} | {r['batch']} | {fmt_ms(r['ms'])} | "
                         f"{'–' if ratio is None else f'{ratio:.3f}'} |")
        lines.append("")
    if b.get("skipped"):
        lines += ["Not measured (out of time): " + "; ".join(b["skipped"]) + ".", ""]
    lines += [f"Note: {n}." for n in b.get("notes", [])]
    for e in b.get("errors", []):
        lines.append(f"- error in {e.get('what')}: {e.get('error')}")
    return lines


def bench_headline(b: dict) -> list[str]:
    """Two or three lines for the screen: the fused fwd+bwd rows' copy fractions, the network ratios."""
    out = []
    rows = [r for r in b.get("ops", []) if r["passes"] == "fwd+bwd" and r["impl"] in ("cuda", "triton")
            and r.get("copy_fraction")]
    if rows:
        first = (rows[0]["dtype"], rows[0]["layout"])
        cells = [f"{r['op']} {r['impl']} {r['copy_fraction']:.0%}" for r in rows if (r["dtype"], r["layout"]) == first]
        out.append(f"bench fwd+bwd, fraction of copy bandwidth ({first[0]}, {first[1]}): " + ", ".join(cells))
    net = [r for r in b.get("network", []) if r["model"] == "fa_resnet56" and r.get("vs_resnet56")]
    if net:
        out.append("FA-ResNet-56 step / ResNet-56 step: "
                   + ", ".join(f"{r['impl']} {r['vs_resnet56']:.2f}x" for r in net))
    return out


# ---- rendering ------------------------------------------------------------------------------------
def render(outdir: Path) -> tuple[str, str, int]:
    """(summary.md, the screen summary, exit status)."""
    env = read_env(outdir)
    steps = read_steps(outdir)
    junits = {name: read_junit(outdir / f) for name, f in JUNIT_OF.items()}
    dry = any(s.status == "dry-run" for s in steps.values())
    for s in steps.values():
        judge(s, outdir, junits)
    ordered = [steps[n] for n in STEPS] + [s for n, s in steps.items() if n not in STEPS]
    failed = [s for s in ordered if s.verdict == "FAIL"]
    incomplete = [s for s in ordered if s.verdict in ("SKIPPED", "TIMEOUT", "EMPTY")]
    verdict = "DRY RUN" if dry else "FAIL" if failed else "INCOMPLETE" if incomplete else "PASS"
    bench = read_json(outdir / "bench.json") or {}
    det = read_json(outdir / "determinism.json")
    ulp = [line for j in junits.values() for line in j.ulp_lines]

    md = [f"# GPU check: {verdict}", ""]
    md += [f"- {k}: {v}" for k, v in env.items()]
    md += ["", (f"Written by `scripts/gpu_report.py` from `bash scripts/gpu_check.sh {outdir.name}`; "
                "logs, JUnit XML (`junit.xml`) and JSON results are beside this file."), "",
           "## Steps", "", "| step | result | s | what it checks | notes |", "|---|---|---|---|---|"]
    for s in ordered:
        md.append(f"| {s.name} | {s.verdict} | {s.seconds} | {STEPS.get(s.name, '')} | {s.detail.replace('|', '/')} |")
    md.append("")
    if failed:
        md += ["## Failures (first lines)", ""]
        for s in failed:
            listed = s.failures[:MAX_LISTED]
            for what, lines in listed:
                md += [f"### {s.name}: {what}", "", "```", *lines, "```", ""]
            if len(s.failures) > len(listed):
                md += [f"... and {len(s.failures) - len(listed)} more failures of {s.name} (see junit.xml).", ""]
    skipped_lines = [f"- {s.name}: {s.detail or s.note}" for s in incomplete]
    if skipped_lines:
        md += ["## Skipped or cut short", "", *skipped_lines, ""]
    reasons: dict[str, int] = {}
    for j in junits.values():
        for r, n in j.skipped.items():
            reasons[r] = reasons.get(r, 0) + n
    if reasons:
        md += ["## Skipped tests (reason: count)", ""]
        md += [f"- {r}: {n}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:15]]
        md.append("")
    md += ["## Bit identity of the cuda and triton backends' outputs with the cpu backend's", ""]
    per_dtype = ulp_by_dtype(ulp)
    if per_dtype:
        md += ["Largest difference in ulp over the cases of the bit-identity test (element-wise outputs must be 0):",
               "", "| backend dtype | element-wise | reductions |", "|---|---|---|"]
        md += [f"| {d} | {e} | {r} |" for d, (e, r) in per_dtype.items()]
        md.append("")
    elif ulp:
        md += [f"    {line}" for line in ulp[:30]] + [""]
    block = ulp_block(outdir / "tests-cuda.log")
    if block:
        md += ["Per output:", "", "```", *block, "```"]
    if not ulp and not block:
        md.append("No ulp figures were printed (see tests-cuda).")
    md += ["", "## Cross-process determinism", "", determinism_line(det) if det else "No result.", ""]
    if det and det.get("differences"):
        md += ["| case | tensor | elements differing | max abs diff | max ulp |", "|---|---|---|---|---|"]
        md += [f"| {x['case']} | {x['tensor']} | {x['n_diff']} of {x['numel']} | {x['max_abs']:.3g} | {x['max_ulp']} |"
               for x in det["differences"][:MAX_LISTED]]
        md.append("")
    md += ["## Benchmarks (quick)", ""]
    md += bench_tables(bench) if bench else ["No benchmark results."]
    md.append("")

    wall = f"; {env['elapsed']}" if env.get("elapsed") else ""
    screen = [(f"==== gpu_check: {verdict} ({sum(s.verdict == 'PASS' for s in ordered)} of {len(ordered)} steps "
               f"passed, {len(failed)} failed, {len(incomplete)} skipped or cut short{wall}) ====")]
    if env.get("gpu"):
        screen.append(f"{env['gpu']} | {env.get('python', '')}")
    for s in ordered:
        screen.append(f"{s.name:<13} {s.verdict:<8} {s.seconds:>4}s  {s.detail[:90]}")
    shown = 0
    for s in failed:
        for what, lines in s.failures:
            if shown >= 6:
                break
            screen.append(f"  FAIL {s.name}" + ("" if what == s.name else f": {what[:100]}"))
            screen += [f"       {ln[:110]}" for ln in lines[:2]]
            shown += 1
    if ulp_by_dtype(ulp):
        screen.append("bit identity, max ulp (element-wise / reductions): " +
                      ", ".join(f"{d} {e}/{r}" for d, (e, r) in ulp_by_dtype(ulp).items()))
    elif ulp:
        screen.append("bit identity: " + " | ".join(ulp[:3])[:200])
    if bench:
        screen += bench_headline(bench)
    screen.append(f"summary: {outdir / 'summary.md'}")
    return "\n".join(md) + "\n", "\n".join(screen), 1 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python3 scripts/gpu_report.py OUTDIR", file=sys.stderr)
        return 2
    outdir = Path(args[0])
    if not outdir.is_dir():
        print(f"gpu_report: OUTDIR {outdir} is not a directory", file=sys.stderr)
        return 2
    merge_junit({step: outdir / f for step, f in JUNIT_OF.items()}, outdir / "junit.xml")
    md, screen, status = render(outdir)
    (outdir / "summary.md").write_text(md)
    print(screen)
    return status


if __name__ == "__main__":
    sys.exit(main())
