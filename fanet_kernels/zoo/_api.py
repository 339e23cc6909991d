"""timm's model API on the zoo models (no timm needed): ``num_classes=0`` (pooled features),
``reset_classifier``, ``get_classifier``, ``forward_features``, ``forward_head``,
``forward_intermediates``, ``prune_intermediate_layers`` and ``feature_info``, with the meaning
timm's models give them (timm/models/resnet.py), so timm's ``features_only=True`` works on them."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn


def make_head(num_features: int, num_classes: int) -> nn.Module:
    """The classifier: Linear, or the identity for ``num_classes=0`` (the model then returns its
    pooled features, as timm's models do)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise ValueError(f"argument 'num_classes' must be an int >= 0, got {num_classes!r}")
    return nn.Linear(num_features, num_classes) if num_classes else nn.Identity()


def take_indices(n: int, indices: Union[int, Sequence[int], None]) -> list[int]:
    """timm's ``indices`` of forward_intermediates: None all, an int the last n, a sequence those
    (negative counting from the end)."""
    if indices is None:
        indices = n
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"argument 'indices': last-n ({indices}) must be in 1 .. {n}")
        return list(range(n - indices, n))
    out = [i + n if i < 0 else i for i in indices]
    if not all(0 <= i < n for i in out):
        raise ValueError(f"argument 'indices' must be in {-n} .. {n - 1}, got {list(indices)}")
    return out


class ZooModel(nn.Module):
    """Subclasses set ``num_classes``, ``num_features``, ``feature_info`` (one dict per feature
    point: num_chs, reduction, module) and ``head_name`` (the classifier's attribute), and define
    ``forward_features``, ``pool_features`` (feature map -> (N, num_features)) and ``feature_maps`` (every
    feature point's output, up to ``stop`` of them)."""

    num_classes: int
    num_features: int
    feature_info: list[dict]
    head_name: str = "fc"

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def feature_maps(self, x: torch.Tensor, stop: Optional[int] = None) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool_features(x)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.head_name)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier for ``num_classes`` (0: none, the model returns pooled features), on the
        old one's device and dtype.  ``global_pool``: only None (the model's own pooling)."""
        if global_pool is not None:
            raise ValueError(f"{type(self).__name__}.reset_classifier: argument 'global_pool' must be None (the "
                             f"model's pooling is fixed), got {global_pool!r}")
        old = next(self.get_classifier().parameters(), None)
        head = make_head(self.num_features, num_classes)
        if old is not None:
            head.to(device=old.device, dtype=old.dtype)
        setattr(self, self.head_name, head)
        self.num_classes = num_classes

    def forward_intermediates(self, x: torch.Tensor, indices: Union[int, Sequence[int], None] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's forward_intermediates: the feature maps of ``feature_info`` entries ``indices``,
        and (unless ``intermediates_only``) the final feature map.  ``norm`` is a no-op: no final norm."""
        if output_fmt != "NCHW":
            raise ValueError(f"argument 'output_fmt' must be 'NCHW', got {output_fmt!r}")
        take = take_indices(len(self.feature_info), indices)
        stop = max(take) + 1 if (stop_early or intermediates_only) else None
        feats = self.feature_maps(x, stop)
        intermediates = [feats[i] for i in take]
        return intermediates if intermediates_only else (feats[-1], intermediates)

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """The absolute indices of ``indices``; ``prune_head`` drops the classifier.  The layers
        after the last index stay (forward_intermediates with intermediates_only does not run them)."""
        take = take_indices(len(self.feature_info), indices)
        if prune_head:
            self.reset_classifier(0)
        return take
