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
