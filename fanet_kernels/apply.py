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
subclasses of themselves (:mod:`fanet_kernels.torchvision_blocks`; same modules, keys and results,
``isinstance`` still holds), so the FA chains fold their add and ReLU into the gate
(``fanet::residual_gate_pool``).

Weights: every original state_dict key keeps its name, so ``model.load_state_dict(original,
strict=False)`` loads all pretrained weights and reports as ``missing_keys`` exactly the new
keys (``layerN.fa.*``, ``layerN.stage_fa.*`` and, with ``se=True``, ``...bnK.se.*``), with no
``unexpected_keys``.  Call apply_fa before loading, or load first: either way works.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from .blocks import BatchNorm2dSE, ResidualBlock, SEBlock, foldable_tail
from .modules import FAGate, FAStage, out_channels


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
    bn.se = SEBlock(bn.num_features, r, device=bn.weight.device, dtype=bn.weight.dtype)


def _make_residual(block: nn.Module) -> bool:
    """torchvision's and timm's BasicBlock and Bottleneck become their ResidualBlock subclasses (same
    parameters and buffers, same keys): the chains then fold their add, ReLU, last BatchNorm and SE
    into the gate, and their own forward runs a BatchNorm -> SE tail as one op.  True if converted."""
    module = type(block).__module__
    if module == "torchvision.models.resnet":
        from .torchvision_blocks import RESIDUAL_CLASSES as TV  # imports torchvision: only for its models
        cls = TV.get(type(block))
    elif module == "timm.models.resnet":
        from . import timm_blocks  # imports timm: only for its models
        cls = timm_blocks.RESIDUAL_CLASSES[type(block)][0] if timm_blocks.converts(block) else None
    else:
        cls = None
    if cls is not None:
        block.__class__ = cls
    return cls is not None


def fuse_tails(model: nn.Module) -> list[str]:
    """Makes the residual blocks of ``model`` run their tail as fused ops, in place, weights kept: each
    torchvision or timm ResNet-family block becomes a ResidualBlock (see _make_residual), so that a
    branch that ends BatchNorm -> SE (timm's SE-ResNet/ResNeXt ``SEModule``, apply_fa's ``se=True``, the
    zoo's SE blocks) runs with its add and ReLU as one op (``ops.bn_se_residual``; in FA chains
    ``ops.bn_se_residual_gate_pool``).  Returns the names of the blocks whose tail is now fused."""
    for m in model.modules():
        _make_residual(m)
    return [name for name, m in model.named_modules()
            if isinstance(m, ResidualBlock) and m.fuse_tail and (tail := foldable_tail(m)) is not None
            and tail.se is not None]


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
                        stage_channels=out_channels(layer[-1]), projection="auto" if s else None,
                        last=s == len(names) - 1, r1=r1, r2=r2, backend=backend, device=ref.device, dtype=ref.dtype)
        setattr(model, name, stage)
    return model


def added_parameters(model: nn.Module) -> int:
    """Parameters of the FA gates and of the SE blocks apply_fa added."""
    mods = [m for m in model.modules() if isinstance(m, FAGate)]
    mods += [m.se for m in model.modules() if isinstance(m, BatchNorm2dSE)]
    return sum(p.numel() for m in mods for p in m.parameters())
