"""The leaderboard builder: published numbers from the cards beside numbers reproduced by the evals.

``python -m eval_harness leaderboard`` calls :func:`build_leaderboard` with the results files it
finds and writes ``nla_space/assets/leaderboard.json`` (the app reads it with
:func:`nla_space.leaderboard.load_leaderboard`; the schema is stated there) and, when asked, the
markdown rendering :func:`to_markdown`.

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
"""

from __future__ import annotations

import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from nla_space.cards import Card, builtin_cards
from nla_space.leaderboard import CARD_META_KEYS, FINDINGS_NOTE, Source, curve, finite, other_published, published_source
from nla_space.scoring import rho

from .evals import EVALS, EvalTask, Metric

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


def reproduced_sources(results: Iterable[dict[str, Any]], cards: list[Card]) -> dict[str, Source]:
    """Group results files by card id; ``oracle-ceiling`` results without a card attach to every
    card on the same backbone and layer."""
    out: dict[str, Source] = {}
    for res in sorted(results, key=_finished):
        meta = res.get("meta") or {}
        task = _eval_of(meta)
        if task is None:
            log.warning("skipping a results file without a known meta.command: %s", meta.get("path"))
            continue
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
    keep = ("command", "path", "card", "backbone", "backbone_revision", "layer", "M", "K", "pool_size", "seed",
            "temperature", "max_new_tokens", "targets", "targets_split", "mu_source", "trained", "limit",
            "git_commit", "device", "wall_time_s", "finished", "note", "av_weights", "source")
    return {k: meta[k] for k in keep if k in meta}


def build_leaderboard(results: Iterable[dict[str, Any]] = (), cards: list[Card] | None = None) -> dict[str, Any]:
    """Published rows for every card, reproduced numbers from ``results`` beside them."""
    cards = builtin_cards() if cards is None else cards
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
    return {"generated": _now(), "rows": rows, "kcurves": kcurves, "findings": found, "anchors": anchors, "other_published": others}


# ----------------------------------------------------------------------------------------------
# Markdown rendering


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:+.{nd}f}" if nd == 4 else f"{x:.{nd}f}"
    return str(x)


def _card_descriptions() -> dict[str, str]:
    """Built-in cards' descriptions (they carry each card's caveats), by card id."""
    try:
        return {c.id: c.description for c in builtin_cards() if c.description}
    except Exception:  # a broken card file must not break the rendering
        return {}


def to_markdown(lb: dict[str, Any]) -> str:
    """A markdown rendering: the findings first, then one table per card and the K-curves."""
    out = [f"# Leaderboard\n\nGenerated {lb.get('generated')}. Scores are fve_nrm = ½(1+cos); centered = "
           "μ of a disjoint pool subtracted; ρ = (s − floor)/(ceiling − floor) with the card's own anchors.\n"]
    if lb.get("findings"):
        out.append("\n## Findings\n\n" + FINDINGS_NOTE + "\n\n| card | origin | K-curve slope / doubling | logp-rerank − greedy | Spearman(logp, oracle) "
                   "| NN-anchor rerank − greedy | raw floor | centered floor | centering changes verdict | greedy − NN-retrieval |\n"
                   "|---|---|---|---|---|---|---|---|---|---|\n")
        for f in lb["findings"]:
            out.append(f"| `{f['card']}` | {f['origin']} | {_fmt(f['kcurve_slope_per_doubling'], 4)} | {_fmt(f['logp_rerank_minus_greedy'], 4)} "
                       f"| {_fmt(f['spearman_logp_oracle'])} | {_fmt(f['nn_anchor_rerank_minus_greedy'], 4)} | {_fmt(f['raw_floor'])} "
                       f"| {_fmt(f['centered_floor'])} | {_fmt(f['centering_changes_verdict'])} | {_fmt(f['greedy_minus_nn_retrieval'], 4)} |\n")
    anchors = lb.get("anchors", {})
    cards: list[str] = []
    for r in lb["rows"]:
        if r["card"] not in cards:
            cards.append(r["card"])
    for cid in cards:
        rows = [r for r in lb["rows"] if r["card"] == cid]
        out.append(f"\n## {rows[0]['title'] or cid}\n\n`{cid}` · backbone `{rows[0]['backbone']}` · layer {rows[0]['layer']}")
        if cid in anchors:
            a = anchors[cid]
            out.append(f" · ρ anchors: floor {a['floor']:.3f}, ceiling {a['ceiling']:.3f} ({a.get('ceiling_name')})")
        description = _card_descriptions().get(cid)
        if description:
            out.append(f"\n\n{description}")
        out.append("\n\n| metric | K | M | published | ρ | reproduced | ρ | run |\n|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            rm = r.get("reproduced_meta") or {}
            run = f"M={rm.get('M')}, K={rm.get('K')}, seed {rm.get('seed')}" if rm else ""
            if rm.get("source"):  # the texts a reading-eval ran on (the latest run of a card fills its rows)
                run += f", {Path(str(rm['source'])).name}"
            out.append(f"| {r['label']} | {_fmt(r['K'])} | {_fmt(r['M'])} | {_fmt(r['published'])} | {_fmt(r['rho_published'], 2)} "
                       f"| {_fmt(r['reproduced'])} | {_fmt(r['rho_reproduced'], 2)} | {run} |\n")
        srcs = sorted({r["published_source"] for r in rows if r["published_source"]})
        if srcs:
            out.append("\nSources: " + "; ".join(srcs) + "\n")
    if lb.get("kcurves"):
        out.append("\n## K-curves (oracle best-of-K′, centered)\n\n| card | origin | " + " | ".join(
            f"K={k}" for k in sorted({c['K'] for c in lb['kcurves']})) + " |\n")
        ks = sorted({c["K"] for c in lb["kcurves"]})
        out.append("|---|---|" + "---|" * len(ks) + "\n")
        seen: list[tuple[str, str]] = []
        for c in lb["kcurves"]:
            if (c["card"], c["origin"]) not in seen:
                seen.append((c["card"], c["origin"]))
        for cid, origin in seen:
            vals = {c["K"]: c["score_cen"] for c in lb["kcurves"] if c["card"] == cid and c["origin"] == origin}
            out.append(f"| `{cid}` | {origin} | " + " | ".join(_fmt(vals.get(k)) for k in ks) + " |\n")
    if lb.get("other_published"):
        out.append("\n## Other published numbers (not fve_nrm; read each note)\n\n| card | table | key | value | note | source |\n|---|---|---|---|---|---|\n")
        for o in lb["other_published"]:
            out.append(f"| `{o['card']}` | {o['table']} | {o['key']} | {o['value']} | {o.get('note') or ''} | {o.get('source') or ''} |\n")
    return "".join(out)
