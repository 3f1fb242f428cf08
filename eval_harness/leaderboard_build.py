"""The leaderboard builder: published numbers from the cards beside numbers reproduced by the evals.

``python -m eval_harness leaderboard`` calls :func:`build_leaderboard` with the results files it
finds and writes ``nla_space/assets/leaderboard.json`` (the app reads it with
:func:`nla_space.leaderboard.load_leaderboard`; the schema is stated there) and, when asked, the
markdown rendering :func:`~eval_harness.leaderboard_markdown.to_markdown` (re-exported here).

Which rows exist is read from the evals registry (:data:`eval_harness.evals.EVALS`): a results file's
``meta.command`` names its eval, the eval says which table the file fills
(:meth:`~eval_harness.evals.base.EvalTask.result_table`), flattens it
(:meth:`~eval_harness.evals.base.EvalTask.flat_values`) and declares the rows it shows
(``metrics``). Published numbers come from the card files (:func:`nla_space.leaderboard.published_source`).

Conventions:

* A row is one (card, metric, K). ``K`` is set only for metrics that depend on the number of
  samples (best-of-K, top-5-of-K, the reranks); a published and a reproduced number share a row
  only when their K agrees. ``M`` is the published number's M when there is one, else the
  reproduced run's; ``reproduced_meta`` always carries the run's own M, K, seed and provenance.
* ρ = (s − floor)/(ceiling − floor) on the centered scale (:func:`nla_space.scoring.rho`), with the
  *card's own* floor and ceiling (``anchors`` in its card file); a card without published anchors
  uses the floor and ceiling reproduced on its backbone and layer by ``oracle-ceiling``
  (``random_floor_cen_fve_mean`` and the paraphrase, else NN-in-pool, ceiling). ρ is left ``None``
  for raw scores and for non-fve metrics (Spearman).
* A results file is any JSON written by a registered eval: its keys at the top level and a
  ``meta`` block with at least ``command``, ``card`` (or ``backbone`` + ``layer`` for
  ``oracle-ceiling``). When several files fill the same row, the one finished last wins.
* Per layer (``reading-eval --layers``): a run keyed ``<run>_L<ℓ>`` (``greedy_L3``) is a point of
  ``layer_curves`` (:func:`reproduced_layer_points`); the rows read only the un-suffixed runs and, where a
  file has none of that name, the card's default layer's (:func:`default_layer_runs`), so a per-layer file
  fills the same rows as a default-layer one and one without the default layer leaves them to older files.
  Published per-layer numbers (a card table's ``L<block>`` keys) are points too
  (:func:`nla_space.leaderboard.published_layer_points`).
"""

from __future__ import annotations

import logging
import math
import re
from datetime import datetime, timezone
from typing import Any, Iterable

from nla_space.cards import Card, builtin_cards
from nla_space.leaderboard import (CARD_META_KEYS, LAYER_METRICS, Source, card_blocks, curve, depth_pct, finite,
                                   layer_point, other_published, published_layer_points, published_source)
from nla_space.scoring import rho

from .evals import EVALS, EvalTask, Metric
from .leaderboard_markdown import to_markdown

__all__ = ["build_leaderboard", "kcurve_slope", "layer_curves", "to_markdown"]

log = logging.getLogger(__name__)

FINDING_KEYS = (
    "kcurve_slope_per_doubling",
    "logp_rerank_minus_greedy",
    "spearman_logp_oracle",
    "nn_anchor_rerank_minus_greedy",
    "raw_floor",
    "centered_floor",
    "centering_changes_verdict",
    "greedy_minus_nn_retrieval",
)


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def kcurve_slope(points: dict[int, float]) -> float | None:
    """Least-squares slope of the score against log2 K (score gained per doubling of K)."""
    pts = [(math.log2(k), s) for k, s in points.items() if k >= 1]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return None if sxx == 0 else sum((x - mx) * (y - my) for x, y in pts) / sxx


def metrics() -> tuple[Metric, ...]:
    """Every registered eval's rows, in registry order."""
    return tuple(m for cls in EVALS.values() for m in cls.metrics)


def row_tables() -> set[str]:
    """Published card keys read into rows or K-curves (never repeated in ``other_published``)."""
    return CARD_META_KEYS | {t for cls in EVALS.values() for t in cls.tables()}


