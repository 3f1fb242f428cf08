"""``python -m eval_harness injection-targets``: activations at several depths + greedy-reply
descriptions for injection AV/AR training; see :mod:`eval_harness.data.injection_targets`."""

from __future__ import annotations

import argparse
from pathlib import Path


from nla_space.backbone import shared_backbone

from .data.injection_targets import DEFAULT_FRACTIONS, InjectionTargetsSpec, build_injection_targets, template_card, trained_bands
from .distributed import rank_device

HELP = "extract multi-depth activations and greedy-reply descriptions of texts (injection AV/AR training data)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = InjectionTargetsSpec(backbone="", texts_file="")
    p.add_argument("--backbone", required=True, help="hub id, local folder, or embedded:NAME")
    p.add_argument("--texts", type=Path, required=True, help="JSONL with {'text'[, 'id']} rows")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--bands", default=",".join(map(str, trained_bands())),
                   help=f"depth bands in percent (default: the trained bands of the template card {template_card().id})")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="length of the greedy-reply description")
    p.add_argument("--min-chars", type=int, default=d.min_chars)
    p.add_argument("--max-texts", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="texts per shard")
    p.add_argument("--seed", type=int, default=d.seed, help="split seed")
    p.add_argument("--fractions", default=",".join(f"{k}={v}" for k, v in DEFAULT_FRACTIONS.items()),
                   help="split fractions by text, e.g. av_sft=0.3,ar_sft=0.3,rl=0.3,heldout=0.1")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--device", default=None)


def run(args: argparse.Namespace) -> int:
    fractions = {k: float(v) for k, v in (kv.split("=") for kv in args.fractions.split(","))}
    spec = InjectionTargetsSpec(backbone=args.backbone, texts_file=str(args.texts), bands=[int(b) for b in args.bands.split(",")],
                                max_new_tokens=args.max_new_tokens, min_chars=args.min_chars, max_texts=args.max_texts,
                                batch_size=args.batch_size, seed=args.seed, fractions=fractions)
    ts = build_injection_targets(shared_backbone(args.backbone, device=rank_device(args.device)), spec, args.out, resume=args.resume)
    if ts is None:  # a rank other than 0 of a multi-process run: rank 0 wrote the set
        return 0
    print(f"wrote {len(ts)} texts × layers {ts.layers} to {args.out}: {ts.meta['split_counts']}")
    return 0
