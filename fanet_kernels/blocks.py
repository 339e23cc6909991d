"""Residual blocks and the ends of their branches that the fused ops run: ResidualBlock, the view
of other libraries' blocks (DownsampleResidualBlock), SEBlock, and what of a branch's end (its last
BatchNorm, the SE block after it) the FA chains and the blocks themselves run as one op (foldable_tail)."""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops

__all__ = ["BatchNorm2dSE", "DownsampleResidualBlock", "ResidualBlock", "SE_WEIGHTS", "SEBlock", "Tail",
           "batch_norm_args", "count_batch", "foldable_tail", "no_hooks"]


class ResidualBlock(nn.Module):
    """A residual block ``relu(branch(x) + shortcut(x))`` (``shortcut`` None: the identity) whose
    add and ReLU an FA chain folds into its gate when the shortcut is the identity: the chain
    calls ``branch`` and ``ops.residual_gate_pool`` instead of ``forward``, which saves a pass over
    memory each way.  Subclasses define ``branch`` and set ``self.shortcut``.  A block with forward
    hooks is run through ``forward`` so that its hooks see its output.

    A branch that ends in a BatchNorm2d, ``branch(x) == branch_norm()(pre_norm(x))``, can say so by
    defining both: the chain then calls ``pre_norm`` and ``ops.bn_residual_gate_pool``, which runs
    that BatchNorm inside the gate as well (a plain affine nn.BatchNorm2d without hooks only).  A
    branch that ends BatchNorm -> SE, ``branch(x) == branch_se()(branch_norm()(pre_norm(x)))``, says so
    with ``branch_se()`` too: the chain then runs ``ops.bn_se_residual_gate_pool``, and ``forward``
    itself (no FA) ``ops.bn_se_residual`` (``fuse_tail = False`` turns that off)."""

    shortcut: Optional[nn.Module]
    fuse_tail: bool = True  # forward runs a BatchNorm -> SE tail, its add and its ReLU as one op

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def branch_norm(self) -> Optional[nn.BatchNorm2d]:
        """The BatchNorm2d that ends the branch (before ``branch_se()``), or None (the default: the
        branch does not say)."""
        return None

    def branch_se(self) -> Optional[nn.Module]:
        """The squeeze-and-excitation module after ``branch_norm()``, or None (the default: none)."""
        return None

    def pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The branch up to, not including, ``branch_norm()``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tail = foldable_tail(self) if self.fuse_tail else None
        if tail is not None and tail.se is not None:
            shortcut = x if self.shortcut is None else self.shortcut(x)
            return _se_tail(shortcut, self.pre_norm(x), batch_norm_args(tail.norm), tail.se, tail.backend)
        return F.relu(self.branch(x) + (x if self.shortcut is None else self.shortcut(x)))


class DownsampleResidualBlock(ResidualBlock):
    """A ResidualBlock view of another library's residual block (torchvision's, timm's): its shortcut is
    its ``downsample``, its branch ends in the BatchNorm named ``norm_name`` and, if ``se_name`` names
    one, the SE module after it.  Subclasses also inherit the library's class and define ``pre_norm``."""

    forward = ResidualBlock.forward
    norm_name: str = ""
    se_name: Optional[str] = None

    @property
    def shortcut(self) -> Optional[nn.Module]:
        return self.downsample

    def branch_norm(self) -> Optional[nn.BatchNorm2d]:
        return getattr(self, self.norm_name)

    def branch_se(self) -> Optional[nn.Module]:
        return getattr(self, self.se_name) if self.se_name else None

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch_norm()(self.pre_norm(x))
        se = self.branch_se()
        return out if se is None else se(out)


