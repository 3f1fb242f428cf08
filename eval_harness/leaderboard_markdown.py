"""The leaderboard's markdown rendering (``python -m eval_harness leaderboard --markdown docs/leaderboard.md``).

:func:`to_markdown` renders the dict of :func:`eval_harness.leaderboard_build.build_leaderboard` (schema in
:mod:`nla_space.leaderboard`): findings, one table per card, K-curves, the per-layer section
(:func:`layers_markdown`) and the other published numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nla_space.cards import builtin_cards
from nla_space.leaderboard import FINDINGS_NOTE, LAYER_COLUMNS

#: decimals of each per-layer column (rates 3, seconds 2, perplexity 1)
_LAYER_DIGITS = {"seconds_per_text": 2, "judge_ppl_mean": 1}
LAYERS_INTRO = (
    "Reading at every depth: `reading-eval --layers` runs the same texts at each layer of a card; one row per "
    "layer (`hidden_states` index; depth % = round(100 · layer / the backbone's blocks)), each strategy's metrics "
    "side by side. 1-in-40 = the re-encoded answer picks out its own activation among 40. Published per-layer "
    "numbers from the cards follow each table: they are **a different metric** (named with each), not this retrieval."
)


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
    """A markdown rendering: the findings first, then one table per card, the K-curves, the per-layer
    tables (:func:`layers_markdown`) and the other published numbers."""
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
    out.append(layers_markdown(lb.get("layer_curves") or []))
    if lb.get("other_published"):
        out.append("\n## Other published numbers (not fve_nrm; read each note)\n\n| card | table | key | value | note | source |\n|---|---|---|---|---|---|\n")
        for o in lb["other_published"]:
            out.append(f"| `{o['card']}` | {o['table']} | {o['key']} | {o['value']} | {o.get('note') or ''} | {o.get('source') or ''} |\n")
    return "".join(out)


def _layer_table(points: list[dict[str, Any]]) -> str:
    """One card's reproduced points as a table: layer, depth %, then each run's columns (runs in the
    points' order: greedy, guided, others); a same-group column only for runs that have it."""
    runs = list(dict.fromkeys(p["run"] for p in points))
    cols = [(run, key, label) for run in runs for key, label in LAYER_COLUMNS
            if key != "retrieval_in40_same_group" or any(p["run"] == run and p.get(key) is not None for p in points)]
    by = {(p["run"], p["layer"]): p for p in points}
    layers = sorted({p["layer"] for p in points})
    depth = {p["layer"]: p.get("depth_pct") for p in points}
    out = ["| layer | depth % | " + " | ".join(f"{run}: {label}" for run, _, label in cols) + " |\n",
           "|---|---|" + "---|" * len(cols) + "\n"]
    for layer in layers:
        cells = [_fmt((by.get((run, layer)) or {}).get(key), _LAYER_DIGITS.get(key, 3)) for run, key, _ in cols]
        out.append(f"| {layer} | {_fmt(depth[layer])} | " + " | ".join(cells) + " |\n")
    return "".join(out)


def _run_line(meta: dict[str, Any]) -> str:
    bits = [f"{k} {meta[k]}" for k in ("M", "K", "seed", "layers", "finished") if meta.get(k) is not None]
    src = f", texts {Path(str(meta['source'])).name}" if meta.get("source") else ""
    return f"`{meta.get('path') or '?'}` ({', '.join(bits)}{src})"


def layers_markdown(points: list[dict[str, Any]]) -> str:
    """The "Per layer" section: per card, a table of its reproduced ``reading-eval --layers`` points
    (:func:`_layer_table`) with the runs they came from, then its published per-layer points with their
    metric, note and source. Empty when there are no points."""
    if not points:
        return ""
    out = ["\n## Per layer\n\n" + LAYERS_INTRO + "\n"]
    if not any(p["origin"] == "reproduced" for p in points):
        out.append("\nNo per-layer runs yet (`python -m eval_harness reading-eval --card … --texts … --layers all`).\n")
    for cid in dict.fromkeys(p["card"] for p in points):
        mine = [p for p in points if p["card"] == cid]
        rep = [p for p in mine if p["origin"] == "reproduced"]
        pub = [p for p in mine if p["origin"] == "published"]
        n_blocks = next((p["n_blocks"] for p in mine if p.get("n_blocks")), None)
        out.append(f"\n### `{cid}`\n\n" + (f"{n_blocks} blocks." if n_blocks else "Block count unknown: no depth %.") + "\n")
        if rep:
            out.append("\n" + _layer_table(rep))
            metas = {str(p["meta"].get("path")): p["meta"] for p in rep if p.get("meta")}
            out.append("\nRuns: " + "; ".join(_run_line(m) for m in metas.values()) + "\n")
        if pub:
            out.append("\nPublished per-layer numbers (not the reading-eval retrieval):\n\n")
            for p in pub:
                out.append(f"- {p['label']}: **{_fmt(p['value'])}** at block {p['block']} (`hidden_states[{p['layer']}]`, "
                           f"depth {_fmt(p['depth_pct'])} %)" + (f". {p['note']}" if p.get("note") else "")
                           + f". Source: {p['source']}\n")
    return "".join(out)
