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
    def tiny(num_classes=10, tiny_imagenet=False, width=4, bn=True):
        return nn.Sequential(nn.Conv2d(3, width, 3, stride=2 if tiny_imagenet else 1, padding=1),
                             nn.BatchNorm2d(width) if bn else nn.Identity(), nn.ReLU(),
                             nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
    def wide(num_classes=10, tiny_imagenet=False):
        return tiny(num_classes, tiny_imagenet, width=8)
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


def install_tiny_model(tmp_path, monkeypatch, module: str) -> str:
    """TINY_MODEL as `module`, importable here and in subprocesses; returns its --model spec.  Each
    test file names its own module: Python caches an imported module by name."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / f"{module}.py").write_text(TINY_MODEL)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
    return f"{module}:tiny"


@pytest.fixture
def tiny_model(tmp_path, monkeypatch):
    return install_tiny_model(tmp_path, monkeypatch, "cli_tiny_model")


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
    assert main(["eval", str(out / "checkpoint.pt"), "--json", str(tmp_path / "new" / "e.json")]) == 0
    assert 0 <= json.loads((tmp_path / "new" / "e.json").read_text())["err"] <= 100


def test_train_tiny_imagenet_folder(tmp_path, tiny_model):
    data = make_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model, "--dataset", "tiny-imagenet", "--data", data,
                 "--epochs", "1", "--out", str(out), *FAST]) == 0
    cfg = _load(out / "checkpoint.pt")["config"]
    got = (cfg["image_size"], cfg["pad"], cfg["crop"], cfg["tiny_imagenet"], cfg["num_classes"])
    assert got == (64, 8, 64, True, 2)


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


def test_best_pt_is_the_logs_best_epoch(tmp_path, cifar, tiny_model, capsys):
    # lr ~0 and no BatchNorm: every epoch ties, so the first is best, and it is no checkpoint epoch
    out = tmp_path / "run"
    argv = ["train", "--model", tiny_model, "--model-arg", "bn=False", "--dataset", "cifar10", "--data", cifar,
            "--epochs", "3", "--save-every", "3", "--lr", "1e-12", "--out", str(out), *FAST]
    assert main(argv) == 0
    log = json.loads((out / "log.json").read_text())
    assert len({r["test_err"] for r in log["epochs"]}) == 1 and log["best"]["epoch"] == 1
    assert _load(out / "best.pt")["epoch"] == 1 and _load(out / "checkpoint.pt")["epoch"] == 3
    # training again into the same folder without --resume: allowed, with a warning naming it
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "warning" in err and str(out) in err


def test_resume_with_other_model_args_names_them(tmp_path, cifar, tiny_model, capsys):
    common = ["train", "--model", tiny_model, "--dataset", "cifar10", "--data", cifar, "--epochs", "2",
              "--out", str(tmp_path / "run"), *FAST]
    assert main([*common, "--stop-after", "1"]) == 0
    _main_error(capsys, [*common, "--resume", "--model-arg", "width=8"], "--model-arg", "width=8")


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


def test_flag_mistakes_exit_2_before_any_work(tmp_path, capsys, monkeypatch):
    # Each is found before a data set is read or a model built (no checkpoint exists at x.pt).
    import fanet_kernels

    monkeypatch.chdir(tmp_path)  # a check that let a mistake through would train into ./runs
    ckpt = str(tmp_path / "x.pt")
    for argv, flag in [
        (["train", "--workers", "-1"], "--workers"), (["eval", ckpt, "--workers", "-1"], "--workers"),
        (["train", "--momentum", "-1"], "--momentum"), (["train", "--weight-decay", "-1"], "--weight-decay"),
        (["train", "--nesterov", "--momentum", "0"], "--nesterov"), (["train", "--lr", "nan"], "--lr"),
        (["train", "--lr-gamma", "inf"], "--lr-gamma"), (["train", "--crop", "50"], "--crop"),
        (["train", "--crop", "37", "--pad", "2"], "--crop"),  # the crop is taken from the padded image
        (["train", "--image-size", "64"], "--image-size"),  # digits are 32x32: it would be ignored
        (["train", "--model", "no.such.module:f"], "--model"),
        (["eval", ckpt, "--batch-size", "0"], "--batch-size"), (["eval", ckpt, "--max-steps", "0"], "--max-steps"),
        (["eval", ckpt, "--max-steps", "-1"], "--max-steps"), (["eval", ckpt, "--json", str(tmp_path)], "--json"),
        (["profile", "--input-size", "-3"], "--input-size"), (["profile", "--input-size", "0"], "--input-size"),
        (["plot", ckpt, "--out", str(tmp_path / "c.xyz")], "--out"),
        (["cam", ckpt, "--out", __file__], "--out"), (["train", "--out", __file__], "--out"),
    ]:
        _main_error(capsys, argv, flag)
    # backends that cannot run on the CPU, as a flag or as a model argument
    # (Triton runs on the CPU under TRITON_INTERPRET=1, which conftest.py sets without a GPU.)
    not_on_cpu = [b for b in ("cuda", "triton") if b not in fanet_kernels.available_backends("cpu")]
    for argv in (["train", "--device", "cpu"], ["eval", ckpt, "--device", "cpu"], ["cam", ckpt]):  # cam: CPU only
        for name in not_on_cpu:
            _main_error(capsys, [*argv, "--backend", name], "--backend", name)
    for name in not_on_cpu:
        _main_error(capsys, ["train", "--device", "cpu", "--model-arg", f"backend={name}"], "--model-arg backend")
    if not torch.cuda.is_available():
        _main_error(capsys, ["train", "--device", "cuda"], "--device")
        _main_error(capsys, ["eval", ckpt, "--device", "cuda"], "--device")


def test_flag_ranges_exit_2(tmp_path, capsys, monkeypatch):
    """Values the optimiser, the RNGs or the augmentation cannot use, and flags that would be
    ignored, each end with one line naming the flag, before any work."""
    from fanet_kernels.cli import build_parser
    from fanet_kernels.cli import checkpoint as ckpt
    from fanet_kernels.cli.train import check_args

    monkeypatch.chdir(tmp_path)
    ckpt.save(str(tmp_path / "c.pt"), {"config": {"dataset": "digits"}, "model": {}})
    for argv, flag in [
        (["train", "--lr-gamma", "0"], "--lr-gamma"), (["train", "--lr-gamma", "-0.1"], "--lr-gamma"),
        (["train", "--milestones", "0", "5"], "--milestones"), (["train", "--milestones", "20", "10"], "--milestones"),
        (["train", "--milestones", "10", "10"], "--milestones"),
        (["train", "--seed", "-1"], "--seed"), (["train", "--seed", str(2**32)], "--seed"),
        (["train", "--seed", str(2**64)], "--seed"),
        (["train", "--pad", "33"], "--pad"), (["train", "--dataset", "tiny-imagenet", "--pad", "65"], "--pad"),
        (["train", "--amp-dtype", "bf16"], "--amp-dtype"),
        (["train", "--data", str(tmp_path)], "--data"),
        (["compare", "--data", str(tmp_path), "--models", "no_such_model"], "--data"),
        (["eval", str(tmp_path / "c.pt"), "--data", str(tmp_path)], "--data"),
    ]:  # (--model no_such_model: had a mistake been let through, no model would train)
        _main_error(capsys, argv + ["--model", "no_such_model"] * (argv[0] == "train"), flag)
    assert not (tmp_path / "runs").exists()
    for ok in (["--seed", "0"], ["--seed", str(2**32 - 1)], ["--pad", "32"], ["--milestones", "1", "2"],
               ["--amp", "--amp-dtype", "bf16"], ["--lr-gamma", "2"]):
        check_args(build_parser().parse_args(["train", *ok]), model=False)


def test_bad_flag_under_torchrun_is_reported_by_rank_0_only(tmp_path, capsys, monkeypatch):
    import fanet_kernels.cli as cli

    monkeypatch.setattr(cli, "FLAG_ERROR_GRACE_S", 0.0, raising=False)
    error_file = tmp_path / "error.json"  # torchrun's per-process error file: its report shows it
    for name, value in dict(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", TORCHELASTIC_ERROR_FILE=str(error_file)).items():
        monkeypatch.setenv(name, value)
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        code = main(["train", "--epochs", "0"])
        err = capsys.readouterr().err
        if rank == "1":  # quiet, and done before rank 0, so torchrun's report lists one failure
            assert (code, err, error_file.exists()) == (0, "", False)
        else:
            assert code == 2 and err.strip().splitlines() == ["fanet: error: argument --epochs: must be >= 1, got 0"]
            assert json.loads(error_file.read_text())["message"]["message"] == err.strip()


def test_torchrun_bad_flag_prints_one_line(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fanet_kernels", "train", "--epochs", "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode != 0
    line = "fanet: error: argument --epochs: must be >= 1, got 0"
    assert res.stderr.splitlines().count(line) == 1, res.stderr
    assert f"traceback : {line}" in res.stderr and "rank      : 0 (local_rank: 0)" in res.stderr


def test_model_construction_errors_exit_2(tmp_path, capsys):
    out = ["--out", str(tmp_path / "run"), "--epochs", "1", *FAST]
    _main_error(capsys, ["train", "--model", "os:getcwd", *out], "--model", "os:getcwd")
    if _has_zoo():
        _main_error(capsys, ["train", "--model", "fa_resnet20", "--model-arg", "r1=0", *out], "--model-arg", "r1")
        _main_error(capsys, ["train", "--model", "fa_resnet20", "--model-arg", "r1=abc", *out], "--model-arg", "r1")


def test_model_factory_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """A TypeError raised inside the user's own factory is a bug in it, not a bad flag: it is not
    turned into a one-line error."""
    (tmp_path / "cli_buggy_model.py").write_text(
        "import torch.nn as nn\n\ndef buggy(num_classes=10):\n    return nn.Conv2d(3, 4, kernel=3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TypeError, match="kernel"):
        main(["train", "--model", "cli_buggy_model:buggy", "--out", str(tmp_path / "run"), "--epochs", "1", *FAST])


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


def test_plot_out_without_suffix_reports_the_png_written(tmp_path, capsys):
    log = tmp_path / "log.json"
    log.write_text(json.dumps({"config": {"model": "m"}, "epochs": [
        {"epoch": 1, "train_loss": 2.0, "train_err": 80.0, "test_loss": 2.1, "test_err": 85.0}]}))
    capsys.readouterr()
    assert main(["plot", str(log), "--out", str(tmp_path / "c4")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'c4.png'}"
    _open_png(tmp_path / "c4.png")


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
    models = [tiny_model, tiny_model.replace(":tiny", ":wide")]
    assert main(["compare", "--models", *models, "--dataset", "cifar10", "--data", cifar,
                 "--epochs", "1", "--out", str(tmp_path / "cmp"), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "test err %" in printed
    _open_png(tmp_path / "cmp" / "curves.png")
    # "time s" is the model's epochs (its log's epoch times), not the start-up before them
    for name in models:
        row = next(line.split() for line in printed.splitlines() if line.startswith(name + " "))
        log = json.loads((tmp_path / "cmp" / name.replace(":", ".") / "log.json").read_text())
        assert float(row[-1]) == pytest.approx(sum(r["epoch_time"] for r in log["epochs"]), abs=0.051)


def test_compare_checks_every_model_first_and_honours_no_plot(tmp_path, cifar, tiny_model, capsys):
    cmp = tmp_path / "cmp"
    common = ["compare", "--dataset", "cifar10", "--data", cifar, "--epochs", "1", "--out", str(cmp), *FAST]
    _main_error(capsys, [*common, "--models", tiny_model, "no_such_model"], "--models", "no_such_model")
    _main_error(capsys, [*common, "--models", tiny_model, tiny_model], "--models", "more than once")
    _main_error(capsys, [*common, "--models", tiny_model, "--model", "resnet20"], "--model")
    _main_error(capsys, [*common, "--models", tiny_model, "--plot", str(tmp_path / "c.xyz")], "--plot", ".xyz")
    assert not cmp.exists()  # nothing trained before the mistake was found
    assert main([*common, "--models", tiny_model, "--no-plot"]) == 0
    assert sorted(p.name for p in cmp.rglob("*.png")) == []
    assert "curves:" not in capsys.readouterr().out


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
