"""Faults met by `fanet train`: kills at every point of a save, corrupt and incomplete checkpoints,
full disks and file-size limits. Short real runs of a tiny model on a tiny CIFAR folder."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from fanet_kernels.cli import checkpoint as ckpt
from fanet_kernels.cli import main

from test_cli import FAST, _main_error, install_tiny_model
from test_data import make_cifar


@pytest.fixture
def tiny_model(tmp_path, monkeypatch) -> str:
    """test_cli's stand-in model, importable here and in subprocesses."""
    return install_tiny_model(tmp_path, monkeypatch, "rel_tiny_model")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> str:
    return make_cifar(tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py", n_train=8, n_test=8)


def _run(tiny_model, cifar, out, *extra: str) -> list[str]:
    return ["train", "--model", tiny_model, "--dataset", "cifar10", "--data", cifar, "--seed", "5",
            "--out", str(out), *FAST, *extra]


def _state_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_state_equal, a, b))
    return type(a) is type(b) and (a == b or a != a and b != b)  # NaN equals NaN here


def _results(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("epoch_time", "images_per_s")} for r in history]


def assert_folder_agrees(out) -> None:
    """The run folder's files describe one run: best.pt is the epoch log.json calls best,
    checkpoint.pt's history is the start of log.json's (and not before best.pt), log.csv has
    log.json's epochs, and nothing is left from an unfinished write."""
    names = set(os.listdir(out))
    assert not [n for n in names if n.startswith((".tmp-", ".next-")) or n == ".commit.json"], names
    if "log.json" not in names:
        assert not names & {"checkpoint.pt", "best.pt", "log.csv"}, names
        return
    log = json.loads((out / "log.json").read_text())
    epochs = log["epochs"]
    assert len((out / "log.csv").read_text().splitlines()) == 1 + len(epochs)
    if log["best"] is None:
        assert "best.pt" not in names
    else:
        best = ckpt.load(str(out / "best.pt"))
        assert best["epoch"] == log["best"]["epoch"]
        assert best["history"][-1]["test_err"] == log["best"]["test_err"]
    if "checkpoint.pt" in names:
        state = ckpt.load(str(out / "checkpoint.pt"))
        assert state["history"] == epochs[: len(state["history"])]
        assert log["best"] is None or state["epoch"] >= log["best"]["epoch"]


