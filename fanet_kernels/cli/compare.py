"""``fanet compare``: train several models with the same recipe, data and seed, then print their
test errors side by side and plot their training curves in one PNG (the README's main job)."""
from __future__ import annotations

import argparse
import os

from . import checks
from . import train as train_cmd
from .errors import FlagError
from .models import check_model
from .plot import plot_curves


def add_arguments(p: argparse.ArgumentParser) -> None:
    train_cmd.add_arguments(p, compare=True)
    p.add_argument("--models", nargs="+", default=["resnet20", "fa_resnet20"],
                   help="models to train, one after the other (default: resnet20 fa_resnet20)")
    p.add_argument("--plot", default=None, help="combined curves figure (default <out>/curves.png)")
    p.epilog = ("The table's 'time s' column is each model's training time: the sum of its epochs "
                "(training and test passes), without the one-off start-up (data, model, first imports).")


def run(args: argparse.Namespace) -> int:
    if args.resume:
        raise FlagError("argument --resume: not supported by compare; resume the single runs with `fanet train`")
    # Everything up front: a typo in the last model must not cost the training of the first ones.
    train_cmd.check_args(args, model=False)
    for name in args.models:
        check_model(name, "--models")
    dirs = [name.replace(":", ".") for name in args.models]
    repeated = sorted({d for d in dirs if dirs.count(d) > 1})
    if repeated:
        raise FlagError(f"argument --models: {', '.join(repeated)} given more than once (the runs share a folder)")
    base = args.out or os.path.join("runs", f"compare-{args.dataset}")
    checks.out_dir(base)
    plot = None if args.no_plot else checks.figure_path(args.plot or os.path.join(base, "curves.png"), "--plot")
    results = []
    for name, folder in zip(args.models, dirs):
        sub = argparse.Namespace(**vars(args))
        sub.model, sub.out = name, os.path.join(base, folder)
        results.append((name, train_cmd.train(sub)))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    if plot:
        plot_curves([(name, res["history"]) for name, res in results], plot,
                    title=f"{args.dataset}: {', '.join(args.models)}")
    width = max(len(n) for n in args.models) + 2
    print(f"\n{'model':<{width}}{'params':>10}{'test err %':>12}{'best %':>9}{'train err %':>13}{'time s':>9}")
    for name, res in results:
        rec = res["record"]
        tested = [r["test_err"] for r in res["history"] if r.get("test_err") is not None]
        secs = sum(r["epoch_time"] for r in res["history"])  # training only, not the start-up
        print(f"{name:<{width}}{res['config']['params']:>10,}{rec.get('test_err', float('nan')):>12.2f}"
              f"{min(tested) if tested else float('nan'):>9.2f}{rec.get('train_err', float('nan')):>13.2f}{secs:>9.1f}")
    if plot:
        print(f"curves: {plot}")
    return 0
