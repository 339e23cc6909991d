"""``apply_fa``: turn a torchvision ResNet / ResNeXt / Wide-ResNet (or a timm ResNet-family
model) into its FA version in place (SPEC §2).

Each ``layerN`` becomes an :class:`~fanet_kernels.modules.FAStage`: its blocks stay children
"0", "1", ... (an FA chain, block 0 ungated), stage 1 is not gated, and stages N >= 2 are gated
with P = the ``downsample`` shortcut of their first block (reused, no new weights).  Each stage
returns a tensor, as the layer it replaces (hooks, IntermediateLayerGetter and timm's
forward_intermediates work); the stage-level attention history rides on that tensor to the next
stage, so the model's own forward (which calls layer1 .. layerN in a row) is unchanged and stays
``torch.compile(fullgraph=True)``-able.

torchvision's ``BasicBlock`` and ``Bottleneck`` become :class:`~fanet_kernels.modules.ResidualBlock`
subclasses of themselves (same modules, keys and results; ``isinstance`` still holds), so the FA
chains fold their add and ReLU into the gate (``fanet::residual_gate_pool``).

Weights: every original state_dict key keeps its name, so ``model.load_state_dict(original,
strict=False)`` loads all pretrained weights and reports as ``missing_keys`` exactly the new
keys (``layerN.fa.*``, ``layerN.stage_fa.*`` and, with ``se=True``, ``...bnK.se.*``), with no
``unexpected_keys``.  Call apply_fa before loading, or load first: either way works.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .modules import FAStage, ResidualBlock, SEBlock, out_channels


class BatchNorm2dSE(nn.BatchNorm2d):
    """A BatchNorm2d followed by an SE block (``.se``): how SE enters a residual branch (after its
    last BN, before the add) without renaming the BN's state_dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(super().forward(x))


def _add_se(block: nn.Module, r: int) -> None:
    # SE goes after the norm that ends the residual branch: bn3 in a bottleneck block, bn2 in a basic one
    name = "bn3" if getattr(block, "bn3", None) is not None else "bn2"
    bn = getattr(block, name, None)
    if bn is None:
        raise TypeError(f"apply_fa(se=True): {type(block).__name__} has no bn3 or bn2 (the BatchNorm2d that ends its "
                        "residual branch, after which SE goes); its children are "
                        f"{', '.join(n for n, _ in block.named_children())}: use se=False")
    if type(bn) is not nn.BatchNorm2d:
        raise TypeError(f"apply_fa(se=True): {type(block).__name__}.{name}, the norm that ends its residual branch, is "
                        f"a {type(bn).__name__}, not an nn.BatchNorm2d (SE goes after that BatchNorm2d): use se=False")
    bn.__class__ = BatchNorm2dSE  # same parameters and buffers, same keys
    bn.se = SEBlock(bn.num_features, r).to(device=bn.weight.device, dtype=bn.weight.dtype)


# torchvision's blocks, up to their last BatchNorm (torchvision/models/resnet.py): the branch is that
# BatchNorm of this (with se=True a BatchNorm2dSE, which the chains do not fold into the gate).
def _basic_pre_norm(self, x: torch.Tensor) -> torch.Tensor:
    return self.conv2(self.relu(self.bn1(self.conv1(x))))


def _bottleneck_pre_norm(self, x: torch.Tensor) -> torch.Tensor:
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    return self.conv3(out)


_BRANCHES = {"BasicBlock": (_basic_pre_norm, "bn2"), "Bottleneck": (_bottleneck_pre_norm, "bn3")}
_RESIDUAL: dict[str, type] = {}  # "Torchvision<Block>" -> the ResidualBlock subclass of torchvision's <Block>


def _residual_class(block_name: str) -> type:
    """``Torchvision<block_name>``: torchvision's block as a ResidualBlock (branch + its
    ``downsample`` as the shortcut).  Made on first use, so importing fanet_kernels does not
    import torchvision; found by name through the module ``__getattr__`` (pickle)."""
    name = "Torchvision" + block_name
    if name not in _RESIDUAL:
        from torchvision.models import resnet as tv

        _RESIDUAL[name] = type(name, (ResidualBlock, getattr(tv, block_name)), {
            "__module__": __name__, "__doc__": f"torchvision's {block_name} as a ResidualBlock.",
            "pre_norm": _BRANCHES[block_name][0], "branch_norm": lambda self: getattr(self, _BRANCHES[block_name][1]),
            "branch": lambda self, x: self.branch_norm()(self.pre_norm(x)), "forward": ResidualBlock.forward,
            "shortcut": property(lambda self: self.downsample)})
    return _RESIDUAL[name]


def __getattr__(name: str):
    if name.startswith("Torchvision") and name[len("Torchvision"):] in _BRANCHES:
        return _residual_class(name[len("Torchvision"):])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _make_residual(block: nn.Module) -> None:
    cls = type(block)
    if cls.__module__ == "torchvision.models.resnet" and cls.__name__ in _BRANCHES:
        block.__class__ = _residual_class(cls.__name__)  # same parameters and buffers, same keys


def _stage_names(model: nn.Module) -> list[str]:
    names = []
    while hasattr(model, f"layer{len(names) + 1}"):
        names.append(f"layer{len(names) + 1}")
    if any(isinstance(getattr(model, n), FAStage) for n in names):
        raise TypeError(f"apply_fa: {type(model).__name__} already has FA stages")
    if len(names) < 2 or not all(isinstance(getattr(model, n), nn.Sequential) for n in names):
        raise TypeError(f"apply_fa: {type(model).__name__} is not a torchvision/timm ResNet-family model "
                        "(expected nn.Sequential attributes layer1, layer2, ...)")
    return names


def apply_fa(model: nn.Module, se: bool = False, r1: int = 4, r2: int = 4, se_reduction: int = 16,
             backend: Optional[str] = None) -> nn.Module:
    """Make ``model`` (torchvision ``resnet*``, ``resnext*``, ``wide_resnet*``, or timm ``resnet*``
    family) an FA network in place and return it.  ``se=True`` also adds an SE block (reduction
    ``se_reduction``) to every residual block (FA-SE).  New modules get the model's device and dtype."""
    names = _stage_names(model)
    ref = next(model.parameters())
    for s, name in enumerate(names):
        layer = getattr(model, name)
        for block in layer:
            if se:
                _add_se(block, se_reduction)
            _make_residual(block)
        stage = FAStage(layer, index=s, channels=[out_channels(b) for b in list(layer)[:-1]],
                        stage_channels=out_channels(layer[-1]), proj="auto" if s else None,
                        last=s == len(names) - 1, r1=r1, r2=r2, backend=backend)
        for m in (stage.fa, getattr(stage, "stage_fa", None)):
            if m is not None:
                m.to(device=ref.device, dtype=ref.dtype)
        setattr(model, name, stage)
    return model


def added_parameters(model: nn.Module) -> int:
    """Parameters of the FA gates and of the SE blocks apply_fa added."""
    from .modules import FAGate
    mods = [m for m in model.modules() if isinstance(m, FAGate)]
    mods += [m.se for m in model.modules() if isinstance(m, BatchNorm2dSE)]
    return sum(p.numel() for m in mods for p in m.parameters())
