"""timm's ResNet blocks as :class:`~fanet_kernels.modules.ResidualBlock` s, and timm's ``SEModule`` as an
SE block the fused ops run: ``apply_fa`` and ``fuse_tails`` give a timm ResNet-family model's blocks
these classes (same modules, keys and results), so that their add, ReLU, last BatchNorm and SE run in
one op.  Only blocks whose forward is what ResidualBlock assumes convert: a ReLU after the add and
no drop path (``blocks_that_convert`` says which).  Importing this module imports timm.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import activations as timm_act
from timm.layers.squeeze_excite import SEModule
from timm.models import resnet as tr

from .blocks import SE_WEIGHTS, DownsampleResidualBlock

__all__ = ["TimmBasicBlock", "TimmBottleneck", "RESIDUAL_CLASSES", "converts"]

_SIGMOIDS = (nn.Sigmoid, timm_act.Sigmoid)


def _se_module_weights(se: SEModule) -> Optional[tuple[torch.Tensor, ...]]:
    """timm's SEModule as (w1, b1, w2, b2) where its forward is sigmoid(fc2(relu(fc1(mean)))) * x: no
    max pool, no norm, ReLU, a sigmoid gate, both 1x1 convs with bias."""
    if (se.add_maxpool or not isinstance(se.bn, nn.Identity) or type(se.act) is not nn.ReLU
            or not isinstance(se.gate, _SIGMOIDS) or se.fc1.bias is None or se.fc2.bias is None):
        return None
    return se.fc1.weight.flatten(1), se.fc1.bias, se.fc2.weight.flatten(1), se.fc2.bias


SE_WEIGHTS[SEModule] = _se_module_weights


class TimmBasicBlock(DownsampleResidualBlock, tr.BasicBlock):
    """timm's BasicBlock: conv1-bn1-drop_block-act1-aa-conv2-bn2-[se], shortcut ``downsample``."""

    norm_name, se_name = "bn2", "se"

    def pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x))))))


class TimmBottleneck(DownsampleResidualBlock, tr.Bottleneck):
    """timm's Bottleneck: conv1-bn1-act1-conv2-bn2-drop_block-act2-aa-conv3-bn3-[se], shortcut
    ``downsample``."""

    norm_name, se_name = "bn3", "se"

    def pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(out)))))
        return self.conv3(out)


# timm's block class -> its ResidualBlock subclass, and the name of its activation after the add
RESIDUAL_CLASSES = {tr.BasicBlock: (TimmBasicBlock, "act2"), tr.Bottleneck: (TimmBottleneck, "act3")}


def converts(block: nn.Module) -> bool:
    """Whether timm ``block`` computes relu(branch + shortcut), as its ResidualBlock class assumes: a
    ReLU after the add and no drop path."""
    entry = RESIDUAL_CLASSES.get(type(block))
    return entry is not None and type(getattr(block, entry[1], None)) is nn.ReLU and block.drop_path is None
