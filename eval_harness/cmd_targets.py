"""``python -m eval_harness targets``: build a (resumable) targets dataset; see :mod:`eval_harness.data.targets`."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from nla_space.backbone import shared_backbone
from nla_space.io import check_writable

from .distributed import rank_device
from .data.targets import HealthThresholds, TargetsSpec, build_targets

HELP = "sample (or read from a corpus) texts and store their layer-L activations as a targets dataset"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", required=True, help="hub id, local folder, or embedded:NAME")
    p.add_argument("--layer", type=int, required=True, help="hidden_states index (0 = embeddings)")
    p.add_argument("--n", type=int, required=True, help="number of sequences")
    p.add_argument("--seq-len", type=int, default=64, help="new tokens per sample / corpus window length (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=64, help="sequences per shard (default 64)")
    p.add_argument("--corpus", type=Path, default=None, help="JSONL with {'text': ...} rows instead of self-sampling")
    p.add_argument("--min-chars", type=int, default=40, help="corpus rows shorter than this are skipped")
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--n-mu-pool", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--device", default=None)
    h = HealthThresholds()
    p.add_argument("--min-dim-std", type=float, default=h.min_dim_std)
    p.add_argument("--min-norm-std", type=float, default=h.min_norm_std)
    p.add_argument("--min-distinct-2", type=float, default=h.min_distinct_2)
    p.add_argument("--max-duplicate-rows", type=float, default=h.max_duplicate_rows)


def run(args: argparse.Namespace) -> int:
    check_writable(args.out, "targets folder")  # before any work: a full or read-only disk fails now
    torch.manual_seed(args.seed)
    backbone = shared_backbone(args.backbone, device=rank_device(args.device))
    spec = TargetsSpec(
        backbone=args.backbone,
        layer=args.layer,
        n=args.n,
        seq_len=args.seq_len,
        seed=args.seed,
        batch_size=args.batch_size,
        corpus=str(args.corpus) if args.corpus else None,
        min_chars=args.min_chars,
        n_val=args.n_val,
        n_test=args.n_test,
        n_mu_pool=args.n_mu_pool,
        health=HealthThresholds(args.min_dim_std, args.min_norm_std, args.min_distinct_2, args.max_duplicate_rows),
    )
    ts = build_targets(backbone, spec, args.out, resume=args.resume)
    if ts is None:  # a rank other than 0 of a multi-process run: rank 0 wrote the set
        return 0
    print(f"wrote {len(ts)} targets to {args.out}: {ts.meta['split_counts']}")
    return 0
