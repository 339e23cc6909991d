"""scripts/gpu_check.sh and its Python parts, as far as a machine without a GPU can check them: the
argument handling, the stop without a GPU, the time-budget bookkeeping (--dry-run), and the report
written from canned results (scripts/gpu_report.py)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
ENV = {**os.environ, "PYTHON": sys.executable}


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def gpu_check(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env or ENV,
                          timeout=timeout, cwd=ROOT)


# ---- the shell script -------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_without_a_gpu_one_line_and_exit_2(tmp_path):
    out = tmp_path / "x"
    r = gpu_check(str(out))
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no GPU here ("), r.stderr
    assert not out.exists()  # nothing built or written


@pytest.mark.parametrize("args, message", [
    ([], "OUTDIR is missing"),
    (["--frobnicate", "/tmp/x"], "unknown option '--frobnicate'"),
    (["/tmp/x", "/tmp/y"], "one OUTDIR only"),
    (["--budget", "soon", "/tmp/x"], "--budget must be a positive whole number"),
    (["--budget"], "--budget needs"),
    (["--skip", "lunch", "/tmp/x"], "--skip: unknown step 'lunch'"),
])
def test_usage_errors_exit_2_with_the_usage_line(args, message):
    r = gpu_check(*args)
    assert r.returncode == 2, r
    assert message in r.stderr
    assert r.stderr.splitlines()[-1].startswith("usage: bash scripts/gpu_check.sh")
    assert r.stdout == ""


def test_help():
    r = gpu_check("--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: ")
    for step in ("build", "tests-cuda", "tests-ops", "memcheck", "racecheck", "determinism", "tests-triton", "bench"):
        assert f"  {step} " in r.stdout


def test_dry_run_names_what_the_budget_cuts(tmp_path):
    """60 s, steps of 2 s: the steps that no longer fit their phase are skipped and named, with why."""
    out = tmp_path / "out"
    r = gpu_check("--dry-run", "--budget", "60", "--skip", "build", str(out),
                  env={**ENV, "GPU_CHECK_DRY_SLEEP": "2"})
    assert r.returncode == 0, r.stderr
    steps = {line.split("\t")[0]: line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()}
    assert steps["build"][1] == "skipped" and "--skip" in steps["build"][5]
    assert steps["tests-cuda"][1] == "dry-run" and steps["tests-triton"][1] == "dry-run"
    for name in ("tests-ops", "memcheck", "racecheck", "determinism", "bench"):
        assert steps[name][1] == "skipped" and "out of time" in steps[name][5], steps[name]
    assert "pytest tests/test_cuda.py -m cuda --junitxml=" in steps["tests-cuda"][5].replace(
        f"{sys.executable} -m pytest -p no:cacheprovider -q -rfEs -o junit_logging=system-out ", "pytest ")
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU check: DRY RUN")
    assert "- bench: out of time" in summary and "- build: left out with --skip" in summary
    assert "==== gpu_check: DRY RUN" in r.stdout and "bench" in r.stdout


def test_shell_syntax_and_shellcheck():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    r = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


# ---- the report ---------------------------------------------------------------------------------
JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="3">
<testcase classname="tests.test_cuda" name="test_elementwise_outputs_are_bit_identical_to_cpu[2x16x8x8-f32-contiguous]">
<system-out>cuda vs cpu, f32 contiguous (2, 16, 8, 8): element-wise max ulp 0, reductions max ulp 2
</system-out></testcase>
<testcase classname="tests.test_cuda"
 name="test_elementwise_outputs_are_bit_identical_to_cpu[2x16x8x8-bf16-contiguous]">
<failure message="AssertionError: element-wise outputs differ">def test_x():
&gt;       assert not not_identical
E       AssertionError: element-wise outputs differ from the CPU's (ulps): {'gate out': 1}
E       assert not {'gate out': 1}
</failure>
<system-out>cuda vs cpu, bf16 contiguous (2, 16, 8, 8): element-wise max ulp 1, reductions max ulp 3
</system-out></testcase>
<testcase classname="tests.test_cuda" name="test_second_device">
<skipped type="pytest.skip" message="needs two CUDA devices">skipped</skipped></testcase>
</testsuite></testsuites>
"""

MEMCHECK = """========= COMPUTE-SANITIZER
========= Invalid __global__ write of size 4 bytes
=========     at void walk_nhwc_kernel<GatePoolOp<float>, 4>(...)+0x1d0 in fa_cuda.cu:311
=========     by thread (3,0,0) in block (7,0,0)
=========     Address 0x7f0000001000 is out of bounds
=========
gpu_sanitize: 142 of 142 op calls (forward+backward) ran on backend cuda, cuda tensors, in 9.1 s
========= ERROR SUMMARY: 1 error
"""

