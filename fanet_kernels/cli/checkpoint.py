"""Checkpoints and the run folder's files: written all-or-nothing, checksummed, read with
``torch.load(weights_only=True)`` and verified.

A checkpoint from elsewhere must not be able to run code, so everything in it is a tensor or a
plain Python value (RNG states included: numpy's and Python's are converted to tensors/lists).

A run folder's files (``checkpoint.pt``, ``best.pt``, ``log.json``, ``log.csv``) change together
through :func:`commit`: each new file is first written in full beside its target
(``.next-<name>``, via a ``.tmp-*`` file that is fsynced and renamed), then a manifest
(``.commit.json``) naming the moves is written atomically (the commit point), then the moves are
made and the manifest removed. A kill before the commit point leaves the old set of files, a kill
after it the new set once :func:`recover` has finished the moves (``fanet train`` does that before
it touches the folder; :func:`load` and :func:`open_committed` read through a pending manifest
without writing). So, after a kill at any point, the folder's files agree with each other: best.pt
is the epoch log.json calls best, and checkpoint.pt's history is the start of log.json's.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import shutil
import tempfile
import zipfile
from typing import IO, Any, Callable, Optional, Sequence

import numpy as np
import torch

from .errors import CliError, brief

FORMAT = "fanet-checkpoint-2"
LEGACY_FORMATS = ("fanet-checkpoint-1",)  # no checksum: read unverified
MANIFEST = ".commit.json"
STAGED = ".next-"
TEMP = ".tmp-"
RESUME_KEYS = ("config", "epoch", "model", "optimizer", "scheduler", "history", "rng")


def checksum(state: Any) -> str:
    """sha256 over every tensor's dtype, shape and bytes and every plain value, in order: the
    content a load must give back (a flipped byte anywhere in it changes this)."""
    h = hashlib.sha256()
    _feed(h, state)
    return "sha256:" + h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        h.update(f"D{len(value)}|".encode())
        for k, v in value.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}|".encode())
        for v in value:
            _feed(h, v)
    else:
        h.update(f"{type(value).__name__}:{value!r}|".encode())


# ---------------------------------------------------------------------------------------------
# Writing


def _fsync_dir(folder: str) -> None:
    """Make the folder's renames durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """``write`` into a temp file beside ``path``, fsync it, rename it to ``path``; on any error the
    temp file is removed and ``path`` is untouched."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=TEMP, suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _finish(folder: str, moves: list[list[str]]) -> None:
    for src, dst in moves:
        try:
            os.replace(os.path.join(folder, src), os.path.join(folder, dst))
        except FileNotFoundError:  # moved already, by an earlier attempt
            pass
    _fsync_dir(folder)
    os.remove(os.path.join(folder, MANIFEST))
    _fsync_dir(folder)