class BatchNorm2dSE(nn.BatchNorm2d):
    """A BatchNorm2d followed by an SE block (``.se``): how SE enters a residual branch (after its
    last BN, before the add) without renaming the BN's state_dict keys (``apply_fa(se=True)``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(super().forward(x))


class Tail(NamedTuple):
    """The end of a residual branch that the fused ops can run: its BatchNorm and, if any, the
    weights (w1, b1, w2, b2) of the SE block after it; ``backend`` of that SE block (None: the setting)."""
    norm: nn.BatchNorm2d
    se: Optional[tuple[torch.Tensor, ...]]
    backend: Optional[str] = None


# SE module type -> its (w1 (R, C), b1, w2 (C, R), b2), or None where its forward is not
# sigmoid(w2 relu(w1 mean_hw(x) + b1) + b2) * x; other libraries' SE types register here.
SE_WEIGHTS: dict[type, Callable[[nn.Module], Optional[tuple[torch.Tensor, ...]]]] = {}


def no_hooks(m: nn.Module) -> bool:
    """Whether module m has no forward (pre-)hooks: a fused op may then run in its place."""
    return not (m._forward_hooks or m._forward_pre_hooks)


def foldable_tail(block: ResidualBlock) -> Optional[Tail]:
    """What of ``block``'s branch end the fused ops can run: its BatchNorm (exactly nn.BatchNorm2d, or
    apply_fa's BatchNorm2dSE, affine, no hooks) and its SE block (one of SE_WEIGHTS' types, no hooks),
    or None where the branch must run as it is (a BatchNorm they cannot run, or an SE block they cannot)."""
    bn = block.branch_norm()
    if type(bn) not in (nn.BatchNorm2d, BatchNorm2dSE) or not bn.affine or not no_hooks(bn):
        return None
    se = bn.se if type(bn) is BatchNorm2dSE else block.branch_se()
    if se is None:
        return Tail(bn, None)
    weights = SE_WEIGHTS[type(se)](se) if type(se) in SE_WEIGHTS and no_hooks(se) else None
    return None if weights is None else Tail(bn, weights, getattr(se, "backend", None))


@torch.fx.wrap
def _se_tail(shortcut: torch.Tensor, z: torch.Tensor, bn: tuple, se: tuple[torch.Tensor, ...],
             backend: Optional[str]) -> torch.Tensor:
    """relu(se(bn(z)) + shortcut) as one op (ops.bn_se_residual), counting the BatchNorm's batch; one
    call in a torch.fx graph (the op's checks branch on shapes)."""
    if z.dtype != shortcut.dtype:  # a block's branch under autocast: promote, as the add would
        dt = torch.promote_types(z.dtype, shortcut.dtype)
        z, shortcut = z.to(dt), shortcut.to(dt)
    weight, bias, mean, var, training, factor, eps = count_batch(bn)
    return ops.bn_se_residual(shortcut, z, weight, bias, *se, mean, var, training, factor, eps, backend=backend)


def batch_norm_args(bn: nn.modules.batchnorm._BatchNorm) -> tuple:
    """(weight, bias, running_mean, running_var, training, momentum, eps, counter): what ``bn.forward``
    passes to F.batch_norm, with ``counter`` = the ``num_batches_tracked`` that this call counts
    (None if none), which ``count_batch`` advances when the call runs (torch/nn/modules/batchnorm.py)."""
    counted = bn.training and bn.track_running_stats and bn.num_batches_tracked is not None
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return (bn.weight, bn.bias, bn.running_mean if track else None, bn.running_var if track else None, training,
            bn.momentum, bn.eps, bn.num_batches_tracked if counted else None)


def count_batch(bn: tuple) -> tuple:
    """batch_norm_args' tuple as F.batch_norm's arguments (..., training, factor, eps), counting the
    batch.  Run inside ``_gate``, so that a torch.fx graph keeps the count with the op."""
    weight, bias, mean, var, training, momentum, eps, counter = bn
    factor = 0.0 if momentum is None else momentum
    if counter is not None:
        counter.add_(1)
        factor = 1.0 / float(counter) if momentum is None else momentum
    return weight, bias, mean, var, training, factor, eps


class SEBlock(nn.Module):
    """Squeeze-and-excitation (Hu et al.): GAP -> Linear(C, C // r) -> ReLU -> Linear -> sigmoid ->
    channel scale; both Linear layers with bias.

    Args:
        channels: C of the input.
        r: reduction: the hidden width is max(1, C // r).
        device, dtype: of the parameters.
    """

    def __init__(self, channels: int, r: int = 16, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        for name, v in (("channels", channels), ("r", r)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"SEBlock: argument '{name}' must be an int >= 1, got {v!r}")
        hidden = max(1, channels // r)
        self.fc1 = nn.Linear(channels, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, channels, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * s[:, :, None, None].to(x.dtype)


SE_WEIGHTS[SEBlock] = lambda se: (se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias)
