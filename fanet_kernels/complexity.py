"""Parameter and multiply-add counts, beside the paper's Tables I-V (SPEC §3).

What ``count_macs`` counts (one forward, the batch of ``input_size``; real counting with forward
hooks, not a formula):
- nn.Conv2d: out.numel() * in_channels / groups * kh * kw;  nn.Linear: out.numel() * in_features
  (this includes the SE blocks' two Linear layers);
- FAGate: the focus MLP (C * h1 + h1 per sample), the association MLP (i * r2i + r2i per sample,
  i >= 2) and the weighting x + (u - x) k (one multiply-add per element of U);
- SEBlock: its channel scale (one multiply per element).
Not counted: BN, ReLU, pooling (the FA/SE global means included), residual additions, biases.

The paper's "MFLOPs" column is about 7.04 x its parameter count on every row and matches no
real count (ResNet-20 at 32x32 is about 41M multiply-adds); it is shown as "paper's figure".
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn

from .blocks import SEBlock
from .modules import FAGate

__all__ = ["count_params", "count_macs", "paper_figures", "complexity_rows", "table", "complexity_table", "print_table"]


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; shared parameters counted once."""
    seen = {id(p): p for p in model.parameters() if p.requires_grad or not trainable_only}
    return sum(p.numel() for p in seen.values())


