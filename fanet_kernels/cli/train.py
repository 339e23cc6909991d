"""``fanet train``: the paper's training recipe (§IV.A) with every knob a flag.

Defaults: SGD, momentum 0.9, batch 128, weight decay 5e-4, lr 0.1 divided by 10 every 60 epochs,
240 epochs; 4-pixel zero pad + random 32x32 crop + horizontal flip and per-channel mean
subtraction (8-pixel pad, 64x64 crop for Tiny ImageNet).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import random
import sys
import time
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

import fanet_kernels

from . import checkpoint as ckpt
from . import checks, distributed, thp
from .data import DATASETS, default_flip, default_pad, effective_image_size, load_dataset, prepare_batch
from .errors import CliError, FlagError, brief
from .evaluate import autocast, evaluate
from .models import build_model, check_model, parse_model_args

LOG_FIELDS = ("epoch", "lr", "train_loss", "train_err", "test_loss", "test_err", "test_top5_err",
              "epoch_time", "images_per_s")


def add_arguments(p: argparse.ArgumentParser, *, compare: bool = False) -> None:
    """The training flags; ``compare`` for `fanet compare`, which takes --models instead of --model,
    trains 15 epochs by default and writes one run per model under --out."""
    g = p.add_argument_group("model and data")
    if not compare:
        g.add_argument("--model", default="fa_resnet20",
                       help="zoo name (see `fanet profile --list`) or package.module:function")
    g.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="extra keyword argument for the model constructor (repeatable)")
    g.add_argument("--dataset", default="digits", choices=DATASETS,
                   help="digits is built in (scikit-learn); the others read --data")
    g.add_argument("--data", help="folder of the data set (never downloaded)")
    g.add_argument("--image-size", type=int,
                   help="resize file images (imagefolder, tiny-imagenet) to this (default 32; 64 for tiny-imagenet)")
    g.add_argument("--tiny-imagenet", action=argparse.BooleanOptionalAction, default=None,
                   help="the paper's Tiny ImageNet model variant (default: on for --dataset tiny-imagenet)")
    g = p.add_argument_group("optimisation (paper defaults)")
    g.add_argument("--epochs", type=int, default=15 if compare else 240, help="(default %(default)s)")
    g.add_argument("--batch-size", type=int, default=128, help="per process")
    g.add_argument("--lr", type=float, default=0.1)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--nesterov", action="store_true")
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--lr-step", type=int, default=60, help="divide the lr every this many epochs")
    g.add_argument("--lr-gamma", type=float, default=0.1, help="factor applied every --lr-step epochs")
    g.add_argument("--milestones", type=int, nargs="+", help="explicit epochs to decay at (overrides --lr-step)")
    g = p.add_argument_group("augmentation")
    g.add_argument("--pad", type=int, help="zero padding before the random crop (default 4; 8 for tiny-imagenet)")
    g.add_argument("--crop", type=int, help="random crop size (default: the image size)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flip (default on; off for digits)")
    g.add_argument("--no-mean", action="store_true", help="skip the per-channel mean subtraction")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="output folder; each model's run goes in <out>/<model> "
                   "(default runs/compare-<dataset>)"
                   if compare else "output folder for logs and checkpoints (default runs/<model>-<dataset>)")
    g.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue from a checkpoint (default: <out>/checkpoint.pt)")
    g.add_argument("--save-every", type=int, default=1, help="checkpoint every N epochs (and at the end)")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate on the test split every N epochs")
    g.add_argument("--stop-after", type=int, help="stop after this many epochs of this invocation "
                   "(checkpointed; continue later with --resume)")
    g.add_argument("--max-steps", type=int, help="at most this many training batches per epoch")
    g.add_argument("--max-eval-steps", type=int, help="at most this many test batches per evaluation")
    g.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    g.add_argument("--seed", type=int, default=0, help="0..2**32-1 (numpy's range)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms only (torch.use_deterministic_algorithms)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--threads", type=int, help="torch CPU threads per process")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--no-plot", action="store_true", help="do not write curves PNGs at the end"
                   if compare else "do not write <out>/curves.png at the end")
    g = p.add_argument_group("speed")
    g.add_argument("--backend", help="fanet_kernels backend: auto, reference, cpu, cuda, triton")
    g.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU; --amp-dtype on GPU)")
    g.add_argument("--amp-dtype", choices=("fp16", "bf16"), help="default bf16 on CPU, fp16 on GPU")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--no-thp", action="store_true", help=thp.FLAG_HELP)


def select_backend(name: Optional[str], device: str) -> None:
    """Set backend ``name`` (None: leave the setting) once it is known to run on ``device``."""
    checks.backend(name, device)
    if name:
        fanet_kernels.set_backend(name)


def default_out(args: argparse.Namespace) -> str:
    return args.out or os.path.join("runs", f"{args.model.replace(':', '.')}-{args.dataset}")


def check_args(args: argparse.Namespace, *, model: bool = True) -> None:
    """Every check that needs no data and no model (``model``: also --model's name, which
    `fanet compare` checks for each of its --models)."""
    checks.at_least(args, 1, "epochs", "batch_size", "lr_step", "save_every", "eval_every", "stop_after",
                    "max_steps", "max_eval_steps", "threads", "image_size", "crop")
    checks.finite(args, "lr", "momentum", "weight_decay", "lr_gamma")
    checks.at_least(args, 0, "pad", "workers", "momentum", "weight_decay")
    checks.positive(args, "lr", "lr_gamma")
    if args.nesterov and args.momentum == 0:
        raise FlagError("argument --nesterov: needs a momentum > 0 (--momentum 0 given)")
    steps = args.milestones or []
    if steps and (steps[0] < 1 or any(b <= a for a, b in zip(steps, steps[1:]))):  # MultiStepLR takes any
        raise FlagError(f"argument --milestones: must be increasing epochs >= 1, got {' '.join(map(str, steps))}")
    if not 0 <= args.seed < 2**32:  # numpy's seeds; torch's and Python's take these too
        raise FlagError(f"argument --seed: must be in 0..{2**32 - 1}, got {args.seed}")
    if args.amp_dtype is not None and not args.amp:
        raise FlagError(f"argument --amp-dtype: only applies with --amp ({args.amp_dtype} given without it)")
    if args.dataset == "digits" and args.data is not None:
        raise FlagError("argument --data: the digits data set is built in and reads no --data; "
                        "give --dataset cifar10, cifar100, tiny-imagenet or imagefolder with it")
    size = effective_image_size(args.dataset, args.image_size)
    if args.image_size is not None and args.image_size != size:  # digits and CIFAR come as 32x32
        raise FlagError(f"argument --image-size: {args.dataset} images are {size}x{size}; --image-size resizes "
                        f"file data sets (imagefolder, tiny-imagenet) only, got {args.image_size}")
    pad = default_pad(args.dataset) if args.pad is None else args.pad
    if pad > size:  # a crop from such a padding can be all zeros
        raise FlagError(f"argument --pad: must be <= the image size ({size}), got {pad}")
    if args.crop is not None and args.crop > size + 2 * pad:  # the crop is taken from the padded image
        raise FlagError(f"argument --crop: must be <= the padded image size ({size} + 2 * {pad}), got {args.crop}")
    device = checks.device(args.device)
    checks.backend(args.backend, device)
    model_args = parse_model_args(args.model_arg)
    if isinstance(model_args.get("backend"), str):
        checks.backend(model_args["backend"], device, "--model-arg backend")
    if model:
        check_model(args.model)
        checks.out_dir(default_out(args))


def _seed_all(seed: int) -> None:
    seed %= 2**32  # --seed plus epoch and rank offsets: kept in numpy's range
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _plain(value: Any) -> Any:
    """Keep only what weights_only checkpoints and JSON can hold."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def state_hash(model: torch.nn.Module) -> str:
    """sha256 over the bytes of every parameter and buffer, in state_dict order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def log_files(config: dict, history: list[dict], extra: Optional[dict] = None) -> dict[str, bytes]:
    """log.csv and log.json's contents for ``history`` (for :func:`checkpoint.commit`)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=LOG_FIELDS)
    writer.writeheader()
    writer.writerows({k: r.get(k) for k in LOG_FIELDS} for r in history)
    tested = [r for r in history if r.get("test_err") is not None]
    best = min(tested, key=lambda r: r["test_err"]) if tested else None
    doc = {"config": config, "epochs": history,
           "best": {"epoch": best["epoch"], "test_err": best["test_err"]} if best else None, **(extra or {})}
    return {"log.csv": text.getvalue().encode(), "log.json": json.dumps(doc, indent=1).encode()}


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def run(args: argparse.Namespace) -> int:
    train(args)
    return 0


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run training as ``args`` says; returns the final log record and the paths written."""
    check_args(args)
    # Process-wide settings this run changes, restored at the end (main() may run in-process).
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.backends.cudnn.benchmark, fanet_kernels.backends.active_setting())
    try:
        if args.backend:  # checked by check_args
            fanet_kernels.set_backend(args.backend)
        if args.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        if args.threads:
            torch.set_num_threads(args.threads)
        return _setup_and_train(args)
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        torch.backends.cudnn.benchmark = saved[2]
        fanet_kernels.set_backend(saved[3])


def _setup_and_train(args: argparse.Namespace) -> dict[str, Any]:
    model_args = parse_model_args(args.model_arg)
    out = default_out(args)
    if distributed.env_rank() == 0:  # finish or drop an update a kill interrupted, before reading or writing
        ckpt.recover(out)
    resume_path = os.path.join(out, "checkpoint.pt") if args.resume == "auto" else args.resume
    resume_state = ckpt.load(resume_path) if resume_path else None
    if resume_state is not None:
        ckpt.check_resumable(resume_state, resume_path)

    train_set, test_set, info = load_dataset(args.dataset, args.data, args.image_size)
    tiny = args.tiny_imagenet if args.tiny_imagenet is not None else args.dataset == "tiny-imagenet"
    pad = default_pad(args.dataset) if args.pad is None else args.pad
    crop = args.crop or info.image_size
    flip = default_flip(args.dataset) if args.flip is None else args.flip
    mean = [0.0] * len(info.mean) if args.no_mean else info.mean

    ctx = distributed.setup(args.device)
    try:
        return _train(args, ctx, out, resume_path, resume_state, train_set, test_set, info,
                      model_args, tiny, pad, crop, flip, mean)
    finally:
        distributed.cleanup()


def _train(args, ctx, out, resume_path, resume_state, train_set, test_set, info, model_args,
           tiny, pad, crop, flip, mean) -> dict[str, Any]:
    device = ctx.device
    _seed_all(args.seed)  # same on every rank: identical initial weights
    model = build_model(args.model, info.num_classes, tiny, model_args).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    config = _plain({
        "model": args.model, "model_args": model_args, "dataset": args.dataset,
        "data": os.path.abspath(args.data) if args.data else None, "num_classes": info.num_classes,
        "image_size": info.image_size, "tiny_imagenet": tiny, "classes": info.classes, "mean": mean,
        "pad": pad, "crop": crop, "flip": flip, "world_size": ctx.world_size,
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "args": {k: v for k, v in vars(args).items() if k != "func"},
    })

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay, nesterov=args.nesterov)
    if args.milestones:
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.milestones, args.lr_gamma)
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_step, args.lr_gamma)
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.amp_dtype or "") or (
        torch.float16 if device.type == "cuda" else torch.bfloat16)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp and device.type == "cuda" and amp_dtype == torch.float16)

    start_epoch, history = 0, []
    if resume_state is not None:
        rcfg = resume_state.get("config", {})
        for key in ("model", "dataset", "num_classes"):
            if rcfg.get(key) != config[key]:
                raise CliError(f"argument --resume: checkpoint {resume_path} was trained with {key}="
                               f"{rcfg.get(key)!r}, this run has {config[key]!r}")
        saved_args, new_args = rcfg.get("model_args") or {}, config["model_args"]
        differ = sorted(k for k in set(saved_args) | set(new_args) if saved_args.get(k) != new_args.get(k))
        if differ:  # a different architecture: its state_dict would not load (or worse, would)
            def show(a: dict) -> str:
                return ", ".join(f"{k}={a[k]!r}" if k in a else f"{k} unset" for k in differ)
            raise CliError(f"argument --model-arg: checkpoint {resume_path} was trained with {show(saved_args)}, "
                           f"this run has {show(new_args)}")
        try:
            model.load_state_dict(resume_state["model"])
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
            if "scaler" in resume_state and scaler.is_enabled():
                scaler.load_state_dict(resume_state["scaler"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CliError(f"checkpoint {resume_path} cannot be resumed: {brief(exc)}") from None
        start_epoch = resume_state["epoch"]  # resume_state passed ckpt.check_resumable
        history = list(resume_state["history"])
        rngs = resume_state["rng"]
        if len(rngs) == ctx.world_size:
            ckpt.set_rng_state(rngs[ctx.rank])
        else:  # a different number of processes: the data order cannot continue exactly
            if ctx.is_main:
                print(f"fanet: warning: checkpoint {resume_path} was written by {len(rngs)} process(es), this run has "
                      f"{ctx.world_size}: training continues with fresh random draws, not exactly as before",
                      file=sys.stderr, flush=True)
            _seed_all(args.seed + 1000 * start_epoch + ctx.rank)
    else:
        _seed_all(args.seed + ctx.rank)  # different augmentation draws per rank

    net: torch.nn.Module = model
    if args.compile:
        net = torch.compile(net)
    if ctx.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)

    if ctx.enabled:
        sampler = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank,
                                     shuffle=True, seed=args.seed, drop_last=False)
    else:
        sampler = RandomSampler(train_set)  # draws its order from torch's (checkpointed) RNG
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                              num_workers=args.workers, drop_last=False,
                              persistent_workers=False, pin_memory=device.type == "cuda")
    test_loader = DataLoader(test_set, batch_size=max(args.batch_size, 256), num_workers=args.workers,
                             sampler=distributed.ShardSampler(len(test_set), ctx.rank, ctx.world_size))

    if ctx.is_main:
        held = [f for f in ("checkpoint.pt", "log.json") if os.path.isfile(os.path.join(out, f))]
        if held and resume_state is None:  # a warning, not a refusal: the README's jobs stay re-runnable
            print(f"fanet: warning: {out} already holds a run ({', '.join(held)}); overwriting it "
                  f"(--resume continues it instead)", file=sys.stderr, flush=True)
        os.makedirs(out, exist_ok=True)
        if not args.quiet:
            print(f"fanet train: {args.model} ({config['params']:,} params) on {args.dataset} "
                  f"({len(train_set)} train / {len(test_set)} test, {info.num_classes} classes), "
                  f"{args.epochs} epochs, batch {args.batch_size} x {ctx.world_size} process(es), "
                  f"device {device}, output {out}" + (f", resuming at epoch {start_epoch + 1}" if start_epoch else ""),
                  flush=True)

    from tqdm import tqdm

    show_bar = ctx.is_main and not args.quiet and sys.stderr.isatty()
    steps_per_epoch = len(train_loader) if args.max_steps is None else min(len(train_loader), args.max_steps)
    record: dict[str, Any] = history[-1] if history else {}
    epochs_run = 0
    for epoch in range(start_epoch, args.epochs):
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        net.train()
        lr = optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        loss_sum = correct = count = 0.0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                   disable=not show_bar, file=sys.stderr, dynamic_ncols=True)
        for step, (images, labels) in enumerate(train_loader):
            if step >= steps_per_epoch:
                break
            x = prepare_batch(images.to(device, non_blocking=True), mean, train=True, pad=pad, crop=crop, flip=flip)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=True)
            with autocast(device, args.amp, amp_dtype):
                logits = net(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
            if not torch.isfinite(loss):
                raise CliError(f"training diverged at epoch {epoch + 1} step {step + 1} (loss {loss.item()}); "
                               f"try a lower --lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            n = len(labels)
            loss_sum += loss.item() * n
            correct += (logits.argmax(1) == labels).sum().item()
            count += n
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / count:.3f}", err=f"{100 * (1 - correct / count):.1f}%", refresh=False)
        bar.close()
        scheduler.step()
        loss_sum, correct, count = distributed.all_sum(ctx, [loss_sum, correct, count])
        train_time = time.perf_counter() - t0
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / max(count, 1),
                  "train_err": 100 * (1 - correct / max(count, 1)), "test_loss": None, "test_err": None,
                  "test_top5_err": None, "epoch_time": None, "images_per_s": count / max(train_time, 1e-9)}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            res = evaluate(net, test_loader, mean, device, ctx, amp=args.amp, amp_dtype=amp_dtype,
                           channels_last=args.channels_last, max_steps=args.max_eval_steps)
            record.update(test_loss=res["loss"], test_err=res["err"], test_top5_err=res["top5_err"])
        record["epoch_time"] = time.perf_counter() - t0
        history.append(record)
        epochs_run += 1
        last = epoch + 1 == args.epochs
        stopping = last or (args.stop_after is not None and epochs_run >= args.stop_after)
        # best.pt holds the epoch log.json calls best: the first with the lowest test error, written
        # when it happens (whatever --save-every says); test_err is summed over ranks, so all agree.
        # checkpoint.pt is written with it, so a resume never starts before the epoch best.pt holds.
        earlier = [r["test_err"] for r in history[:-1] if r["test_err"] is not None]
        best = record["test_err"] is not None and (not earlier or record["test_err"] < min(earlier))
        save = (epoch + 1) % args.save_every == 0 or stopping or best
        state, names = None, ["checkpoint.pt"] * save + ["best.pt"] * best
        if names:
            rngs = distributed.all_gather_object(ctx, ckpt.rng_state())  # every rank's, for exact resume
            state = {"config": config, "epoch": epoch + 1, "model": ckpt.unwrap(net).state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "history": history, "rng": rngs}
            if scaler.is_enabled():
                state["scaler"] = scaler.state_dict()
        if ctx.is_main:  # the checkpoints and the logs change together, or not at all (a kill, a full disk)
            ckpt.commit(out, log_files(config, history), state, names)
            if not args.quiet:
                print(f"epoch {epoch + 1:3d}/{args.epochs}  lr {lr:.4g}  "
                      f"train loss {record['train_loss']:.4f} err {record['train_err']:6.2f}%  "
                      f"test loss {_fmt(record['test_loss'], '.4f')} err {_fmt(record['test_err'], '6.2f')}%  "
                      f"{record['epoch_time']:.1f}s", flush=True)
        if stopping:
            break
    if ctx.enabled:  # DDP keeps replicas equal; check it, and record the evidence in the log
        hashes = distributed.all_gather_object(ctx, state_hash(ckpt.unwrap(net)))
        if ctx.is_main:
            ckpt.commit(out, log_files(config, history, {"rank_state_sha256": hashes}))
            if len(set(hashes)) != 1:
                print("fanet: warning: the ranks' weights differ at the end of training", file=sys.stderr)
    if ctx.is_main and history and not args.no_plot:
        from .plot import plot_curves

        plot_curves([(args.model, history)], os.path.join(out, "curves.png"), title=f"{args.model} on {args.dataset}")
    distributed.barrier(ctx)
    if ctx.is_main and not args.quiet and record:
        tested = [r for r in history if r.get("test_err") is not None]
        best = min(tested, key=lambda r: r["test_err"]) if tested else None
        print(f"done: {args.model} test error {_fmt(record.get('test_err'), '.2f')}% after epoch "
              f"{record.get('epoch')}" + (f" (best {best['test_err']:.2f}% at epoch {best['epoch']})" if best else "")
              + f"; logs and curves in {out}", flush=True)
    return {"record": record, "history": history, "out": out, "config": config, "model": ckpt.unwrap(net)}
