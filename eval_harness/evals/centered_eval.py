"""``centered-eval``: greedy, sampled mean, best-of-K and top-5-of-K (raw and centered), the
NN-retrieval baseline and the random floor, on the held-out test split (SRT ``scripts/centered_eval.py``; ``docs/evals.md``).

Keys are the reference's (``adapter_{raw,cen}_{greedy,sampled,bestofK,top5ofK}_mean``,
``nn_{raw,cen}_{mean,p50}``, ``random_{raw,cen}_mean``), plus:

* ``kcurve_oracle_top1_cen`` / ``_raw``: best-of-K′ over the first K′ of the same K samples;
* ``nn_reencode_{raw,cen}_mean``: the *honest* NN baseline — the centered nearest pool row's text
  re-encoded by the round-trip convention, as the AV's candidates are (the reference NN uses the
  pool vector itself as h, which no text achieves);
* ``adapter_cen_bestofK_p50`` / ``adapter_cen_greedy_p50``.

Targets, pool and μ: :mod:`eval_harness.evals.common`. Meta, resume, sample logs: :mod:`eval_harness.results`.
"""

from __future__ import annotations

import logging
from typing import Any

from nla_space.scoring import fve_nrm, fve_nrm_centered

from . import common as evals
from .base import EvalTask, Metric

log = logging.getLogger(__name__)

TABLE = "centered_eval"


class CenteredEval(EvalTask):
    """``centered-eval``; the keys are listed in the module docstring."""

    name = "centered-eval"
    table = TABLE
    help = "centered eval of a card on held-out targets: greedy / sampled / best-of-K / NN / random (raw and centered)"
    #: prefix cards only: candidates are re-encoded by the round-trip convention (:mod:`eval_harness.evals.common`)
    supported_kinds = ("prefix",)
    Config = evals.SampledConfig
    metrics = (
        Metric(TABLE, "adapter_cen_greedy_mean", "greedy (centered)"),
        Metric(TABLE, "adapter_cen_sampled_mean", "sampled mean (centered)"),
        Metric(TABLE, "adapter_cen_bestofK_mean", "best-of-{K} (centered)", k_dependent=True),
        Metric(TABLE, "adapter_cen_top5ofK_mean", "top-5-of-{K} mean (centered)", k_dependent=True),
        Metric(TABLE, "nn_cen_mean", "NN-retrieval from the pool (centered)"),
        Metric(TABLE, "random_cen_mean", "random floor (centered)"),
        Metric(TABLE, "adapter_raw_greedy_mean", "greedy (raw)", centered=False),
        Metric(TABLE, "adapter_raw_sampled_mean", "sampled mean (raw)", centered=False),
        Metric(TABLE, "adapter_raw_bestofK_mean", "best-of-{K} (raw)", k_dependent=True, centered=False),
        Metric(TABLE, "adapter_raw_top5ofK_mean", "top-5-of-{K} mean (raw)", k_dependent=True, centered=False),
        Metric(TABLE, "nn_raw_mean", "NN-retrieval from the pool (raw)", centered=False),
        Metric(TABLE, "random_raw_mean", "random floor (raw)", centered=False),
    )

    def open(self) -> list[int]:
        self.er = evals.open_run(self.cfg, self.supported_kinds, self.name)
        return self.er.targets

    def fingerprint(self) -> dict[str, Any]:
        return self.er.fingerprint(self.name, {"log_samples": self.cfg.log_samples is not None})

    def process(self, target: int) -> dict[str, Any]:
        return evals.sample_target(self.er, target, keep_text=self.cfg.log_samples is not None)

    def aggregate(self, recs: list[dict[str, Any]]) -> dict[str, Any]:
        """The reference keys from per-target records (in target order)."""
        run, m = self.er, evals.mean
        K = run.K
        out = head(run, recs)
        for kind in ("raw", "cen"):
            best = [max(r[kind]) for r in recs]
            out[f"adapter_{kind}_greedy_mean"] = m([r[f"greedy_{kind}"] for r in recs])
            out[f"adapter_{kind}_sampled_mean"] = m([x for r in recs for x in r[kind]])
            out[f"adapter_{kind}_bestofK_mean"] = m(best)
            out[f"adapter_{kind}_top5ofK_mean"] = m([evals.topk_mean(r[kind], 5) for r in recs])
        out["adapter_cen_greedy_p50"] = evals.percentile([r["greedy_cen"] for r in recs], 50)
        out["adapter_cen_bestofK_p50"] = evals.percentile([max(r["cen"]) for r in recs], 50)
        out["mean_rollout_tokens"] = m([x for r in recs for x in r["lengths"]])

        vecs = run.ts.vectors[[r["target"] for r in recs]]
        nn = evals.nearest_in_pool(vecs, run.pool)
        out["nn_raw_mean"], out["nn_raw_p50"] = m(nn.raw_fve), evals.percentile(nn.raw_fve, 50)
        out["nn_cen_mean"], out["nn_cen_p50"] = m(nn.cen_fve), evals.percentile(nn.cen_fve, 50)
        h = evals.reencode_rows(run.backbone, run.layer, [run.ts.token_ids[run.pool.rows[j]] for j in nn.cen_idx])
        out["nn_reencode_raw_mean"] = m(fve_nrm(h, vecs).tolist())
        out["nn_reencode_cen_mean"] = m(fve_nrm_centered(h, vecs, run.pool.mu).tolist())
        out["random_raw_mean"], out["random_cen_mean"] = evals.random_floor(run.pool)
        for kind in ("cen", "raw"):
            out[f"kcurve_oracle_top1_{kind}"] = {str(k): m([max(r[kind][:k]) for r in recs]) for k in evals.k_grid(K)}
        return out

    def meta_fields(self, results: dict[str, Any]) -> dict[str, Any]:
        return self.er.meta_fields(self.cfg, self.cfg.M)

    def samples(self, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return samples_log(recs)

    def summary(self, results: dict[str, Any]) -> str:
        er = self.er
        return (f"{self.name}: {er.oc.card.id} L{er.layer}, M={results['M']}, K={er.K}: "
                f"greedy cen {results['adapter_cen_greedy_mean']:.3f}, best-of-{er.K} cen {results['adapter_cen_bestofK_mean']:.3f}, "
                f"NN cen {results['nn_cen_mean']:.3f}, random cen {results['random_cen_mean']:.3f} → {self.cfg.out}")


def head(run: evals.EvalRun, recs: list[dict[str, Any]]) -> dict[str, Any]:
    """The leading keys of ``centered-eval`` and ``rerank-eval`` results (the run's settings)."""
    return {
        "backbone": run.backbone.spec, "layer": run.layer, "av_ckpt": run.oc.card.id,
        "M": len(recs), "K": run.K, "T": run.max_new_tokens, "temperature": run.temperature,
        "pool_size": run.pool.size, "anisotropy_mu_norm": round(float(run.pool.mu.norm()), 4),
    }


def samples_log(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = ("target", "greedy_text", "greedy_raw", "greedy_cen", "texts", "raw", "cen", "lengths", "logp", "anchor_cos")
    return [{k: r[k] for k in keys if k in r} for r in recs]