def _eval_of(meta: dict[str, Any]) -> type[EvalTask] | None:
    return EVALS.get(str(meta.get("command")))


def _finished(result: dict[str, Any]) -> str:
    return str(result.get("meta", {}).get("finished") or "")


_RUN_LAYER = re.compile(r"(?P<run>.+)_L(?P<layer>\d+)")


def split_run(name: str) -> tuple[str, int | None]:
    """A results key → (run, layer): ``greedy_L3`` → ``("greedy", 3)``, ``guided_k16`` → ``("guided_k16", None)``."""
    m = _RUN_LAYER.fullmatch(name)
    return (m.group("run"), int(m.group("layer"))) if m else (name, None)


def default_layer_runs(res: dict[str, Any], default_layer: int | None) -> dict[str, Any] | None:
    """The results file as the rows read it: its un-suffixed runs, plus each ``<run>_L<default_layer>``
    under the name ``<run>`` where no un-suffixed run has it. A file without per-layer runs is returned
    as it is; None when nothing is left (a per-layer file without the default layer fills no row)."""
    runs = res.get("results")
    if not isinstance(runs, dict) or all(split_run(str(k))[1] is None for k in runs):
        return res
    keep = {k: v for k, v in runs.items() if split_run(str(k))[1] is None}
    for name, run in runs.items():
        base, layer = split_run(str(name))
        if layer is not None and layer == default_layer:
            keep.setdefault(base, run)
    return {**res, "results": keep} if keep else None


def _run_rank(run: str) -> tuple[int, str]:
    """Greedy first, then guided, then the others (by name)."""
    return (0 if run == "greedy" else 1 if run.startswith("guided") else 2, run)


def reproduced_layer_points(results: Iterable[dict[str, Any]], cards: list[Card]) -> list[dict[str, Any]]:
    """One ``layer_curves`` point per (card, run, layer) of the ``reading-eval`` results whose runs carry a
    layer (keys ``<run>_L<ℓ>``); when several files give the same point, the one finished last wins.
    ``depth_pct`` uses the card's block count (:func:`nla_space.leaderboard.card_blocks`; None for a card
    outside ``cards`` or one whose count is unknown). Sorted by card, run (:func:`_run_rank`), layer."""
    by_id = {c.id: c for c in cards}
    points: dict[tuple[str, str, int], dict[str, Any]] = {}
    for res in sorted(results, key=_finished):
        meta = res.get("meta") or {}
        task = _eval_of(meta)
        runs = res.get("results")
        if task is None or task.table != "reading_eval" or not isinstance(runs, dict) or not meta.get("card"):
            continue
        cid = str(meta["card"])
        n_blocks = card_blocks(by_id.get(cid))
        for name, run in runs.items():
            base, layer = split_run(str(name))
            if layer is None or not isinstance(run, dict):
                continue
            points[(cid, base, layer)] = layer_point(
                card=cid, origin="reproduced", metric=task.result_table(meta), run=base, strategy=run.get("strategy"),
                k=run.get("k"), layer=layer, depth_pct=depth_pct(layer, n_blocks), n_blocks=n_blocks,
                label=f"{base}, reading-eval", n=run.get("n"), meta=_meta_summary(meta), source=str(meta.get("path") or ""),
                **{m: _r(finite(run.get(m))) for m in LAYER_METRICS})
    order = {cid: i for i, cid in enumerate(by_id)}
    return [points[k] for k in sorted(points, key=lambda k: (order.get(k[0], len(order)), k[0], _run_rank(k[1]), k[2]))]


def layer_curves(results: Iterable[dict[str, Any]], cards: list[Card]) -> list[dict[str, Any]]:
    """Every card's reproduced per-layer points (:func:`reproduced_layer_points`), then the published
    ones (:func:`nla_space.leaderboard.published_layer_points`), card by card."""
    rep = reproduced_layer_points(results, cards)
    ids = list(dict.fromkeys([c.id for c in cards] + [p["card"] for p in rep]))
    pub = {c.id: published_layer_points(c) for c in cards}
    return [p for cid in ids for p in [q for q in rep if q["card"] == cid] + pub.get(cid, [])]


