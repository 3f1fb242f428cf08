"""``policy-eval``: confident-right / confident-wrong / hedged rates by 1-in-n retrieval, genericness,
greedy vs the best-of-K + τ policy, swept over τ and λ (``nla_at_home.md`` §4.1; method:
:mod:`eval_harness.policy_eval`; card, targets, μ, seeds: :mod:`eval_harness.card_targets`).

Output: one JSON with the reference's keys ``layers, n_samples, taus, config, per_layer{L: n,
greedy_confident_right, greedy_confident_wrong, greedy_genericness, penalty_sweeps{λ: rows},
tau_sweep}`` (each row ``{tau, confident_right, confident_wrong, hedged, specific_genericness}``),
plus ``retrieval``/``n_retrieval``, ``other_retrieval`` (the same table under the other retrieval
rule) and ``meta``. ``--log-samples`` writes each target's candidate texts and flags.
"""

from __future__ import annotations

import argparse
import logging
import math
import time

from nla_space.errors import NLAInputError

from . import policy_eval as pe
from .card_targets import add_card_arguments, open_card_targets
from .evals import check_positive
from .results import Checkpoint, now_iso, run_meta, write_results

log = logging.getLogger(__name__)

HELP = "confident-right / confident-wrong / hedged rates (1-in-n retrieval) of greedy vs the τ/λ policy on held-out targets"
COMMAND = "policy-eval"


def _floats(name: str, xs: list[float], lo: float, hi: float) -> list[float]:
    if not xs or any(not math.isfinite(x) or not lo <= x <= hi for x in xs):
        raise NLAInputError(f"{name} values must be numbers in [{lo}, {hi}], got {xs}")
    return [float(x) for x in xs]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_card_arguments(p)
    p.add_argument("--n", type=int, default=50, help="1-in-n retrieval: the target plus n−1 test-split distractors (default 50)")
    p.add_argument("--k", type=int, default=12, help="sampled candidates per target (default 12, the reference's)")
    p.add_argument("--tau-grid", type=float, nargs="+", default=list(pe.DEFAULT_TAUS), help="τ values (cosine scale of f)")
    p.add_argument("--lambda-grid", type=float, nargs="+", default=list(pe.DEFAULT_LAMBDAS), help="generic-centroid penalties λ")
    p.add_argument("--temperature", type=float, default=0.9, help="sampling temperature (default 0.9, the reference's)")
    p.add_argument("--retrieval", choices=pe.RETRIEVALS, default="activation",
                   help="what 'right' means in per_layer: the description retrieves its own activation (default) or its input text")
    p.add_argument("--compass", default=None, help="score with this compass file (compass.safetensors or a reference .pt) instead of the card's scorer")
    p.add_argument("--compass-block-offset", type=int, default=1, help="compass keys are blocks ℓ − offset (default 1, the reference's)")
    p.add_argument("--log-samples", default=None, help="per-target candidates as JSON Lines")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nla_space.compass import Compass, MiniLM

    started, started_iso = time.time(), now_iso()
    check_positive("--n", args.n, 2)
    check_positive("--k", args.k)
    if not math.isfinite(args.temperature) or not 0 <= args.temperature <= 5:
        raise NLAInputError(f"--temperature must be in [0, 5], got {args.temperature}")
    s = pe.Settings(n=args.n, K=args.k, taus=_floats("--tau-grid", args.tau_grid, -1.0, 1.0),
                    lambdas=_floats("--lambda-grid", args.lambda_grid, -10.0, 10.0), temperature=float(args.temperature),
                    max_new_tokens=args.max_new_tokens, seed=args.seed, retrieval=args.retrieval)
    ct = open_card_targets(args, None)
    compass = pe.CompassOverride(Compass.load(Path(args.compass)), args.compass_block_offset) if args.compass else None
    if compass is not None:
        missing = [L for L in ct.layers if L - compass.block_offset not in compass.compass.maps]
        if missing:
            raise NLAInputError(f"the compass has no map for layer(s) {missing} (keys {compass.compass.layers}, offset {compass.block_offset})")
    embed = MiniLM()
    keys = pe.TextKeys(ct, embed)
    n_test = len(ct.ts.indices("test"))
    if n_test < s.n:
        log.warning("1-in-%d retrieval asked, the test split has %d rows: pools are 1-in-%d", s.n, n_test, n_test)
    scorer = f"compass {args.compass}" if compass else ct.oc.scorer_name
    fp = ct.fingerprint(COMMAND, args, {"n": s.n, "K": s.K, "temperature": s.temperature, "scorer": scorer})
    ckpt = Checkpoint(args.out, fp, args.resume).open()
    recs = ckpt.run(ct.targets, lambda row: pe.target_record(ct, row, s, embed, keys, compass), desc=COMMAND)
    other = [r for r in pe.RETRIEVALS if r != s.retrieval][0]
    results = {
        "layers": ct.layers,
        "n_samples": s.K,
        "taus": s.taus,
        "lambdas": s.lambdas,
        "retrieval": s.retrieval,
        "n_retrieval": min(s.n, n_test),
        "config": {"card": ct.oc.card.id, "n": s.n, "k": s.K, "temperature": s.temperature, "top_p": ct.oc.top_p,
                   "max_new_tokens": s.max_new_tokens, "seed": s.seed, "scorer": scorer, "faith_model": "sentence-transformers/all-MiniLM-L6-v2"},
        "per_layer": pe.aggregate(ct, recs, s, s.retrieval),
        "other_retrieval": {"retrieval": other, "per_layer": pe.aggregate(ct, recs, s, other)},
    }
    results["meta"] = run_meta(COMMAND, ct.meta_fields(args, {
        "K": s.K, "n_retrieval": results["n_retrieval"], "temperature": s.temperature, "scorer": scorer,
        "tau_scale": "cosine of f (compass: e·t*; activation scorers: μ-centered cosine); a card τ on the fve_nrm scale is 2τ−1 here",
        "centroid": "l2norm(mean of the unit MiniLM embeddings of every sampled candidate of this run), as the reference",
    }), started, started_iso, args.out, args)
    samples = [{"target": r["target"], "pool": r["pool"],
                "layers": {L: {k: v for k, v in x.items() if k != "e"} for L, x in r["layers"].items()}} for r in recs]
    write_results(args.out, results, samples, Path(args.log_samples) if args.log_samples else None)
    ckpt.finish()
    for L in ct.layers:
        pl = results["per_layer"][str(L)]
        row = pl["tau_sweep"][len(s.taus) // 2]
        print(f"{COMMAND}: {ct.oc.card.id} L{L}, {pl['n']} targets, 1-in-{results['n_retrieval']} ({s.retrieval}): greedy right "
              f"{pl['greedy_confident_right']:.3f}; policy (λ={s.lambdas[0]}, τ={row['tau']}) right {row['confident_right']:.3f}, "
              f"wrong {row['confident_wrong']:.3f}, hedged {row['hedged']:.3f} → {args.out}")
    return 0
