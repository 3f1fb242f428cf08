"""Round trip through the card's reconstructor (nla-at-home's ``scripts/eval_roundtrip_phi4.py`` and
``scripts/experiments/stress_test_nla.py``), for any card kind.

Per target row and layer (card, targets, μ, seeds: :mod:`eval_harness.evals.card_targets`): the **greedy**
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

Output: one JSON with the reference's keys ``holdout_n, arms{roundtrip, input_text}{per_layer{"L{ℓ}({pct}%)"},
mean, n}`` plus ``ci95``, ``mu_pool_centered``, ``correct_vs_wrong{key: n_samples, correct, garbage,
delta, top1, centered{…}}``, ``bootstrap`` and ``meta``. ``--log-samples`` writes each target's
greedy description per layer.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch

from nla_space.errors import NLAInputError
from nla_space.leaderboard import finite
from nla_space.metrics import bootstrap_centered_cosine, bootstrap_mean, forced_choice, row_cosines

from ..settings import setting
from .base import EvalTask, Metric
from .card_targets import CardTargets, CardTargetsConfig, open_card_targets
from .common import ALL_KINDS, check_positive, target_seed

log = logging.getLogger(__name__)

TABLE = "roundtrip"


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


# ---------------------------------------------------------------------------------------------- the eval


@dataclass(kw_only=True)
class RoundtripConfig(CardTargetsConfig):
    n: int = setting(50, "number of test-split targets (default 50, the reference's double holdout)")
    bootstrap: int = setting(20_000, "bootstrap resamples B (default 20000)")
    bootstrap_seed: int | None = setting(None, "bootstrap seed (default: --seed)")
    log_samples: str | None = setting(None, "per-target greedy descriptions as JSON Lines")


class Roundtrip(EvalTask):
    """``roundtrip``: the module docstring's method and keys."""

    name = "roundtrip"
    table = TABLE
    help = "round trip: mean-centred per-layer AR cosine (bootstrap 95% CI) and correct-vs-wrong top-1 on held-out targets"
    #: any kind with an activation reconstructor (a compass-scored card is refused by :func:`check_card`)
    supported_kinds = ALL_KINDS
    Config = RoundtripConfig
    metrics = (
        Metric(TABLE, "roundtrip_cos_mean", "round-trip cosine, mean-centred (AR or re-encode)", centered=False, fve=False),
        Metric(TABLE, "correct_vs_wrong_top1", "round trip picks the right activation over a wrong one", centered=False, fve=False),
    )

    @classmethod
    def flat_values(cls, results: dict[str, Any]) -> dict[str, Any]:
        """The mean-centred round-trip cosine and the mean correct-vs-wrong top-1 (``M`` = targets)."""
        values = super().flat_values(results)
        arm = (results.get("arms") or {}).get("roundtrip") or {}
        tops = [finite(v.get("top1")) for v in (results.get("correct_vs_wrong") or {}).values() if isinstance(v, dict)]
        values.update(roundtrip_cos_mean=arm.get("mean"), M=arm.get("n") or results.get("holdout_n"),
                      correct_vs_wrong_top1=sum(tops) / len(tops) if tops and None not in tops else None)
        return values

    def open(self) -> list[int]:
        a = self.cfg
        check_positive("--n", a.n, 2)
        check_positive("--bootstrap", a.bootstrap)
        ct = self.ct = open_card_targets(a, a.n, self.supported_kinds, self.name)
        check_card(ct)
        if len(ct.targets) < 2:
            raise NLAInputError(f"the round trip needs at least 2 targets; {len(ct.targets)} selected")
        self.bseed = a.seed if a.bootstrap_seed is None else a.bootstrap_seed
        return ct.targets

    def fingerprint(self) -> dict[str, Any]:
        return self.ct.fingerprint(self.name, self.cfg, {"n": self.cfg.n})

    def process(self, target: int) -> dict[str, Any]:
        return target_record(self.ct, target, self.cfg.max_new_tokens, self.cfg.seed)

    def aggregate(self, recs: list[dict[str, Any]]) -> dict[str, Any]:
        return aggregate(self.ct, recs, self.cfg.bootstrap, self.bseed)

    def meta_fields(self, results: dict[str, Any]) -> dict[str, Any]:
        return self.ct.meta_fields(self.cfg, {
            "K": 1, "greedy": True, "bootstrap_B": self.cfg.bootstrap, "bootstrap_seed": self.bseed,
            "input_text_arm": "the reconstruction of the target's own input text (no gold descriptions in a targets folder)",
        })

    def samples(self, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"target": r["target"], "layers": {L: {"text": x["text"]} for L, x in r["layers"].items()}} for r in recs]

    def summary(self, results: dict[str, Any]) -> str:
        arm = results["arms"]["roundtrip"]
        return (f"{self.name}: {self.ct.oc.card.id} layers {self.ct.layers}, n={results['holdout_n']}: round trip {arm['mean']:.3f} "
                f"[{arm['ci95'][0]:.3f}, {arm['ci95'][1]:.3f}] (B={self.cfg.bootstrap}), input text "
                f"{results['arms']['input_text']['mean']:.3f} → {self.cfg.out}")
