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

#: the card bench opens when none is named: the embedded prefix AV
PREFIX_DEFAULT = "smollm2-135m-prefix"
#: prefix cards only: bench times the soft prefix against the plain HF recipe (``--random-weights`` uses only
#: a card's backbone shape, so there any kind's card may name it)
SUPPORTED_KINDS = ("prefix",)

HELP = ("time best-of-K (project vs plain HF recipe), matmul throughput and copy bandwidth, FLOP and memory bounds, "
        "targets and centered-eval rates, app/CLI start")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--card", default=None, help="a prefix card (default: smollm2-135m-prefix, the embedded prefix AV); "
                   "the bench times prefix rollouts against the plain HF recipe")
    p.add_argument("--backbone", default=None)
    p.add_argument("--k", default="1,8,16,64", help="comma-separated K values")
    p.add_argument("--tokens", type=int, default=64, help="fixed rollout length")
    p.add_argument("--repeats", type=int, default=1, help="take the best of this many runs per K")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, metavar="{float32,bfloat16}",
                   help="the project path's backbone dtype (default: $NLA_CPU_DTYPE on CPU, else float32 on CPU and the "
                        "card's on CUDA); bfloat16 also reports bf16_fidelity against float32")
    p.add_argument("--plain-dtype", default=None, metavar="{float32,bfloat16}",
                   help="the plain recipe's dtype (default: float32 on CPU, the reference recipe's; the card's on CUDA); "
                        "bfloat16 gives a like-for-like comparison with --dtype bfloat16")
    p.add_argument("--start", choices=["none", "warm", "cold"], default="warm",
                   help="also time a whole CLI process: warm (cached backbone) or cold (empty cache, converts the GGUF)")
    p.add_argument("--random-weights", action="store_true",
                   help="time the card's backbone shape (backbone.shape in its card file) with random weights: real "
                        "sizes without a download; no start times, no fidelity block")
    p.add_argument("--layers", type=int, default=None,
                   help="with --random-weights: keep only this many blocks (a smoke run on a small machine)")
    p.add_argument("--no-pipelines", action="store_true",
                   help="skip the targets sequences/s and centered-eval targets/s measurements")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON report here")


