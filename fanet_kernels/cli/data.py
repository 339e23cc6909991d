"""Data sets for the command line: CIFAR-10/100, Tiny ImageNet, any ImageFolder tree, and the
built-in ``digits`` set, all read from local files (this never downloads anything).

Every data set yields uint8 images (C, H, W) and int64 labels; augmentation (the paper's pad +
random crop + flip) and per-channel mean subtraction run on whole batches in the training
process (:func:`prepare_batch`), drawing from torch's global RNG, so a run is reproducible from
its seed and its checkpointed RNG state whatever the number of loader workers.
"""
from __future__ import annotations

import codecs
import os
import pickle
import sys
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


def _numpy_globals() -> dict[tuple[str, str], object]:
    """What pickled numpy arrays refer to, under the module names numpy 1 and 2 write."""
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's _reconstruct, wherever it lives
    frombuffer = np.ndarray.__reduce_ex__(np.zeros(1), 5)[0]  # protocol 5's _frombuffer
    scalar = np.float64(0).__reduce__()[0]
    allowed: dict[tuple[str, str], object] = {}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles plain values and numpy arrays only: CIFAR's files are pickles, and a plain
    ``pickle.load`` runs whatever callable a crafted file names (``__reduce__``). numpy's array
    constructors build arrays from bytes and run no code of the file's choosing; ``_codecs.encode``
    is how protocol 0-2 pickles written by Python 3 store bytes."""

    _allowed = _numpy_globals()
    _allowed[("_codecs", "encode")] = codecs.encode

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: not a plain value or numpy array") from None


def _unpickle(path: str, name: str, root: str) -> dict:
    if not os.path.isfile(path):
        raise _missing(root, name, f"missing file {os.path.basename(path)}")
    try:
        with open(path, "rb") as f:
            return _SafeUnpickler(f, encoding="latin1").load()
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}" if isinstance(exc, pickle.UnpicklingError) else type(exc).__name__
        raise _missing(root, name, f"cannot read {os.path.basename(path)} ({detail[:200]})") from None


def _cifar_images(x, fname: str) -> np.ndarray:
    """``data`` as uint8 (N, 3072) rows, or a one-line reason why not."""
    try:
        x = np.asarray(x)
    except ValueError:  # numpy refuses ragged nested lists
        raise ValueError(f"{fname}'s 'data' is ragged (rows of different lengths); expected N x 3072") from None
    if x.dtype.kind not in "ui":  # float pixels (0..1 or 0..255), strings, objects: no safe cast
        raise ValueError(f"{fname}'s 'data' is {x.dtype}; expected uint8 pixel values 0..255")
    if x.ndim != 2 or x.shape[1] != 3072:
        raise ValueError(f"{fname} holds data of shape {x.shape}, not N x 3072")
    if x.size and (x.min() < 0 or x.max() > 255):  # int64 would wrap in a cast to uint8
        raise ValueError(f"{fname}'s 'data' has values in {x.min()}..{x.max()}, outside the pixel range 0..255")
    return x.astype(np.uint8, copy=False)


def _cifar_labels(y, fname: str, key: str, n_images: int, n_classes: int) -> np.ndarray:
    """``key`` as int64 class indices, one per image, or a one-line reason why not."""
    try:
        y = np.asarray(y)
    except ValueError:  # numpy refuses ragged nested lists
        raise ValueError(f"{fname}'s '{key}' is ragged (lists of different lengths); expected one class index "
                         f"per image") from None
    if y.ndim != 1:
        raise ValueError(f"{fname}'s '{key}' has shape {y.shape}; expected one class index per image")
    if len(y) != n_images:
        raise ValueError(f"{fname} has {len(y)} '{key}' for {n_images} images")
    if len(y) and y.dtype.kind not in "ui":
        kind = "strings" if y.dtype.kind in "US" else f"{y.dtype} values"
        raise ValueError(f"{fname}'s '{key}' are {kind}; expected integer class indices 0..{n_classes - 1}")
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{fname}'s '{key}' holds {y.min() if y.min() < 0 else y.max()}, outside the class "
                         f"indices 0..{n_classes - 1}")
    return y.astype(np.int64)


def _cifar_split(root: str, name: str, files: Sequence[str], label_key: str, n_classes: int) -> TensorImages:
    data, labels = [], []
    for fname in files:
        d = _unpickle(os.path.join(root, fname), name, root)
        if not isinstance(d, dict) or "data" not in d or label_key not in d:
            raise _missing(root, name, f"{fname} has no 'data'/'{label_key}' entries")
        try:
            x = _cifar_images(d["data"], fname)
            data.append(x)
            labels.append(_cifar_labels(d[label_key], fname, label_key, len(x), n_classes))
        except ValueError as exc:
            raise _missing(root, name, str(exc)) from None
    if not sum(len(x) for x in data):  # an empty split would train on nothing or report 100% error
        raise _missing(root, name, f"{', '.join(files)} hold{'s' if len(files) == 1 else ''} no images")
    images = torch.from_numpy(np.concatenate(data).reshape(-1, 3, 32, 32))
    return TensorImages(images, torch.from_numpy(np.concatenate(labels)))


def load_cifar(root: str, name: str) -> tuple[TensorImages, TensorImages, list[str]]:
    if not os.path.isdir(root):
        raise _missing(root, name, "no such directory")
    if name == "cifar10":
        n = 10
        train = _cifar_split(root, name, [f"data_batch_{i}" for i in range(1, 6)], "labels", n)
        test = _cifar_split(root, name, ["test_batch"], "labels", n)
        meta_file, meta_key = "batches.meta", "label_names"
    else:
        n = 100
        train = _cifar_split(root, name, ["train"], "fine_labels", n)
        test = _cifar_split(root, name, ["test"], "fine_labels", n)
        meta_file, meta_key = "meta", "fine_label_names"
    classes = [str(i) for i in range(n)]
    meta_path = os.path.join(root, meta_file)
    if os.path.isfile(meta_path):
        meta = _unpickle(meta_path, name, root)
        names = meta.get(meta_key) if isinstance(meta, dict) else None
        if isinstance(names, (list, tuple)) and len(names) == n:
            classes = [c.decode("latin1") if isinstance(c, bytes) else str(c) for c in names]
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


def _class_images(root: str, folder: str) -> list[str]:
    """The image files under ``folder`` (symlinks followed), sorted; a folder reached twice (a
    symlink loop, or two links to one folder) is an error, not images counted again and again."""
    name = "imagefolder"
    seen: dict[str, str] = {}
    images: list[str] = []

    def walk_error(exc: OSError) -> None:
        raise _missing(root, name, f"cannot read {os.path.relpath(exc.filename or folder, root)} ({exc.strerror})")

    for dirpath, dirnames, files in os.walk(folder, followlinks=True, onerror=walk_error):
        dirnames.sort()
        real = os.path.realpath(dirpath)
        if real in seen:
            raise _missing(root, name, f"{os.path.relpath(dirpath, root)} is {os.path.relpath(seen[real], root)} "
                                       f"again (a symlink loop or a repeated folder)")
        seen[real] = dirpath
        images += [os.path.join(dirpath, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return images


def load_imagefolder(root: str, size: int) -> tuple[FileImages, FileImages, list[str]]:
    name = "imagefolder"
    if not os.path.isdir(root):
        raise _missing(root, name, "no such directory")
    train_dir = os.path.join(root, "train")
    test_dir = next((os.path.join(root, d) for d in ("val", "test") if os.path.isdir(os.path.join(root, d))), None)
    if not os.path.isdir(train_dir) or test_dir is None:
        raise _missing(root, name, "missing train/ or val/ folder")
    split = os.path.basename(test_dir)
    classes = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
    if not classes:
        raise _missing(root, name, "train/ has no class folders")
    # A class only in val/ would be left out of the test error without a word; one with no training
    # images would be a class the model is never shown.
    extra = sorted(d for d in os.listdir(test_dir) if os.path.isdir(os.path.join(test_dir, d)) and d not in classes)
    if extra:
        raise _missing(root, name, f"{split}/ has class folder(s) {', '.join(extra)} that train/ does not have")
    train, test = [], []
    for i, cls in enumerate(classes):
        files = _class_images(root, os.path.join(train_dir, cls))
        if not files:
            raise _missing(root, name, f"train/{cls} holds no images")
        train += [(f, i) for f in files]
        folder = os.path.join(test_dir, cls)
        files = _class_images(root, folder) if os.path.isdir(folder) else []
        if not files:  # the test error is still that of the other classes' images: a warning
            print(f"fanet: warning: imagefolder data at {root}: {split}/{cls} holds no images; "
                  f"class {cls} is not in the test error", file=sys.stderr, flush=True)
        test += [(f, i) for f in files]
    if not test:
        raise _missing(root, name, f"{split}/ holds no images")
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
