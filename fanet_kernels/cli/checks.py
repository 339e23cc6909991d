"""Checks of the commands' flags, run before any data or model work: a mistake then costs no time
and ends with one line naming the flag (a :class:`FlagError`), never a traceback from deep inside."""
from __future__ import annotations

import argparse
import math
import os
from typing import Any

import torch

from .errors import FlagError


def flag(name: str) -> str:
    """``"batch_size"`` -> ``"--batch-size"``."""
    return "--" + name.replace("_", "-")


def at_least(args: argparse.Namespace, minimum: float, *names: str) -> None:
    """Each flag in ``names`` is unset (None) or >= ``minimum``."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise FlagError(f"argument {flag(name)}: must be >= {minimum}, got {value}")


def positive(args: argparse.Namespace, *names: str) -> None:
    """Each flag in ``names`` is unset (None) or > 0."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise FlagError(f"argument {flag(name)}: must be > 0, got {value}")


def finite(args: argparse.Namespace, *names: str) -> None:
    """argparse's ``type=float`` accepts nan and inf; no optimiser setting can use them."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise FlagError(f"argument {flag(name)}: must be a finite number, got {value}")


def device(arg: str) -> str:
    """``--device`` resolved to ``cpu`` or ``cuda``; ``cuda`` without a GPU is an error here, not
    a driver traceback at the first tensor moved."""
    if arg == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if arg == "cuda" and not (torch.cuda.is_available() and torch.cuda.device_count() > 0):
        raise FlagError("argument --device: cuda requested but no CUDA GPU is usable here "
                       "(torch.cuda.is_available() is False); use --device cpu")
    return arg


def backend(name: Any, device_type: str, what: str = "--backend") -> None:
    """Backend ``name`` (None: not set) exists, is built here and runs on ``device_type`` tensors;
    otherwise the first op call would fail in the middle of the run."""
    if name is None:
        return
    import fanet_kernels
    from fanet_kernels import backends

    try:
        key = backends.check_name(name)
    except ValueError:
        raise FlagError(f"argument {what}: unknown backend {name!r}; choose from {', '.join(backends.NAMES)}") from None
    if key != "auto" and backends.load(key) is None:  # not built here: the backend's own reason
        raise FlagError(f"argument {what}: backend {key!r} is not available: {backends.unavailable_reason(key)}")
    usable = fanet_kernels.available_backends(device_type)
    if key != "auto" and key not in usable:
        raise FlagError(f"argument {what}: backend {key!r} does not run on {device_type} here; "
                       f"choose from auto, {', '.join(usable)}")


def out_dir(path: str, what: str = "--out") -> None:
    """An output folder that can be created (or already is one)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise FlagError(f"argument {what}: {path} exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise FlagError(f"argument {what}: cannot create {path}: {parent} is not a directory")


def out_file(path: str, what: str) -> None:
    """An output file whose folder can be created and that is not a folder itself."""
    if os.path.isdir(path):
        raise FlagError(f"argument {what}: {path} is a directory, expected a file name")
    out_dir(os.path.dirname(os.path.abspath(path)), what)


def figure_path(path: str, what: str) -> str:
    """The file matplotlib will really write for ``path`` (no suffix: rcParams' savefig.format,
    png, appended) after checking that matplotlib can write that format."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    suffix = os.path.splitext(path)[1].lstrip(".").lower()
    if not suffix:
        suffix = matplotlib.rcParams["savefig.format"]
        path = f"{path}.{suffix}"
    formats = FigureCanvasAgg.get_supported_filetypes()
    if suffix not in formats:
        raise FlagError(f"argument {what}: cannot write .{suffix} figures; use one of "
                       f"{', '.join('.' + f for f in sorted(formats))}")
    out_file(path, what)
    return path

