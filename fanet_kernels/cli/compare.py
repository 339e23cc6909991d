"""``fanet compare``: train several models with the same recipe, data and seed, then print their
test errors side by side and plot their training curves in one PNG (the README's main job)."""
from __future__ import annotations

import argparse
import os
import time

from . import train as train_cmd
from .errors import CliError
from .plot import plot_curves


def add_arguments(p: argparse.ArgumentParser) -> None:
    train_cmd.add_arguments(p)
    p.set_defaults(epochs=15, out=None)
    p.add_argument("--models", nargs="+", default=["resnet20", "fa_resnet20"], help="models to train")
    p.add_argument("--plot", default=None, help="curves PNG (default <out>/curves.png)")


def run(args: argparse.Namespace) -> int:
    if args.resume:
        raise CliError("argument --resume: not supported by compare; resume the single runs with `fanet train`")
    base = args.out or os.path.join("runs", f"compare-{args.dataset}")
    results = []
    for name in args.models:
        sub = argparse.Namespace(**vars(args))
        sub.model, sub.out = name, os.path.join(base, name.replace(":", "."))
        t0 = time.perf_counter()
        res = train_cmd.train(sub)
        results.append((name, res, time.perf_counter() - t0))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    plot = args.plot or os.path.join(base, "curves.png")
    plot_curves([(name, res["history"]) for name, res, _ in results], plot,
                title=f"{args.dataset}: {', '.join(args.models)}")
    width = max(len(n) for n in args.models) + 2
    print(f"\n{'model':<{width}}{'params':>10}{'test err %':>12}{'best %':>9}{'train err %':>13}{'time s':>9}")
    for name, res, secs in results:
        rec = res["record"]
        tested = [r["test_err"] for r in res["history"] if r.get("test_err") is not None]
        print(f"{name:<{width}}{res['config']['params']:>10,}{rec.get('test_err', float('nan')):>12.2f}"
              f"{min(tested) if tested else float('nan'):>9.2f}{rec.get('train_err', float('nan')):>13.2f}{secs:>9.1f}")
    print(f"curves: {plot}")
    return 0
