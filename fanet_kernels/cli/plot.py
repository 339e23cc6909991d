"""``fanet plot``: training curves from one or more logs, as the paper's Fig. 6 (error and loss,
train dashed and test solid, one colour per run)."""
from __future__ import annotations

import argparse
import csv
import json
import os
from typing import Optional

from . import checks
from .checkpoint import open_committed
from .errors import CliError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("logs", nargs="+", help="log.json / log.csv files, or run folders holding them")
    p.add_argument("--out", "-o", default="curves.png",
                   help="figure to write (its suffix picks the format: .png, .pdf, .svg, ...; none: .png)")
    p.add_argument("--labels", nargs="+", help="legend labels, one per log (default: the model names)")
    p.add_argument("--title", help="figure title")


def read_log(path: str) -> tuple[str, list[dict]]:
    """(label, epoch records) from a run folder, log.json or log.csv."""
    if os.path.isdir(path):
        for name in ("log.json", "log.csv"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise CliError(f"log folder {path}: no log.json or log.csv in it")
    if not os.path.isfile(path):
        raise CliError(f"log {path}: no such file (expected a log.json or log.csv written by `fanet train`)")
    label = os.path.basename(os.path.dirname(os.path.abspath(path)))
    try:
        if path.endswith(".json"):
            with open_committed(path, "r") as f:
                doc = json.load(f)
            records = doc["epochs"]
            label = doc.get("config", {}).get("model", label)
        else:
            with open_committed(path, "r", newline="") as f:
                records = [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
                           for row in csv.DictReader(f)]
        for r in records:
            r["epoch"] = int(r["epoch"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CliError(f"log {path} is not a `fanet train` log ({type(exc).__name__}: {exc})") from None
    if not records:
        raise CliError(f"log {path} has no epochs yet")
    return label, records


def plot_curves(runs: list[tuple[str, list[dict]]], out: str, title: Optional[str] = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, records) in enumerate(runs):
        c = colors[i % len(colors)]
        for ax, key in zip(axes, ("err", "loss")):
            tr = [(r["epoch"], r[f"train_{key}"]) for r in records if r.get(f"train_{key}") is not None]
            te = [(r["epoch"], r[f"test_{key}"]) for r in records if r.get(f"test_{key}") is not None]
            if tr:
                ax.plot(*zip(*tr), "--", color=c, alpha=0.8, label=f"{label} train")
            if te:
                ax.plot(*zip(*te), "-", color=c, marker="." if len(te) < 30 else None, label=f"{label} test")
    axes[0].set_ylabel("top-1 error (%)")
    axes[1].set_ylabel("cross-entropy loss")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run(args: argparse.Namespace) -> int:
    out = checks.figure_path(args.out, "--out")
    runs = [read_log(p) for p in args.logs]
    if args.labels:
        if len(args.labels) != len(runs):
            raise CliError(f"argument --labels: {len(args.labels)} labels for {len(runs)} logs")
        runs = [(lab, recs) for lab, (_, recs) in zip(args.labels, runs)]
    print(f"wrote {plot_curves(runs, out, args.title)}")
    return 0
