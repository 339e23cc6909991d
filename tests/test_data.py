"""Data loading of the command line: tiny folders in each supported layout, built here."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from fanet_kernels.cli.data import (CliError, channel_mean, load_dataset, prepare_batch)

pytest.importorskip("PIL")


def make_cifar(root, name: str = "cifar10", n_train: int = 10, n_test: int = 6, classes: int = 10) -> str:
    """A CIFAR python folder with ``n_train`` images per training file (5 files for CIFAR-10)."""
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    key = "labels" if name == "cifar10" else "fine_labels"

    def dump(fname, n):
        d = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: rng.integers(0, classes, n).tolist()}
        with open(os.path.join(root, fname), "wb") as f:
            pickle.dump(d, f)

    if name == "cifar10":
        for i in range(1, 6):
            dump(f"data_batch_{i}", n_train)
        dump("test_batch", n_test)
        with open(os.path.join(root, "batches.meta"), "wb") as f:
            pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    else:
        dump("train", n_train)
        dump("test", n_test)
        with open(os.path.join(root, "meta"), "wb") as f:
            pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)]}, f)
    return str(root)


def _jpeg(path, size, seed):
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def make_tiny_imagenet(root, wnids=("n01443537", "n01629819"), per_class: int = 4, n_val: int = 4) -> str:
    os.makedirs(os.path.join(root, "val", "images"), exist_ok=True)
    with open(os.path.join(root, "wnids.txt"), "w") as f:
        f.write("\n".join(wnids) + "\n")
    for c, w in enumerate(wnids):
        folder = os.path.join(root, "train", w, "images")
        os.makedirs(folder)
        for i in range(per_class):
            _jpeg(os.path.join(folder, f"{w}_{i}.JPEG"), 64, 10 * c + i)
    with open(os.path.join(root, "val", "val_annotations.txt"), "w") as f:
        for i in range(n_val):
            _jpeg(os.path.join(root, "val", "images", f"val_{i}.JPEG"), 64, 100 + i)
            f.write(f"val_{i}.JPEG\t{wnids[i % len(wnids)]}\t0\t0\t63\t63\n")
    return str(root)


def make_imagefolder(root, classes=("cat", "dog"), per_class: int = 3) -> str:
    for split in ("train", "val"):
        for c in classes:
            os.makedirs(os.path.join(root, split, c))
            for i in range(per_class):
                _jpeg(os.path.join(root, split, c, f"{i}.png"), 40, hash((split, c, i)) % 1000)
    return str(root)


def test_cifar10_folder(tmp_path):
    train, test, info = load_dataset("cifar10", make_cifar(tmp_path / "c10"))
    assert len(train) == 50 and len(test) == 6
    assert info.num_classes == 10 and info.classes[3] == "c3" and info.image_size == 32
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    # CIFAR rows are channel-major: the first 1024 bytes are the red plane
    with open(tmp_path / "c10" / "data_batch_1", "rb") as f:
        raw = pickle.load(f)["data"][0]
    assert torch.equal(x[0].flatten(), torch.from_numpy(raw[:1024]))


def test_cifar100_folder(tmp_path):
    train, test, info = load_dataset("cifar100", make_cifar(tmp_path / "c100", "cifar100", classes=100))
    assert len(train) == 10 and info.num_classes == 100 and info.classes[0] == "f0"


def test_tiny_imagenet_folder(tmp_path):
    train, test, info = load_dataset("tiny-imagenet", make_tiny_imagenet(tmp_path / "tin"))
    assert (len(train), len(test), info.num_classes, info.image_size) == (8, 4, 2, 64)
    assert train[0][0].shape == (3, 64, 64)
    assert test.labels.tolist() == [0, 1, 0, 1]


def test_imagefolder_resized(tmp_path):
    train, test, info = load_dataset("imagefolder", make_imagefolder(tmp_path / "if"), image_size=24)
    assert info.classes == ["cat", "dog"] and len(train) == 6 and len(test) == 6
    assert train[0][0].shape == (3, 24, 24)


def test_digits_fixed_split():
    pytest.importorskip("sklearn")
    train, test, info = load_dataset("digits", None)
    train2, test2, _ = load_dataset("digits", None)
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert torch.equal(test.images, test2.images) and torch.equal(train.labels, train2.labels)
    assert train.images.shape[1:] == (3, 32, 32) and train.images.dtype == torch.uint8
    assert info.num_classes == 10 and 0 < info.mean[0] < 1
    assert torch.bincount(test.labels, minlength=10).min() > 20  # every class in the test split


@pytest.mark.parametrize("name, what", [
    ("cifar10", "no such directory"), ("cifar100", "no such directory"),
    ("tiny-imagenet", "no such directory"), ("imagefolder", "no such directory"),
])
def test_missing_folder_names_path_and_layout(tmp_path, name, what):
    missing = str(tmp_path / "nope")
    with pytest.raises(CliError) as e:
        load_dataset(name, missing)
    msg = str(e.value)
    assert missing in msg and what in msg and "expected" in msg and "\n" not in msg


def test_corrupt_cifar_file(tmp_path):
    root = make_cifar(tmp_path / "c10")
    with open(os.path.join(root, "data_batch_3"), "wb") as f:
        f.write(b"not a pickle at all")
    with pytest.raises(CliError, match="data_batch_3"):
        load_dataset("cifar10", root)
    os.remove(os.path.join(root, "test_batch"))
    with pytest.raises(CliError, match="test_batch|data_batch_3"):
        load_dataset("cifar10", root)


def test_tiny_imagenet_missing_annotations(tmp_path):
    root = make_tiny_imagenet(tmp_path / "tin")
    os.remove(os.path.join(root, "val", "val_annotations.txt"))
    with pytest.raises(CliError, match="val_annotations.txt"):
        load_dataset("tiny-imagenet", root)


def test_dataset_needs_path():
    with pytest.raises(CliError, match="--data"):
        load_dataset("cifar10", None)


def test_prepare_batch_eval_is_mean_subtraction():
    imgs = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    mean = [0.5, 0.25, 0.125]
    x = prepare_batch(imgs, mean, train=False)
    assert x.dtype == torch.float32 and x.shape == (5, 3, 8, 8)
    torch.testing.assert_close(x[:, 1], imgs[:, 1].float() / 255 - 0.25)


def test_prepare_batch_augmentation():
    imgs = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)
    torch.manual_seed(0)
    x = prepare_batch(imgs, [0, 0, 0], train=True, pad=2, crop=8, flip=True)
    torch.manual_seed(0)
    x2 = prepare_batch(imgs, [0, 0, 0], train=True, pad=2, crop=8, flip=True)
    assert torch.equal(x, x2)  # the draws come from torch's global RNG only
    assert x.shape == (64, 3, 8, 8)
    assert (x == 0).any()  # zero padding shows up in some crops
    y = prepare_batch(imgs, [0, 0, 0], train=True, pad=8, crop=16)
    assert y.shape == (64, 3, 16, 16)


def test_channel_mean_of_file_images(tmp_path):
    train, _, _ = load_dataset("imagefolder", make_imagefolder(tmp_path / "if"), image_size=8)
    m = channel_mean(train)
    expect = torch.stack([train[i][0] for i in range(len(train))]).double().mean(dim=(0, 2, 3)) / 255
    assert m == pytest.approx(expect.tolist())


class _RunsCode:
    """A pickle payload that calls a function of its choosing when it is loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_cifar_files_are_read_without_running_code(tmp_path):
    root = make_cifar(tmp_path / "c10")
    marker = tmp_path / "code-ran"
    with open(os.path.join(root, "data_batch_2"), "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], "x": _RunsCode(marker)}, f)
    with pytest.raises(CliError, match=r"data_batch_2 \(UnpicklingError: refused to load io.open") as e:
        load_dataset("cifar10", root)
    assert not marker.exists() and "\n" not in str(e.value)
    make_cifar(root)
    with open(os.path.join(root, "batches.meta"), "wb") as f:  # the meta file is read the same way
        pickle.dump({"label_names": _RunsCode(marker)}, f)
    with pytest.raises(CliError, match="batches.meta"):
        load_dataset("cifar10", root)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_pickles_of_every_protocol_load(tmp_path, protocol):
    """Python 2's CIFAR files (protocol 2), and numpy arrays in the later protocols."""
    root = make_cifar(tmp_path / "c10")
    x = np.arange(4 * 3072).reshape(4, 3072) % 256
    d = {"data": x.astype(np.uint8), "labels": np.array([3, 1, 4, 1]), "batch_label": b"batch 1",
         "filenames": ["a.png"] * 4}
    with open(os.path.join(root, "test_batch"), "wb") as f:
        pickle.dump(d, f, protocol=protocol)
    _, test, _ = load_dataset("cifar10", root)
    assert test.labels.tolist() == [3, 1, 4, 1]
    assert torch.equal(test.images.reshape(4, -1), torch.from_numpy(x.astype(np.uint8)))


def _labels(n):
    return list(np.arange(n) % 10)


@pytest.mark.parametrize("fname, entry, value, needle", [
    ("data_batch_1", "labels", [0, 1, 2], "3 'labels' for 10 images"),
    ("data_batch_1", "labels", [[0, 1]] * 5 + [[0]] * 5, "ragged"),
    ("data_batch_1", "labels", ["cat"] * 10, "strings"),
    ("data_batch_1", "labels", [0.5] * 10, "float64"),
    ("data_batch_1", "labels", [[0]] * 10, "shape (10, 1)"),
    ("data_batch_1", "labels", [10] * 10, "holds 10, outside the class indices 0..9"),
    ("test_batch", "labels", [-1] * 6, "holds -1"),
    ("data_batch_1", "data", np.full((10, 3072), 0.5), "float64"),
    ("data_batch_1", "data", np.full((10, 3072), 300, np.int64), "300..300, outside the pixel range"),
    ("data_batch_1", "data", np.zeros((10, 1024), np.uint8), "shape (10, 1024)"),
    ("test_batch", "data", np.zeros((0, 3072), np.uint8), "6 'labels' for 0 images"),
])
def test_bad_cifar_content_one_line(tmp_path, fname, entry, value, needle):
    root = make_cifar(tmp_path / "c10")
    with open(os.path.join(root, fname), "rb") as f:
        d = pickle.load(f)
    d[entry] = value
    with open(os.path.join(root, fname), "wb") as f:
        pickle.dump(d, f)
    with pytest.raises(CliError) as e:
        load_dataset("cifar10", root)
    msg = str(e.value)
    assert fname in msg and needle in msg and "\n" not in msg, msg


def test_empty_cifar_splits_refused(tmp_path):
    root = make_cifar(tmp_path / "c10", n_test=0)
    with pytest.raises(CliError, match="test_batch holds no images"):
        load_dataset("cifar10", root)
    root = make_cifar(tmp_path / "c10e", n_train=0)
    with pytest.raises(CliError, match="data_batch_1, .*data_batch_5 hold no images"):
        load_dataset("cifar10", root)


def test_cifar_int_pixels_in_range_are_kept(tmp_path):
    root = make_cifar(tmp_path / "c10")
    x = (np.arange(6 * 3072).reshape(6, 3072) % 256).astype(np.int64)
    with open(os.path.join(root, "test_batch"), "wb") as f:
        pickle.dump({"data": x, "labels": [1, 2, 3, 4, 5, 6]}, f)
    _, test, _ = load_dataset("cifar10", root)
    assert torch.equal(test.images.reshape(6, -1).long(), torch.from_numpy(x))


def test_imagefolder_empty_class_refused(tmp_path):
    root = make_imagefolder(tmp_path / "if")
    os.makedirs(os.path.join(root, "train", "emu"))
    with pytest.raises(CliError, match="train/emu holds no images"):
        load_dataset("imagefolder", root)


def test_imagefolder_class_only_in_val_refused(tmp_path):
    root = make_imagefolder(tmp_path / "if")
    os.makedirs(os.path.join(root, "val", "emu"))
    _jpeg(os.path.join(root, "val", "emu", "0.png"), 40, 1)
    with pytest.raises(CliError, match="val/ has class folder.* emu that train/ does not have"):
        load_dataset("imagefolder", root)


def test_imagefolder_empty_val_class_warns(tmp_path, capsys):
    root = make_imagefolder(tmp_path / "if")
    for f in os.listdir(os.path.join(root, "val", "dog")):
        os.remove(os.path.join(root, "val", "dog", f))
    _, test, _ = load_dataset("imagefolder", root)
    assert len(test) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and "val/dog" in err[0]


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="needs symlinks")
def test_imagefolder_symlink_loop_refused(tmp_path):
    root = make_imagefolder(tmp_path / "if")
    os.symlink(os.path.join(root, "train", "cat"), os.path.join(root, "train", "cat", "again"))
    with pytest.raises(CliError, match="train/cat/again is train/cat again") as e:
        load_dataset("imagefolder", root)
    assert "\n" not in str(e.value)
