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
     "other_published": [{"card", "table", "key", "value", "note", "source"}],
     "layer_curves": [{"card", "origin", "metric", "run", "strategy", "k", "layer", "block", "depth_pct",
                       "n_blocks", "label", "value", "n", *LAYER_METRICS, "meta", "note", "source"}]}

``layer_curves`` (:data:`LAYER_POINT_KEYS`; every key in every point, None where it does not apply) are
points of a quantity against depth, one per (card, origin, run, layer):

* ``origin: "reproduced"``: one run of ``reading-eval --layers`` (results key ``<run>_L<ℓ>``; ``metric``
  is the results table, ``reading_eval``; ``run`` the key without the layer, e.g. ``greedy``,
  ``guided_k16``), with its reading metrics (:data:`LAYER_METRICS`) and ``meta``, the run's meta summary;
  ``value`` is None.
* ``origin: "published"``: a number of a card's published table under a key ``L<block>``
  (:func:`published_layer_points`); ``metric`` is the table's name (e.g. ``roundtrip``), ``value`` the
  number, ``note`` and ``source`` its citation, and ``label`` says it is not the reading-eval retrieval.

``layer`` is always a ``hidden_states`` index (:mod:`nla_space.activations`); ``block`` is the block index a
published key states (None for reproduced points); ``depth_pct = round(100 · layer / n_blocks)`` (Python
rounding) with ``n_blocks`` the backbone's block count (:func:`card_blocks`), None when unknown.

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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection

from .cards import ASSETS_DIR, Card, builtin_cards
from .cards.sections import DEFAULT_BLOCK_OFFSET

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


#: Block counts of the embedded backbones, whose cards state no ``backbone.shape``: ``num_hidden_layers``
#: of the ``config.json`` of each one's hub equivalent (HuggingFaceTB/SmolLM2-135M-Instruct: 30,
#: google/gemma-3-270m: 18; the cards' descriptions state the same).
EMBEDDED_BLOCKS: dict[str, int] = {"embedded:smollm2-135m-instruct": 30, "embedded:gemma3-270m": 18}
#: The reading metrics of a reproduced per-layer point (``reading-eval``'s per-run numbers; the last one
#: only with ``--group-by``).
LAYER_METRICS = ("retrieval_top1", "retrieval_top1_in40", "minilm_top1", "confident", "confident_right", "confident_wrong",
                 "precision_confident", "seconds_per_text", "judge_ppl_mean", "retrieval_in40_same_group")
#: How tables name the per-layer reading metrics (key, column label), in the order they are shown.
LAYER_COLUMNS = (("retrieval_top1_in40", "1-in-40 retrieval"), ("minilm_top1", "MiniLM"), ("confident_right", "confident-right"),
                 ("confident_wrong", "confident-wrong"), ("precision_confident", "precision of confident"),
                 ("seconds_per_text", "s/text"), ("judge_ppl_mean", "judge ppl"), ("retrieval_in40_same_group", "same-group 1-in-40"))
#: The keys of every ``layer_curves`` point (module docstring).
LAYER_POINT_KEYS = ("card", "origin", "metric", "run", "strategy", "k", "layer", "block", "depth_pct", "n_blocks", "label",
                    "value", "n", *LAYER_METRICS, "meta", "note", "source")
#: What a published per-layer table measures (table name → words); a table not listed is named by its key.
LAYER_TABLE_LABELS = {"roundtrip": "round-trip cosine"}
_BLOCK_KEY = re.compile(r"L(\d+)")


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


def card_blocks(card: Card | None) -> int | None:
    """The number of blocks of the card's backbone without loading it: ``backbone.shape.num_hidden_layers``,
    else :data:`EMBEDDED_BLOCKS`; None when neither knows."""
    if card is None:
        return None
    n = (card.backbone.shape or {}).get("num_hidden_layers")
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        return n
    return EMBEDDED_BLOCKS.get(card.backbone_id)


def block_offset(card: Card) -> int:
    """``hidden_states[ℓ]`` is the output of block ``ℓ − offset``: the card's ``injection.block_offset``, else 1."""
    return card.injection.block_offset if card.injection is not None else DEFAULT_BLOCK_OFFSET


