"""Round trip through the card's reconstructor (``nla_at_home.md`` §4.3–4.4), for any card kind.

Per target row and layer (card, targets, μ, seeds: :mod:`eval_harness.card_targets`): the **greedy**
description (``rollout`` + ``candidate_texts``), its reconstruction ``P_i`` (``reconstruct``: the
card's AR, or the backbone self-re-encode for a prefix card) and, as a second arm, the
reconstruction of the target's own input text (``reconstruct_texts``; the reference's second arm is
the AR on *gold* descriptions, which a targets folder does not have, so this arm is named
``input_text``, not ``gt_ceiling``). ``T_i`` is the target activation.

Aggregation (:mod:`nla_space.metrics`):

* ``arms.{roundtrip,input_text}.per_layer["L{ℓ}({pct}%)"]``: the reference's mean-centred per-layer
  cosine (P and T centred by their own means over the evaluated rows); ``mean`` over layers; ``ci95``:
  the paired percentile bootstrap over target rows (B resamples, seeded; the same resamples for both
  arms and every layer);
* ``arms.*.mu_pool_centered``: the project's convention instead (both sides minus μ of the
  ``mu_pool`` split), with its bootstrap CI;
* ``correct_vs_wrong``: per layer, the reference's forced choice against the next row's activation
  (raw cosines, as the reference) and the same with μ-centred cosines.

A compass-scored card has no activation reconstructor (its scorer returns sentence embeddings): refused.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import torch

from nla_space.errors import NLAInputError
from nla_space.metrics import bootstrap_centered_cosine, bootstrap_mean, forced_choice, row_cosines

from .card_targets import CardTargets
from .evals import target_seed

log = logging.getLogger(__name__)


def check_card(ct: CardTargets) -> None:
    if ct.oc.scorer_space != "activation":
        raise NLAInputError(f"card {ct.oc.card.id}: its scorer ({ct.oc.scorer_name}) is not an activation reconstructor; "
                            "the round trip needs one")


def target_record(ct: CardTargets, row: int, max_new_tokens: int, seed: int) -> dict[str, Any]:
    """The greedy description of one target at every layer, its reconstruction and the input text's."""
    oc = ct.oc
    out: dict[str, Any] = {"target": row, "layers": {}}
    for L in ct.layers:
        v = ct.activation(row, L)
        g = oc.rollout(v, 1, 1.0, max_new_tokens, True, target_seed(seed, row), L)
        out["layers"][str(L)] = {
            "text": oc.candidate_texts(g)[0],
            "P": [float(x) for x in oc.reconstruct(g, L)[0]],
            "P_input": [float(x) for x in oc.reconstruct_texts([ct.ts.texts[row]], L)[0]],
        }
    return out


def _arm(ct: CardTargets, Ps: list[torch.Tensor], Ts: list[torch.Tensor], B: int, seed: int) -> dict[str, Any]:
    keys = [ct.depth_key(L) for L in ct.layers]
    bs = bootstrap_centered_cosine(Ps, Ts, B=B, seed=seed)
    mus = [ct.mu(L).double() for L in ct.layers]
    bm = bootstrap_mean([row_cosines(P - mu, T - mu) for P, T, mu in zip(Ps, Ts, mus)], B=B, seed=seed)
    return {
        "per_layer": dict(zip(keys, bs.per_layer)), "mean": bs.mean, "n": bs.n, "ci95": list(bs.ci95),
        "mu_pool_centered": {"per_layer": dict(zip(keys, bm.per_layer)), "mean": bm.mean, "ci95": list(bm.ci95)},
    }


def aggregate(ct: CardTargets, recs: list[dict[str, Any]], B: int, seed: int) -> dict[str, Any]:
    rows = [r["target"] for r in recs]
    Ts = [torch.stack([ct.oc.score_target(ct.activation(r, L), L) for r in rows]).double() for L in ct.layers]
    P = [torch.tensor([r["layers"][str(L)]["P"] for r in recs], dtype=torch.float64) for L in ct.layers]
    Pin = [torch.tensor([r["layers"][str(L)]["P_input"] for r in recs], dtype=torch.float64) for L in ct.layers]
    cvw = {}
    for L, P_L, T_L in zip(ct.layers, P, Ts):
        mu = ct.mu(L).double()
        cvw[ct.depth_key(L)] = {**asdict(forced_choice(P_L, T_L)), "centered": asdict(forced_choice(P_L - mu, T_L - mu))}
    return {
        "holdout_n": len(recs),
        "layers": ct.layers,
        "arms": {"roundtrip": _arm(ct, P, Ts, B, seed), "input_text": _arm(ct, Pin, Ts, B, seed)},
        "correct_vs_wrong": cvw,
        "bootstrap": {"B": B, "seed": seed, "level": 0.95, "method": "percentile, paired over target rows, centring recomputed per resample"},
    }
