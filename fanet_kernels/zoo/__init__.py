"""The paper's networks (SPEC §3): ``create_model(name, num_classes=10, **kw)``, ``list_models()``.

Names: resnet{20,32,44,56,110}, vgg19, resnext29_8x16d, inception_v4, each also with the
prefixes se_, fa_ and fa_se_.  Keyword arguments: ``tiny_imagenet`` (paper §IV.B: stride-2 first
conv for ResNet/ResNeXt, global max pool before the FC for VGG), ``se_reduction`` (default: the
paper's, r = 4 for ResNet-20, 8 for deeper ResNets, ResNeXt and Inception, 16 for VGG),
``r1``, ``r2``, ``backend``.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from .inception import InceptionV4
from .resnet import DEPTHS, CifarResNet, default_se_reduction
from .resnext import CifarResNeXt
from .vgg import VGG19

__all__ = ["create_model", "list_models", "CifarResNet", "CifarResNeXt", "VGG19", "InceptionV4"]

_PREFIXES = ("", "se_", "fa_", "fa_se_")


def _bases() -> dict[str, tuple]:
    """base name -> (constructor, its fixed kwargs, default SE reduction)."""
    out: dict[str, tuple] = {f"resnet{d}": (CifarResNet, {"depth": d}, default_se_reduction(d)) for d in DEPTHS}
    out["vgg19"] = (VGG19, {}, 16)
    out["resnext29_8x16d"] = (CifarResNeXt, {"depth": 29, "cardinality": 8, "base_width": 16}, 8)
    out["inception_v4"] = (InceptionV4, {}, 8)
    return out


def list_models() -> list[str]:
    return [p + b for b in _bases() for p in _PREFIXES]


def create_model(name: str, num_classes: int = 10, **kw: Any) -> nn.Module:
    """A zoo model by name (see list_models()), e.g. ``create_model("fa_resnet56", 100)``."""
    key = name.strip().lower() if isinstance(name, str) else name
    prefix = next((p for p in ("fa_se_", "se_", "fa_") if isinstance(key, str) and key.startswith(p)), "")
    base = key[len(prefix):] if isinstance(key, str) else None
    bases = _bases()
    if base not in bases:
        raise ValueError(f"fanet zoo: unknown model {name!r}; known: {', '.join(list_models())}")
    ctor, fixed, se_r = bases[base]
    se_r = kw.pop("se_reduction", se_r)
    if "se_" in prefix and (not isinstance(se_r, int) or isinstance(se_r, bool) or se_r < 1):
        raise ValueError(f"fanet zoo: argument 'se_reduction' of {name!r} must be an int >= 1, got {se_r!r}")
    return ctor(num_classes=num_classes, se_reduction=se_r if "se_" in prefix else None,
                fa=prefix.startswith("fa_"), **fixed, **kw)
