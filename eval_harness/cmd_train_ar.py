"""``python -m eval_harness train-ar``: LoRA + per-depth heads activation reconstructor; see :mod:`eval_harness.train.ar`."""

from __future__ import annotations

import argparse

from nla_space.backbone import load_backbone
from nla_space.io import check_writable

from .data.injection_targets import load_injection_targets
from .train.ar import ARTrainConfig, train_ar
from .settings import settings_from_args
from .train.cli import add_run_options, summary
from .distributed import rank_device

HELP = "train an activation reconstructor (description → activation per depth; LoRA + value heads, normalized MSE)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_options(p, ARTrainConfig)


def run(args: argparse.Namespace) -> int:
    check_writable(args.out, "training run")  # before any work: a full or read-only disk fails now
    ts = load_injection_targets(args.targets)
    cfg = settings_from_args(ARTrainConfig, args)
    st = train_ar(load_backbone(args.backbone or ts.meta["backbone"], device=rank_device(args.device)), ts, args.out, cfg, resume=args.resume)
    print(summary(st, "held-out centered cos", args.out))
    return 0
