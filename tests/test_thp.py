"""`fanet train` (and compare, eval) run with THP_MEM_ALLOC_ENABLE=1 by default on Linux for inputs larger
than 32x32 (0 for digits and CIFAR): set before PyTorch's first CPU allocation, verified on a fresh tensor,
off with --no-thp, as the user set it otherwise, and a process that allocated too early is re-executed
once, never twice.

Each check is a `fanet train --epochs 0` process: the setting is applied (and its line printed) before
the flags are checked, so no data or model is touched."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from fanet_kernels.cli import main, thp

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="THP_MEM_ALLOC_ENABLE is Linux-only")

ON = "fanet: THP_MEM_ALLOC_ENABLE=1 (set by fanet; --no-thp turns it off)"
LARGE = ["--dataset", "imagefolder", "--image-size", "224"]  # no data is read: --epochs 0 fails first
# main() run as the program runs it, after {pre}; each start and the huge-page probe's answers are logged,
# and the probe answers {answer} (the real answer: `real`).
PROGRAM = """
import sys
log = sys.argv.pop(1)
open(log, "a").write("start\\n")
{pre}
import fanet_kernels.cli.thp as thp
probe = thp.huge_pages_active
def logged():
    real = probe()
    open(log, "a").write(f"probe {{real}}\\n")
    return {answer}
thp.huge_pages_active = logged
from fanet_kernels.cli import main
sys.exit(main())
"""


def _env(value: Optional[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (thp.ENV, thp.REEXEC_MARK)}
    if value is not None:
        env[thp.ENV] = value
    return env


def _start(args: list[str], value: Optional[str] = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fanet_kernels", "train", "--epochs", "0", *args],
                            env=_env(value), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _program(log: Path, pre: str, answer: str) -> subprocess.Popen:
    code = PROGRAM.format(pre=pre, answer=answer)
    return subprocess.Popen([sys.executable, "-c", code, str(log), "train", "--epochs", "0", *LARGE], env=_env(None),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _thp_lines(proc: subprocess.Popen) -> list[str]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "argument --epochs" in err, (proc.returncode, out, err)
    return [line for line in out.splitlines() if line.startswith("fanet: THP")]


MADVISE = thp.kernel_mode() == "madvise"  # the probe (and so the re-execution) needs this kernel mode


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[subprocess.Popen, Optional[Path]]]:
    """Every process of this file, started at once: each spends most of its time importing torch."""
    logs = tmp_path_factory.mktemp("thp")
    procs: dict[str, tuple[subprocess.Popen, Optional[Path]]] = {
        "default": (_start(LARGE), None),
        "default_small": (_start([]), None),
        "no_thp": (_start(["--no-thp"]), None),
        "user_0": (_start([], "0"), None),
        "user_1": (_start([], "1"), None),
        "flag_over_user": (_start(["--no-thp"], "1"), None),
    }
    if MADVISE:
        # Allocates before main(): the setting cannot take effect, so it re-executes, and then it does.
        procs["late"] = (_program(logs / "late.log", "import torch; torch.ones(1 << 20)", "real"), logs / "late.log")
        # The probe always says off: one re-execution, then the line says so; never a second one.
        procs["stuck"] = (_program(logs / "stuck.log", "", "False"), logs / "stuck.log")
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()


@pytest.mark.skipif(thp.kernel_mode() == "never", reason="the kernel's transparent huge pages are off")
def test_on_by_default_off_with_the_flag_and_as_the_user_set_it(runs) -> None:
    names = ("default", "default_small", "no_thp", "user_0", "user_1", "flag_over_user")
    lines = {name: _thp_lines(runs[name][0]) for name in names}
    assert lines["default"] == [ON + ": CPU tensors of 2 MiB or more are allocated on transparent huge pages"]
    off = "CPU tensors use PyTorch's default allocation (4 KiB pages)"
    assert lines["default_small"] == ["fanet: THP_MEM_ALLOC_ENABLE=0 (set by fanet for inputs of 32x32 or less; "
                                      f"THP_MEM_ALLOC_ENABLE=1 in the environment turns it on): {off}"]
    assert lines["no_thp"] == [f"fanet: THP_MEM_ALLOC_ENABLE=0 (--no-thp): {off}"]
    assert lines["user_0"] == [f"fanet: THP_MEM_ALLOC_ENABLE=0 (from the environment): {off}"]
    assert lines["user_1"] == ["fanet: THP_MEM_ALLOC_ENABLE=1 (from the environment): CPU tensors of 2 MiB or "
                               "more are allocated on transparent huge pages"]
    assert lines["flag_over_user"] == [f"fanet: THP_MEM_ALLOC_ENABLE=0 (--no-thp): {off}"]


@pytest.mark.skipif(not MADVISE, reason="the probe needs the kernel's THP mode 'madvise'")
def test_a_process_that_allocated_first_is_reexecuted_once(runs) -> None:
    (late, late_log), (stuck, stuck_log) = runs["late"], runs["stuck"]
    assert _thp_lines(late) == [ON + ": CPU tensors of 2 MiB or more are allocated on transparent huge pages"]
    assert late_log.read_text().splitlines() == ["start", "probe False", "start", "probe True"]
    assert _thp_lines(stuck) == ["fanet: THP_MEM_ALLOC_ENABLE=1, without effect: PyTorch allocated CPU memory "
                                 "before it was set (set THP_MEM_ALLOC_ENABLE=1 in the environment before "
                                 "Python starts)"]
    assert stuck_log.read_text().splitlines() == ["start", "probe True", "start", "probe True"]


def test_in_process_main_never_reexecutes_and_restores_the_variable(monkeypatch, capsys) -> None:
    monkeypatch.delenv(thp.ENV, raising=False)
    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("main(argv) re-executed the process"))
    monkeypatch.setattr(thp, "huge_pages_active", lambda: False)  # as if this process had allocated first
    monkeypatch.setattr(thp, "kernel_mode", lambda: "madvise")
    assert main(["train", "--epochs", "0", *LARGE]) == 2
    assert "fanet: THP_MEM_ALLOC_ENABLE=1, without effect" in capsys.readouterr().out
    assert thp.ENV not in os.environ


def test_default_by_input_size() -> None:
    assert [thp.default_value(s) for s in (8, 32, 64, 224, None)] == ["0", "0", "1", "1", "1"]


def test_not_linux_leaves_the_environment_alone(monkeypatch, capsys) -> None:
    monkeypatch.delenv(thp.ENV, raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert thp.setup(off=False, may_reexec=True) is None
    assert thp.ENV not in os.environ
