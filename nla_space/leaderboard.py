"""The leaderboard: published numbers from the cards beside numbers reproduced by the harness.

:func:`load_leaderboard` is what the app reads: ``assets/leaderboard.json`` when it exists, else the
published part built from the built-in cards, so there is always something to show.
:func:`build_leaderboard` is the one implementation behind both (``python -m eval_harness
leaderboard`` calls it with the results files it finds).

Schema (keys are only ever added, never renamed)::

    {"generated": iso8601,
     "rows": [{"card", "title", "backbone", "layer", "metric", "label", "K", "M",
               "published", "published_source", "reproduced", "reproduced_meta",
               "rho_published", "rho_reproduced"}],
     "kcurves": [{"card", "origin": "published"|"reproduced", "K", "score_cen"}],
     "findings": [{"card", "origin", "kcurve_slope_per_doubling", "logp_rerank_minus_greedy",
                   "spearman_logp_oracle", "nn_anchor_rerank_minus_greedy", "raw_floor",
                   "centered_floor", "centering_changes_verdict", "greedy_minus_nn_retrieval"}],
     "anchors": {card: {"floor", "ceiling", "ceiling_name", "source"}},
     "other_published": [{"card", "table", "key", "value", "note", "source"}]}

``other_published`` holds the numeric facts of card tables that are not SRT-style fve_nrm evals
(e.g. token-injection cards' round-trip cosines, AR deltas), each with the table's ``note`` and
the card's source, so they are never mistaken for fve_nrm rows. Training hyperparameters are left out.

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
* A results file is any JSON written by ``centered-eval``, ``rerank-eval`` or ``oracle-ceiling``:
  reference keys at the top level and a ``meta`` block with at least ``command``, ``card`` (or
  ``backbone`` + ``layer`` for ``oracle-ceiling``). When several files fill the same row, the
  one finished last wins.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from .cards import REPO_ROOT, Card, builtin_cards
from .scoring import rho

log = logging.getLogger(__name__)

DEFAULT_PATH = REPO_ROOT / "assets" / "leaderboard.json"

#: results ``meta.command`` → the table name used in card files (``published``)
COMMAND_TABLES = {"centered-eval": "centered_eval", "rerank-eval": "rerank_eval", "oracle-ceiling": "oracle_ceiling",
                  "policy-eval": "policy_eval", "roundtrip": "roundtrip", "reading-eval": "reading_eval"}

#: reading-eval runs reported per decoding strategy (results key → label), and their metrics
READING_RUNS = (("guided_k16", "guided, K=16"), ("best-of-k_k16", "best-of-16"), ("best-of-k_k64", "best-of-64"), ("greedy", "greedy"))
READING_METRICS = (("retrieval_top1", "1-in-n retrieval of its own activation"), ("minilm_top1", "MiniLM agreement (nearest own text)"),
                   ("confident", "confident"), ("confident_right", "confident and right (1-in-40)"),
                   ("confident_wrong", "confident and wrong (1-in-40)"), ("seconds_per_text", "seconds per text"))

#: the τ (compass cosine scale) and λ at which a policy-eval sweep is reported (nla-at-home's defaults)
POLICY_TAU, POLICY_LAMBDA = 0.30, 0.0


@dataclass(frozen=True)
class Metric:
    table: str  #: ``centered_eval`` | ``rerank_eval`` | ``oracle_ceiling``
    key: str  #: reference key name (``srt.md`` §6)
    label: str  #: human label; ``{K}`` is filled in
    k_dependent: bool = False
    centered: bool = True
    fve: bool = True  #: an fve_nrm score (ρ applies when centered)


METRICS: tuple[Metric, ...] = (
    Metric("centered_eval", "adapter_cen_greedy_mean", "greedy (centered)"),
    Metric("centered_eval", "adapter_cen_sampled_mean", "sampled mean (centered)"),
    Metric("centered_eval", "adapter_cen_bestofK_mean", "best-of-{K} (centered)", k_dependent=True),
    Metric("centered_eval", "adapter_cen_top5ofK_mean", "top-5-of-{K} mean (centered)", k_dependent=True),
    Metric("centered_eval", "nn_cen_mean", "NN-retrieval from the pool (centered)"),
    Metric("centered_eval", "random_cen_mean", "random floor (centered)"),
    Metric("centered_eval", "adapter_raw_greedy_mean", "greedy (raw)", centered=False),
    Metric("centered_eval", "adapter_raw_sampled_mean", "sampled mean (raw)", centered=False),
    Metric("centered_eval", "adapter_raw_bestofK_mean", "best-of-{K} (raw)", k_dependent=True, centered=False),
    Metric("centered_eval", "adapter_raw_top5ofK_mean", "top-5-of-{K} mean (raw)", k_dependent=True, centered=False),
    Metric("centered_eval", "nn_raw_mean", "NN-retrieval from the pool (raw)", centered=False),
    Metric("centered_eval", "random_raw_mean", "random floor (raw)", centered=False),
    Metric("rerank_eval", "logp_rerank_cen_mean", "logp-rerank of {K} (centered)", k_dependent=True),
    Metric("rerank_eval", "nn_anchor_rerank_cen_mean", "NN-anchor rerank of {K} (centered)", k_dependent=True),
    Metric("rerank_eval", "spearman_logp_vs_oracle_cen_mean", "Spearman(logp, oracle centered), K={K}", k_dependent=True, centered=False, fve=False),
    Metric("oracle_ceiling", "replay_cen_fve_mean", "replay (centered)"),
    Metric("oracle_ceiling", "paraphrase_best_cen_fve_mean", "paraphrase best-of-{K} (centered)", k_dependent=True),
    Metric("oracle_ceiling", "nn_in_pool_cen_fve_mean", "NN-in-pool (centered)"),
    Metric("oracle_ceiling", "random_floor_cen_fve_mean", "random floor, oracle-ceiling (centered)"),
    Metric("oracle_ceiling", "replay_fve_mean", "replay (raw)", centered=False),
    Metric("oracle_ceiling", "paraphrase_best_fve_mean", "paraphrase best-of-{K} (raw)", k_dependent=True, centered=False),
    Metric("oracle_ceiling", "nn_in_pool_fve_mean", "NN-in-pool (raw)", centered=False),
    Metric("oracle_ceiling", "random_floor_fve_mean", "random floor, oracle-ceiling (raw)", centered=False),
    # policy-eval (flattened by :func:`flat_values`): rates over 1-in-n retrieval, at τ = POLICY_TAU, λ = POLICY_LAMBDA
    *(Metric(t, key, f"{label}, {who}", k_dependent=k, centered=False, fve=False)
      for t, who in (("policy_eval_compass", "compass rerank of {K}"), ("policy_eval", "oracle rerank of {K}"))
      for key, label, k in (("policy_confident_right", "confident right (τ 0.30)", True),
                            ("policy_confident_wrong", "confident wrong (τ 0.30)", True),
                            ("policy_hedged", "hedged (τ 0.30)", True),
                            ("oracle_retrieval_any", "any candidate retrieves the target", True))),
    Metric("roundtrip", "roundtrip_cos_mean", "round-trip cosine, mean-centred (AR or re-encode)", centered=False, fve=False),
    Metric("roundtrip", "correct_vs_wrong_top1", "round trip picks the right activation over a wrong one", centered=False, fve=False),
    # reading-eval on a held-out text file (flattened by :func:`flat_values`: ``<run>_<metric>``)
    *(Metric("reading_eval", f"{run}_{key}", f"{label}, {who}", centered=False, fve=False)
      for run, who in READING_RUNS for key, label in READING_METRICS),
)

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


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def _curve(d: Any) -> dict[int, float]:
    """``{"1": s, "2": s, …, "M": 200}`` → ``{1: s, 2: s, …}`` (non-integer keys dropped)."""
    out: dict[int, float] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            if str(k).isdigit() and _num(v) is not None:
                out[int(k)] = float(v)
    return dict(sorted(out.items()))


def kcurve_slope(curve: dict[int, float]) -> float | None:
    """Least-squares slope of the score against log2 K (score gained per doubling of K)."""
    pts = [(math.log2(k), s) for k, s in curve.items() if k >= 1]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return None if sxx == 0 else sum((x - mx) * (y - my) for x, y in pts) / sxx


# ----------------------------------------------------------------------------------------------
# What one origin (published card tables, or the reproduced results of one card) says


@dataclass
class Source:
    """The numbers of one card from one origin, as tables keyed like the reference JSONs."""

    tables: dict[str, dict[str, Any]]  #: table name → reference keys (+ "M", "K")
    sources: dict[str, str]  #: table name → provenance string (published) or ""
    metas: dict[str, dict[str, Any]]  #: table name → results ``meta`` (reproduced)
    kcurve: dict[int, float]

    def get(self, table: str, key: str) -> float | None:
        return _num(self.tables.get(table, {}).get(key))


def published_source(card: Card) -> Source:
    pub = card.published or {}
    base = str(pub.get("source") or card.source_file or card.id)
    tables: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    for name in ("centered_eval", "rerank_eval", "oracle_ceiling"):
        if isinstance(pub.get(name), dict):
            tables[name] = dict(pub[name])
            sources[name] = f"{base} [{name}]"
    kcurve = _curve(pub.get("kcurve_oracle_top1_cen")) or _curve(pub.get("bestof_cen"))
    # rerank_eval tables in the cards do not all state K; it is the K-curve's largest K.
    if "rerank_eval" in tables and "K" not in tables["rerank_eval"]:
        k = max(kcurve) if kcurve else tables.get("centered_eval", {}).get("K")
        if k is not None:
            tables["rerank_eval"]["K"] = int(k)
    kc_meta = pub.get("kcurve_oracle_top1_cen")
    if "rerank_eval" in tables and "M" not in tables["rerank_eval"] and isinstance(kc_meta, dict) and "M" in kc_meta:
        tables["rerank_eval"]["M"] = kc_meta["M"]  # the K-curve and the rerank numbers come from one rerank_eval run
    # every published paraphrase ceiling is best-of-8 (the reference default; each card says so)
    if "oracle_ceiling" in tables:
        tables["oracle_ceiling"].setdefault("K", 8)
    return Source(tables=tables, sources=sources, metas={}, kcurve=kcurve)


def _finished(result: dict[str, Any]) -> str:
    return str(result.get("meta", {}).get("finished") or "")


def reproduced_sources(results: Iterable[dict[str, Any]], cards: list[Card]) -> dict[str, Source]:
    """Group results files by card id; ``oracle-ceiling`` results without a card attach to every
    card on the same backbone and layer."""
    out: dict[str, Source] = {}
    for res in sorted(results, key=_finished):
        meta = res.get("meta") or {}
        table = COMMAND_TABLES.get(str(meta.get("command")))
        if table is None:
            log.warning("skipping a results file without a known meta.command: %s", meta.get("path"))
            continue
        ids = [meta["card"]] if meta.get("card") else [
            c.id for c in cards if c.backbone_id == meta.get("backbone") and meta.get("layer") in c.layers
        ] or [f"{meta.get('backbone')}@L{meta.get('layer')}"]
        if table == "policy_eval" and (meta.get("args") or {}).get("compass"):
            table = "policy_eval_compass"
        if table == "reading_eval" and (meta.get("args") or {}).get("texts") in (None, "None"):
            table = "reading_eval_split"  # a corpus split: reported in docs, not in the held-out rows
        for cid in ids:
            src = out.setdefault(cid, Source({}, {}, {}, {}))
            values = flat_values(table, res)
            values.setdefault("M", meta.get("M"))
            values.setdefault("K", meta.get("K"))
            src.tables[table] = values
            src.sources[table] = str(meta.get("path") or "")
            src.metas[table] = meta
            curve = _curve(res.get("kcurve_oracle_top1_cen"))
            if curve and (table == "rerank_eval" or not src.kcurve):
                src.kcurve = curve
    return out


def flat_values(table: str, res: dict[str, Any]) -> dict[str, Any]:
    """A results file's numbers as one flat dict: the reference keys as they are; for ``policy-eval``
    the first layer's rates at τ = :data:`POLICY_TAU`, λ = :data:`POLICY_LAMBDA` (plus ``K`` = candidates,
    ``M`` = targets); for ``roundtrip`` the mean-centred round-trip cosine and the mean correct-vs-wrong top-1."""
    values = {k: v for k, v in res.items() if k != "meta"}
    if table.startswith("policy_eval"):
        layers = res.get("per_layer") or {}
        first = layers[sorted(layers)[0]] if layers else {}
        sweep = (first.get("penalty_sweeps") or {}).get(str(POLICY_LAMBDA), [])
        at = next((r for r in sweep if _num(r.get("tau")) is not None and abs(r["tau"] - POLICY_TAU) < 1e-9), {})
        values.update(policy_confident_right=at.get("confident_right"), policy_confident_wrong=at.get("confident_wrong"),
                      policy_hedged=at.get("hedged"), oracle_retrieval_any=first.get("oracle_retrieval_any"),
                      K=res.get("n_samples"), M=first.get("n"))
    elif table.startswith("reading_eval"):
        runs = res.get("results") or {}
        for run, r in runs.items():
            values.update({f"{run}_{k}": v for k, v in r.items() if k != "examples" and isinstance(v, (int, float, type(None)))})
        values.update(M=next(iter(runs.values()), {}).get("n"), K=None)
        values.pop("results", None)
    elif table == "roundtrip":
        arm = (res.get("arms") or {}).get("roundtrip") or {}
        tops = [_num(v.get("top1")) for v in (res.get("correct_vs_wrong") or {}).values() if isinstance(v, dict)]
        values.update(roundtrip_cos_mean=arm.get("mean"), M=arm.get("n") or res.get("holdout_n"),
                      correct_vs_wrong_top1=sum(tops) / len(tops) if tops and None not in tops else None)
    return values


def card_anchors(card: Card | None, reproduced: Source | None) -> dict[str, Any] | None:
    """Floor and ceiling for ρ: the card's own, else reproduced by ``oracle-ceiling`` on its backbone."""
    a = (card.anchors if card else None) or {}
    floor, ceiling = _num(a.get("random_floor_cen")), _num(a.get("ceiling_cen"))
    if floor is not None and ceiling is not None and ceiling != floor:
        return {"floor": floor, "ceiling": ceiling, "ceiling_name": a.get("ceiling_name"), "source": a.get("source")}
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
    if tbl is None or _num(tbl.get(metric.key)) is None:
        return None
    k = tbl.get("K") if metric.k_dependent else None
    return metric.key, (int(k) if isinstance(k, (int, float)) else None)


