"""The benchmark suite still runs and renders: one op group and one training-step row in
quick mode, then benchmarks/run.py --from-json on their results.  Timings are not checked."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import fanet_kernels as fk

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif("cpu" not in fk.available_backends("cpu"), reason="compiled CPU backend not built")


def test_benchmark_suite_runs_and_renders(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    select = "(gate_pool-fwd+bwd-128x32x16x16-float32-nchw and not compiled) or fa_resnet56-cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "--benchmark-only", "--fanet-quick", "-q",
         "-p", "no:cacheprovider", "-k", select, f"--benchmark-json={results}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(results.read_text())
    rows = {b["extra_info"].get("impl") for b in data["benchmarks"]}
    assert {"clone", "reference", "cpu"} <= rows

    # run.py keeps each row's summary statistics but not its per-round samples in results.json
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    assert all("data" in b["stats"] for b in data["benchmarks"])
    kept = run.without_samples(data)["benchmarks"]
    assert all("data" not in b["stats"] and "median" in b["stats"] for b in kept)

    out = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--from-json", str(results),
                           "--output", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "| 128x32x16x16 float32 nchw | cpu |" in text  # the gate_pool target row
    assert "fa_resnet56 [cpu] step / ResNet-56 eager step" in text
