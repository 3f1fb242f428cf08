"""``python -m eval_harness train-grpo``: contrastive GRPO of an injection AV with a KL term; see :mod:`eval_harness.train_grpo`."""

from __future__ import annotations

import argparse
from pathlib import Path


from nla_space.backbone import load_backbone

from .injection_targets import load_injection_targets
from .train_grpo import GRPOConfig, train_grpo

HELP = "GRPO of an SFT injection AV: contrastive reward (AR or re-encode), KL to the SFT policy, reward-hacking watch"


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = GRPOConfig()
    p.add_argument("--targets", type=Path, required=True, help="folder written by `injection-targets` (uses its rl / heldout splits)")
    p.add_argument("--sft", type=Path, required=True, help="the SFT AV folder (train-av-lora's best/)")
    p.add_argument("--ar", type=Path, default=None, help="train-ar's best/ (needed with --scorer ar)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--backbone", default=None, help="default: the target set's backbone")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch, help="activations per step")
    p.add_argument("--group-size", type=int, default=d.group_size, help="samples per activation")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--kl-coef", type=float, default=d.kl_coef)
    p.add_argument("--ref", choices=("sft", "base"), default=d.ref, help="KL reference: frozen SFT adapter, or adapter disabled")
    p.add_argument("--scorer", choices=("ar", "reencode"), default=d.scorer)
    p.add_argument("--no-centered", action="store_true", help="raw cosines in the reward (default: μ-centered)")
    p.add_argument("--fail-reward", type=float, default=d.fail_reward, help="reward of an unclosed or empty sample")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-items", type=int, default=d.eval_items)
    p.add_argument("--collapse-top1", type=float, default=d.collapse_top1, help="warn below this held-out contrastive top-1 (chance 0.5)")
    p.add_argument("--stop-on-collapse", action="store_true", help="stop when held-out top-1 falls below --collapse-top1")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default=None)


def run(args: argparse.Namespace) -> int:
    ts = load_injection_targets(args.targets)
    cfg = GRPOConfig(steps=args.steps, batch=args.batch, group_size=args.group_size, temperature=args.temperature, top_p=args.top_p,
                     max_new_tokens=args.max_new_tokens, lr=args.lr, kl_coef=args.kl_coef, ref=args.ref, scorer=args.scorer,
                     centered=not args.no_centered, fail_reward=args.fail_reward, eval_every=args.eval_every, eval_items=args.eval_items,
                     collapse_top1=args.collapse_top1, stop_on_collapse=args.stop_on_collapse, seed=args.seed)
    # a private copy: the trainable adapter is attached to this model in place
    backbone = load_backbone(args.backbone or ts.meta["backbone"], device=args.device)
    st = train_grpo(backbone, ts, args.sft, args.out, cfg, ar_folder=args.ar, resume=args.resume)
    msg = "stopped: held-out top-1 collapsed" if st["collapsed"] else ("stopped early (rerun with --resume)" if st["stopped_early"] else "done")
    print(f"{msg}: step {st['step']}/{st['total_steps']}, best eval_reward {st['best']} at step {st['best_step']}, AV in {args.out / 'best'}")
    return 0
