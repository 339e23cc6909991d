"""Pieces shared by the zoo models."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from ..modules import SEBlock


def conv_bn(cin: int, cout: int, kernel, stride: int = 1, padding=0, groups: int = 1, eps: float = 1e-5) -> nn.Sequential:
    """Conv (no bias: BN follows) + BN."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
                         nn.BatchNorm2d(cout, eps=eps))


def maybe_se(channels: int, r: Optional[int]) -> Optional[nn.Module]:
    return SEBlock(channels, r) if r else None


def init_weights(model: nn.Module) -> None:
    """He init for convs (He et al. 2015), BN to identity, as the CIFAR ResNet papers do."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
