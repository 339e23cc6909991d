"""ResNeXt-29 8x16d for CIFAR (Xie et al. 2017; SPEC §3) with SE, FA and FA-SE variants."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..blocks import ResidualBlock
from ._common import StagedNet, conv_bn, maybe_se


class ResNeXtBlock(ResidualBlock):
    """1x1 conv-BN-ReLU, grouped 3x3 conv-BN-ReLU, 1x1 conv-BN, [SE], + shortcut (1x1 conv + BN
    where shapes change), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, cardinality: int, width: int,
                 se_reduction: Optional[int] = None):
        super().__init__()
        self.conv_reduce = nn.Conv2d(cin, width, 1, bias=False)
        self.bn_reduce = nn.BatchNorm2d(width)
        self.conv_conv = nn.Conv2d(width, width, 3, stride, 1, groups=cardinality, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.conv_expand = nn.Conv2d(width, cout, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(cout)
        self.se = maybe_se(cout, se_reduction)
        self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn_expand(self.pre_norm(x))
        return out if self.se is None else self.se(out)

    def branch_norm(self) -> Optional[nn.BatchNorm2d]:
        return self.bn_expand

    def branch_se(self) -> Optional[nn.Module]:
        return self.se

    def pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn_reduce(self.conv_reduce(x)))
        return self.conv_expand(F.relu(self.bn(self.conv_conv(out))))


class CifarResNeXt(StagedNet):
    """ResNeXt-(9n+2): stem 3x3 conv to 64, three stages of n blocks with outputs 256/512/1024 and
    grouped width cardinality * base_width * 2^s."""

    def __init__(self, depth: int = 29, cardinality: int = 8, base_width: int = 16, num_classes: int = 10,
                 se_reduction: Optional[int] = None, fa: bool = False, tiny_imagenet: bool = False,
                 r1: int = 4, r2: int = 4, backend: Optional[str] = None, fuse: bool = True):
        if (depth - 2) % 9:
            raise ValueError(f"argument 'depth' must be 9n+2, got {depth}")
        n = (depth - 2) // 9
        stages, cin = [], 64
        for s, cout in enumerate((256, 512, 1024)):
            width = cardinality * base_width * 2 ** s
            stages.append(nn.Sequential(*[
                ResNeXtBlock(cin if b == 0 else cout, cout, 2 if (s > 0 and b == 0) else 1, cardinality, width,
                             se_reduction) for b in range(n)]))
            cin = cout
        super().__init__(64, stages, 1024, num_classes, fa, tiny_imagenet, r1, r2, backend, fuse)
