"""``python -m eval_harness text-corpus``: build the natural-text window corpus; see :mod:`eval_harness.data.text_corpus`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nla_space.cards import ASSETS_DIR

from .data.text_corpus import build_corpus

HELP = "build a corpus of natural text windows (fortunes, Python docs and code, Debian summaries, prompts) offline"

#: windows per source in the shipped recipe (v1)
DEFAULT_CAPS = {"fortunes": 14000, "fortunes-de": 1500, "fortunes-es": 1200, "fortunes-it": 1200, "pydoc": 2000, "code": 2500, "debian": 2500}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="corpus JSONL (a .meta.json is written beside it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--caps", default=json.dumps(DEFAULT_CAPS), help="JSON: windows per source")
    p.add_argument("--prompts", type=Path, default=ASSETS_DIR / "corpora/user_prompts_v1.jsonl")


def run(args: argparse.Namespace) -> int:
    meta = build_corpus(args.out, json.loads(args.caps), seed=args.seed, prompts_path=args.prompts)
    print(f"wrote {meta['n']} windows to {args.out}: {meta['per_source']}; splits {meta['splits']}")
    return 0
