"""``python -m eval_harness train-av-lora``: LoRA SFT of a token-injection AV; see :mod:`eval_harness.train.av_lora`."""

from __future__ import annotations

import argparse

from nla_space.backbone import load_backbone
from nla_space.io import check_writable

from .data.injection_targets import load_injection_targets
from .train.av_lora import AVTrainConfig, train_av
from .settings import settings_from_args
from .train.cli import add_run_options, summary
from .distributed import rank_device

HELP = "LoRA SFT of a token-injection AV (marker, normalize injection, depth-percent prompt, sidecar) on injection targets"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_options(p, AVTrainConfig)


def run(args: argparse.Namespace) -> int:
    check_writable(args.out, "training run")  # before any work: a full or read-only disk fails now
    ts = load_injection_targets(args.targets)
    cfg = settings_from_args(AVTrainConfig, args)
    st = train_av(load_backbone(args.backbone or ts.meta["backbone"], device=rank_device(args.device)), ts, args.out, cfg, resume=args.resume)
    print(summary(st, "val_loss", args.out))
    return 0
