"""VGG-19 with BN and one FC classifier (paper §IV.A) with SE, FA and FA-SE variants.

The 5 conv groups (convs + max pool) are the FA blocks.  Focus of block i is on its input X_i
(so its pool comes from the previous gate, no extra pass); the weighting starts from P(X_i), a
1x1 conv (stride 2) + BN, since every group halves the size (SPEC §2).  Focusing on X_i rather
than P(X_i) is what reproduces the paper's FA-VGG-19 count (20.56M; on P(X_i) it would be 20.63M).
Convs keep their bias, as torchvision's vgg19_bn (whose ImageNet weights the paper loads).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..modules import FASequential
from ._api import ZooModel, make_head
from ._common import conv_bn, init_weights, maybe_se

CFG = ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4)


def _group(cin: int, widths, se_reduction: Optional[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        if se_reduction is not None:  # SE after every conv (the paper's SE-VGG-19 count, r = 16)
            layers.append(maybe_se(w, se_reduction))
        cin = w
    layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class VGG19(ZooModel):
    """Feature points (``feature_info``): the output of each conv group (gated, with ``fa``)."""

    head_name = "classifier"

    def __init__(self, num_classes: int = 10, se_reduction: Optional[int] = None, fa: bool = False,
                 tiny_imagenet: bool = False, r1: int = 4, r2: int = 4, backend: Optional[str] = None):
        super().__init__()
        groups, cins, cin = [], [], 3
        for widths in CFG:
            groups.append(_group(cin, widths, se_reduction))
            cins.append(cin)
            cin = widths[-1]
        if fa:
            outs = [w[-1] for w in CFG]
            projections = [None] + [conv_bn(outs[i - 1], outs[i], 1, 2) for i in range(1, 5)]
            self.features = FASequential(groups, channels=outs[:4], r1=r1, r2=r2, backend=backend,
                                         projections=projections)
        else:
            self.features = nn.Sequential(*groups)
        # paper §IV.B: global max pool before the FC for Tiny ImageNet (2x2 left at 64x64)
        self.pool = nn.AdaptiveMaxPool2d(1) if tiny_imagenet else nn.Identity()
        self.num_classes, self.num_features = num_classes, 512
        self.classifier = make_head(512, num_classes)
        init_weights(self)
        self.feature_info = [dict(num_chs=w[-1], reduction=2 ** (i + 1), module=f"features.{i}")
                             for i, w in enumerate(CFG)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(x), 1)

    def feature_maps(self, x: torch.Tensor, stop: Optional[int] = None) -> list[torch.Tensor]:
        if not isinstance(self.features, FASequential):
            out = []
            for group in list(self.features)[:stop]:
                out.append(x := group(x))
            return out
        # the FA chain runs its groups and gates in one loop: group 0's output and each gate's come
        # from forward hooks (on gates and group 0 only: a hook on group i >= 1 changes nothing here)
        out = []
        hooks = [m.register_forward_hook(lambda m, a, o: out.append(o if isinstance(o, torch.Tensor) else o[0]))
                 for m in (self.features[0], *self.features.fa)]
        try:
            self.features(x)
        finally:
            for h in hooks:
                h.remove()
        return out[:stop]
