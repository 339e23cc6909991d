"""Pieces shared by the zoo models."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modules import FAStages, SEBlock


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


class StagedNet(nn.Module):
    """The frame of the CIFAR ResNet and ResNeXt: a 3x3 conv + BN + ReLU stem (stride 2 for Tiny
    ImageNet, paper §IV.B), the stages (with ``fa``: every stage an FA chain plus the stage level,
    paper Fig. 4), global average pooling and a Linear head."""

    def __init__(self, stem_channels: int, stages: list[nn.Sequential], out_channels: int, num_classes: int,
                 fa: bool, tiny_imagenet: bool, r1: int, r2: int, backend: Optional[str]):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem_channels, 3, 2 if tiny_imagenet else 1, 1, bias=False),
                                  nn.BatchNorm2d(stem_channels), nn.ReLU(inplace=True))
        self.layers = FAStages(stages, r1=r1, r2=r2, backend=backend) if fa else nn.Sequential(*stages)
        self.fc = nn.Linear(out_channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