def _manifest(folder: str) -> Optional[list[list[str]]]:
    """The moves of a committed but unfinished :func:`commit` in ``folder`` (None: none pending)."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            moves = json.load(f)["moves"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CliError(f"run folder {folder}: unreadable {MANIFEST} ({brief(exc)}); remove it to continue") from None
    if not (isinstance(moves, list) and all(isinstance(m, list) and len(m) == 2 and all(
            isinstance(p, str) and os.path.basename(p) == p for p in m) for m in moves)):
        raise CliError(f"run folder {folder}: malformed {MANIFEST}; remove it to continue")
    return moves


def recover(folder: str) -> None:
    """Bring ``folder`` to a consistent state after a kill: finish a committed update, or drop an
    uncommitted one, and remove temp files left by a killed write."""
    if not os.path.isdir(folder):
        return
    moves = _manifest(folder)
    if moves is not None:
        _finish(folder, moves)
    for path in glob.glob(os.path.join(glob.escape(folder), TEMP + "*")) + \
            glob.glob(os.path.join(glob.escape(folder), STAGED + "*")):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def commit(folder: str, texts: Optional[dict[str, bytes]] = None, state: Optional[dict[str, Any]] = None,
           state_names: Sequence[str] = ()) -> None:
    """Replace ``folder``'s files all together: each of ``state_names`` with checkpoint ``state``
    and each name in ``texts`` with its bytes. After a failure (full disk, file size limit, ...) the
    previous files are intact, no temp file is left, and the error is one :class:`CliError` line."""
    texts = dict(texts or {})
    folder = os.path.abspath(folder)
    names = list(state_names) + list(texts)
    try:
        os.makedirs(folder, exist_ok=True)
        recover(folder)
        staged: list[str] = []
        try:
            if state_names:
                payload = {"format": FORMAT, **state}
                payload["checksum"] = checksum(payload)
                first = os.path.join(folder, STAGED + state_names[0])
                staged.append(first)
                _write_atomic(first, lambda f: torch.save(payload, f))
                for name in state_names[1:]:
                    staged.append(os.path.join(folder, STAGED + name))
                    _write_atomic(staged[-1], lambda f: _copy_into(first, f))
            for name, data in texts.items():
                staged.append(os.path.join(folder, STAGED + name))
                _write_atomic(staged[-1], lambda f, data=data: f.write(data))
            moves = [[STAGED + name, name] for name in names]
            _write_atomic(os.path.join(folder, MANIFEST), lambda f: f.write(json.dumps({"moves": moves}).encode()))
        except BaseException:
            for path in staged:
                if os.path.exists(path):
                    os.remove(path)
            raise
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as RuntimeError
        raise CliError(f"cannot write {', '.join(names)} in {folder}: {brief(exc, 200)}; "
                       f"the previous files are kept") from None
    try:
        _fsync_dir(folder)
        _finish(folder, moves)
    except OSError as exc:  # committed: readers already see the new files, the next run finishes the moves
        raise CliError(f"cannot rename the new {', '.join(names)} into place in {folder} ({brief(exc, 200)}); "
                       f"they are complete and `fanet train` finishes the update when it next runs there") from None


def _copy_into(src: str, f: IO[bytes]) -> None:
    with open(src, "rb") as s:
        shutil.copyfileobj(s, f)


def save(path: str, state: dict[str, Any]) -> None:
    """Write checkpoint ``state`` to ``path`` atomically (see :func:`commit`)."""
    commit(os.path.dirname(os.path.abspath(path)), state=state, state_names=[os.path.basename(path)])


# ---------------------------------------------------------------------------------------------
# Reading


def open_committed(path: str, mode: str = "rb", **kwargs: Any) -> IO:
    """Open ``path`` as the last commit left it: its staged new version while a committed update
    of its folder is unfinished (a kill between the commit point and the moves)."""
    folder, name = os.path.split(os.path.abspath(path))
    try:
        moves = _manifest(folder)
    except CliError:
        moves = None
    for src, dst in moves or []:
        if dst == name:
            try:
                return open(os.path.join(folder, src), mode, **kwargs)
            except FileNotFoundError:  # moved in the meantime
                break
    return open(path, mode, **kwargs)


def load(path: str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save` and verify its checksum; any problem is a one-line
    :class:`CliError`."""
    try:
        f = open_committed(path)
    except IsADirectoryError:
        raise CliError(f"checkpoint {path}: is a directory, expected a checkpoint file") from None
    except FileNotFoundError:
        raise CliError(f"checkpoint {path}: no such file") from None
    except OSError as exc:
        raise CliError(f"checkpoint {path}: cannot read it ({brief(exc)})") from None
    with f:
        if not zipfile.is_zipfile(f):
            raise CliError(f"checkpoint {path} is corrupt or not a torch checkpoint (not a torch.save zip archive)")
        f.seek(0)
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:
            text = str(exc).strip()
            if "Weights only load failed" in text:
                reason = "it holds objects other than tensors and plain values; refused, loading them could run code"
            else:
                reason = (text.splitlines()[0] if text else type(exc).__name__)[:200]
            raise CliError(f"checkpoint {path} is corrupt or not a fanet checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, *LEGACY_FORMATS) or "model" not in state:
        raise CliError(f"checkpoint {path} is not a fanet checkpoint (written by `fanet train`)")
    stored = state.pop("checksum", None)
    if stored is None and state["format"] == FORMAT:
        raise CliError(f"checkpoint {path} is corrupt: it has no checksum")
    if stored is not None and stored != checksum(state):
        raise CliError(f"checkpoint {path} is corrupt: its contents do not match the sha256 checksum stored in it")
    return state


# ---------------------------------------------------------------------------------------------
# RNG states and resume


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


def _numpy_state(n: dict[str, Any]) -> tuple:
    keys = n["keys"]
    if not isinstance(keys, torch.Tensor) or keys.dtype != torch.int64 or keys.dim() != 1:
        raise ValueError("'keys' must be a 1-D int64 tensor")
    if len(keys) and (keys.min() < 0 or keys.max() >= 2**32):
        raise ValueError("'keys' must be in 0..2**32-1")
    pos, has_gauss = n["pos"], n["has_gauss"]
    if not isinstance(pos, int) or not 0 <= pos <= len(keys):  # numpy does not check it; it indexes with it
        raise ValueError(f"'pos' must be in 0..{len(keys)}, got {pos!r}")
    if has_gauss not in (0, 1):
        raise ValueError(f"'has_gauss' must be 0 or 1, got {has_gauss!r}")
    return n["name"], keys.numpy().astype(np.uint32), pos, has_gauss, float(n["cached"])


def _python_state(p: dict[str, Any]) -> tuple:
    if not isinstance(p["state"], (list, tuple)):
        raise TypeError("'state' must be a list")
    if p["gauss"] is not None and not isinstance(p["gauss"], float):
        raise TypeError("'gauss' must be None or a float")
    return p["version"], tuple(p["state"]), p["gauss"]


def rng_problem(state: Any) -> Optional[str]:
    """What is wrong with RNG state ``state`` (None: nothing): every part is applied to a fresh
    generator of its kind, so a state that passes here restores without error."""
    if not isinstance(state, dict):
        return f"is a {type(state).__name__}, not a dict"
    for part in ("torch", "numpy", "python"):
        if part not in state:
            return f"has no {part!r} state"
    try:
        torch.Generator().set_state(state["torch"])
    except (TypeError, ValueError, RuntimeError) as exc:
        return f"has a malformed 'torch' state ({brief(exc, 120)})"
    try:
        np.random.RandomState().set_state(_numpy_state(state["numpy"]))
    except (TypeError, ValueError, OverflowError, KeyError, IndexError, AttributeError) as exc:
        return f"has a malformed 'numpy' state ({brief(exc, 120)})"
    try:
        random.Random().setstate(_python_state(state["python"]))
    except (TypeError, ValueError, OverflowError, KeyError, IndexError, AttributeError) as exc:
        return f"has a malformed 'python' state ({brief(exc, 120)})"
    cuda = state.get("cuda", [])
    if not isinstance(cuda, (list, tuple)) or not all(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda):
        return "has a malformed 'cuda' state (expected a list of uint8 tensors)"
    return None


def check_resumable(state: dict[str, Any], path: str) -> None:
    """Every key a resume reads is there and well formed; otherwise one line naming what is
    missing or malformed (a resume must continue the run exactly or not at all)."""
    def refuse(what: str) -> CliError:
        return CliError(f"checkpoint {path} cannot be resumed: {what}")

    for key in RESUME_KEYS:
        if key not in state:
            raise refuse(f"it has no {key!r} entry")
    for key in ("config", "model", "optimizer", "scheduler"):
        if not isinstance(state[key], dict):
            raise refuse(f"its {key!r} entry is a {type(state[key]).__name__}, not a dict")
    epoch = state["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise refuse(f"its 'epoch' entry must be a whole number >= 0, got {epoch!r}")
    history = state["history"]
    if not isinstance(history, list) or [r.get("epoch") if isinstance(r, dict) else None
                                         for r in history] != list(range(1, epoch + 1)):
        raise refuse(f"its 'history' entry does not hold the records of epochs 1..{epoch}")
    rngs = state["rng"]
    if not isinstance(rngs, list) or not rngs:
        raise refuse("its 'rng' entry is not a non-empty list of RNG states (one per process)")
    for i, r in enumerate(rngs):
        problem = rng_problem(r)
        if problem:
            raise refuse(f"its RNG state of rank {i} {problem}")


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state(state["numpy"]))
    random.setstate(_python_state(state["python"]))
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

