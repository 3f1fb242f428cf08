"""``rerank-eval``: the K-curve and the cheap rerankers, on the held-out test split (SRT ``scripts/rerank_eval.py``; ``docs/evals.md``).

From the same K samples per target (:func:`eval_harness.evals.common.sample_target`):

* ``kcurve_oracle_top1_cen`` / ``_raw``: best-of-K′ over the first K′ samples, keyed by K′ as a
  string, K′ ∈ {1, 2, 4, …} ∪ {K};
* ``logp_rerank_{cen,raw}_mean``: the candidate with the highest mean token log-prob under the AV
  (:func:`eval_harness.evals.common.sequence_logprob`), scored by the oracle; ``logp_rerank_vs_greedy`` =
  its centered score minus greedy's;
* ``nn_anchor_rerank_{cen,raw}_mean``: the candidate whose centered re-encoding is closest (cosine)
  to the centered nearest pool vector of v — uses v only to find the neighbour;
* ``nn_anchor_baseline_cen_mean``: centered fve of that neighbour itself — **really centered**
  here. The reference's key of that name held the *raw* fve of the neighbour (a bug in SRT ``scripts/rerank_eval.py``);
  that value is reported honestly as ``nn_anchor_baseline_raw_mean``;
* ``spearman_logp_vs_oracle_cen_{mean,p50,p05,p95}``: per-target Spearman (tie-averaged ranks)
  between logp and the centered oracle score over the K candidates; ``_n`` targets where defined.
"""

from __future__ import annotations

import logging
from typing import Any

from nla_space.scoring import fve_nrm, fve_nrm_centered

from . import common as evals
from .base import EvalTask, Metric
from .centered_eval import head, samples_log

log = logging.getLogger(__name__)

TABLE = "rerank_eval"

def _pick(rec: dict[str, Any], key: str) -> int:
    xs = rec[key]
    return max(range(len(xs)), key=lambda i: xs[i])


def aggregate(run: evals.EvalRun, recs: list[dict[str, Any]], nn: evals.Nearest) -> dict[str, Any]:
    m = evals.mean
    out = head(run, recs)
    for kind in ("cen", "raw"):
        out[f"greedy_{kind}_mean"] = m([r[f"greedy_{kind}"] for r in recs])
        out[f"sampled_{kind}_mean"] = m([x for r in recs for x in r[kind]])
    for kind in ("cen", "raw"):
        out[f"kcurve_oracle_top1_{kind}"] = {str(k): m([max(r[kind][:k]) for r in recs]) for k in evals.k_grid(run.K)}
    for kind in ("cen", "raw"):
        out[f"logp_rerank_{kind}_mean"] = m([r[kind][_pick(r, "logp")] for r in recs])
    out["logp_rerank_vs_greedy"] = out["logp_rerank_cen_mean"] - out["greedy_cen_mean"]
    for kind in ("cen", "raw"):
        out[f"nn_anchor_rerank_{kind}_mean"] = m([r[kind][_pick(r, "anchor_cos")] for r in recs])
    vecs = run.ts.vectors[[r["target"] for r in recs]]
    anchors = run.pool.vectors[nn.cen_idx]
    out["nn_anchor_baseline_cen_mean"] = m(fve_nrm_centered(anchors, vecs, run.pool.mu).tolist())
    out["nn_anchor_baseline_raw_mean"] = m(fve_nrm(anchors, vecs).tolist())
    rhos = [evals.spearman(r["logp"], r["cen"]) for r in recs]
    out["spearman_logp_vs_oracle_cen_mean"] = m(rhos)
    for q, name in ((50, "p50"), (5, "p05"), (95, "p95")):
        out[f"spearman_logp_vs_oracle_cen_{name}"] = evals.percentile(rhos, q)
    out["spearman_logp_vs_oracle_cen_n"] = sum(x is not None for x in rhos)
    out["mean_rollout_tokens"] = m([x for r in recs for x in r["lengths"]])
    return out


class RerankEval(EvalTask):
    """``rerank-eval``; the keys are listed in the module docstring."""

    name = "rerank-eval"
    table = TABLE
    help = "K-curve, logp-rerank, NN-anchor rerank and Spearman(logp, oracle) of a card on held-out targets"
    #: prefix cards only: logp is taken under the soft prefix (:func:`eval_harness.evals.common.sequence_logprob`)
    supported_kinds = ("prefix",)
    Config = evals.SampledConfig
    metrics = (
        Metric(TABLE, "logp_rerank_cen_mean", "logp-rerank of {K} (centered)", k_dependent=True),
        Metric(TABLE, "nn_anchor_rerank_cen_mean", "NN-anchor rerank of {K} (centered)", k_dependent=True),
        Metric(TABLE, "spearman_logp_vs_oracle_cen_mean", "Spearman(logp, oracle centered), K={K}", k_dependent=True,
               centered=False, fve=False),
    )

    def open(self) -> list[int]:
        er = self.er = evals.open_run(self.cfg, self.supported_kinds, self.name)
        self.nn = evals.nearest_in_pool(er.ts.vectors[er.targets], er.pool)
        self.anchor_of = {row: er.pool.vectors[j] for row, j in zip(er.targets, self.nn.cen_idx)}
        return er.targets

    def fingerprint(self) -> dict[str, Any]:
        return self.er.fingerprint(self.name, {"log_samples": self.cfg.log_samples is not None})

    def process(self, target: int) -> dict[str, Any]:
        return evals.sample_target(self.er, target, logp=True, anchor=self.anchor_of[target], keep_text=self.cfg.log_samples is not None)

    def aggregate(self, recs: list[dict[str, Any]]) -> dict[str, Any]:
        return aggregate(self.er, recs, self.nn)

    def meta_fields(self, results: dict[str, Any]) -> dict[str, Any]:
        return {**self.er.meta_fields(self.cfg, self.cfg.M),
                "nn_anchor_note": ("nn_anchor_baseline_cen_mean is centered; the reference's key of that name was the raw "
                                   "fve of the centered neighbour, reported here as nn_anchor_baseline_raw_mean")}

    def samples(self, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return samples_log(recs)

    def summary(self, results: dict[str, Any]) -> str:
        er, kc = self.er, results["kcurve_oracle_top1_cen"]
        return (f"{self.name}: {er.oc.card.id} L{er.layer}, M={results['M']}, K={er.K}: K-curve cen "
                + " ".join(f"{k}:{v:.3f}" for k, v in kc.items())
                + f"; greedy {results['greedy_cen_mean']:.3f}, logp-rerank {results['logp_rerank_cen_mean']:.3f}, "
                f"NN-anchor {results['nn_anchor_rerank_cen_mean']:.3f}, Spearman {results['spearman_logp_vs_oracle_cen_mean']} → {self.cfg.out}")
