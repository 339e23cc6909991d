"""``fanet eval``: top-1 (and top-5) error of a checkpoint on a data set."""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import nullcontext
from typing import Optional

import torch
from torch.utils.data import DataLoader

from . import checkpoint as ckpt
from . import checks, distributed, thp
from .data import DATASETS, prepare_batch
from .errors import CliError, FlagError, brief


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint written by `fanet train` (checkpoint.pt or best.pt)")
    p.add_argument("--dataset", choices=DATASETS, help="default: the data set the checkpoint was trained on")
    p.add_argument("--data", help="data folder (default: the training run's)")
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="evaluate at most this many batches")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--backend", default=None, help="fanet_kernels backend (auto, reference, cpu, cuda, triton)")
    p.add_argument("--amp", action="store_true", help="autocast (bf16 on CPU, fp16 on GPU)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--json", dest="json_out", help="also write the result to this JSON file")
    p.add_argument("--no-thp", action="store_true", help=thp.FLAG_HELP)


def autocast(device: torch.device, enabled: bool, dtype: Optional[torch.dtype] = None):
    if not enabled:
        return nullcontext()
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, mean: list[float], device: torch.device,
             ctx: distributed.Dist, *, amp: bool = False, amp_dtype: Optional[torch.dtype] = None,
             channels_last: bool = False, max_steps: Optional[int] = None) -> dict[str, float]:
    """Loss, top-1 and top-5 error (%) over ``loader``, summed over all ranks."""
    was_training = model.training
    model.eval()
    loss_sum = correct1 = correct5 = count = 0.0
    for step, (images, labels) in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        x = prepare_batch(images.to(device), mean, train=False)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device)
        with autocast(device, amp, amp_dtype):
            logits = model(x)
        logits = logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == labels).sum().item()
        correct5 += (top == labels[:, None]).any(dim=1).sum().item()
        count += len(labels)
    model.train(was_training)
    loss_sum, correct1, correct5, count = distributed.all_sum(ctx, [loss_sum, correct1, correct5, count])
    count = max(count, 1.0)
    return {"loss": loss_sum / count, "err": 100.0 * (1 - correct1 / count),
            "top5_err": 100.0 * (1 - correct5 / count), "count": int(count)}


def model_from_checkpoint(state: dict, path: str) -> torch.nn.Module:
    from .models import build_model

    cfg = state.get("config", {})
    try:
        model = build_model(cfg["model"], cfg["num_classes"], cfg.get("tiny_imagenet", False), cfg.get("model_args"))
    except KeyError as exc:
        raise CliError(f"checkpoint {path} has no model config ({exc})") from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CliError(f"checkpoint {path} does not match model {cfg['model']!r}: {brief(exc)}") from None
    return model


def run(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .train import select_backend

    checks.at_least(args, 1, "batch_size", "max_steps")  # --max-steps 0 would report 0 images as numbers
    checks.at_least(args, 0, "workers")
    if args.json_out:
        checks.out_file(args.json_out, "--json")
    select_backend(args.backend, checks.device(args.device))
    state = ckpt.load(args.checkpoint)
    cfg = state.get("config", {})
    name = args.dataset or cfg.get("dataset", "digits")
    if name == "digits" and args.data is not None:
        raise FlagError("argument --data: the digits data set is built in and reads no --data")
    model = model_from_checkpoint(state, args.checkpoint)
    data_root = args.data if args.data is not None else (cfg.get("data") if name == cfg.get("dataset") else None)
    train_set, test_set, info = load_dataset(name, data_root, cfg.get("image_size"))
    if info.num_classes != cfg.get("num_classes"):
        raise CliError(f"argument --dataset: {name} has {info.num_classes} classes, "
                       f"the checkpoint's model {cfg.get('num_classes')}")
    ctx = distributed.setup(args.device)
    model.to(ctx.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    ds = test_set if args.split == "test" else train_set
    loader = DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers,
                        sampler=distributed.ShardSampler(len(ds), ctx.rank, ctx.world_size))
    try:  # with the training set's mean that the model was trained with
        result = evaluate(model, loader, cfg.get("mean", info.mean), ctx.device, ctx, amp=args.amp,
                          channels_last=args.channels_last, max_steps=args.max_steps)
    finally:
        distributed.cleanup()
    if not ctx.is_main:
        return 0
    result.update(model=cfg["model"], dataset=name, split=args.split, epoch=state.get("epoch"))
    print(f"{cfg['model']} on {name} {args.split} ({result['count']} images, epoch {state.get('epoch')}): "
          f"top-1 error {result['err']:.2f}%  top-5 error {result['top5_err']:.2f}%  loss {result['loss']:.4f}")
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    sys.stdout.flush()
    return 0