def count_macs(model: nn.Module, input_size: Sequence[int] = (1, 3, 32, 32)) -> int:
    """Multiply-adds of one forward of a random input of ``input_size`` ((C, H, W) means
    batch 1), counted as the module docstring says."""
    shape = tuple(input_size)
    if len(shape) == 3:
        shape = (1, *shape)
    total = [0]

    def conv(m: nn.Conv2d, inp, out):
        total[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m: nn.Linear, inp, out):
        total[0] += out.numel() * m.in_features

    def gate(m: FAGate, args, kwargs, out):
        n = out.out.shape[0]
        h1 = m.focus1.out_features
        total[0] += n * (m.channels * h1 + h1) + out.out.numel()
        if m.index >= 2:
            total[0] += n * (m.index * m.assoc1.out_features + m.assoc1.out_features)

    def se(m: SEBlock, inp, out):
        total[0] += out.numel()

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear))
        elif isinstance(m, FAGate):
            handles.append(m.register_forward_hook(gate, with_kwargs=True))
        elif isinstance(m, SEBlock):
            handles.append(m.register_forward_hook(se))
    ref = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.randn(shape, device=ref.device, dtype=ref.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total[0]


# (dataset, model) -> (paper #param in M, paper MFLOPs or None).  Tables I (cifar10), II and V
# (cifar100), III and IV (tiny_imagenet).
_T = {
    "cifar10": {
        "resnet20": (0.293, 2.063), "se_resnet20": (0.301, 2.122), "fa_resnet20": (0.297, 2.093),
        "resnet32": (0.487, 3.431), "se_resnet32": (0.495, 3.482), "fa_resnet32": (0.495, 3.484),
        "resnet44": (0.682, 4.800), "se_resnet44": (0.692, 4.870), "fa_resnet44": (0.693, 4.879),
        "resnet56": (0.876, 6.168), "se_resnet56": (0.889, 6.259), "fa_resnet56": (0.892, 6.278),
        "resnet110": (1.751, 12.33), "se_resnet110": (1.778, 12.51), "fa_resnet110": (1.802, 12.67),
        "vgg19": (20.03, 140.2), "se_vgg19": (20.34, 142.4), "fa_vgg19": (20.56, 143.9),
        "inception_v4": (36.84, 258.1), "se_inception_v4": (40.60, 284.5), "fa_inception_v4": (40.56, 284.2),
        "resnext29_8x16d": (5.647, 39.78), "se_resnext29_8x16d": (6.685, 47.04),
        "fa_resnext29_8x16d": (6.665, 46.91),
    },
    "cifar100": {
        "vgg19": (20.08, 140.6), "se_vgg19": (20.39, 142.7), "fa_vgg19": (20.60, 144.2),
        "fa_se_vgg19": (20.91, None),
        "resnet56": (0.882, 6.209), "se_resnet56": (0.895, 6.300), "fa_resnet56": (0.898, 6.319),
        "se_resnet110": (1.784, None), "fa_se_resnet110": (1.834, None),
        "inception_v4": (36.97, 259.1), "se_inception_v4": (40.74, 285.4), "fa_inception_v4": (40.70, 285.1),
        "resnext29_8x16d": (5.739, 40.43), "se_resnext29_8x16d": (6.777, 47.68),
        "fa_resnext29_8x16d": (6.757, 47.55),
    },
    "tiny_imagenet": {
        "vgg19": (20.13, 140.9), "se_vgg19": (20.28, 142.0), "fa_vgg19": (20.65, 144.6),
        "resnet56": (0.889, 6.254), "se_resnet56": (0.902, 6.345), "fa_resnet56": (0.904, 6.364),
        "fa_se_resnet56": (0.930, None), "se_resnet110": (1.790, None), "fa_se_resnet110": (1.840, None),
        "inception_v4": (37.13, 260.2), "se_inception_v4": (40.90, 286.5), "fa_inception_v4": (40.85, 286.2),
        "fa_se_inception_v4": (44.62, None),
        "resnext29_8x16d": (5.841, 41.14), "se_resnext29_8x16d": (6.880, 48.40),
        "fa_resnext29_8x16d": (6.860, 48.27),
    },
}
DATASETS = {"cifar10": (10, 32), "cifar100": (100, 32), "tiny_imagenet": (200, 64)}


def paper_figures(name: str, dataset: str = "cifar10") -> tuple[Optional[float], Optional[float]]:
    """(#param in millions, MFLOPs) the paper prints for ``name`` on ``dataset``, None where absent."""
    if dataset not in _T:
        raise ValueError(f"argument 'dataset' must be one of {', '.join(_T)}, got {dataset!r}")
    return _T[dataset].get(name, (None, None))


def _dataset_of(num_classes: int, tiny_imagenet: bool) -> Optional[str]:
    if tiny_imagenet:
        return "tiny_imagenet" if num_classes == 200 else None
    return {10: "cifar10", 100: "cifar100"}.get(num_classes)


def complexity_rows(models: Iterable, num_classes: int = 10, tiny_imagenet: bool = False,
                    input_size: Optional[Sequence[int]] = None, dataset: Optional[str] = None) -> list[dict]:
    """One dict per model: params, real MACs (batch 1) and the paper's figures for the matching
    table (CIFAR-10: 10 classes, CIFAR-100: 100, Tiny ImageNet: 200 with ``tiny_imagenet``; or
    ``dataset`` given).  ``models``: zoo names, or (label, nn.Module) pairs for other models."""
    from . import zoo

    if dataset is not None:
        if dataset not in DATASETS:
            raise ValueError(f"argument 'dataset' must be one of {', '.join(DATASETS)}, got {dataset!r}")
        num_classes, size = DATASETS[dataset]
        tiny_imagenet = dataset == "tiny_imagenet"
    else:
        dataset = _dataset_of(num_classes, tiny_imagenet)
        size = 64 if tiny_imagenet else 32
    shape = tuple(input_size) if input_size is not None else (3, size, size)
    rows = []
    for entry in models:
        if isinstance(entry, str):
            name, model = entry, zoo.create_model(entry, num_classes, tiny_imagenet=tiny_imagenet)
        else:
            name, model = entry
        p_params, p_flops = paper_figures(name, dataset) if dataset else (None, None)
        rows.append({"model": name, "params": count_params(model), "macs": count_macs(model, shape),
                     "paper_params_M": p_params, "paper_mflops": p_flops})
    return rows


def table(models: Iterable, num_classes: int = 10, tiny_imagenet: bool = False,
          input_size: Optional[Sequence[int]] = None, dataset: Optional[str] = None) -> str:
    """A Markdown table of complexity_rows (same arguments)."""
    rows = complexity_rows(models, num_classes, tiny_imagenet, input_size, dataset)
    where = dataset or _dataset_of(num_classes, tiny_imagenet) or f"{num_classes} classes (no paper table)"
    lines = [f"Complexity, {where} (real counts, batch 1; the paper columns are its printed figures, "
             "its MFLOPs about 7.04 x #param, not a real count)",
             "",
             "| model | params | paper #param | real MMACs | paper MFLOPs (paper's figure) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        pp = "–" if r["paper_params_M"] is None else f"{r['paper_params_M']}M"
        pf = "–" if r["paper_mflops"] is None else f"{r['paper_mflops']}"
        lines.append(f"| {r['model']} | {r['params']:,} | {pp} | {r['macs'] / 1e6:.2f} | {pf} |")
    return "\n".join(lines)


def complexity_table(models: Iterable, dataset: str = "cifar10") -> str:
    """table() for one of the paper's data sets: cifar10, cifar100, tiny_imagenet."""
    return table(models, dataset=dataset)


def print_table(models: Iterable, num_classes: int = 10, tiny_imagenet: bool = False,
                input_size: Optional[Sequence[int]] = None, dataset: Optional[str] = None) -> None:
    """Print table(...)."""
    print(table(models, num_classes, tiny_imagenet, input_size, dataset))
