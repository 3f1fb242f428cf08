"""``centered-eval``: greedy, sampled mean, best-of-K and top-5-of-K (raw and centered), the
NN-retrieval baseline and the random floor, on the held-out test split (``srt.md`` §6).

Keys are the reference's (``adapter_{raw,cen}_{greedy,sampled,bestofK,top5ofK}_mean``,
``nn_{raw,cen}_{mean,p50}``, ``random_{raw,cen}_mean``), plus:

* ``kcurve_oracle_top1_cen`` / ``_raw``: best-of-K′ over the first K′ of the same K samples;
* ``nn_reencode_{raw,cen}_mean``: the *honest* NN baseline — the centered nearest pool row's text
  re-encoded by the round-trip convention, as the AV's candidates are (the reference NN uses the
  pool vector itself as h, which no text achieves; ``srt.md`` §7.4);
* ``adapter_cen_bestofK_p50`` / ``adapter_cen_greedy_p50``.

Targets, pool and μ: :mod:`eval_harness.evals`. Meta, resume, sample logs: :mod:`eval_harness.results`.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from nla_space.scoring import fve_nrm, fve_nrm_centered

from . import evals
from .results import Checkpoint, now_iso, run_meta, write_results

log = logging.getLogger(__name__)

HELP = "centered eval of a card on held-out targets: greedy / sampled / best-of-K / NN / random (raw and centered)"
COMMAND = "centered-eval"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--M", type=int, default=200, help="number of test-split targets (default 200)")
    p.add_argument("--K", type=int, default=64, help="samples per target (default 64)")
    evals.add_common_arguments(p)


def aggregate(run: evals.EvalRun, recs: list[dict[str, Any]]) -> dict[str, Any]:
    """The reference keys from per-target records (in target order)."""
    m = evals.mean
    K = run.K
    out: dict[str, Any] = {
        "backbone": run.backbone.spec, "layer": run.layer, "av_ckpt": run.oc.card.id,
        "M": len(recs), "K": K, "T": run.max_new_tokens, "temperature": run.temperature,
        "pool_size": run.pool.size, "anisotropy_mu_norm": round(float(run.pool.mu.norm()), 4),
    }
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


def samples_log(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = ("target", "greedy_text", "greedy_raw", "greedy_cen", "texts", "raw", "cen", "lengths", "logp", "anchor_cos")
    return [{k: r[k] for k in keys if k in r} for r in recs]


def run(args: argparse.Namespace) -> int:
    started, started_iso = time.time(), now_iso()
    er = evals.open_run(args)
    ckpt = Checkpoint(args.out, er.fingerprint(COMMAND, {"log_samples": args.log_samples is not None}), args.resume).open()
    keep = args.log_samples is not None
    recs = ckpt.run(er.targets, lambda row: evals.sample_target(er, row, keep_text=keep), desc=COMMAND)
    results = aggregate(er, recs)
    results["meta"] = run_meta(COMMAND, er.meta_fields(args, args.M), started, started_iso, args.out, args)
    write_results(args.out, results, samples_log(recs), args.log_samples)
    ckpt.finish()
    print(f"{COMMAND}: {er.oc.card.id} L{er.layer}, M={len(recs)}, K={er.K}: "
          f"greedy cen {results['adapter_cen_greedy_mean']:.3f}, best-of-{er.K} cen {results['adapter_cen_bestofK_mean']:.3f}, "
          f"NN cen {results['nn_cen_mean']:.3f}, random cen {results['random_cen_mean']:.3f} → {args.out}")
    return 0
