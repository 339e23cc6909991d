"""CIFAR ResNet-(6n+2) (He et al. 2016, SPEC §3) with SE, FA and FA-SE variants."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..blocks import ResidualBlock
from ._common import StagedNet, conv_bn, maybe_se

DEPTHS = (20, 32, 44, 56, 110)


def default_se_reduction(depth: int) -> int:
    """The paper's SE reduction: r = 4 for ResNet-20, r = 8 for the deeper ones (SPEC §3)."""
    return 4 if depth == 20 else 8


class BasicBlock(ResidualBlock):
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

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.pre_norm(x))
        return out if self.se is None else self.se(out)

    def branch_norm(self) -> Optional[nn.BatchNorm2d]:
        return self.bn2

    def branch_se(self) -> Optional[nn.Module]:
        return self.se

    def pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.bn1(self.conv1(x))))


class CifarResNet(StagedNet):
    """Stages of n basic blocks with 16/32/64 channels; ``fa=True``: FA on blocks and stages."""

    def __init__(self, depth: int = 20, num_classes: int = 10, se_reduction: Optional[int] = None, fa: bool = False,
                 tiny_imagenet: bool = False, r1: int = 4, r2: int = 4, backend: Optional[str] = None,
                 fuse: bool = True):
        if (depth - 2) % 6:
            raise ValueError(f"argument 'depth' must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        stages, cin = [], 16
        for s, width in enumerate((16, 32, 64)):
            stages.append(nn.Sequential(*[
                BasicBlock(cin if b == 0 else width, width, 2 if (s > 0 and b == 0) else 1, se_reduction)
                for b in range(n)]))
            cin = width
        super().__init__(16, stages, 64, num_classes, fa, tiny_imagenet, r1, r2, backend, fuse)
