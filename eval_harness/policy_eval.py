"""Confident-right / confident-wrong / hedged rates of a card's best-of-K + τ policy (``nla_at_home.md``
§4.1, ``av_policy.py --eval``), for any card kind.

Per target row and layer (card, targets, μ, seeds: :mod:`eval_harness.card_targets`):

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
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from nla_space.compass import Compass, generic_centroid, pick
from nla_space.metrics import retrieved_rows

from .card_targets import CardTargets
from .evals import mean, target_seed

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
