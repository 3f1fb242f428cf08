"""The leaderboard as the app reads it, and the published numbers of the card files.

:func:`load_leaderboard` reads ``nla_space/assets/leaderboard.json`` (:data:`DEFAULT_PATH`, written by
``python -m eval_harness leaderboard``, which is also where rows, ρ, K-curves and findings are
built); when the file is missing or unreadable it falls back to :func:`published_board`, the
published numbers of the built-in cards as plain rows, so there is always something to show.

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

A card's ``published`` section holds tables keyed like the SRT eval scripts' JSONs
(``centered_eval``, ``rerank_eval``, ``oracle_ceiling``: :func:`published_source`), K-curves, and other
tables; ``other_published`` holds the numeric facts of the tables no row reads (e.g. token-injection
cards' round-trip cosines, AR deltas), each with the table's ``note`` and the card's source, so they
are never mistaken for fve_nrm rows. Training hyperparameters are left out.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection

from .cards import ASSETS_DIR, Card, builtin_cards

log = logging.getLogger(__name__)

DEFAULT_PATH = ASSETS_DIR / "leaderboard.json"

#: the published tables read by :func:`published_source`
SRT_TABLES = ("centered_eval", "rerank_eval", "oracle_ceiling")
#: What the findings table compares and why the hub cards' rows are published-only (the app's
#: Leaderboard tab and ``docs/leaderboard.md`` both lead with it).
FINDINGS_NOTE = (
    "The comparison across backbones: how fast best-of-K rises per doubling of K, whether reranking by the AV's own "
    "log-probability beats greedy, whether best-of-64 beats nearest-neighbour retrieval, and whether centering "
    "changes the verdict. Rows marked *published* come from the cards' model cards; *reproduced* rows were run by "
    "this project's harness (`nla-eval`), with the run's settings in each row.\n\n"
    "**The hub cards (Qwen2.5-7B, Llama-3.2-3B, Gemma-2-2B, Phi-4) cannot be re-run on this project's machines**, "
    "which cannot download their weights; their rows are as published. Where the weights can be downloaded, "
    "`nla-eval targets`, then `centered-eval`, `rerank-eval` and `oracle-ceiling` with `--card <hub id>` reproduce "
    "them (docs/evals.md), and `nla-eval leaderboard` adds them here."
)

#: published keys that are not tables of numbers to list (provenance, K-curves, training settings)
CARD_META_KEYS = frozenset({"source", "note", "bestof_cen", "bestof_raw", "kcurve_oracle_top1_cen", "training"})


def finite(x: Any) -> float | None:
    """``x`` as a float when it is a finite number (not a bool), else None."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def curve(d: Any) -> dict[int, float]:
    """``{"1": s, "2": s, …, "M": 200}`` → ``{1: s, 2: s, …}`` (non-integer keys dropped)."""
    out: dict[int, float] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            if str(k).isdigit() and finite(v) is not None:
                out[int(k)] = float(v)
    return dict(sorted(out.items()))


@dataclass
class Source:
    """The numbers of one card from one origin, as tables keyed like the reference JSONs."""

    tables: dict[str, dict[str, Any]]  #: table name → reference keys (+ "M", "K")
    sources: dict[str, str]  #: table name → provenance string (published) or ""
    metas: dict[str, dict[str, Any]]  #: table name → results ``meta`` (reproduced)
    kcurve: dict[int, float]

    def get(self, table: str, key: str) -> float | None:
        return finite(self.tables.get(table, {}).get(key))


def published_source(card: Card) -> Source:
    pub = card.published or {}
    base = str(pub.get("source") or card.source_file or card.id)
    tables: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    for name in SRT_TABLES:
        if isinstance(pub.get(name), dict):
            tables[name] = dict(pub[name])
            sources[name] = f"{base} [{name}]"
    kcurve = curve(pub.get("kcurve_oracle_top1_cen")) or curve(pub.get("bestof_cen"))
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


def other_published(card: Card, skip: Collection[str]) -> list[dict[str, Any]]:
    """Numeric leaves of the card's published tables not in ``skip`` (those read into rows), with the table's note and source."""
    pub = card.published or {}
    out: list[dict[str, Any]] = []

    def walk(table: str, prefix: str, node: Any, note: str | None) -> None:
        if isinstance(node, dict):
            note = str(node.get("note")) if node.get("note") is not None else note
            for k, v in node.items():
                if k != "note":
                    walk(table, f"{prefix}.{k}" if prefix else str(k), v, note)
        elif finite(node) is not None:
            out.append({"card": card.id, "table": table, "key": prefix, "value": node, "note": note,
                        "source": str(pub.get("source") or card.source_file or card.id)})

    for table, node in pub.items():
        if table not in skip and isinstance(node, dict):
            walk(table, "", node, str(pub["note"]) if pub.get("note") is not None else None)
    return out


def published_board(cards: list[Card] | None = None) -> dict[str, Any]:
    """The published numbers of ``cards`` (default: the built-in ones) in the leaderboard schema, one
    plain row per number of :func:`published_source` (label = key; no ρ, no findings)."""
    rows: list[dict[str, Any]] = []
    kcurves: list[dict[str, Any]] = []
    others: list[dict[str, Any]] = []
    for card in builtin_cards() if cards is None else cards:
        src = published_source(card)
        for table, values in src.tables.items():
            for key, value in values.items():
                if key not in ("K", "M") and finite(value) is not None:
                    rows.append({"card": card.id, "title": card.title, "backbone": card.backbone_id, "layer": card.default_layer,
                                 "metric": key, "label": key, "K": values.get("K"), "M": values.get("M"), "published": value,
                                 "published_source": src.sources[table], "reproduced": None, "reproduced_meta": None,
                                 "rho_published": None, "rho_reproduced": None})
        kcurves += [{"card": card.id, "origin": "published", "K": k, "score_cen": s} for k, s in src.kcurve.items()]
        others += other_published(card, CARD_META_KEYS | set(src.tables))
    return {"generated": None, "rows": rows, "kcurves": kcurves, "findings": [], "anchors": {}, "other_published": others}


def load_leaderboard(path: Path | None = None) -> dict[str, Any]:
    """The leaderboard file (default ``nla_space/assets/leaderboard.json``), else :func:`published_board`."""
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
    return published_board()
