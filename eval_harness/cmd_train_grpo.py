"""``python -m eval_harness train-grpo``: contrastive GRPO of an injection AV with a KL term; see :mod:`eval_harness.train.grpo`."""

from __future__ import annotations

import argparse
from pathlib import Path

from nla_space.backbone import load_backbone
from nla_space.io import check_writable

from .data.injection_targets import load_injection_targets
from .settings import add_setting_options, settings_from_args
from .train.grpo import GRPOConfig, train_grpo

HELP = "GRPO of an SFT injection AV: contrastive reward (AR or re-encode), KL to the SFT policy, reward-hacking watch"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--targets", type=Path, required=True, help="folder written by `injection-targets` (uses its rl / heldout splits)")
    p.add_argument("--sft", type=Path, required=True, help="the SFT AV folder (train-av-lora's best/)")
    p.add_argument("--ar", type=Path, default=None, help="train-ar's best/ (needed with --scorer ar)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--backbone", default=None, help="default: the target set's backbone")
    add_setting_options(p, GRPOConfig)  # one declaration per setting: the config dataclass
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default=None)


def run(args: argparse.Namespace) -> int:
    check_writable(args.out, "training run")  # before any work: a full or read-only disk fails now
    ts = load_injection_targets(args.targets)
    cfg = settings_from_args(GRPOConfig, args)
    # a private copy: the trainable adapter is attached to this model in place
    backbone = load_backbone(args.backbone or ts.meta["backbone"], device=args.device)
    st = train_grpo(backbone, ts, args.sft, args.out, cfg, ar_folder=args.ar, resume=args.resume)
    msg = "stopped: held-out top-1 collapsed" if st["collapsed"] else ("stopped early (rerun with --resume)" if st["stopped_early"] else "done")
    print(f"{msg}: step {st['step']}/{st['total_steps']}, best eval_reward {st['best']} at step {st['best_step']}, AV in {args.out / 'best'}")
    return 0
