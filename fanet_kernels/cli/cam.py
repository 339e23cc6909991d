"""``fanet cam``: Grad-CAM heat maps (Selvaraju et al.; paper §IV.D, Fig. 7) for a checkpoint and
some images, and the block attention: the mean k of every gated block per class."""
from __future__ import annotations

import argparse
import csv
import os
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from . import checkpoint as ckpt
from . import checks
from .data import DATASETS, load_dataset, prepare_batch
from .errors import CliError, FlagError
from .evaluate import model_from_checkpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint written by `fanet train`")
    p.add_argument("--images", nargs="+", help="image files (default: --num-images from the test split)")
    p.add_argument("--num-images", type=int, default=8, help="test images to show, spread over the classes")
    p.add_argument("--dataset", choices=DATASETS, help="default: the checkpoint's data set")
    p.add_argument("--data", help="data folder (default: the training run's)")
    p.add_argument("--layer", help="module whose activation Grad-CAM weighs (default: the last 4-D feature map)")
    p.add_argument("--target", type=int, help="class to explain (default: the predicted class)")
    p.add_argument("--k-images", type=int, default=2000, help="test images averaged in the k-per-class plot")
    p.add_argument("--out", default="cam", help="output folder for the PNGs and k_per_class.csv")
    p.add_argument("--backend", help="fanet_kernels backend")


