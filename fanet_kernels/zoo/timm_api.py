"""The zoo in timm's registry: once ``fanet_kernels`` is imported, ``timm.create_model("fa_resnet56")``
builds the zoo model (through timm's ``build_model_with_cfg``, so ``features_only=True``,
``out_indices``, ``num_classes``, ``pretrained_cfg_overlay`` and ``checkpoint_path`` work as on
timm's own models).  Zoo names timm already has (``vgg19``, ``inception_v4``: ImageNet models of
its own) stay timm's; ``fanet_kernels.zoo.create_model`` builds the zoo's.

timm is not imported by ``import fanet_kernels`` (it takes a second): the names are registered
at once if timm is already imported, else right after timm's own import.
No weights are downloaded: a zoo model's pretrained_cfg names no source, so ``pretrained=True``
needs ``pretrained_cfg_overlay=dict(file="path/to/weights.pth")`` (a state_dict, or a checkpoint
with it under "state_dict" or "model").
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from typing import Any, Callable, Optional

import torch.nn as nn

from . import create_model, list_models

__all__ = ["default_cfgs", "register"]

# CIFAR input, mean subtraction only (std 1), as the CLI trains them; "classifier": the head that
# timm drops when loading weights for another num_classes.
default_cfgs: dict[str, dict[str, Any]] = {}
_registered = False


def _base(name: str) -> str:
    for prefix in ("fa_se_", "se_", "fa_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _cfg(name: str) -> dict[str, Any]:
    base = _base(name)
    first_conv, classifier = {"vgg19": ("features.0.0", "classifier"),
                              "inception_v4": ("stem.0.0", "fc")}.get(base, ("stem.0", "fc"))
    return dict(url="", file=None, num_classes=10, input_size=(3, 32, 32), pool_size=(1, 1), crop_pct=1.0,
                interpolation="bilinear", mean=(0.4914, 0.4822, 0.4465), std=(1.0, 1.0, 1.0),
                first_conv=first_conv, classifier=classifier, license="bsd-3-clause")


def _build(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    from timm.models import build_model_with_cfg, resolve_pretrained_cfg

    cfg = resolve_pretrained_cfg(name, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                 pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"))
    if pretrained and not (cfg.has_weights or cfg.state_dict is not None):
        raise ValueError(f"fanet zoo: {name} has no weights to download: pass the file with "
                         f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file=PATH)) "
                         "or use checkpoint_path=PATH")
    in_chans = kwargs.pop("in_chans", 3)
    if in_chans != 3:
        raise ValueError(f"fanet zoo: argument 'in_chans' of {name!r} must be 3, got {in_chans!r}")
    if kwargs.pop("global_pool", None) is not None:
        raise ValueError(f"fanet zoo: argument 'global_pool' of {name!r} is not supported (the pooling is fixed)")
    n_features = 5 if _base(name) == "vgg19" else 4
    return build_model_with_cfg(lambda **kw: create_model(name, **kw), name, pretrained,
                                feature_cfg=dict(feature_cls="getter", out_indices=tuple(range(n_features))),
                                kwargs_filter=("in_chans", "global_pool"), **kwargs)  # what timm adds from the cfg


def _entrypoint(name: str) -> Callable[..., nn.Module]:
    def fn(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _build(name, pretrained, **kwargs)

    fn.__name__ = fn.__qualname__ = name  # timm registers an entrypoint under its __name__
    fn.__module__ = __name__  # and reads its pretrained cfg from default_cfgs of this module
    fn.__doc__ = f"The fanet_kernels zoo's {name} (fanet_kernels.zoo.create_model({name!r}, ...))."
    return fn


def register() -> list[str]:
    """Register the zoo's models with timm (once); returns the names registered."""
    global _registered
    if not _registered:
        _registered = True
        from timm.models import is_model, register_model

        for name in list_models():
            if not is_model(name):
                default_cfgs[name] = _cfg(name)
                register_model(_entrypoint(name))
    return list(default_cfgs)


class _RegisterAfterTimmImport(importlib.abc.MetaPathFinder):
    """Finds timm's spec with the other finders, and runs :func:`register` right after timm's
    ``__init__`` has run (timm's registry is complete then)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname != "timm":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # one use; and find_spec below must not come back here
        spec = importlib.util.find_spec(fullname)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            register()

        loader.exec_module = exec_then_register  # this spec's own loader object
        return spec


def register_when_imported() -> None:
    """Register now if timm is imported, else after its import; nothing if timm is not installed."""
    if "timm" in sys.modules:
        register()
    elif importlib.util.find_spec("timm") is not None:
        sys.meta_path.insert(0, _RegisterAfterTimmImport())

