"""``rerank-eval``: the K-curve and the cheap rerankers, on the held-out test split (``srt.md`` §6).

From the same K samples per target (:func:`eval_harness.evals.sample_target`):

* ``kcurve_oracle_top1_cen`` / ``_raw``: best-of-K′ over the first K′ samples, keyed by K′ as a
  string, K′ ∈ {1, 2, 4, …} ∪ {K};
* ``logp_rerank_{cen,raw}_mean``: the candidate with the highest mean token log-prob under the AV
  (:func:`eval_harness.evals.sequence_logprob`), scored by the oracle; ``logp_rerank_vs_greedy`` =
  its centered score minus greedy's;
* ``nn_anchor_rerank_{cen,raw}_mean``: the candidate whose centered re-encoding is closest (cosine)
  to the centered nearest pool vector of v — uses v only to find the neighbour;
* ``nn_anchor_baseline_cen_mean``: centered fve of that neighbour itself — **really centered**
  here. The reference's key of that name held the *raw* fve of the neighbour (``srt.md`` §7.8);
  that value is reported honestly as ``nn_anchor_baseline_raw_mean``;
* ``spearman_logp_vs_oracle_cen_{mean,p50,p05,p95}``: per-target Spearman (tie-averaged ranks)
  between logp and the centered oracle score over the K candidates; ``_n`` targets where defined.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from nla_space.scoring import fve_nrm, fve_nrm_centered

from . import evals
from .cmd_centered_eval import samples_log
from .results import Checkpoint, now_iso, run_meta, write_results

log = logging.getLogger(__name__)

HELP = "K-curve, logp-rerank, NN-anchor rerank and Spearman(logp, oracle) of a card on held-out targets"
COMMAND = "rerank-eval"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--M", type=int, default=200, help="number of test-split targets (default 200)")
    p.add_argument("--K", type=int, default=64, help="samples per target (default 64)")
    evals.add_common_arguments(p)


def _pick(rec: dict[str, Any], key: str) -> int:
    xs = rec[key]
    return max(range(len(xs)), key=lambda i: xs[i])


def aggregate(run: evals.EvalRun, recs: list[dict[str, Any]], nn: evals.Nearest) -> dict[str, Any]:
    m = evals.mean
    out: dict[str, Any] = {
        "backbone": run.backbone.spec, "layer": run.layer, "av_ckpt": run.oc.card.id,
        "M": len(recs), "K": run.K, "T": run.max_new_tokens, "temperature": run.temperature,
        "pool_size": run.pool.size, "anisotropy_mu_norm": round(float(run.pool.mu.norm()), 4),
    }
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


def run(args: argparse.Namespace) -> int:
    started, started_iso = time.time(), now_iso()
    er = evals.open_run(args)
    nn = evals.nearest_in_pool(er.ts.vectors[er.targets], er.pool)
    anchor_of = {row: er.pool.vectors[j] for row, j in zip(er.targets, nn.cen_idx)}
    keep = args.log_samples is not None
    ckpt = Checkpoint(args.out, er.fingerprint(COMMAND, {"log_samples": keep}), args.resume).open()
    recs = ckpt.run(
        er.targets,
        lambda row: evals.sample_target(er, row, logp=True, anchor=anchor_of[row], keep_text=keep),
        desc=COMMAND,
    )
    results = aggregate(er, recs, nn)
    results["meta"] = run_meta(COMMAND, er.meta_fields(args, args.M), started, started_iso, args.out, args)
    results["meta"]["nn_anchor_note"] = ("nn_anchor_baseline_cen_mean is centered; the reference's key of that name was the raw "
                                         "fve of the centered neighbour, reported here as nn_anchor_baseline_raw_mean")
    write_results(args.out, results, samples_log(recs), args.log_samples)
    ckpt.finish()
    kc = results["kcurve_oracle_top1_cen"]
    print(f"{COMMAND}: {er.oc.card.id} L{er.layer}, M={len(recs)}, K={er.K}: K-curve cen "
          + " ".join(f"{k}:{v:.3f}" for k, v in kc.items())
          + f"; greedy {results['greedy_cen_mean']:.3f}, logp-rerank {results['logp_rerank_cen_mean']:.3f}, "
          f"NN-anchor {results['nn_anchor_rerank_cen_mean']:.3f}, Spearman {results['spearman_logp_vs_oracle_cen_mean']} → {args.out}")
    return 0