BENCH = {
    "schema": 1, "device": "cuda", "gpu": "NVIDIA H200", "complete": False,
    "copy_peak": {"bytes": 2 << 30, "ms": 0.5, "gbps": 4295.0},
    "ops": [
        {"op": "gate_pool", "passes": "fwd+bwd", "shape": [128, 256, 32, 32], "dtype": "float32", "layout": "nchw",
         "impl": impl, "bytes": 8 * 134217728, "ms": ms, "gbps": 8 * 134217728 / ms / 1e6, "copy_ms": 0.25,
         "copy_fraction": 0.25 / ms} for impl, ms in (("cuda", 0.3125), ("triton", 0.5), ("reference", 1.25))],
    "network": [{"model": "resnet56", "impl": "eager", "batch": 128, "ms": 40.0, "vs_resnet56": None},
                {"model": "fa_resnet56", "impl": "triton", "batch": 128, "ms": 42.0, "vs_resnet56": 1.05}],
    "skipped": ["resnet56 compiled training step, batch 128"], "errors": [],
}


def canned_outdir(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    (out / "env.txt").write_text("gpu: NVIDIA H200, compute capability 9.0, 139 GiB, 132 SMs (1 visible)\n"
                                 "python: 3.12.3; torch: 2.11.0 (CUDA 13.0); triton: 3.6.0\n")
    (out / "junit_cuda.xml").write_text(JUNIT)
    (out / "memcheck.log").write_text(MEMCHECK)
    (out / "racecheck.log").write_text("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n")
    (out / "tests-cuda.log").write_text(
        "..F.s\ncuda vs cpu backend, largest difference in ulp per output (0: bit-identical):\n"
        "  bf16 gate out: 1\n  f32 gate out: 0\n\n1 failed, 1 passed, 1 skipped\n")
    (out / "bench.json").write_text(json.dumps(BENCH))
    (out / "determinism.json").write_text(json.dumps({
        "ok": True, "cases_compared": 144, "tensors_compared": 900, "identical": 900, "differences": [],
        "not_compared": []}))
    (out / "build.log").write_text("ptxas info    : Used 40 registers, 0 bytes spill stores, 0 bytes spill loads\n")
    rows = [("build", "ok", 95, 0), ("tests-cuda", "failed", 30, 1), ("memcheck", "failed", 40, 3),
            ("racecheck", "ok", 50, 0), ("determinism", "ok", 60, 0), ("tests-triton", "skipped", 0, "-"),
            ("bench", "ok", 150, 0)]
    (out / "steps.tsv").write_text("".join(
        f"{name}\t{status}\t{s}\t{rc}\t{out / (name + '.log') if status != 'skipped' else ''}\t"
        f"{'out of time: 12s left in its phase, needs at least 20s' if status == 'skipped' else 'cmd'}\n"
        for name, status, s, rc in rows))
    return out


def test_report_from_canned_results(tmp_path, capsys):
    report = load("gpu_report")
    out = canned_outdir(tmp_path)
    assert report.main([str(out)]) == 1  # a failure: exit 1
    md = (out / "summary.md").read_text()
    screen = capsys.readouterr().out
    assert md.startswith("# GPU check: FAIL")
    assert "- gpu: NVIDIA H200" in md
    # steps: each with its verdict and detail
    assert "| tests-cuda | FAIL | 30 |" in md and "1 passed, 1 failed, 1 skipped" in md
    assert "| memcheck | FAIL | 40 |" in md and "1 error(s) reported" in md
    assert "| racecheck | PASS | 50 |" in md and "| determinism | PASS | 60 |" in md
    assert "| tests-triton | SKIPPED | 0 |" in md and "- tests-triton: out of time" in md
    assert "| tests-ops | SKIPPED | 0 |" in md and "never started" in md  # no line in steps.tsv
    assert "ptxas: 0 of 1 kernel builds spill" in md
    # failures, with their first lines
    assert "### tests-cuda: tests.test_cuda::test_elementwise_outputs_are_bit_identical_to_cpu[2x16x8x8-bf16" in md
    assert "E       AssertionError: element-wise outputs differ from the CPU's (ulps): {'gate out': 1}" in md
    assert "Invalid __global__ write of size 4 bytes" in md and "walk_nhwc_kernel" in md
    assert "- needs two CUDA devices: 1" in md
    # bit identity: per dtype from the tests' lines, per output from the log
    assert "| cuda f32 | 0 | 2 |" in md and "| cuda bf16 | 1 | 3 |" in md and "  bf16 gate out: 1" in md
    # benchmarks
    assert "| gate_pool | fwd+bwd | float32, nchw | 1074 | 0.250 | 0.312 (80%) | 0.500 (50%) | 1.250 (20%) |" in md
    assert "| fa_resnet56 | triton | 128 | 42.000 | 1.050 |" in md
    assert "Not measured (out of time): resnet56 compiled training step, batch 128." in md
    assert "144 cases, 900 tensors: 900 bitwise identical" in md
    # the screen: short, with the verdict, every step and the first failures
    lines = screen.splitlines()
    assert len(lines) <= 40 and lines[0].startswith("==== gpu_check: FAIL (4 of 8 steps passed, 2 failed, 2 skipped")
    assert any(ln.startswith("tests-cuda    FAIL") for ln in lines)
    assert any("FAIL memcheck" in ln for ln in lines)
    assert "bit identity, max ulp (element-wise / reductions): cuda f32 0/2, cuda bf16 1/3" in screen
    assert "gate_pool cuda 80%, gate_pool triton 50%" in screen and "triton 1.05x" in screen
    # the merged JUnit file holds the suite under its step's name
    merged = (out / "junit.xml").read_text()
    assert 'name="tests-cuda"' in merged and merged.count("<testcase") == 3


def test_report_passes_when_everything_passed(tmp_path):
    report = load("gpu_report")
    out = canned_outdir(tmp_path)
    junit = JUNIT.replace('<failure message="AssertionError: element-wise outputs differ">', "<!--").replace(
        "</failure>", "-->")
    (out / "junit_cuda.xml").write_text(junit)
    (out / "memcheck.log").write_text("========= ERROR SUMMARY: 0 errors\n")
    for name in ("junit_ops.xml", "junit_triton.xml"):
        (out / name).write_text(junit)
    (out / "steps.tsv").write_text("".join(f"{n}\tok\t10\t0\t{out / (n + '.log')}\tcmd\n" for n in report.STEPS))
    md, screen, status = report.render(out)
    assert status == 0 and md.startswith("# GPU check: PASS"), md[:2000]
    assert screen.startswith("==== gpu_check: PASS (8 of 8 steps passed, 0 failed")


def test_report_reads_sanitizer_verdicts(tmp_path):
    report = load("gpu_report")
    race = tmp_path / "race.log"
    race.write_text(textwrap.dedent("""\
        ========= Error: Race reported between Write access at void sum_kernel(...)+0x80
        =========     and Read access at void sum_kernel(...)+0x90 [16 hazards]
        =========
        ========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)
        """))
    r = report.read_sanitizer(race)
    assert r.errors == 1
    assert r.first[0] == "========= Error: Race reported between Write access at void sum_kernel(...)+0x80"
    gvisor = tmp_path / "gvisor.log"
    gvisor.write_text("========= Error: Device not supported\n========= Target application returned an error\n")
    assert report.read_sanitizer(gvisor).unsupported == "Device not supported"
    assert report.read_sanitizer(tmp_path / "missing.log").errors is None


def test_report_usage(tmp_path, capsys):
    report = load("gpu_report")
    assert report.main([]) == 2 and "usage:" in capsys.readouterr().err
    assert report.main([str(tmp_path / "nope")]) == 2 and "not a directory" in capsys.readouterr().err


# ---- the determinism comparison and the sanitizer's op calls ------------------------------------
def test_determinism_compares_bits():
    det = load("gpu_determinism")
    a = torch.tensor([1.0, -0.0, float("nan"), 3.0])
    assert det.differ(a, a.clone()) is None  # NaN against the same NaN: the same bits
    b = a.clone()
    b[1] = 0.0  # -0.0 == 0.0 as numbers, not as bits
    b[3] = torch.nextafter(torch.tensor(3.0), torch.tensor(4.0))
    d = det.differ(a, b)
    assert d["n_diff"] == 2 and d["max_ulp"] == 1 << 31 and d["numel"] == 4
    assert det.differ(a, a.double())["n_diff"] == -1
    first = {"results": {"c1": {"out0": a}, "c2": {"out0": a}}}
    second = {"results": {"c1": {"out0": b}}}
    result = det.compare(first, second)
    assert result["ok"] is False and result["cases_compared"] == 1 and result["not_compared"] == ["c2"]
    assert det.compare(first, first)["ok"] is True


@pytest.mark.skipif("cpu" not in __import__("fanet_kernels").available_backends("cpu"),
                    reason="the cpu backend is not built")
def test_sanitizer_calls_match_the_reference():
    """gpu_sanitize.call runs each op forward and backward: on the cpu backend its results are the
    reference's (so the calls that the sanitizer watches on a GPU are well-formed)."""
    san = load("gpu_sanitize")
    for op in san.OPS:
        got = san.call(op, "cpu", (2, 8, 5, 7), torch.float32, "channels_last", "cpu", seed=3, misaligned=True)
        want = san.call(op, "reference", (2, 8, 5, 7), torch.float32, "channels_last", "cpu", seed=3, misaligned=True)
        assert got.keys() == want.keys() and any(k.startswith("grad_") for k in got), op
        for key in got:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4,
                                       msg=lambda m, what=f"{op} {key}": f"{what}: {m}")
    assert len(san.cases(san.SHAPES, ["float32", "bfloat16"], san.MISALIGNED_SHAPES)) > 100