def grad_cam(model: torch.nn.Module, x: torch.Tensor, target: Optional[torch.Tensor] = None,
             layer: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(cams (N, H, W) in 0..1 at the input size, logits, layer name).  The heat map is
    relu(sum_c alpha_c A_c) with alpha_c the spatial mean of d score / d A_c."""
    modules = dict(model.named_modules())
    if layer is not None and layer not in modules:
        raise CliError(f"argument --layer: model has no module {layer!r}")
    seen: list[tuple[str, torch.Tensor]] = []

    def hook(name):
        def fn(_m, _inp, out):
            # By default skip 1x1 maps (a global pool's output has nothing to localise).
            if isinstance(out, torch.Tensor) and out.dim() == 4 and (layer is not None or out[0, 0].numel() > 1):
                seen.append((name, out))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items() if n and (layer is None or n == layer)]
    try:
        with torch.enable_grad():
            logits = model(x)
            if not seen:
                raise CliError(f"argument --layer: {layer or 'the model'} produced no 4-D feature map")
            name, act = seen[-1]  # the last feature map to be finished: the deepest one
            target = logits.argmax(1) if target is None else target
            score = logits.gather(1, target.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(score, act)
    finally:
        for h in handles:
            h.remove()
    weights = grad.float().mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * act.detach().float()).sum(1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return cam / peak, logits.detach(), name


def _pick_test_images(test_set, n: int, num_classes: int) -> list[int]:
    """n test indices, round-robin over the classes so several classes show up."""
    labels = test_set.labels.tolist()
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    picked, rank = [], 0
    while len(picked) < min(n, len(labels)):
        for c in range(num_classes):
            if rank < len(by_class.get(c, [])) and len(picked) < n:
                picked.append(by_class[c][rank])
        rank += 1
    return picked


def _load_files(paths: list[str], size: int) -> torch.Tensor:
    from PIL import Image

    out = []
    for path in paths:
        try:
            with Image.open(path) as img:
                out.append(np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8))
        except Exception as exc:
            raise CliError(f"argument --images: cannot read {path} ({type(exc).__name__})") from None
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def save_cam_grid(images: torch.Tensor, cams: torch.Tensor, titles: list[str], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.8 * n + 0.4, 3.9), squeeze=False)
    for i in range(n):
        img = images[i].permute(1, 2, 0).numpy()
        axes[0, i].imshow(img)
        axes[0, i].set_title(titles[i], fontsize=7)
        axes[1, i].imshow(img)
        axes[1, i].imshow(cams[i].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        for ax in axes[:, i]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@torch.no_grad()
def k_per_class(model: torch.nn.Module, loader: DataLoader, mean: list[float], num_classes: int):
    """(block labels, (num_classes, blocks) mean k, counts per class) over ``loader``."""
    from fanet_kernels.modules import collect_k

    sums: Optional[torch.Tensor] = None
    labels_out: list[str] = []
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for images, labels in loader:
        model(prepare_batch(images, mean, train=False))
        ks = collect_k(model)
        if not ks:
            return [], None, counts
        cols = [k.double().reshape(len(labels), -1) for k in ks.values()]
        if sums is None:
            labels_out = [f"{name}[{j + 1}]" for name, c in zip(ks, cols) for j in range(c.shape[1])]
            sums = torch.zeros(num_classes, len(labels_out), dtype=torch.float64)
        sums.index_add_(0, labels, torch.cat(cols, dim=1))
        counts += torch.bincount(labels, minlength=num_classes).double()
    assert sums is not None
    return labels_out, sums / counts.clamp_min(1).unsqueeze(1), counts


def save_k_plot(blocks: list[str], means: torch.Tensor, classes: list[str], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(blocks) + 2), 4.2))
    cmap = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
    for c in range(len(classes)):
        ax.plot(range(len(blocks)), means[c].numpy(), marker="o", ms=3, lw=1,
                color=cmap(c % cmap.N), label=classes[c] if len(classes) <= 20 else None)
    ax.set_xticks(range(len(blocks)))
    ax.set_xticklabels(blocks, rotation=70, fontsize=7)
    ax.set_ylabel("mean k (block attention)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if len(classes) <= 20:
        ax.legend(fontsize=7, ncol=2, title="class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    from .train import select_backend

    checks.at_least(args, 1, "num_images")
    checks.at_least(args, 0, "k_images", "target")
    checks.out_dir(args.out)
    select_backend(args.backend, "cpu")  # cam runs the model on the CPU
    state = ckpt.load(args.checkpoint)
    cfg = state["config"]
    model = model_from_checkpoint(state, args.checkpoint).eval()
    name = args.dataset or cfg.get("dataset", "digits")
    if name == "digits" and args.data is not None:
        raise FlagError("argument --data: the digits data set is built in and reads no --data")
    data_root = args.data if args.data is not None else (cfg.get("data") if name == cfg.get("dataset") else None)
    mean, classes = cfg["mean"], cfg.get("classes") or [str(i) for i in range(cfg["num_classes"])]
    if args.target is not None and args.target >= cfg["num_classes"]:
        raise CliError(f"argument --target: class index must be in 0..{cfg['num_classes'] - 1}")
    os.makedirs(args.out, exist_ok=True)

    test_set = None
    if args.images:
        images, truth = _load_files(args.images, cfg["image_size"]), [None] * len(args.images)
    else:
        _, test_set, _ = load_dataset(name, data_root, cfg.get("image_size"))
        idx = _pick_test_images(test_set, args.num_images, cfg["num_classes"])
        images = torch.stack([test_set[i][0] for i in idx])
        truth = [int(test_set[i][1]) for i in idx]
    target = None if args.target is None else torch.full((len(images),), args.target, dtype=torch.int64)
    cams, logits, layer = grad_cam(model, prepare_batch(images, mean, train=False), target, args.layer)
    pred = logits.argmax(1).tolist()
    titles = [(f"true {classes[t]}\n" if t is not None else "") + f"pred {classes[p]}" for t, p in zip(truth, pred)]
    grid = save_cam_grid(images, cams, titles, os.path.join(args.out, "gradcam.png"))
    print(f"Grad-CAM on {layer!r} for {len(images)} images: {grid}")

    if args.k_images > 0:
        if test_set is None:
            _, test_set, _ = load_dataset(name, data_root, cfg.get("image_size"))
        n = min(args.k_images, len(test_set))
        subset = Subset(test_set, np.linspace(0, len(test_set) - 1, n).astype(int).tolist())
        blocks, means, counts = k_per_class(model, DataLoader(subset, batch_size=256), mean, cfg["num_classes"])
        if not blocks:
            print("no FA chains in this model: no k-per-class plot")
        else:
            path = save_k_plot(blocks, means, classes, os.path.join(args.out, "k_per_class.png"))
            with open(os.path.join(args.out, "k_per_class.csv"), "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["class", "images"] + blocks)
                for c in range(cfg["num_classes"]):
                    w.writerow([classes[c], int(counts[c])] + [f"{v:.5f}" for v in means[c].tolist()])
            print(f"mean k of {len(blocks)} gated blocks per class over {n} test images: {path}")
    return 0
