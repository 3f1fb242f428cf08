"""Confident-right / confident-wrong / hedged rates of a card's best-of-K + τ policy (nla-at-home's
``scripts/av_policy.py --eval``), for any card kind.

Per target row and layer (card, targets, μ, seeds: :mod:`eval_harness.evals.card_targets`):

1. one greedy and K sampled candidates (``rollout``), parsed (``candidate_texts``);
2. their unit MiniLM-L6 embeddings ``e_i`` (:class:`nla_space.compass.MiniLM`);
3. the scorer's vectors ``h_i`` and the scorer targets of the 1-in-n retrieval pool: the row itself
   plus ``n − 1`` distractor rows drawn from the held-out ``test`` split (seeded by the row,
   :func:`distractors`), in row order;
4. scores ``S[i, k] = cos(h_i − μ, t_k − μ)`` (μ from the ``mu_pool`` split) for an activation-space
   scorer (an AR, or the prefix card's self-re-encode), ``S[i, k] = e_i·t*(a_k)`` for a compass
   (the card's, or ``--compass FILE``); the candidate's faithfulness is ``f_i = S[i, own]``;
5. *right* (:func:`nla_space.metrics.retrieved`): with ``retrieval = activation`` (default) the
   candidate's row of S retrieves its own activation; with ``retrieval = text`` (the reference's
   rule) ``e_i`` retrieves the MiniLM embedding of its own input text among the pool rows' texts.
   Both are computed; the results say which one ``per_layer`` uses.

Aggregation (the reference's keys and row format): the generic centroid ``c`` is built from every
sampled candidate of the run (all layers × targets × K; the reference's choice, a mild leak it
documents); greedy never hedges; for each λ and τ the policy picks ``j = argmax(f − λ e·c)`` (the first
on ties, :func:`nla_space.compass.pick`), ``conf = f_j`` (unpenalised), hedged when ``conf < τ``, and
the three rates sum to 1 over the targets. τ is on the **cosine** scale of f (the reference's
compass scale; a card's ``default_tau`` on the fve_nrm scale corresponds to ``2τ − 1``).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from nla_space.compass import Compass, generic_centroid, pick
from nla_space.errors import NLAInputError
from nla_space.leaderboard import finite
from nla_space.metrics import retrieved_rows

from ..settings import setting
from .base import EvalTask, Metric
from .card_targets import CardTargets, CardTargetsConfig, open_card_targets
from .common import ALL_KINDS, check_positive, mean, target_seed

log = logging.getLogger(__name__)

DEFAULT_TAUS = (0.20, 0.25, 0.30, 0.35, 0.40)
DEFAULT_LAMBDAS = (0.0, 0.3, 0.5)
RETRIEVALS = ("activation", "text")
#: significant digits kept for the stored MiniLM embeddings (keeps the partial file small; exact on resume)
EMB_DIGITS = 6

Embed = Callable[[Sequence[str]], torch.Tensor]


@dataclass
class Settings:
    n: int
    K: int
    taus: list[float]
    lambdas: list[float]
    temperature: float
    max_new_tokens: int
    seed: int
    retrieval: str = "activation"


@dataclass
class CompassOverride:
    """``--compass FILE``: score candidates with this compass (keys: block = ℓ − ``block_offset``)."""

    compass: Compass
    block_offset: int = 1

    def target(self, a: torch.Tensor, layer: int) -> torch.Tensor:
        return self.compass.target(a, layer - self.block_offset).float()


def distractors(test_rows: list[int], row: int, n: int, seed: int) -> list[int]:
    """The 1-in-n pool of ``row``: itself and ``n − 1`` other test rows (all when fewer), drawn by
    ``random.Random(target_seed(seed, row))``, returned in row order."""
    others = [r for r in test_rows if r != row]
    rng = random.Random(target_seed(seed, row))
    return sorted(rng.sample(others, min(n - 1, len(others))) + [row])


class TextKeys:
    """MiniLM embeddings of the targets' input texts (the reference's retrieval keys), cached."""

    def __init__(self, ct: CardTargets, embed: Embed):
        self.ct, self.embed, self.cache = ct, embed, {}

    def __call__(self, rows: list[int]) -> torch.Tensor:
        todo = [r for r in rows if r not in self.cache]
        if todo:
            for r, e in zip(todo, self.embed([self.ct.ts.texts[r] for r in todo])):
                self.cache[r] = e.double()
        return torch.stack([self.cache[r] for r in rows])


def layer_record(ct: CardTargets, row: int, layer: int, pool: list[int], s: Settings, embed: Embed, keys: TextKeys,
                 compass: CompassOverride | None) -> dict[str, Any]:
    """Greedy + K candidates of one target at one layer: f, both retrieval flags, embeddings."""
    oc = ct.oc
    v = ct.activation(row, layer)
    seed = target_seed(s.seed, row)
    g = oc.rollout(v, 1, s.temperature, s.max_new_tokens, True, seed, layer)
    smp = oc.rollout(v, s.K, s.temperature, s.max_new_tokens, False, seed, layer)
    texts = oc.candidate_texts(g) + oc.candidate_texts(smp)
    E = embed(texts).double()
    own = pool.index(row)
    acts = ct.activations(pool, layer)
    if compass is not None:
        H = E
        T = torch.stack([compass.target(a, layer) for a in acts]).double()
    else:
        H = torch.cat([oc.reconstruct(g, layer), oc.reconstruct(smp, layer)]).double()
        T = torch.stack([oc.score_target(a, layer) for a in acts]).double()
        if oc.scorer_space == "activation":
            mu = ct.mu(layer).double()
            H, T = H - mu, T - mu
    S = torch.nn.functional.normalize(H, dim=-1) @ torch.nn.functional.normalize(T, dim=-1).T
    f = [float(x) for x in S[:, own]]
    right_act = retrieved_rows(S, own)
    right_text = retrieved_rows(E @ keys(pool).T, own)
    return {
        "f_greedy": f[0], "f": f[1:],
        "right_activation": right_act, "right_text": right_text,  # index 0 = greedy
        "e": [[float(f"{x:.{EMB_DIGITS}g}") for x in row_] for row_ in E.tolist()],
        "texts": texts,
    }


def target_record(ct: CardTargets, row: int, s: Settings, embed: Embed, keys: TextKeys, compass: CompassOverride | None) -> dict[str, Any]:
    """Every layer of one target; the distractors come from the whole test split (not only the
    evaluated rows), so ``--limit`` does not change a target's pool."""
    pool = distractors(ct.ts.indices("test"), row, s.n, s.seed)
    return {"target": row, "pool": pool,
            "layers": {str(L): layer_record(ct, row, L, pool, s, embed, keys, compass) for L in ct.layers}}


