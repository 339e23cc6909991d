"""The ``fanet`` command line: train, eval, profile, cam, plot and compare.

User errors (bad flags, missing or corrupt data, unreadable checkpoints) end with one line on
stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

from . import thp
from .errors import CliError, FlagError

# Under torchrun, how long rank 0 waits after reporting a flag mistake before it exits, so that
# the other processes (which exit quietly) are gone first and torchrun reports one failure.
FLAG_ERROR_GRACE_S = 1.0

__all__ = ["main", "build_parser", "CliError"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the usage block; we want one line
        raise FlagError(message)


def build_parser() -> argparse.ArgumentParser:
    from . import cam, compare, evaluate, plot, profile, train

    parser = _Parser(prog="fanet", description="Train, evaluate and look inside Focus-and-Association networks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    commands = [
        ("train", train, "train a model (the paper's recipe by default)"),
        ("eval", evaluate, "top-1 error of a checkpoint on a data set"),
        ("profile", profile, "parameters and multiply-adds of zoo models, beside the paper's figures"),
        ("cam", cam, "Grad-CAM heat maps and per-class block attention (k) of a checkpoint"),
        ("plot", plot, "training curves (error and loss, train and test) from logs"),
        ("compare", compare, "train several models on the same data and print their test errors side by side"),
    ]
    for name, module, help_text in commands:
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = text.splitlines()
    if len(lines) > 1:  # re-raised from a DataLoader worker: the original message is the last line
        text = lines[-1].split("CliError: ", 1)[-1]
    return text


def _report(line: str, flag_error: bool = False) -> int:
    """Print ``line`` on stderr and return exit code 2. Under torchrun the line also goes to the
    worker's error file (torchrun's failure report then shows it instead of a pointer to its docs),
    and a flag mistake, which every process finds alike, is reported by rank 0 alone: the other
    processes exit quietly and successfully, so torchrun's report lists one failure, not one per
    process (its own exit code is still non-zero, from rank 0)."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if flag_error and world > 1 and rank != 0:
        return 0
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as f:
                json.dump({"message": {"message": line, "extraInfo": {
                    "py_callstack": line, "timestamp": str(int(time.time()))}}}, f)
        except OSError:
            pass
    print(line, file=sys.stderr, flush=True)
    if flag_error and world > 1:
        time.sleep(FLAG_ERROR_GRACE_S)
    return 2


def _input_size(args: argparse.Namespace) -> Optional[int]:
    """The side of the command's input images, if its flags say it (eval without --dataset: None)."""
    from .data import DATASETS, effective_image_size
    if getattr(args, "dataset", None) not in DATASETS:
        return None
    return effective_image_size(args.dataset, getattr(args, "image_size", None))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    train, compare and eval run with ``THP_MEM_ALLOC_ENABLE=1`` on Linux for inputs larger than 32x32
    unless the environment sets it or ``--no-thp`` is given (:mod:`fanet_kernels.cli.thp`); with
    ``argv`` given (main() called in-process) the variable is restored afterwards and the process is
    never re-executed."""
    saved_thp = os.environ.get(thp.ENV)
    try:
        args = build_parser().parse_args(argv)
        if hasattr(args, "no_thp"):
            status = thp.setup(off=args.no_thp, may_reexec=argv is None, image_size=_input_size(args))
            if status is not None and int(os.environ.get("RANK", "0")) == 0:
                print(status.line(), flush=True)
        return int(args.func(args) or 0)
    except CliError as exc:
        return _report(f"fanet: error: {_one_line(exc)}", isinstance(exc, FlagError))
    except OSError as exc:  # unwritable output folder, full disk, ...
        return _report(f"fanet: error: {exc}")
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print("fanet: interrupted", file=sys.stderr)
        return 130
    finally:
        if argv is not None:
            thp.restore(saved_thp)
