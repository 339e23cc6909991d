"""Building models by name for the command line: a zoo name, or ``package.module:function`` for a
model of the user's own (called as ``function(num_classes=..., **model_args)``)."""
from __future__ import annotations

import ast
import importlib
import inspect
from typing import Any

import torch

from .errors import CliError, FlagError, brief


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
            raise FlagError(f"argument --model-arg: expected KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def check_model(name: str, what: str = "--model") -> None:
    """A zoo name, or an importable ``package.module:function``; raises before any data work."""
    _factory(name, what)


def _factory(name: str, what: str = "--model") -> Any:
    """The user's function for ``package.module:function``, else None (after checking the zoo name)."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError) as exc:  # ValueError: an empty module name
            raise FlagError(f"argument {what}: cannot import {name!r} ({exc})") from None
    names = zoo_names()
    if not names:
        raise FlagError(f"argument {what}: the model zoo (fanet_kernels.zoo) is not available")
    if name not in names:
        raise FlagError(f"argument {what}: unknown model {name!r}; choose from {', '.join(names)} "
                       f"or give package.module:function")
    return None


def build_model(name: str, num_classes: int, tiny_imagenet: bool = False,
                model_args: dict[str, Any] | None = None) -> torch.nn.Module:
    model_args = dict(model_args or {})
    factory = _factory(name)
    if factory is not None:
        if tiny_imagenet:
            model_args.setdefault("tiny_imagenet", True)
        try:  # arguments it does not take are a bad --model/--model-arg; a bug inside it keeps its traceback
            inspect.signature(factory).bind(num_classes=num_classes, **model_args)
        except TypeError as exc:
            raise CliError(f"argument --model: {name} cannot be called with num_classes and the --model-arg "
                           f"values {sorted(model_args)}: {exc}") from None
        except ValueError:  # no signature to check (some builtins): the call itself will tell
            pass
        model = factory(num_classes=num_classes, **model_args)
        if not isinstance(model, torch.nn.Module):
            raise CliError(f"argument --model: {name} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    from fanet_kernels import zoo

    try:
        return zoo.create_model(name, num_classes=num_classes, tiny_imagenet=tiny_imagenet, **model_args)
    except (TypeError, ValueError, RuntimeError) as exc:  # the zoo's and the FA modules' argument checks
        what = "--model-arg" if model_args else "--model"
        raise CliError(f"argument {what}: {brief(exc)}") from None