def _meta_summary(meta: dict[str, Any]) -> dict[str, Any]:
    keep = ("command", "path", "card", "backbone", "backbone_revision", "layer", "M", "K", "pool_size", "seed",
            "temperature", "max_new_tokens", "targets", "targets_split", "mu_source", "trained", "limit",
            "git_commit", "device", "wall_time_s", "finished", "note", "av_weights")
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
        for metric in METRICS:
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
            found.append({"card": cid, "origin": origin, **findings(src)})
    others = [o for c in cards for o in other_published(c)]
    return {"generated": _now(), "rows": rows, "kcurves": kcurves, "findings": found, "anchors": anchors, "other_published": others}


#: card tables read into rows (:data:`METRICS`) or K-curves; never repeated in ``other_published``
_ROW_TABLES = {"source", "note", "reading_eval", "reading_eval_split", "centered_eval", "rerank_eval", "oracle_ceiling", "policy_eval", "policy_eval_compass", "roundtrip", "bestof_cen", "bestof_raw",
               "kcurve_oracle_top1_cen", "training"}


def other_published(card: Card) -> list[dict[str, Any]]:
    """Numeric leaves of the card's non-SRT published tables, with the table's note and source."""
    pub = card.published or {}
    out: list[dict[str, Any]] = []

    def walk(table: str, prefix: str, node: Any, note: str | None) -> None:
        if isinstance(node, dict):
            note = str(node.get("note")) if node.get("note") is not None else note
            for k, v in node.items():
                if k != "note":
                    walk(table, f"{prefix}.{k}" if prefix else str(k), v, note)
        elif _num(node) is not None:
            out.append({"card": card.id, "table": table, "key": prefix, "value": node, "note": note,
                        "source": str(pub.get("source") or card.source_file or card.id)})

    for table, node in pub.items():
        if table not in _ROW_TABLES and isinstance(node, dict):
            walk(table, "", node, str(pub["note"]) if pub.get("note") is not None else None)
    return out


