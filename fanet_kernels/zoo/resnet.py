"""CIFAR ResNet-(6n+2) (He et al. 2016, SPEC §3) with SE, FA and FA-SE variants."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modules import FAStages
from ._common import conv_bn, init_weights, maybe_se

DEPTHS = (20, 32, 44, 56, 110)


def default_se_reduction(depth: int) -> int:
    """The paper's SE reduction: r = 4 for ResNet-20, r = 8 for the deeper ones (SPEC §3)."""
    return 4 if depth == 20 else 8


class BasicBlock(nn.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, [SE], + shortcut, ReLU.  The shortcut where shapes change is
    a 3x3 conv (stride 2) + BN, also the stage-level projection P of FA (SPEC §2)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, se_reduction: Optional[int] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.se = maybe_se(cout, se_reduction)
        self.shortcut = conv_bn(cin, cout, 3, stride, 1) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class CifarResNet(nn.Module):
    """``fa=True``: every stage an FA chain plus the stage level (paper Fig. 4)."""

    def __init__(self, depth: int = 20, num_classes: int = 10, se_reduction: Optional[int] = None, fa: bool = False,
                 tiny_imagenet: bool = False, r1: int = 4, r2: int = 4, backend: Optional[str] = None):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"argument 'depth' must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        # paper §IV.B: Tiny ImageNet (64x64) uses a stride-2 first conv
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2 if tiny_imagenet else 1, 1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        stages, cin = [], 16
        for s, width in enumerate((16, 32, 64)):
            blocks = [BasicBlock(cin if b == 0 else width, width, 2 if (s > 0 and b == 0) else 1, se_reduction)
                      for b in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.layers = FAStages(stages, r1=r1, r2=r2, backend=backend) if fa else nn.Sequential(*stages)
        self.fc = nn.Linear(64, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
