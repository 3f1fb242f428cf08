"""``python -m eval_harness train-ar``: LoRA + per-depth heads activation reconstructor; see :mod:`eval_harness.train_ar`."""

from __future__ import annotations

import argparse
from pathlib import Path


from nla_space.backbone import load_backbone

from .injection_targets import load_injection_targets
from .train_ar import ARTrainConfig, train_ar

HELP = "train an activation reconstructor (description → activation per depth; LoRA + value heads, normalized MSE)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ARTrainConfig()
    p.add_argument("--targets", type=Path, required=True, help="folder written by `injection-targets`")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--backbone", default=None, help="default: the target set's backbone")
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--head-lr", type=float, default=d.head_lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lora-r", type=int, default=d.lora_r)
    p.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    p.add_argument("--target-modules", default=d.target_modules)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-texts", type=int, default=d.eval_texts)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default=None)


def run(args: argparse.Namespace) -> int:
    ts = load_injection_targets(args.targets)
    cfg = ARTrainConfig(epochs=args.epochs, lr=args.lr, head_lr=args.head_lr, batch_size=args.batch_size, max_steps=args.max_steps,
                        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=args.target_modules,
                        max_tokens=args.max_tokens, eval_every=args.eval_every, eval_texts=args.eval_texts, seed=args.seed)
    st = train_ar(load_backbone(args.backbone or ts.meta["backbone"], device=args.device), ts, args.out, cfg, resume=args.resume)
    msg = "stopped early (rerun with --resume)" if st["stopped_early"] else "done"
    print(f"{msg}: step {st['step']}/{st['total_steps']}, best held-out centered cos {st['best']} at step {st['best_step']}, AR in {args.out / 'best'}")
    return 0
