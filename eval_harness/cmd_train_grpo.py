"""``python -m eval_harness train-grpo``: contrastive GRPO of an injection AV with a KL term; see :mod:`eval_harness.train.grpo`."""

from __future__ import annotations

import argparse
from pathlib import Path

from nla_space.backbone import load_backbone
from nla_space.io import check_writable

from .data.injection_targets import load_injection_targets
from .settings import settings_from_args
from .train.cli import add_run_options, summary
from .train.grpo import GRPOConfig, train_grpo
from .distributed import rank_device

HELP = "GRPO of an SFT injection AV: contrastive reward (AR or re-encode), KL to the SFT policy, reward-hacking watch"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_options(p, GRPOConfig, targets_help="folder written by `injection-targets` (uses its rl / heldout splits)", inputs=(
        ("--sft", dict(type=Path, required=True, help="the SFT AV folder (train-av-lora's best/)")),
        ("--ar", dict(type=Path, default=None, help="train-ar's best/ (needed with --scorer ar)")),
    ))


def run(args: argparse.Namespace) -> int:
    check_writable(args.out, "training run")  # before any work: a full or read-only disk fails now
    ts = load_injection_targets(args.targets)
    cfg = settings_from_args(GRPOConfig, args)
    # a private copy: the trainable adapter is attached to this model in place
    backbone = load_backbone(args.backbone or ts.meta["backbone"], device=rank_device(args.device))
    st = train_grpo(backbone, ts, args.sft, args.out, cfg, ar_folder=args.ar, resume=args.resume)
    print(summary(st, "eval_reward", args.out, stopped="stopped: held-out top-1 collapsed" if st["collapsed"] else None))
    return 0
