"""``python -m eval_harness train``: SFT of a prefix AV on a targets folder; see :mod:`eval_harness.train`."""

from __future__ import annotations

import argparse
from pathlib import Path


from nla_space.io import check_writable
from nla_space.runtime import shared_backbone
from nla_space.verbalizers.config import INJECT_NORMS

from .dataset import load_target_set
from .train import TrainConfig, train

HELP = "train a prefix activation verbalizer (token CE under teacher forcing) on a targets folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--targets", type=Path, required=True, help="folder written by `targets`")
    p.add_argument("--out", type=Path, required=True, help="run folder (log.jsonl, best/, checkpoint/)")
    p.add_argument("--backbone", default=None, help="default: the target set's backbone")
    p.add_argument("--layer", type=int, default=None, help="default: the target set's layer (must match it)")
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--lr-proj-scale", type=float, default=d.lr_proj_scale,
                   help="the v projection trains at lr × this (default 1; 0.1 keeps the identity init from drowning in noise)")
    p.add_argument("--lr-prefix-scale", type=float, default=d.lr_prefix_scale,
                   help="the prefix trains at lr × this (default 1; 0 freezes it so training must use v)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--num-prefix-tokens", type=int, default=d.num_prefix_tokens)
    p.add_argument("--inject-norm", choices=INJECT_NORMS, default=d.inject_norm,
                   help="'embed': normalise v to the mean embedding-row norm before proj; 'center_embed': subtract the targets' μ "
                   "first (stored in the AV); default none, as the reference")
    p.add_argument("--max-steps", type=int, default=None, help="overrides --epochs")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--schedule", choices=("constant", "cosine"), default=d.schedule, help="LR after warmup (cosine ends at 10 %%)")
    p.add_argument("--max-gold-len", type=int, default=d.max_gold_len)
    p.add_argument("--val-every", type=int, default=d.val_every)
    p.add_argument("--val-vectors", type=int, default=d.val_vectors, help="val rows used per check")
    p.add_argument("--val-k", type=int, default=d.val_k, help="best-of-K for the val metric (default 8)")
    p.add_argument("--val-batch-rows", type=int, default=d.val_batch_rows, help="rollout rows per sampling call")
    p.add_argument("--ce-val-rows", type=int, default=d.ce_val_rows, help="val rows for val_ce_gain (teacher-forced CE, own v vs shifted v)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--device", default=None)


def run(args: argparse.Namespace) -> int:
    check_writable(args.out, "training run")  # before any work: a full or read-only disk fails now
    ts = load_target_set(args.targets)
    backbone = shared_backbone(args.backbone or ts.meta["backbone"], device=args.device)
    cfg = TrainConfig(
        epochs=args.epochs, lr=args.lr, lr_proj_scale=args.lr_proj_scale, lr_prefix_scale=args.lr_prefix_scale, batch_size=args.batch_size, num_prefix_tokens=args.num_prefix_tokens, inject_norm=args.inject_norm,
        max_steps=args.max_steps, warmup_steps=args.warmup_steps, schedule=args.schedule, max_gold_len=args.max_gold_len,
        val_every=args.val_every, val_vectors=args.val_vectors, val_k=args.val_k, val_batch_rows=args.val_batch_rows, ce_val_rows=args.ce_val_rows, seed=args.seed,
    )
    state = train(backbone, ts, args.out, cfg, layer=args.layer, resume=args.resume)
    msg = "stopped early (checkpoint saved; rerun with --resume)" if state["stopped_early"] else "done"
    print(f"{msg}: step {state['step']}/{state['total_steps']}, best {state['best']} at step {state['best_step']}, best AV in {args.out / 'best'}")
    return 0