def policy_rows(recs: list[dict[str, Any]], c: torch.Tensor, lam: float, taus: list[float], retrieval: str) -> list[dict[str, Any]]:
    """One row per τ: {tau, confident_right, confident_wrong, hedged, specific_genericness} over ``recs`` (one layer)."""
    picks = []
    for r in recs:
        E = torch.tensor(r["e"][1:], dtype=torch.float64)
        gen = E @ c
        j = pick(torch.tensor(r["f"], dtype=torch.float64), gen, lam)
        picks.append((r["f"][j], bool(r[f"right_{retrieval}"][1 + j]), float(gen[j])))
    out = []
    n = len(picks)
    for tau in taus:
        spec = [(right, g) for conf, right, g in picks if conf >= tau]
        out.append({
            "tau": tau,
            "confident_right": sum(right for right, _ in spec) / n,
            "confident_wrong": sum(not right for right, _ in spec) / n,
            "hedged": (n - len(spec)) / n,
            "specific_genericness": mean([g for _, g in spec]),
        })
    return out


def aggregate(ct: CardTargets, recs: list[dict[str, Any]], s: Settings, retrieval: str) -> dict[str, Any]:
    """``per_layer`` in the reference's shape, for one retrieval rule."""
    c = generic_centroid(torch.tensor([e for r in recs for L in r["layers"].values() for e in L["e"][1:]], dtype=torch.float64))
    per_layer: dict[str, Any] = {}
    for L in ct.layers:
        lrecs = [r["layers"][str(L)] for r in recs]
        greedy_right = [bool(x[f"right_{retrieval}"][0]) for x in lrecs]
        sweeps = {str(lam): policy_rows(lrecs, c, lam, s.taus, retrieval) for lam in s.lambdas}
        per_layer[str(L)] = {
            "n": len(lrecs),
            "key": ct.depth_key(L),
            "greedy_confident_right": sum(greedy_right) / len(lrecs),
            "greedy_confident_wrong": 1 - sum(greedy_right) / len(lrecs),
            "greedy_genericness": mean([float(torch.tensor(x["e"][0], dtype=torch.float64) @ c) for x in lrecs]),
            "greedy_f_mean": mean([x["f_greedy"] for x in lrecs]),
            "sampled_f_mean": mean([f for x in lrecs for f in x["f"]]),
            "oracle_retrieval_any": sum(any(x[f"right_{retrieval}"][1:]) for x in lrecs) / len(lrecs),
            "penalty_sweeps": sweeps,
            "tau_sweep": sweeps[str(s.lambdas[0])],
        }
    return per_layer


