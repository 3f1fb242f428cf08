"""``bench``: best-of-K latency of the project's path vs the plain recipe, FLOP bound, start times."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HELP = "time best-of-K (project vs plain HF recipe), matmul throughput, FLOP bound, app/CLI start"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--card", default=None, help="card (default: the embedded card)")
    p.add_argument("--backbone", default=None)
    p.add_argument("--k", default="1,8,16,64", help="comma-separated K values")
    p.add_argument("--tokens", type=int, default=64, help="fixed rollout length")
    p.add_argument("--repeats", type=int, default=1, help="take the best of this many runs per K")
    p.add_argument("--device", default=None)
    p.add_argument("--start", choices=["none", "warm", "cold"], default="warm",
                   help="also time a whole CLI process: warm (cached backbone) or cold (empty cache, converts the GGUF)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON report here")


def _cli_start_seconds(card: str | None, cache: str | None = None) -> float:
    """Wall time of a whole `python -m nla_space verbalize` process answering one K=1 request."""
    env = dict(os.environ)
    if cache:
        env["NLA_SPACE_CACHE"] = cache
    cmd = [sys.executable, "-m", "nla_space", "verbalize", "--text", "warm start", "--k", "1", "--max-new-tokens", "1"]
    if card:
        cmd += ["--card", card]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> int:
    from nla_space.errors import NLAInputError
    from nla_space.io import atomic_write_json
    from nla_space.runtime import open_card

    from .bench import run_bench

    try:
        ks = [int(x) for x in str(args.k).split(",") if x.strip()]
    except ValueError:
        raise NLAInputError(f"--k must be comma-separated integers, got {args.k!r}")
    if not ks or min(ks) < 1:
        raise NLAInputError("--k values must be ≥ 1")
    opened = open_card(args.card, backbone=args.backbone, device=args.device)
    report = run_bench(opened, ks, new_tokens=args.tokens, repeats=args.repeats)
    if args.start in ("warm", "cold"):
        report.warm_start_s = round(_cli_start_seconds(args.card), 2)
    if args.start == "cold":
        with tempfile.TemporaryDirectory() as tmp:
            report.cold_start_s = round(_cli_start_seconds(args.card, tmp), 2)
    data = report.to_dict()
    if args.out:
        atomic_write_json(args.out, data)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"card {report.card} on {report.device}, {report.threads} threads, matmul {report.matmul_gflops:.0f} GFLOP/s")
    print(f"{'K':>4} {'project s':>10} {'plain s':>9} {'speedup':>8} {'cand/s':>7} {'bound s':>8} {'of bound':>9}")
    for r in report.rows:
        print(f"{r.k:>4} {r.project_s:>10.2f} {r.plain_s:>9.2f} {r.speedup:>7.2f}x {r.k / r.project_s:>7.2f} "
              f"{r.flop_bound_s:>8.2f} {r.fraction_of_bound:>8.0%}")
    if report.warm_start_s is not None:
        print(f"warm CLI start-to-answer: {report.warm_start_s:.2f} s")
    if report.cold_start_s is not None:
        print(f"cold CLI start-to-answer (GGUF conversion): {report.cold_start_s:.2f} s")
    return 0
