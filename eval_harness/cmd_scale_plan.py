"""``python -m eval_harness scale-plan``: GPU-hours and memory per card at its published size, from counted FLOPs; see :mod:`eval_harness.scale_plan`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nla_space.cards import find_card
from nla_space.io import atomic_write_text

from .scale_plan import H100_BF16_TFLOPS, Recipe, markdown, plan

HELP = "plan on paper: FLOPs (counted on the meta device) and memory of building targets and training each card at its published size"
SEED_CARDS = ("RiverRider/srt-nla-av-v1", "RiverRider/srt-nla-av-llama32-3b", "RiverRider/srt-nla-av-gemma2-2b-v1",
              "anicka/nla-phi4-universal-av-v2", "anicka/nla-qwen2.5-7b-L20-av-v2", "kitft/Llama-3.3-70B-NLA-L53-av")


def add_arguments(p: argparse.ArgumentParser) -> None:
    r = Recipe()
    p.add_argument("--cards", default=",".join(SEED_CARDS), help="comma list of card ids (default: the seed cards and the 70B kitft card)")
    p.add_argument("--targets", type=int, default=r.targets)
    p.add_argument("--epochs", type=int, default=r.epochs)
    p.add_argument("--seq-tokens", type=int, default=r.seq_tokens, help="tokens of one training row")
    p.add_argument("--gen-tokens", type=int, default=r.gen_tokens, help="tokens generated per target")
    p.add_argument("--batch", type=int, default=r.batch, help="rows per step (activation memory)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed share of the peak sustained (default 0.4)")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS, help="GPU peak, TFLOP/s (default H100 dense bf16)")
    p.add_argument("--out", type=Path, default=None, help="write the plan as JSON here (a .md table beside it)")


def run(args: argparse.Namespace) -> int:
    cards = [find_card(c.strip()) for c in args.cards.split(",") if c.strip()]
    res = plan(cards, Recipe(args.targets, args.epochs, args.seq_tokens, args.gen_tokens, args.batch), args.mfu, args.peak_tflops)
    table = markdown(res)
    if args.out:
        atomic_write_text(args.out, json.dumps(res, indent=2) + "\n")
        atomic_write_text(args.out.with_suffix(".md"), table)
    print(table, end="")
    return 0
