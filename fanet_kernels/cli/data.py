"""Data sets for the command line: CIFAR-10/100, Tiny ImageNet, any ImageFolder tree, and the
built-in ``digits`` set, all read from local files (this never downloads anything).

Every data set yields uint8 images (C, H, W) and int64 labels; augmentation (the paper's pad +
random crop + flip) and per-channel mean subtraction run on whole batches in the training
process (:func:`prepare_batch`), drawing from torch's global RNG, so a run is reproducible from
its seed and its checkpointed RNG state whatever the number of loader workers.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import CliError

DATASETS = ("digits", "cifar10", "cifar100", "tiny-imagenet", "imagefolder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")

LAYOUTS = {
    "cifar10": "a CIFAR-10 python folder (cifar-10-batches-py): data_batch_1..5, test_batch, "
               "batches.meta, each a pickle with 'data' (N x 3072 uint8) and 'labels'",
    "cifar100": "a CIFAR-100 python folder (cifar-100-python): train, test, meta, each a pickle "
                "with 'data' (N x 3072 uint8) and 'fine_labels'",
    "tiny-imagenet": "a Tiny ImageNet folder (tiny-imagenet-200): wnids.txt, train/<wnid>/images/*.JPEG, "
                     "val/images/*.JPEG and val/val_annotations.txt",
    "imagefolder": "an ImageFolder tree: train/<class>/<image> and val/<class>/<image> "
                   "(or test/ instead of val/)",
}


@dataclass
class DataInfo:
    """What a model and a checkpoint need to know about a data set."""

    name: str
    num_classes: int
    image_size: int
    classes: list[str]
    mean: list[float] = field(default_factory=list)  # per channel, on the 0..1 scale


class TensorImages(Dataset):
    """Images held in memory as one uint8 (N, C, H, W) tensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


