"""``roundtrip``: mean-centred per-layer AR cosine of the greedy descriptions with a bootstrap 95% CI,
and correct-vs-wrong-activation top-1 (``nla_at_home.md`` §4.3–4.4; method:
:mod:`eval_harness.roundtrip`; card, targets, μ, seeds: :mod:`eval_harness.card_targets`).

Output: one JSON with the reference's keys ``holdout_n, arms{roundtrip, input_text}{per_layer{"L{ℓ}({pct}%)"},
mean, n}`` plus ``ci95``, ``mu_pool_centered``, ``correct_vs_wrong{key: n_samples, correct, garbage,
delta, top1, centered{…}}``, ``bootstrap`` and ``meta``. ``--log-samples`` writes each target's
greedy description per layer.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from nla_space.errors import NLAInputError

from . import roundtrip as rt
from .card_targets import add_card_arguments, open_card_targets
from .evals import check_positive
from .results import Checkpoint, now_iso, run_meta, write_results

log = logging.getLogger(__name__)

HELP = "round trip: mean-centred per-layer AR cosine (bootstrap 95% CI) and correct-vs-wrong top-1 on held-out targets"
COMMAND = "roundtrip"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_card_arguments(p)
    p.add_argument("--n", type=int, default=50, help="number of test-split targets (default 50, the reference's double holdout)")
    p.add_argument("--bootstrap", type=int, default=20_000, help="bootstrap resamples B (default 20000)")
    p.add_argument("--bootstrap-seed", type=int, default=None, help="bootstrap seed (default: --seed)")
    p.add_argument("--log-samples", default=None, help="per-target greedy descriptions as JSON Lines")


def run(args: argparse.Namespace) -> int:
    started, started_iso = time.time(), now_iso()
    check_positive("--n", args.n, 2)
    check_positive("--bootstrap", args.bootstrap)
    ct = open_card_targets(args, args.n)
    rt.check_card(ct)
    if len(ct.targets) < 2:
        raise NLAInputError(f"the round trip needs at least 2 targets; {len(ct.targets)} selected")
    bseed = args.seed if args.bootstrap_seed is None else args.bootstrap_seed
    ckpt = Checkpoint(args.out, ct.fingerprint(COMMAND, args, {"n": args.n}), args.resume).open()
    recs = ckpt.run(ct.targets, lambda row: rt.target_record(ct, row, args.max_new_tokens, args.seed), desc=COMMAND)
    results = rt.aggregate(ct, recs, args.bootstrap, bseed)
    results["meta"] = run_meta(COMMAND, ct.meta_fields(args, {
        "K": 1, "greedy": True, "bootstrap_B": args.bootstrap, "bootstrap_seed": bseed,
        "input_text_arm": "the reconstruction of the target's own input text (no gold descriptions in a targets folder)",
    }), started, started_iso, args.out, args)
    samples = [{"target": r["target"], "layers": {L: {"text": x["text"]} for L, x in r["layers"].items()}} for r in recs]
    write_results(args.out, results, samples, Path(args.log_samples) if args.log_samples else None)
    ckpt.finish()
    arm = results["arms"]["roundtrip"]
    print(f"{COMMAND}: {ct.oc.card.id} layers {ct.layers}, n={results['holdout_n']}: round trip {arm['mean']:.3f} "
          f"[{arm['ci95'][0]:.3f}, {arm['ci95'][1]:.3f}] (B={args.bootstrap}), input text {results['arms']['input_text']['mean']:.3f} → {args.out}")
    return 0
