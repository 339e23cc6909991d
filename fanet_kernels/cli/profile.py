"""``fanet profile``: trainable parameters and real multiply-adds of zoo models, with the paper's
Table I-III figures beside them (via :mod:`fanet_kernels.complexity`)."""
from __future__ import annotations

import argparse

from . import checks
from .errors import CliError
from .models import build_model, zoo_names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="*", help="zoo names (default: all); `--list` prints them")
    p.add_argument("--list", action="store_true", help="list the zoo's models and exit")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--tiny-imagenet", action="store_true", help="the Tiny ImageNet variants (64x64 inputs)")
    p.add_argument("--input-size", type=int, help="input height = width (default 32; 64 with --tiny-imagenet)")


def run(args: argparse.Namespace) -> int:
    checks.at_least(args, 1, "num_classes", "input_size")
    names = zoo_names()
    if not names:
        raise CliError("the model zoo (fanet_kernels.zoo) is not available")
    if args.list:
        print("\n".join(names))
        return 0
    unknown = [m for m in args.models if m not in names and ":" not in m]
    if unknown:
        raise CliError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    size = args.input_size if args.input_size is not None else (64 if args.tiny_imagenet else 32)
    from fanet_kernels import complexity

    # Zoo names go in as names (so the paper's figures are found); user models as (label, module).
    entries = [m if ":" not in m else (m, build_model(m, args.num_classes, args.tiny_imagenet))
               for m in (args.models or names)]
    print(complexity.table(entries, num_classes=args.num_classes, tiny_imagenet=args.tiny_imagenet,
                           input_size=(3, size, size)))
    return 0
