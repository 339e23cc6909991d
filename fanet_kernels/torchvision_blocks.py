"""torchvision's ResNet blocks as :class:`~fanet_kernels.modules.ResidualBlock` s: ``apply_fa`` gives a
converted model's blocks these classes (same modules, keys and results; ``isinstance`` of torchvision's
class still holds), so that the FA chains run their add and ReLU, and their last BatchNorm, inside
the gate.  Importing this module imports torchvision; ``import fanet_kernels`` does not.
"""
from __future__ import annotations

import torch
from torchvision.models import resnet as tv

from .blocks import DownsampleResidualBlock

__all__ = ["TorchvisionBasicBlock", "TorchvisionBottleneck", "RESIDUAL_CLASSES"]


class TorchvisionBasicBlock(DownsampleResidualBlock, tv.BasicBlock):
    """torchvision's BasicBlock: the branch is conv1-bn1-relu-conv2-bn2, the shortcut ``downsample``
    (with apply_fa(se=True) bn2 is a BatchNorm2dSE: the BatchNorm and the SE block after it)."""

    norm_name = "bn2"

    def pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu(self.bn1(self.conv1(x))))


class TorchvisionBottleneck(DownsampleResidualBlock, tv.Bottleneck):
    """torchvision's Bottleneck: the branch is conv1-bn1-relu-conv2-bn2-relu-conv3-bn3, the shortcut
    ``downsample``."""

    norm_name = "bn3"

    def pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.conv3(out)


# torchvision's block class -> its ResidualBlock subclass
RESIDUAL_CLASSES = {tv.BasicBlock: TorchvisionBasicBlock, tv.Bottleneck: TorchvisionBottleneck}