def depth_pct(layer: int | None, n_blocks: int | None) -> int | None:
    """``round(100 · layer / n_blocks)`` for a ``hidden_states`` index (Python rounding); None when either is unknown."""
    if layer is None or not n_blocks:
        return None
    return int(round(100.0 * layer / n_blocks))


def layer_point(**values: Any) -> dict[str, Any]:
    """One ``layer_curves`` point: every key of :data:`LAYER_POINT_KEYS`, None where not given."""
    unknown = set(values) - set(LAYER_POINT_KEYS)
    if unknown:
        raise ValueError(f"not layer-curve keys: {sorted(unknown)}")
    return {k: values.get(k) for k in LAYER_POINT_KEYS}


def card_short_name(card: Card) -> str:
    """The card's first alias (else its id) and its backbone: how plots and labels name it."""
    return f"{card.aliases[0] if card.aliases else card.id} ({card.backbone_id})"


def published_layer_points(card: Card) -> list[dict[str, Any]]:
    """Published per-layer numbers: every numeric entry keyed ``L<block>`` of a top-level table of the
    card's ``published`` section (e.g. Phi-4's ``roundtrip: {"L4": 0.42, "L19": 0.69}``).

    Convention: ``L<b>`` in a card's published table is a *block* index, as the sources write it, so the
    point's ``layer`` (``hidden_states`` index) is ``b + block_offset`` (:func:`block_offset`; Phi-4:
    ``L19`` is ``hidden_states[20]``) and ``depth_pct`` follows from it (:func:`depth_pct`). Each point
    carries the table's ``note`` and the card's source, and a label saying the number is that table's
    metric, not the reading-eval retrieval.
    """
    pub = card.published or {}
    source = str(pub.get("source") or card.source_file or card.id)
    n_blocks, offset = card_blocks(card), block_offset(card)
    out: list[dict[str, Any]] = []
    for table, node in pub.items():
        if table in CARD_META_KEYS or not isinstance(node, dict):
            continue
        what = LAYER_TABLE_LABELS.get(table, table.replace("_", " "))
        for key, value in node.items():
            m = _BLOCK_KEY.fullmatch(str(key))
            if m is None or finite(value) is None:
                continue
            block = int(m.group(1))
            out.append(layer_point(card=card.id, origin="published", metric=table, layer=block + offset, block=block,
                                   depth_pct=depth_pct(block + offset, n_blocks), n_blocks=n_blocks, value=float(value),
                                   label=f"{card_short_name(card)}, published {what} (not retrieval)",
                                   note=str(node["note"]) if node.get("note") is not None else None,
                                   source=f"{source} [{table}]"))
    return sorted(out, key=lambda p: (p["metric"], p["layer"]))


def published_board(cards: list[Card] | None = None) -> dict[str, Any]:
    """The published numbers of ``cards`` (default: the built-in ones) in the leaderboard schema, one
    plain row per number of :func:`published_source` (label = key; no ρ, no findings)."""
    rows: list[dict[str, Any]] = []
    kcurves: list[dict[str, Any]] = []
    others: list[dict[str, Any]] = []
    layers: list[dict[str, Any]] = []
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
        layers += published_layer_points(card)
    return {"generated": None, "rows": rows, "kcurves": kcurves, "findings": [], "anchors": {}, "other_published": others,
            "layer_curves": layers}


def load_leaderboard(path: Path | None = None) -> dict[str, Any]:
    """The leaderboard file (default ``nla_space/assets/leaderboard.json``), else :func:`published_board`.

    A file written before ``layer_curves`` existed gets the built-in cards' published per-layer points."""
    path = Path(path) if path is not None else DEFAULT_PATH
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("rows"), list):
                data.setdefault("kcurves", [])
                data.setdefault("findings", [])
                if "layer_curves" not in data:
                    data["layer_curves"] = [p for c in builtin_cards() for p in published_layer_points(c)]
                return data
            log.warning("%s: not a leaderboard (no 'rows'); using the published numbers", path)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            log.warning("%s: unreadable (%s); using the published numbers", path, exc)
    return published_board()