def reproduced_sources(results: Iterable[dict[str, Any]], cards: list[Card]) -> dict[str, Source]:
    """Group results files by card id; ``oracle-ceiling`` results without a card attach to every
    card on the same backbone and layer. Per-layer runs are read through :func:`default_layer_runs`."""
    out: dict[str, Source] = {}
    defaults = {c.id: c.default_layer for c in cards}
    for res in sorted(results, key=_finished):
        meta = res.get("meta") or {}
        task = _eval_of(meta)
        if task is None:
            log.warning("skipping a results file without a known meta.command: %s", meta.get("path"))
            continue
        view = default_layer_runs(res, defaults.get(str(meta.get("card"))))
        if view is None:
            log.info("%s: per-layer runs only, none at the card's default layer: no rows from it", meta.get("path"))
            continue
        res = view
        table = task.result_table(meta)
        ids = [meta["card"]] if meta.get("card") else [
            c.id for c in cards if c.backbone_id == meta.get("backbone") and meta.get("layer") in c.layers
        ] or [f"{meta.get('backbone')}@L{meta.get('layer')}"]
        for cid in ids:
            src = out.setdefault(cid, Source({}, {}, {}, {}))
            values = task.flat_values(res)
            values.setdefault("M", meta.get("M"))
            values.setdefault("K", meta.get("K"))
            src.tables[table] = values
            src.sources[table] = str(meta.get("path") or "")
            src.metas[table] = meta
            kc = curve(res.get("kcurve_oracle_top1_cen"))
            if kc and (table == "rerank_eval" or not src.kcurve):  # the rerank run's K-curve wins
                src.kcurve = kc
    return out


def card_anchors(card: Card | None, reproduced: Source | None) -> dict[str, Any] | None:
    """Floor and ceiling for ρ: the card's own, else reproduced by ``oracle-ceiling`` on its backbone."""
    a = card.anchors if card else None
    floor, ceiling = (finite(a.random_floor_cen), finite(a.ceiling_cen)) if a else (None, None)
    if a and floor is not None and ceiling is not None and ceiling != floor:
        return {"floor": floor, "ceiling": ceiling, "ceiling_name": a.ceiling_name, "source": a.source}
    if reproduced is not None:
        floor = reproduced.get("oracle_ceiling", "random_floor_cen_fve_mean")
        k = reproduced.tables.get("oracle_ceiling", {}).get("K")
        for key, name in (("paraphrase_best_cen_fve_mean", f"paraphrase best-of-{k}"), ("nn_in_pool_cen_fve_mean", "NN-in-pool")):
            ceiling = reproduced.get("oracle_ceiling", key)
            if floor is not None and ceiling is not None and ceiling > floor:
                return {"floor": floor, "ceiling": ceiling, "ceiling_name": f"{name} (reproduced)",
                        "source": reproduced.sources.get("oracle_ceiling", "")}
    return None


def findings(src: Source) -> dict[str, Any]:
    """The findings of one card and origin (``None`` where the numbers are missing)."""
    greedy_cen = src.get("rerank_eval", "greedy_cen_mean")
    if greedy_cen is None:
        greedy_cen = src.get("centered_eval", "adapter_cen_greedy_mean")
    logp = src.get("rerank_eval", "logp_rerank_cen_mean")
    anchor = src.get("rerank_eval", "nn_anchor_rerank_cen_mean")
    g_raw, g_cen = src.get("centered_eval", "adapter_raw_greedy_mean"), src.get("centered_eval", "adapter_cen_greedy_mean")
    f_raw, f_cen = src.get("centered_eval", "random_raw_mean"), src.get("centered_eval", "random_cen_mean")
    nn_cen = src.get("centered_eval", "nn_cen_mean")
    verdict = None
    if None not in (g_raw, g_cen, f_raw, f_cen):
        verdict = (g_raw > f_raw) != (g_cen > f_cen)
    return {
        "kcurve_slope_per_doubling": _r(kcurve_slope(src.kcurve)),
        "logp_rerank_minus_greedy": _r(logp - greedy_cen) if None not in (logp, greedy_cen) else None,
        "spearman_logp_oracle": _r(src.get("rerank_eval", "spearman_logp_vs_oracle_cen_mean")),
        "nn_anchor_rerank_minus_greedy": _r(anchor - greedy_cen) if None not in (anchor, greedy_cen) else None,
        "raw_floor": _r(f_raw),
        "centered_floor": _r(f_cen),
        "centering_changes_verdict": verdict,
        "greedy_minus_nn_retrieval": _r(g_cen - nn_cen) if None not in (g_cen, nn_cen) else None,
    }


