"""``python -m eval_harness train-patch``: train a patch AV on a text corpus; see :mod:`eval_harness.train.patch`."""

from __future__ import annotations

import argparse
from pathlib import Path

from nla_space.backbone import load_backbone
from nla_space.io import check_writable

from .settings import add_setting_options, settings_from_args
from .train.patch import PatchTrainConfig, train_patch
from .distributed import rank_device

HELP = "train a patch AV (v written at its own layer, LoRA above it) with token CE on a text corpus"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", required=True, help="hub id, local folder, or embedded:NAME")
    p.add_argument("--corpus", type=Path, required=True, help="JSONL from `text-corpus` (rows with text and split)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--device", default=None)
    add_setting_options(p, PatchTrainConfig, default_help=True)  # one declaration per setting: the config dataclass


def run(args: argparse.Namespace) -> int:
    check_writable(args.out, "run folder")
    cfg = settings_from_args(PatchTrainConfig, args)
    backbone = load_backbone(args.backbone, device=rank_device(args.device))  # private: the LoRA is attached in place
    state = train_patch(backbone, args.corpus, args.out, cfg, resume=args.resume)
    print(f"stopped at step {state['step']} of {state['total_steps']}; best val_ce {state['best']} at step {state['best_step']}")
    return 0