def test_kill_at_any_point_of_a_save_leaves_files_that_agree(tmp_path, cifar, tiny_model, monkeypatch):
    """A kill leaves the folder as it is on disk at that moment: copy it before every rename,
    removal and checkpoint write of a run (and halfway through each checkpoint write), then check
    each copy, as `fanet train` finds it, and resume each one to the end."""
    full = tmp_path / "full"  # the uninterrupted run
    argv = _run(tiny_model, cifar, full, "--epochs", "4", "--save-every", "3", "--no-plot")
    assert main(argv) == 0
    final = ckpt.load(str(full / "checkpoint.pt"))
    assert_folder_agrees(full)

    out, snaps = tmp_path / "run", []

    def snapshot():
        if out.exists():
            snaps.append(tmp_path / f"snap{len(snaps):03d}")
            shutil.copytree(out, snaps[-1], symlinks=True)

    def before(fn):
        def wrapper(*args, **kwargs):
            snapshot()
            return fn(*args, **kwargs)
        return wrapper

    real_save = torch.save

    def half_then_rest(obj, f, *args, **kwargs):  # a kill halfway through writing a checkpoint
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        snapshot()
        f.write(data[len(data) // 2:])

    with monkeypatch.context() as m:
        for name in ("replace", "rename", "remove", "unlink"):
            m.setattr(os, name, before(getattr(os, name)))
        m.setattr(torch, "save", before(half_then_rest))
        assert main(_run(tiny_model, cifar, out, "--epochs", "4", "--save-every", "3", "--no-plot")) == 0
    assert len(snaps) > 10
    assert _state_equal(ckpt.load(str(out / "checkpoint.pt"))["model"], final["model"])

    resumed = set()
    for snap in snaps:
        ckpt.recover(str(snap))  # what `fanet train` does first in a folder
        assert_folder_agrees(snap)
        files = tuple(sorted((p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in snap.iterdir()))
        if (snap / "checkpoint.pt").exists() and files not in resumed:  # and the run continues exactly
            resumed.add(files)
            assert main(_run(tiny_model, cifar, snap, "--epochs", "4", "--save-every", "3", "--no-plot",
                             "--resume")) == 0
            assert_folder_agrees(snap)
            assert _state_equal(ckpt.load(str(snap / "checkpoint.pt"))["model"], final["model"]), snap.name
            assert _results(json.loads((snap / "log.json").read_text())["epochs"]) == _results(final["history"])


def test_real_kill_between_checkpoint_and_best(tmp_path, cifar, tiny_model):
    """os._exit (no cleanup, as a SIGKILL) right after checkpoint.pt is moved into place and before
    best.pt: readers see the committed files, and a resume finishes the update."""
    out = tmp_path / "run"
    argv = _run(tiny_model, cifar, out, "--epochs", "2", "--no-plot")
    script = textwrap.dedent(f"""
        import os, sys
        real = os.replace
        def replace(src, dst, *a, **k):
            if str(dst).endswith("best.pt") and not os.path.basename(str(src)).startswith(".tmp-"):
                os._exit(9)
            return real(src, dst, *a, **k)
        os.replace = replace
        from fanet_kernels.cli import main
        sys.exit(main({argv!r}))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 9, res.stderr[-2000:]
    # killed between the commit point and the last moves of epoch 1: checkpoint.pt is in place,
    # best.pt and the logs are not yet, but every reader sees the committed update
    assert ".commit.json" in os.listdir(out) and not (out / "best.pt").exists()
    assert ckpt.load(str(out / "best.pt"))["epoch"] == ckpt.load(str(out / "checkpoint.pt"))["epoch"] == 1
    assert main(_run(tiny_model, cifar, out, "--epochs", "2", "--no-plot", "--resume")) == 0
    assert_folder_agrees(out)


def _good_run(tmp_path, cifar, tiny_model):
    out = tmp_path / "good"
    assert main(_run(tiny_model, cifar, out, "--epochs", "2", "--stop-after", "1", "--no-plot")) == 0
    return out


def _resume_error(capsys, tmp_path, cifar, tiny_model, state, *needles):
    bad = tmp_path / "bad.pt"
    ckpt.save(str(bad), state)  # a valid checksum: what is wrong is the content
    _main_error(capsys, _run(tiny_model, cifar, tmp_path / "bad-run", "--epochs", "2", "--resume", str(bad)),
                str(bad), *needles)


def test_resume_refuses_incomplete_or_malformed_checkpoints(tmp_path, cifar, tiny_model, capsys):
    good = ckpt.load(str(_good_run(tmp_path, cifar, tiny_model) / "checkpoint.pt"))
    ckpt.check_resumable(good, "good")

    def variant(edit):
        state = {k: v for k, v in good.items() if k != "format"}
        state["rng"] = [dict(r) for r in good["rng"]]
        edit(state)
        return state

    cases = [
        (lambda s: s.pop("epoch"), "'epoch'"),
        (lambda s: s.pop("rng"), "'rng'"),
        (lambda s: s.pop("optimizer"), "'optimizer'"),
        (lambda s: s.update(epoch="1"), "'epoch'"),
        (lambda s: s.update(rng=[]), "'rng'"),
        (lambda s: s.update(history=[]), "'history'"),
        (lambda s: s["rng"][0].pop("numpy"), "'numpy'"),
        (lambda s: s["rng"][0].update(torch=torch.zeros(7, dtype=torch.uint8)), "'torch'"),
        (lambda s: s["rng"][0].update(torch=torch.zeros(5056, dtype=torch.uint8)), "'torch'"),
        (lambda s: s["rng"][0].update(numpy={**s["rng"][0]["numpy"], "keys": torch.zeros(3, dtype=torch.int64)}),
         "'numpy'"),
        (lambda s: s["rng"][0].update(numpy={**s["rng"][0]["numpy"], "pos": 10**6}), "'numpy'"),
        (lambda s: s["rng"][0].update(python={**s["rng"][0]["python"], "state": [1, 2, 3]}), "'python'"),
        (lambda s: s["rng"][0].update(python={**s["rng"][0]["python"], "state": [-1] * 625}), "'python'"),
        (lambda s: s["rng"].__setitem__(0, "seed"), "rank 0"),
    ]
    for edit, needle in cases:
        _resume_error(capsys, tmp_path, cifar, tiny_model, variant(edit), needle, "cannot be resumed")


def test_flipped_byte_is_detected(tmp_path, cifar, tiny_model, capsys):
    path = _good_run(tmp_path, cifar, tiny_model) / "checkpoint.pt"
    raw = path.read_bytes()
    good = ckpt.load(str(path))
    with zipfile.ZipFile(path) as z:  # a byte in the middle of a tensor's data: still a valid archive
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    off = info.header_offset  # the data follow the local header, its name and its (padding) extra field
    name_len, extra_len = struct.unpack("<HH", raw[off + 26:off + 30])
    start = off + 30 + name_len + extra_len
    bad = tmp_path / "flipped.pt"
    flipped = bytearray(raw)
    flipped[start + info.file_size // 2] ^= 0x10
    bad.write_bytes(bytes(flipped))
    _main_error(capsys, ["eval", str(bad)], str(bad), "checksum")
    _main_error(capsys, _run(tiny_model, cifar, tmp_path / "r", "--epochs", "2", "--resume", str(bad)), "checksum")
    # A flip anywhere is refused with one line or changes nothing that is loaded.
    for pos in range(0, len(raw), max(1, len(raw) // 150)):
        flipped = bytearray(raw)
        flipped[pos] ^= 0x01
        bad.write_bytes(bytes(flipped))
        try:
            state = ckpt.load(str(bad))
        except ckpt.CliError as exc:
            assert "\n" not in str(exc) and str(bad) in str(exc)
        else:
            assert _state_equal(state, good), pos


@pytest.mark.parametrize("fault", ["torch.save RuntimeError", "disk full", "rename fails"])
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, cifar, tiny_model, capsys, monkeypatch, fault):
    out = _good_run(tmp_path, cifar, tiny_model)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}

    def save(obj, f, *args, **kwargs):  # what a file-size limit or a full disk looks like from torch.save
        f.write(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1216 vs 1152\n"
                           "PytorchStreamWriter failed writing file data/0: file write failed")

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst).startswith(".next-checkpoint"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(src, dst)

    with monkeypatch.context() as m:
        if fault == "torch.save RuntimeError":
            m.setattr(torch, "save", save)
        elif fault == "disk full":
            m.setattr(os, "fsync", fsync)
        else:
            m.setattr(os, "replace", replace)
        _main_error(capsys, _run(tiny_model, cifar, out, "--epochs", "2", "--resume"), "checkpoint.pt", "kept")
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before  # intact, and no litter


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="RLIMIT_FSIZE: Linux")
def test_file_size_limit_during_save(tmp_path, cifar, tiny_model):
    """A real file-size limit (ulimit -f) below the checkpoint's size, above the logs'."""
    import resource

    out = _good_run(tmp_path, cifar, tiny_model)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    limit = max(len(before["log.json"]), len(before["log.csv"])) + 4096
    assert limit < len(before["checkpoint.pt"])

    def limit_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    argv = _run(tiny_model, cifar, out, "--epochs", "2", "--resume")
    res = subprocess.run([sys.executable, "-m", "fanet_kernels", *argv], capture_output=True, text=True,
                         timeout=300, preexec_fn=limit_files)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoint.pt" in lines[0] and "kept" in lines[0], res.stderr
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