# ---------------------------------------------------------------------------------------------- the eval


def _floats(name: str, xs: list[float], lo: float, hi: float) -> list[float]:
    if not xs or any(not math.isfinite(x) or not lo <= x <= hi for x in xs):
        raise NLAInputError(f"{name} values must be numbers in [{lo}, {hi}], got {xs}")
    return [float(x) for x in xs]


@dataclass(kw_only=True)
class PolicyConfig(CardTargetsConfig):
    n: int = setting(50, "1-in-n retrieval: the target plus n−1 test-split distractors (default 50)")
    k: int = setting(12, "sampled candidates per target (default 12, the reference's)")
    tau_grid: tuple[float, ...] = setting(DEFAULT_TAUS, "τ values (cosine scale of f)", many=True)
    lambda_grid: tuple[float, ...] = setting(DEFAULT_LAMBDAS, "generic-centroid penalties λ", many=True)
    temperature: float = setting(0.9, "sampling temperature (default 0.9, the reference's)")
    retrieval: str = setting("activation", "what 'right' means in per_layer: the description retrieves its own activation (default) or its input text",
                             choices=RETRIEVALS)
    compass: str | None = setting(None, "score with this compass file (compass.safetensors or a reference .pt) instead of the card's scorer")
    compass_block_offset: int = setting(1, "compass keys are blocks ℓ − offset (default 1, the reference's)")
    log_samples: str | None = setting(None, "per-target candidates as JSON Lines")


#: the τ (compass cosine scale) and λ at which a run is reported on the leaderboard (nla-at-home's defaults)
REPORT_TAU, REPORT_LAMBDA = 0.30, 0.0


