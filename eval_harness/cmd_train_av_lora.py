"""``python -m eval_harness train-av-lora``: LoRA SFT of a token-injection AV; see :mod:`eval_harness.train.av_lora`."""

from __future__ import annotations

import argparse
from pathlib import Path

from nla_space.backbone import load_backbone
from nla_space.io import check_writable

from .data.injection_targets import load_injection_targets
from .train.av_lora import AVTrainConfig, train_av
from .settings import add_setting_options, settings_from_args

HELP = "LoRA SFT of a token-injection AV (marker, normalize injection, depth-percent prompt, sidecar) on injection targets"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--targets", type=Path, required=True, help="folder written by `injection-targets`")
    p.add_argument("--out", type=Path, required=True, help="run folder (log.jsonl, best/, checkpoint/)")
    p.add_argument("--backbone", default=None, help="default: the target set's backbone")
    add_setting_options(p, AVTrainConfig)  # one declaration per setting: the config dataclass
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default=None)


def run(args: argparse.Namespace) -> int:
    check_writable(args.out, "training run")  # before any work: a full or read-only disk fails now
    ts = load_injection_targets(args.targets)
    cfg = settings_from_args(AVTrainConfig, args)
    st = train_av(load_backbone(args.backbone or ts.meta["backbone"], device=args.device), ts, args.out, cfg, resume=args.resume)
    msg = "stopped early (rerun with --resume)" if st["stopped_early"] else "done"
    print(f"{msg}: step {st['step']}/{st['total_steps']}, best val_loss {st['best']} at step {st['best_step']}, AV in {args.out / 'best'}")
    return 0
