"""Pieces shared by the zoo models."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..blocks import ResidualBlock, SEBlock
from ..modules import FAStages
from ..modules import out_channels as out_channels_of
from ._api import ZooModel, make_head


def conv_bn(cin: int, cout: int, kernel, stride: int = 1, padding=0, groups: int = 1,
            eps: float = 1e-5) -> nn.Sequential:
    """Conv (no bias: BN follows) + BN."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
                         nn.BatchNorm2d(cout, eps=eps))


def maybe_se(channels: int, r: Optional[int]) -> Optional[nn.Module]:
    return SEBlock(channels, r) if r is not None else None


def init_weights(model: nn.Module) -> None:
    """He init for convs (He et al. 2015), BN to identity, as the CIFAR ResNet papers do."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class StagedNet(ZooModel):
    """The frame of the CIFAR ResNet and ResNeXt: a 3x3 conv + BN + ReLU stem (stride 2 for Tiny
    ImageNet, paper §IV.B), the stages (with ``fa``: every stage an FA chain plus the stage level,
    paper Fig. 4), global average pooling and a Linear head (none for ``num_classes=0``).
    Feature points (``feature_info``): the stem and each stage (stride 2 from the second on).
    ``fuse=False``: every block runs its own eager tail (no BatchNorm, SE, add or ReLU inside a fused
    op), for comparisons."""

    def __init__(self, stem_channels: int, stages: list[nn.Sequential], out_channels: int, num_classes: int,
                 fa: bool, tiny_imagenet: bool, r1: int, r2: int, backend: Optional[str], fuse: bool = True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem_channels, 3, 2 if tiny_imagenet else 1, 1, bias=False),
                                  nn.BatchNorm2d(stem_channels), nn.ReLU(inplace=True))
        for block in (b for st in stages for b in st if isinstance(b, ResidualBlock)):
            block.fuse_tail = fuse
        self.layers = (FAStages(stages, r1=r1, r2=r2, backend=backend, fuse_residual=fuse) if fa
                       else nn.Sequential(*stages))
        self.num_classes, self.num_features = num_classes, out_channels
        self.fc = make_head(out_channels, num_classes)
        init_weights(self)
        r = 2 if tiny_imagenet else 1
        self.feature_info = [dict(num_chs=stem_channels, reduction=r, module="stem")] + [
            dict(num_chs=out_channels_of(st), reduction=r * 2 ** s, module=f"layers.{s}")
            for s, st in enumerate(stages)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x))

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def feature_maps(self, x: torch.Tensor, stop: Optional[int] = None) -> list[torch.Tensor]:
        out = [self.stem(x)]
        for s in range(len(self.layers) if stop is None else min(len(self.layers), stop - 1)):
            out.append(self.layers[s](out[-1]))  # an FA stage reads the stage history off its input
        return out
