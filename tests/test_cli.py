"""The ``fanet`` command line: short real runs on tiny data folders made here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fanet_kernels.cli import main

from test_data import make_cifar, make_tiny_imagenet

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

# A stand-in model for the runs that only test the command line's plumbing (fast, any input size).
TINY_MODEL = textwrap.dedent("""
    from torch import nn
    def tiny(num_classes=10, tiny_imagenet=False, width=4):
        return nn.Sequential(nn.Conv2d(3, width, 3, stride=2 if tiny_imagenet else 1, padding=1),
                             nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
""")
# One thread: on a busy 2-core machine two OpenMP threads per process can be 10x slower.
FAST = ["--batch-size", "8", "--max-steps", "2", "--max-eval-steps", "1", "--threads", "1", "--quiet"]


def _has_zoo() -> bool:
    try:
        from fanet_kernels import zoo  # noqa: F401
        return "fa_resnet20" in zoo.list_models()
    except ImportError:
        return False


needs_zoo = pytest.mark.skipif(not _has_zoo(), reason="fanet_kernels.zoo is not available")


@pytest.fixture
def tiny_model(tmp_path, monkeypatch):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "cli_tiny_model.py").write_text(TINY_MODEL)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
    return "cli_tiny_model:tiny"


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return make_cifar(tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py", n_train=8, n_test=8)


def _fanet(*args: str, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fanet_kernels", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _load(path):
    return torch.load(path, weights_only=True)


@needs_zoo
def test_train_cifar_folder_zoo_model(tmp_path, cifar, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "fa_resnet20", "--dataset", "cifar10", "--data", cifar,
                 "--epochs", "1", "--out", str(out), *FAST[:-1]]) == 0
    printed = capsys.readouterr().out
    assert "epoch   1/1" in printed and "test" in printed
    state = _load(out / "checkpoint.pt")
    assert state["epoch"] == 1 and state["config"]["model"] == "fa_resnet20"
    assert set(state["rng"][0]) >= {"torch", "numpy", "python"}
    log = json.loads((out / "log.json").read_text())
    assert log["epochs"][0]["epoch"] == 1 and log["epochs"][0]["test_err"] is not None
    assert (out / "log.csv").read_text().startswith("epoch,lr,train_loss")
    assert main(["eval", str(out / "checkpoint.pt"), "--json", str(tmp_path / "e.json")]) == 0
    assert 0 <= json.loads((tmp_path / "e.json").read_text())["err"] <= 100


def test_train_tiny_imagenet_folder(tmp_path, tiny_model):
    data = make_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model, "--dataset", "tiny-imagenet", "--data", data,
                 "--epochs", "1", "--out", str(out), *FAST]) == 0
    cfg = _load(out / "checkpoint.pt")["config"]
    assert (cfg["image_size"], cfg["pad"], cfg["crop"], cfg["tiny_imagenet"], cfg["num_classes"]) == (64, 8, 64, True, 2)


@needs_zoo
def test_train_tiny_imagenet_zoo_model(tmp_path):
    data = make_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    assert main(["train", "--model", "fa_resnet20", "--dataset", "tiny-imagenet", "--data", data,
                 "--epochs", "1", "--out", str(tmp_path / "run"), "--batch-size", "4", "--max-steps", "1",
                 "--max-eval-steps", "1", "--threads", "1", "--quiet"]) == 0


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_resume_matches_uninterrupted(tmp_path, cifar, backend):
    import fanet_kernels

    if backend not in fanet_kernels.available_backends("cpu"):
        pytest.skip(f"backend {backend} not available")
    model = "fa_resnet20" if _has_zoo() else None
    if model is None:
        pytest.skip("fanet_kernels.zoo is not available")
    common = ["train", "--model", model, "--dataset", "cifar10", "--data", cifar, "--epochs", "3",
              "--lr-step", "2", "--seed", "3", "--deterministic", "--backend", backend, *FAST]
    assert main([*common, "--out", str(tmp_path / "full")]) == 0
    assert main([*common, "--out", str(tmp_path / "part"), "--stop-after", "1"]) == 0
    assert _load(tmp_path / "part" / "checkpoint.pt")["epoch"] == 1
    assert main([*common, "--out", str(tmp_path / "part"), "--resume"]) == 0
    full, part = _load(tmp_path / "full" / "checkpoint.pt"), _load(tmp_path / "part" / "checkpoint.pt")
    assert part["epoch"] == 3 and part["scheduler"] == full["scheduler"]
    for k, v in full["model"].items():
        assert torch.equal(v, part["model"][k]), k
    for a, b in zip(full["optimizer"]["state"].values(), part["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert [r["train_loss"] for r in full["history"]] == [r["train_loss"] for r in part["history"]]
    lines = (tmp_path / "part" / "log.csv").read_text().splitlines()
    assert len(lines) == 4  # header + 3 epochs, none repeated


def test_checkpoint_is_atomic_and_weights_only(tmp_path):
    from fanet_kernels.cli import checkpoint as ckpt

    path = str(tmp_path / "c.pt")
    ckpt.save(path, {"model": {"w": torch.ones(2)}, "rng": [ckpt.rng_state()]})
    assert os.listdir(tmp_path) == ["c.pt"]  # no temp file left behind
    state = ckpt.load(path)  # torch.load(weights_only=True) inside
    ckpt.set_rng_state(state["rng"][0])
    a = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    ckpt.set_rng_state(state["rng"][0])
    b = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_torchrun_two_processes(tmp_path, cifar, tiny_model):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fanet_kernels", "train", "--model", tiny_model, "--dataset", "cifar10", "--data", cifar,
           "--epochs", "2", "--out", str(out), "--batch-size", "4", "--max-steps", "3", "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    log = json.loads((out / "log.json").read_text())
    hashes = log["rank_state_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]  # both ranks end with identical weights
    state = _load(out / "checkpoint.pt")
    assert state["config"]["world_size"] == 2 and len(state["rng"]) == 2
    assert sorted(os.listdir(out)) == ["best.pt", "checkpoint.pt", "curves.png", "log.csv", "log.json"]


def _assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fanet: error:"), res.stderr
    assert "Traceback" not in res.stderr
    for needle in needles:
        assert needle in lines[0]


def _main_error(capsys, argv, *needles: str) -> None:
    """The same check in-process (fast): main() returns 2 and prints one line on stderr."""
    capsys.readouterr()
    code = main(argv)
    _assert_one_line_error(subprocess.CompletedProcess(argv, code, "", capsys.readouterr().err), *needles)


def test_errors_from_the_real_entry_point_exit_2(tmp_path):
    # Through `python -m fanet_kernels`: exit code and stderr as a shell sees them.
    _assert_one_line_error(_fanet("train", "--no-such-flag"), "--no-such-flag")
    missing = str(tmp_path / "no-cifar-here")
    _assert_one_line_error(_fanet("train", "--dataset", "cifar10", "--data", missing), missing, "data_batch_1")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage" * 100)
    _assert_one_line_error(_fanet("eval", str(bad)), str(bad))


def test_bad_flags_exit_2(capsys):
    _main_error(capsys, ["train", "--epochs", "many"], "--epochs")
    _main_error(capsys, ["train", "--epochs", "0"], "--epochs")
    _main_error(capsys, ["train", "--backend", "nope"], "backend")
    _main_error(capsys, ["train", "--model-arg", "oops"], "--model-arg")
    _main_error(capsys, ["frobnicate"])
    _main_error(capsys, [])


def test_missing_data_path_exit_2(tmp_path, capsys):
    missing = str(tmp_path / "no-data-here")
    _main_error(capsys, ["train", "--dataset", "tiny-imagenet", "--data", missing], missing, "wnids.txt")
    _main_error(capsys, ["train", "--dataset", "imagefolder", "--data", missing], missing, "train/")
    _main_error(capsys, ["train", "--dataset", "cifar100"], "--data")
    _main_error(capsys, ["plot", missing], missing)


def test_corrupt_checkpoint_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage" * 100)
    _main_error(capsys, ["train", "--resume", str(bad), "--out", str(tmp_path)], str(bad))
    _main_error(capsys, ["cam", str(tmp_path / "missing.pt")], "missing.pt")
    truncated = tmp_path / "truncated.pt"
    torch.save({"format": "fanet-checkpoint-1", "model": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:-300])
    _main_error(capsys, ["eval", str(truncated)], str(truncated))
    # a pickle that would run code is refused by weights_only loading
    torch.save({"format": "fanet-checkpoint-1", "model": {}, "evil": _Evil()}, tmp_path / "evil.pt")
    _main_error(capsys, ["eval", str(tmp_path / "evil.pt")], "refused")


class _Evil:
    pass


def _open_png(path) -> tuple[int, int]:
    with PIL.open(path) as img:
        img.load()
        assert img.format == "PNG"
        return img.size


def test_plot_and_cam_write_pngs(tmp_path, cifar, tiny_model):
    runs = []
    for seed in ("0", "1"):
        out = tmp_path / f"run{seed}"
        assert main(["train", "--model", tiny_model, "--dataset", "cifar10", "--data", cifar, "--epochs", "2",
                     "--seed", seed, "--out", str(out), *FAST]) == 0
        runs.append(out)
    _open_png(runs[0] / "curves.png")  # train writes its own curves at the end
    png = tmp_path / "curves.png"
    assert main(["plot", str(runs[0] / "log.json"), str(runs[1] / "log.csv"), "-o", str(png)]) == 0
    assert _open_png(png)[0] > 100
    assert main(["cam", str(runs[0] / "checkpoint.pt"), "--num-images", "3", "--k-images", "8",
                 "--out", str(tmp_path / "cam")]) == 0
    _open_png(tmp_path / "cam" / "gradcam.png")


@needs_zoo
def test_cam_k_per_class_fa_model(tmp_path, cifar):
    out = tmp_path / "run"
    assert main(["train", "--model", "fa_resnet20", "--dataset", "cifar10", "--data", cifar, "--epochs", "1",
                 "--out", str(out), *FAST]) == 0
    assert main(["cam", str(out / "checkpoint.pt"), "--num-images", "2", "--k-images", "8",
                 "--out", str(tmp_path / "cam")]) == 0
    _open_png(tmp_path / "cam" / "gradcam.png")
    _open_png(tmp_path / "cam" / "k_per_class.png")
    rows = (tmp_path / "cam" / "k_per_class.csv").read_text().splitlines()
    assert len(rows) == 11 and rows[0].startswith("class,images,")


def test_compare_prints_side_by_side(tmp_path, cifar, tiny_model, capsys):
    assert main(["compare", "--models", tiny_model, tiny_model + "", "--dataset", "cifar10", "--data", cifar,
                 "--epochs", "1", "--out", str(tmp_path / "cmp"), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "test err %" in printed
    _open_png(tmp_path / "cmp" / "curves.png")


@needs_zoo
def test_profile_lists_and_counts(capsys):
    assert main(["profile", "--list"]) == 0
    assert "fa_resnet20" in capsys.readouterr().out.split()
    assert main(["profile", "resnet20", "fa_resnet20"]) == 0
    printed = capsys.readouterr().out
    assert "297,222" in printed or "297222" in printed


def test_amp_and_channels_last_run(tmp_path, cifar, tiny_model):
    assert main(["train", "--model", tiny_model, "--dataset", "cifar10", "--data", cifar, "--epochs", "1",
                 "--amp", "--channels-last", "--out", str(tmp_path / "amp"), *FAST]) == 0