def load_leaderboard(path: Path | None = None) -> dict[str, Any]:
    """The leaderboard file (default ``assets/leaderboard.json``), else the published part built from the cards."""
    path = Path(path) if path is not None else DEFAULT_PATH
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("rows"), list):
                data.setdefault("kcurves", [])
                data.setdefault("findings", [])
                return data
            log.warning("%s: not a leaderboard (no 'rows'); using the published numbers", path)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            log.warning("%s: unreadable (%s); using the published numbers", path, exc)
    return build_leaderboard()


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
    from .cards import builtin_cards

    try:
        return {c.id: c.description for c in builtin_cards() if c.description}
    except Exception:  # a broken card file must not break the rendering
        return {}


def to_markdown(lb: dict[str, Any]) -> str:
    """A markdown rendering: one table per card, then the K-curves and the findings."""
    out = [f"# Leaderboard\n\nGenerated {lb.get('generated')}. Scores are fve_nrm = ½(1+cos); centered = "
           "μ of a disjoint pool subtracted; ρ = (s − floor)/(ceiling − floor) with the card's own anchors.\n"]
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
    if lb.get("findings"):
        out.append("\n## Findings\n\n| card | origin | K-curve slope / doubling | logp-rerank − greedy | Spearman(logp, oracle) "
                   "| NN-anchor rerank − greedy | raw floor | centered floor | centering changes verdict | greedy − NN-retrieval |\n"
                   "|---|---|---|---|---|---|---|---|---|---|\n")
        for f in lb["findings"]:
            out.append(f"| `{f['card']}` | {f['origin']} | {_fmt(f['kcurve_slope_per_doubling'], 4)} | {_fmt(f['logp_rerank_minus_greedy'], 4)} "
                       f"| {_fmt(f['spearman_logp_oracle'])} | {_fmt(f['nn_anchor_rerank_minus_greedy'], 4)} | {_fmt(f['raw_floor'])} "
                       f"| {_fmt(f['centered_floor'])} | {_fmt(f['centering_changes_verdict'])} | {_fmt(f['greedy_minus_nn_retrieval'], 4)} |\n")
    if lb.get("other_published"):
        out.append("\n## Other published numbers (not fve_nrm; read each note)\n\n| card | table | key | value | note | source |\n|---|---|---|---|---|---|\n")
        for o in lb["other_published"]:
            out.append(f"| `{o['card']}` | {o['table']} | {o['key']} | {o['value']} | {o.get('note') or ''} | {o.get('source') or ''} |\n")
    return "".join(out)
