"""Building models by name for the command line: a zoo name, or ``package.module:function`` for a
model of the user's own (called as ``function(num_classes=..., **model_args)``)."""
from __future__ import annotations

import ast
import importlib
from typing import Any

import torch

from .errors import CliError


def zoo_names() -> list[str]:
    try:
        from fanet_kernels import zoo
    except ImportError:
        return []
    return list(zoo.list_models())


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``["r1=8", "se=True"]`` -> ``{"r1": 8, "se": True}`` (values as Python literals, else strings)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise CliError(f"argument --model-arg: expected KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def build_model(name: str, num_classes: int, tiny_imagenet: bool = False,
                model_args: dict[str, Any] | None = None) -> torch.nn.Module:
    model_args = dict(model_args or {})
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise CliError(f"argument --model: cannot import {name!r} ({exc})") from None
        if tiny_imagenet:
            model_args.setdefault("tiny_imagenet", True)
        return factory(num_classes=num_classes, **model_args)
    names = zoo_names()
    if not names:
        raise CliError("argument --model: the model zoo (fanet_kernels.zoo) is not available")
    if name not in names:
        raise CliError(f"argument --model: unknown model {name!r}; choose from {', '.join(names)} "
                       f"or give package.module:function")
    from fanet_kernels import zoo

    try:
        return zoo.create_model(name, num_classes=num_classes, tiny_imagenet=tiny_imagenet, **model_args)
    except TypeError as exc:
        raise CliError(f"argument --model-arg: {exc}") from None
