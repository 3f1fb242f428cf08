"""``python -m eval_harness train-av-lora``: LoRA SFT of a token-injection AV; see :mod:`eval_harness.train_av_lora`."""

from __future__ import annotations

import argparse
from pathlib import Path


from nla_space.backbone import load_backbone
from nla_space.verbalizers.injection import INJECTION_RULES

from .injection_targets import load_injection_targets
from .train_av_lora import AVTrainConfig, train_av

HELP = "LoRA SFT of a token-injection AV (marker, normalize injection, depth-percent prompt, sidecar) on injection targets"


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = AVTrainConfig()
    p.add_argument("--targets", type=Path, required=True, help="folder written by `injection-targets`")
    p.add_argument("--out", type=Path, required=True, help="run folder (log.jsonl, best/, checkpoint/)")
    p.add_argument("--backbone", default=None, help="default: the target set's backbone")
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--max-steps", type=int, default=None, help="overrides --epochs")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--lora-r", type=int, default=d.lora_r)
    p.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    p.add_argument("--target-modules", default=d.target_modules, help="comma list of module names, or all-linear")
    p.add_argument("--rule", choices=INJECTION_RULES, default=d.rule,
                   help="center_normalize: inject (v − μ_ℓ) at the scale (for backbones whose activations share one direction)")
    p.add_argument("--injection-scale", type=float, default=None, help="default: the target set's suggested scale")
    p.add_argument("--marker", default=d.marker, help="preferred marker (another single-token char is used if it is not one token)")
    p.add_argument("--max-target-len", type=int, default=d.max_target_len)
    p.add_argument("--val-frac", type=float, default=d.val_frac)
    p.add_argument("--val-every", type=int, default=d.val_every)
    p.add_argument("--val-rows", type=int, default=d.val_rows)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default=None)


def run(args: argparse.Namespace) -> int:
    ts = load_injection_targets(args.targets)
    cfg = AVTrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_steps=args.max_steps, warmup_steps=args.warmup_steps,
                        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=args.target_modules,
                        rule=args.rule, injection_scale=args.injection_scale, marker=args.marker, max_target_len=args.max_target_len,
                        val_frac=args.val_frac, val_every=args.val_every, val_rows=args.val_rows, seed=args.seed)
    st = train_av(load_backbone(args.backbone or ts.meta["backbone"], device=args.device), ts, args.out, cfg, resume=args.resume)
    msg = "stopped early (rerun with --resume)" if st["stopped_early"] else "done"
    print(f"{msg}: step {st['step']}/{st['total_steps']}, best val_loss {st['best']} at step {st['best_step']}, AV in {args.out / 'best'}")
    return 0