class PolicyEval(EvalTask):
    """``policy-eval``: greedy vs the τ/λ policy (module docstring); a run with ``--compass`` fills
    ``policy_eval_compass``, else ``policy_eval``."""

    name = "policy-eval"
    table = "policy_eval"
    variant_tables = ("policy_eval_compass",)
    help = "confident-right / confident-wrong / hedged rates (1-in-n retrieval) of greedy vs the τ/λ policy on held-out targets"
    #: any kind: only the opened-card interface is used (:mod:`eval_harness.evals.card_targets`)
    supported_kinds = ALL_KINDS
    Config = PolicyConfig
    # rates over 1-in-n retrieval, at τ = REPORT_TAU, λ = REPORT_LAMBDA (:meth:`flat_values`)
    metrics = tuple(
        Metric(t, key, f"{label}, {who}", k_dependent=True, centered=False, fve=False)
        for t, who in (("policy_eval_compass", "compass rerank of {K}"), ("policy_eval", "oracle rerank of {K}"))
        for key, label in (("policy_confident_right", "confident right (τ 0.30)"), ("policy_confident_wrong", "confident wrong (τ 0.30)"),
                           ("policy_hedged", "hedged (τ 0.30)"), ("oracle_retrieval_any", "any candidate retrieves the target")))

    @classmethod
    def result_table(cls, meta: dict[str, Any]) -> str:
        return "policy_eval_compass" if (meta.get("args") or {}).get("compass") else "policy_eval"

    @classmethod
    def flat_values(cls, results: dict[str, Any]) -> dict[str, Any]:
        """The first layer's rates at τ = :data:`REPORT_TAU`, λ = :data:`REPORT_LAMBDA`, ``K`` = candidates, ``M`` = targets."""
        values = super().flat_values(results)
        layers = results.get("per_layer") or {}
        first = layers[sorted(layers)[0]] if layers else {}
        sweep = (first.get("penalty_sweeps") or {}).get(str(REPORT_LAMBDA), [])
        at = next((r for r in sweep if finite(r.get("tau")) is not None and abs(r["tau"] - REPORT_TAU) < 1e-9), {})
        values.update(policy_confident_right=at.get("confident_right"), policy_confident_wrong=at.get("confident_wrong"),
                      policy_hedged=at.get("hedged"), oracle_retrieval_any=first.get("oracle_retrieval_any"),
                      K=results.get("n_samples"), M=first.get("n"))
        return values

    def open(self) -> list[int]:
        from nla_space.compass import Compass, MiniLM

        a = self.cfg
        check_positive("--n", a.n, 2)
        check_positive("--k", a.k)
        if not math.isfinite(a.temperature) or not 0 <= a.temperature <= 5:
            raise NLAInputError(f"--temperature must be in [0, 5], got {a.temperature}")
        self.s = s = Settings(n=a.n, K=a.k, taus=_floats("--tau-grid", a.tau_grid, -1.0, 1.0),
                              lambdas=_floats("--lambda-grid", a.lambda_grid, -10.0, 10.0), temperature=float(a.temperature),
                              max_new_tokens=a.max_new_tokens, seed=a.seed, retrieval=a.retrieval)
        ct = self.ct = open_card_targets(a, None, self.supported_kinds, self.name)
        self.compass = compass = CompassOverride(Compass.load(Path(a.compass)), a.compass_block_offset) if a.compass else None
        if compass is not None:
            missing = [L for L in ct.layers if L - compass.block_offset not in compass.compass.maps]
            if missing:
                raise NLAInputError(f"the compass has no map for layer(s) {missing} (keys {compass.compass.layers}, offset {compass.block_offset})")
        self.embed = MiniLM()
        self.keys = TextKeys(ct, self.embed)
        self.n_test = len(ct.ts.indices("test"))
        if self.n_test < s.n:
            log.warning("1-in-%d retrieval asked, the test split has %d rows: pools are 1-in-%d", s.n, self.n_test, self.n_test)
        self.scorer = f"compass {a.compass}" if compass else ct.oc.scorer_name
        return ct.targets

    def fingerprint(self) -> dict[str, Any]:
        s = self.s
        return self.ct.fingerprint(self.name, self.cfg, {"n": s.n, "K": s.K, "temperature": s.temperature, "scorer": self.scorer})

    def process(self, target: int) -> dict[str, Any]:
        return target_record(self.ct, target, self.s, self.embed, self.keys, self.compass)

    def aggregate(self, recs: list[dict[str, Any]]) -> dict[str, Any]:
        ct, s = self.ct, self.s
        other = [r for r in RETRIEVALS if r != s.retrieval][0]
        return {
            "layers": ct.layers,
            "n_samples": s.K,
            "taus": s.taus,
            "lambdas": s.lambdas,
            "retrieval": s.retrieval,
            "n_retrieval": min(s.n, self.n_test),
            "config": {"card": ct.oc.card.id, "n": s.n, "k": s.K, "temperature": s.temperature, "top_p": ct.oc.top_p,
                       "max_new_tokens": s.max_new_tokens, "seed": s.seed, "scorer": self.scorer,
                       "faith_model": "sentence-transformers/all-MiniLM-L6-v2"},
            "per_layer": aggregate(ct, recs, s, s.retrieval),
            "other_retrieval": {"retrieval": other, "per_layer": aggregate(ct, recs, s, other)},
        }

    def meta_fields(self, results: dict[str, Any]) -> dict[str, Any]:
        s = self.s
        return self.ct.meta_fields(self.cfg, {
            "K": s.K, "n_retrieval": results["n_retrieval"], "temperature": s.temperature, "scorer": self.scorer,
            "tau_scale": "cosine of f (compass: e·t*; activation scorers: μ-centered cosine); a card τ on the fve_nrm scale is 2τ−1 here",
            "centroid": "l2norm(mean of the unit MiniLM embeddings of every sampled candidate of this run), as the reference",
        })

    def samples(self, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"target": r["target"], "pool": r["pool"],
                 "layers": {L: {k: v for k, v in x.items() if k != "e"} for L, x in r["layers"].items()}} for r in recs]

    def summary(self, results: dict[str, Any]) -> str:
        s, lines = self.s, []
        for L in self.ct.layers:
            pl = results["per_layer"][str(L)]
            row = pl["tau_sweep"][len(s.taus) // 2]
            lines.append(f"{self.name}: {self.ct.oc.card.id} L{L}, {pl['n']} targets, 1-in-{results['n_retrieval']} ({s.retrieval}): greedy right "
                         f"{pl['greedy_confident_right']:.3f}; policy (λ={s.lambdas[0]}, τ={row['tau']}) right {row['confident_right']:.3f}, "
                         f"wrong {row['confident_wrong']:.3f}, hedged {row['hedged']:.3f} → {self.cfg.out}")
        return "\n".join(lines)
