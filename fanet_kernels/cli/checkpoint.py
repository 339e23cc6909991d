"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint from elsewhere must not be able to run code, so everything in it is a tensor or a
plain Python value (RNG states included: numpy's and Python's are converted to tensors/lists).
"""
from __future__ import annotations

import os
import random
import tempfile
import zipfile
from typing import Any

import numpy as np
import torch

from .errors import CliError

FORMAT = "fanet-checkpoint-1"


def save(path: str, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, flushed to disk,
    then renamed over ``path`` (so a crash leaves the old checkpoint or the new one, never half)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save`; any problem is a one-line :class:`CliError`."""
    if not os.path.isfile(path):
        raise CliError(f"checkpoint {path}: no such file")
    if not zipfile.is_zipfile(path):
        raise CliError(f"checkpoint {path} is corrupt or not a torch checkpoint (not a torch.save zip archive)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc).strip()
        if "Weights only load failed" in text:
            reason = "it holds objects other than tensors and plain values; refused, loading them could run code"
        else:
            reason = (text.splitlines()[0] if text else type(exc).__name__)[:200]
        raise CliError(f"checkpoint {path} is corrupt or not a fanet checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise CliError(f"checkpoint {path} is not a fanet checkpoint (written by `fanet train`)")
    return state


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from, as tensors and plain values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model