def _cli_start_seconds(card: str | None, cache: str | None = None, dtype: str | None = None) -> float:
    """Wall time of a whole `python -m nla_space verbalize` process answering one K=1 request (in ``dtype``)."""
    env = dict(os.environ)
    if cache:
        env["NLA_SPACE_CACHE"] = cache
    cmd = [sys.executable, "-m", "nla_space", "verbalize", "--text", "warm start", "--k", "1", "--max-new-tokens", "1"]
    if card:
        cmd += ["--card", card]
    if dtype:
        cmd += ["--dtype", dtype]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> int:
    from nla_space.backbone import CPU_DTYPES, requested_dtype, resolve_dtype
    from nla_space.errors import NLAInputError
    from nla_space.io import atomic_write_json
    from nla_space.runtime import open_card

    import torch

    from .bench import run_bench
    from .evals.common import require_card_kind
    try:
        ks = [int(x) for x in str(args.k).split(",") if x.strip()]
    except ValueError:
        raise NLAInputError(f"--k must be comma-separated integers, got {args.k!r}")
    if not ks or min(ks) < 1:
        raise NLAInputError("--k values must be ≥ 1")
    for flag, value in (("--dtype", args.dtype), ("--plain-dtype", args.plain_dtype)):
        if value is not None and value not in CPU_DTYPES:
            raise NLAInputError(f"{flag} must be {' or '.join(CPU_DTYPES)}, got {value!r}")
    if args.layers is not None and not args.random_weights:
        raise NLAInputError("--layers applies to --random-weights only")
    if not args.random_weights:  # before anything is opened: another kind is refused here
        require_card_kind(args.card or PREFIX_DEFAULT, SUPPORTED_KINDS, "bench")
    dtype = requested_dtype(args.dtype, args.device)
    vector = None
    if args.random_weights:
        from .random_backbone import random_weights_card

        if args.card is None:
            raise NLAInputError("--random-weights needs --card (one whose card file has backbone.shape)")
        opened = random_weights_card(args.card, device=args.device, dtype=dtype, layers=args.layers)
        vector = torch.randn(opened.backbone.hidden_size, generator=torch.Generator().manual_seed(0))
        args.start = "none"  # there is no CLI process to start for a random-weight model
    else:
        opened = open_card(args.card or PREFIX_DEFAULT, backbone=args.backbone, device=args.device, dtype=dtype)
    dev = opened.backbone.device
    # The plain recipe's dtype: as asked, else float32 on CPU / the card's on CUDA (what it would load).
    plain_dtype = resolve_dtype(args.plain_dtype, dev, opened.card.backbone.dtype)
    plain = opened.with_dtype(plain_dtype)
    reference = opened.with_dtype("float32") if dtype == "bfloat16" and not args.random_weights else None
    report = run_bench(opened, ks, new_tokens=args.tokens, repeats=args.repeats, plain=plain, fidelity_reference=reference,
                       vector=vector, pipelines=not (args.no_pipelines or args.random_weights))
    if args.random_weights:
        report.extra["random_weights"] = {"shape_of": opened.card.backbone_id, "layers": opened.backbone.num_layers,
                                          "source": (opened.card.backbone.shape or {}).get("source")}
    if args.start in ("warm", "cold"):
        report.warm_start_s = round(_cli_start_seconds(args.card or PREFIX_DEFAULT, dtype=dtype), 2)
    if args.start == "cold":
        with tempfile.TemporaryDirectory() as tmp:
            report.cold_start_s = round(_cli_start_seconds(args.card or PREFIX_DEFAULT, tmp, dtype), 2)
    data = report.to_dict()
    if args.out:
        atomic_write_json(args.out, data)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    tput = ", ".join(f"{name} {g:.0f}" for name, g in report.matmul_gflops_by_dtype.items())
    print(f"card {report.card} on {report.device}, {report.threads} threads, matmul GFLOP/s: {tput}")
    print(f"project path in {report.project_dtype}, plain recipe in {report.plain_dtype} "
          "(each FLOP bound at its own dtype's matmul throughput)")
    if "random_weights" in report.extra:
        rw = report.extra["random_weights"]
        print(f"random weights in the shape of {rw['shape_of']} ({rw['layers']} blocks; shape from {rw['source']})")
    print(f"memory copy bandwidth: {report.memory_gbps:.0f} GB/s")
    print(f"{'K':>4} {'project s':>10} {'plain s':>9} {'speedup':>8} {'cand/s':>7} {'FLOP bound s':>13} {'of bound':>9} "
          f"{'plain of bound':>15} {'memory bound s':>15} {'x memory bound':>15}")
    for r in report.rows:
        plain_frac = r.plain_fraction_of_bound
        print(f"{r.k:>4} {r.project_s:>10.2f} {r.plain_s:>9.2f} {r.speedup:>7.2f}x {r.k / r.project_s:>7.2f} "
              f"{r.flop_bound_s:>13.2f} {r.fraction_of_bound:>8.0%} {'-' if plain_frac is None else f'{plain_frac:.0%}':>15} "
              f"{r.memory_bound_s:>15.2f} {r.memory_bound_ratio:>14.1f}x")
    fid = report.bf16_fidelity
    if fid is not None:
        print(f"{fid['dtype']} fidelity vs {fid['reference_dtype']} (K={fid['k']}, seed {fid['seed']}, {fid['score']} score): "
              f"mean |Δscore| {fid['mean_abs_delta_score']:.4f} (max {fid['max_abs_delta_score']:.4f}) on the same candidates; "
              f"same pick: {'yes' if fid['same_best_pick'] else 'no'}; same best text as a {fid['reference_dtype']} run: "
              f"{'yes' if fid['same_best_text_as_reference_run'] else 'no'} ({fid['identical_candidates']}/{fid['k']} identical candidates); "
              f"pick scored in {fid['reference_dtype']} {fid['best_score_in_reference']:.4f} vs its own best {fid['reference_run_best_score']:.4f}")
    if report.pipelines is not None:
        pl = report.pipelines
        print(f"targets: {pl['targets_sequences_per_s']:.2f} sequences/s ({pl['targets_tokens']} tokens); "
              f"centered-eval: {pl['centered_eval_targets_per_s']:.3f} targets/s (K={pl['centered_eval_K']})")
    if report.warm_start_s is not None:
        print(f"warm CLI start-to-answer: {report.warm_start_s:.2f} s")
    if report.cold_start_s is not None:
        print(f"cold CLI start-to-answer (GGUF conversion): {report.cold_start_s:.2f} s")
    return 0