class FileImages(Dataset):
    """Images decoded from files on access (Tiny ImageNet, ImageFolder), resized to ``size``."""

    def __init__(self, samples: list[tuple[str, int]], size: int):
        self.samples, self.size = samples, size
        self.labels = torch.tensor([y for _, y in samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if img.size != (self.size, self.size):
                    img = img.resize((self.size, self.size), Image.BILINEAR)
                array = np.asarray(img, dtype=np.uint8)
        except Exception as exc:
            raise CliError(f"cannot read image {path}: {exc}") from None
        return torch.from_numpy(array.copy()).permute(2, 0, 1), torch.tensor(label, dtype=torch.int64)


def _missing(path: str, name: str, what: str) -> CliError:
    return CliError(f"{name} data at {path}: {what}; expected {LAYOUTS[name]}")


def _unpickle(path: str, name: str, root: str) -> dict:
    if not os.path.isfile(path):
        raise _missing(root, name, f"missing file {os.path.basename(path)}")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as exc:
        raise _missing(root, name, f"cannot read {os.path.basename(path)} ({type(exc).__name__})") from None


def _cifar_split(root: str, name: str, files: Sequence[str], label_key: str) -> TensorImages:
    data, labels = [], []
    for fname in files:
        d = _unpickle(os.path.join(root, fname), name, root)
        if not isinstance(d, dict) or "data" not in d or label_key not in d:
            raise _missing(root, name, f"{fname} has no 'data'/'{label_key}' entries")
        x = np.asarray(d["data"], dtype=np.uint8)
        if x.ndim != 2 or x.shape[1] != 3072 or len(d[label_key]) != len(x):
            raise _missing(root, name, f"{fname} holds data of shape {x.shape}, not N x 3072")
        data.append(x)
        labels.extend(int(v) for v in d[label_key])
    images = torch.from_numpy(np.concatenate(data).reshape(-1, 3, 32, 32))
    return TensorImages(images, torch.tensor(labels, dtype=torch.int64))


def load_cifar(root: str, name: str) -> tuple[TensorImages, TensorImages, list[str]]:
    if not os.path.isdir(root):
        raise _missing(root, name, "no such directory")
    if name == "cifar10":
        train = _cifar_split(root, name, [f"data_batch_{i}" for i in range(1, 6)], "labels")
        test = _cifar_split(root, name, ["test_batch"], "labels")
        meta_file, meta_key, n = "batches.meta", "label_names", 10
    else:
        train = _cifar_split(root, name, ["train"], "fine_labels")
        test = _cifar_split(root, name, ["test"], "fine_labels")
        meta_file, meta_key, n = "meta", "fine_label_names", 100
    classes = [str(i) for i in range(n)]
    meta_path = os.path.join(root, meta_file)
    if os.path.isfile(meta_path):
        meta = _unpickle(meta_path, name, root)
        if isinstance(meta, dict) and len(meta.get(meta_key, [])) == n:
            classes = [str(c) for c in meta[meta_key]]
    for split in (train, test):
        if len(split.labels) and (split.labels.min() < 0 or split.labels.max() >= n):
            raise _missing(root, name, f"labels outside 0..{n - 1}")
    return train, test, classes


def load_tiny_imagenet(root: str, size: int) -> tuple[FileImages, FileImages, list[str]]:
    name = "tiny-imagenet"
    if not os.path.isdir(root):
        raise _missing(root, name, "no such directory")
    wnids_path = os.path.join(root, "wnids.txt")
    if not os.path.isfile(wnids_path):
        raise _missing(root, name, "missing wnids.txt")
    with open(wnids_path) as f:
        wnids = [line.strip() for line in f if line.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    train = []
    for wnid in wnids:
        folder = os.path.join(root, "train", wnid, "images")
        if not os.path.isdir(folder):
            raise _missing(root, name, f"missing folder train/{wnid}/images")
        train += [(os.path.join(folder, f), index[wnid]) for f in sorted(os.listdir(folder))
                  if f.lower().endswith(IMAGE_EXTENSIONS)]
    ann = os.path.join(root, "val", "val_annotations.txt")
    if not os.path.isfile(ann):
        raise _missing(root, name, "missing val/val_annotations.txt")
    val = []
    with open(ann) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split("\t") if "\t" in line else line.split()
            if not parts or not parts[0].strip():
                continue
            if len(parts) < 2 or parts[1].strip() not in index:
                raise _missing(root, name, f"val/val_annotations.txt line {lineno} names no known wnid")
            path = os.path.join(root, "val", "images", parts[0].strip())
            if not os.path.isfile(path):
                raise _missing(root, name, f"missing val/images/{parts[0].strip()}")
            val.append((path, index[parts[1].strip()]))
    if not train or not val:
        raise _missing(root, name, "no images found")
    return FileImages(train, size), FileImages(val, size), wnids


def _folder_samples(folder: str, classes: list[str]) -> list[tuple[str, int]]:
    samples = []
    for i, cls in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(folder, cls), followlinks=True)):
            samples += [(os.path.join(dirpath, f), i) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return samples


def load_imagefolder(root: str, size: int) -> tuple[FileImages, FileImages, list[str]]:
    name = "imagefolder"
    if not os.path.isdir(root):
        raise _missing(root, name, "no such directory")
    train_dir = os.path.join(root, "train")
    test_dir = next((os.path.join(root, d) for d in ("val", "test") if os.path.isdir(os.path.join(root, d))), None)
    if not os.path.isdir(train_dir) or test_dir is None:
        raise _missing(root, name, "missing train/ or val/ folder")
    classes = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
    if not classes:
        raise _missing(root, name, "train/ has no class folders")
    train, test = _folder_samples(train_dir, classes), _folder_samples(test_dir, classes)
    if not train or not test:
        raise _missing(root, name, "no images found")
    return FileImages(train, size), FileImages(test, size), classes


def load_digits_32(test_fraction: float = 0.2, seed: int = 0) -> tuple[TensorImages, TensorImages, list[str]]:
    """scikit-learn's handwritten digits (8x8, 1797 images, bundled with the package), resized
    to 32x32 RGB; the train/test split is fixed (a permutation drawn from ``seed``)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise CliError("the built-in 'digits' data set needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8), 0..1
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    test_idx, train_idx = perm[:n_test].sort().values, perm[n_test:].sort().values
    return (TensorImages(x[train_idx], y[train_idx]), TensorImages(x[test_idx], y[test_idx]),
            [str(i) for i in range(10)])


def default_image_size(name: str) -> int:
    return 64 if name == "tiny-imagenet" else 32


def effective_image_size(name: str, requested: Optional[int] = None) -> int:
    """The size of data set ``name``'s images: digits and CIFAR are 32x32 whatever ``requested``;
    file images are resized to ``requested`` (default :func:`default_image_size`)."""
    if name in ("digits", "cifar10", "cifar100"):
        return 32
    return requested or default_image_size(name)


def default_pad(name: str) -> int:
    """The paper: 4-pixel pad for 32x32 inputs, 8 for Tiny ImageNet's 64x64."""
    return 8 if name == "tiny-imagenet" else 4


def default_flip(name: str) -> bool:
    # Mirrored handwritten digits are not digits any more (a 2 becomes an S-like shape).
    return name != "digits"


def load_dataset(name: str, root: Optional[str], image_size: Optional[int] = None):
    """(train, test, DataInfo) for data set ``name`` found at ``root``."""
    if name not in DATASETS:
        raise CliError(f"argument --dataset: unknown data set {name!r}; choose from {', '.join(DATASETS)}")
    size = effective_image_size(name, image_size)
    if name == "digits":
        train, test, classes = load_digits_32()
    else:
        if not root:
            raise CliError(f"argument --data: data set {name!r} needs --data PATH, {LAYOUTS[name]}")
        root = os.path.expanduser(root)
        if name in ("cifar10", "cifar100"):
            train, test, classes = load_cifar(root, name)
        elif name == "tiny-imagenet":
            train, test, classes = load_tiny_imagenet(root, size)
        else:
            train, test, classes = load_imagefolder(root, size)
    info = DataInfo(name=name, num_classes=len(classes), image_size=size, classes=classes)
    info.mean = channel_mean(train)
    return train, test, info


def channel_mean(ds: Dataset, max_samples: int = 2000) -> list[float]:
    """Per-channel mean of the training images on the 0..1 scale (from an evenly spaced subset of
    at most ``max_samples`` images for file-backed sets, all images for in-memory ones)."""
    if isinstance(ds, TensorImages):
        return (ds.images.double().mean(dim=(0, 2, 3)) / 255).tolist()
    n = len(ds)
    idx = np.linspace(0, n - 1, num=min(n, max_samples)).astype(int)
    total = torch.zeros(3, dtype=torch.float64)
    for i in idx:
        total += ds[int(i)][0].double().mean(dim=(1, 2))
    return (total / len(idx) / 255).tolist()


def prepare_batch(images: torch.Tensor, mean: Sequence[float], *, train: bool, pad: int = 0,
                  crop: Optional[int] = None, flip: bool = False) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 model input: mean-subtracted, and for training zero-padded
    by ``pad``, randomly cropped to ``crop`` and randomly mirrored (paper §IV.A)."""
    x = images.float().div_(255)
    x -= torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    if not train or len(x) == 0:
        return x
    n, _, h, w = x.shape
    crop = crop or h
    if pad > 0 or crop != h:
        x = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        ys = torch.randint(0, h + 2 * pad - crop + 1, (n,)).tolist()
        xs = torch.randint(0, w + 2 * pad - crop + 1, (n,)).tolist()
        x = torch.stack([x[i, :, ys[i]:ys[i] + crop, xs[i]:xs[i] + crop] for i in range(n)])
    if flip:
        mirror = torch.rand(n) < 0.5
        x = torch.where(mirror.view(-1, 1, 1, 1).to(x.device), x.flip(3), x)
    return x
