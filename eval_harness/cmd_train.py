"""``python -m eval_harness train``: SFT of a prefix AV on a targets folder; see :mod:`eval_harness.train.prefix`."""

from __future__ import annotations

import argparse
from pathlib import Path


from nla_space.backbone import shared_backbone
from nla_space.io import check_writable

from .data.dataset import load_target_set
from .train.prefix import TrainConfig, train
from .settings import add_setting_options, settings_from_args
from .distributed import rank_device

HELP = "train a prefix activation verbalizer (token CE under teacher forcing) on a targets folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--targets", type=Path, required=True, help="folder written by `targets`")
    p.add_argument("--out", type=Path, required=True, help="run folder (log.jsonl, best/, checkpoint/)")
    p.add_argument("--backbone", default=None, help="default: the target set's backbone")
    p.add_argument("--layer", type=int, default=None, help="default: the target set's layer (must match it)")
    add_setting_options(p, TrainConfig)  # one declaration per setting: the config dataclass
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--device", default=None)


def run(args: argparse.Namespace) -> int:
    check_writable(args.out, "training run")  # before any work: a full or read-only disk fails now
    ts = load_target_set(args.targets)
    backbone = shared_backbone(args.backbone or ts.meta["backbone"], device=rank_device(args.device))
    cfg = settings_from_args(TrainConfig, args)
    state = train(backbone, ts, args.out, cfg, layer=args.layer, resume=args.resume)
    msg = "stopped early (checkpoint saved; rerun with --resume)" if state["stopped_early"] else "done"
    print(f"{msg}: step {state['step']}/{state['total_steps']}, best {state['best']} at step {state['best_step']}, best AV in {args.out / 'best'}")
    return 0