def _row_key(metric: Metric, src: Source) -> tuple[str, int | None] | None:
    tbl = src.tables.get(metric.table)
    if tbl is None or finite(tbl.get(metric.key)) is None:
        return None
    k = tbl.get("K") if metric.k_dependent else None
    return metric.key, (int(k) if isinstance(k, (int, float)) else None)


def _meta_summary(meta: dict[str, Any]) -> dict[str, Any]:
    keep = ("command", "path", "card", "backbone", "backbone_revision", "layer", "layers", "M", "K", "pool_size", "seed",
            "temperature", "max_new_tokens", "targets", "targets_split", "mu_source", "trained", "limit",
            "git_commit", "device", "wall_time_s", "finished", "note", "av_weights", "source")
    return {k: meta[k] for k in keep if k in meta}


def build_leaderboard(results: Iterable[dict[str, Any]] = (), cards: list[Card] | None = None) -> dict[str, Any]:
    """Published rows for every card, reproduced numbers from ``results`` beside them, and the per-layer
    points (``layer_curves``: :func:`layer_curves`)."""
    cards = builtin_cards() if cards is None else cards
    results = list(results)  # read twice: the rows and the per-layer points
    by_id = {c.id: c for c in cards}
    repro = reproduced_sources(results, cards)
    rows: list[dict[str, Any]] = []
    kcurves: list[dict[str, Any]] = []
    found: list[dict[str, Any]] = []
    anchors: dict[str, Any] = {}
    for cid in list(by_id) + [c for c in repro if c not in by_id]:
        card = by_id.get(cid)
        pub = published_source(card) if card else Source({}, {}, {}, {})
        rep = repro.get(cid)
        anc = card_anchors(card, rep)
        if anc:
            anchors[cid] = anc
        meta0 = next(iter(rep.metas.values())) if rep and rep.metas else {}
        title = card.title if card else str(meta0.get("card_title") or cid)
        backbone = card.backbone_id if card else str(meta0.get("backbone") or "")
        # a card outside the built-in set: the results' layer (multi-layer commands record ``layers``)
        layer = card.default_layer if card else meta0.get("layer", (meta0.get("layers") or [None])[0])
        for metric in metrics():
            keys: list[tuple[str, int | None]] = []
            for src in (pub, rep):
                if src is not None and (k := _row_key(metric, src)) is not None and k not in keys:
                    keys.append(k)
            for _, K in keys:
                p = pub.get(metric.table, metric.key) if _row_key(metric, pub) == (metric.key, K) else None
                r = rep.get(metric.table, metric.key) if rep and _row_key(metric, rep) == (metric.key, K) else None
                ptab = pub.tables.get(metric.table, {})
                M = ptab.get("M") if p is not None else (rep.tables[metric.table].get("M") if rep and r is not None else None)
                use_rho = metric.centered and metric.fve and anc is not None
                rows.append({
                    "card": cid,
                    "title": title,
                    "backbone": backbone,
                    "layer": layer,
                    "metric": metric.key,
                    "label": metric.label.format(K=K if K is not None else "K"),
                    "K": K,
                    "M": int(M) if isinstance(M, (int, float)) else None,
                    "published": _r(p),
                    "published_source": pub.sources.get(metric.table) if p is not None else None,
                    "reproduced": _r(r),
                    "reproduced_meta": _meta_summary(rep.metas.get(metric.table, {})) if r is not None and rep else None,
                    "rho_published": _r(rho(p, anc["floor"], anc["ceiling"]), 3) if use_rho and p is not None else None,
                    "rho_reproduced": _r(rho(r, anc["floor"], anc["ceiling"]), 3) if use_rho and r is not None else None,
                })
        for origin, src in (("published", pub), ("reproduced", rep)):
            if src is None or not src.tables and not src.kcurve:
                continue
            kcurves += [{"card": cid, "origin": origin, "K": k, "score_cen": _r(s)} for k, s in src.kcurve.items()]
            f = findings(src)
            if any(v is not None for v in f.values()):  # a card with only other evals (reading-eval) has none
                found.append({"card": cid, "origin": origin, **f})
    skip = row_tables()
    others = [o for c in cards for o in other_published(c, skip)]
    return {"generated": _now(), "rows": rows, "kcurves": kcurves, "findings": found, "anchors": anchors, "other_published": others,
            "layer_curves": layer_curves(results, cards)}
