"""Turn a result (``Verbalization.to_dict()``) into what the page shows: badge, table, plot, notes.

Pure functions of plain data (no Gradio, no model), so they are easy to test and reuse.
"""

from __future__ import annotations

import html
import math
from typing import Any

import pandas as pd

from ..cards import Card
from ..cards.sections import AnchorsSection

#: note kinds (:data:`nla_space.policy.NOTE_KINDS`) that :func:`notes_markdown` states from ``trained``/``centered`` instead
SHOWN_ABOVE = ("untrained", "uncentered")

CANDIDATE_COLUMNS = ["rank", "chosen", "specificity", "score (centered)", "score (raw)", "compass f", "candidate"]


def score_kind(result: dict[str, Any]) -> str:
    """What the hedged score is: ``confidence`` (calibrated cards), else ``centered`` or ``raw`` fve."""
    if result.get("criterion") == "confidence":
        return "confidence"
    return "centered" if result.get("centered") else "raw"


def badge_html(result: dict[str, Any]) -> str:
    """The hedged / confident badge at τ, plus an untrained warning when the AV is untrained."""
    hedged = bool(result["hedged"])
    cls, word = ("hedged", "HEDGED") if hedged else ("confident", "CONFIDENT")
    why = "below" if hedged else "at or above"
    parts = [
        f'<div class="nla-badges"><span class="nla-badge nla-{cls}" id="nla-badge-{cls}">{word}</span>'
        f'<span class="nla-score">{score_kind(result)} score <b>{result["score"]:.3f}</b> is {why} '
        f'τ = {result["tau"]:.3f}</span>'
    ]
    if not result.get("trained", False):
        parts.append('<span class="nla-badge nla-untrained">UNTRAINED AV</span>')
    parts.append("</div>")
    if result.get("confidence_meaning"):
        parts.append(f'<div class="nla-meaning">{escape(result["confidence_meaning"])}</div>')
    return "".join(parts)


def notes_markdown(result: dict[str, Any]) -> str:
    lines = []
    if not result.get("trained", False):
        lines.append("⚠️ **Untrained AV**: this card runs an identity-initialised verbalizer (no trained weights "
                     "are shipped yet), so the candidates are not readings of the activation. The scores and "
                     "the best-of-K machinery still work.")
    if not result.get("centered", False):
        lines.append("Scores are raw fve_nrm (the card has no μ), not centered; the raw floor sits well above 0.5.")
    for n in result.get("notes", []):
        if n["kind"] not in SHOWN_ABOVE:
            lines.append(f"Note: {n['text']}")
    return "\n\n".join(lines)


def _sort_key(c: dict[str, Any], centered: bool) -> float:
    """Candidates in selection order: specificity where the card has it, else the centered or raw score."""
    if c.get("specificity") is not None:
        return -float(c["specificity"])
    s = c["score_cen"] if centered and c.get("score_cen") is not None else c["score_raw"]
    return -float(s)


def candidates_frame(result: dict[str, Any]) -> pd.DataFrame:
    """The K candidates sorted by the selection score, the chosen one marked."""
    centered = bool(result.get("centered"))
    cands = result["candidates"]
    comp = result.get("compass") or None
    order = sorted(range(len(cands)), key=lambda i: _sort_key(cands[i], centered))
    rows = []
    for rank, i in enumerate(order, 1):
        c = cands[i]
        mark = ("★" if i == result["best_index"] else "") + ("◆" if comp and i == comp["best_index"] else "")
        rows.append({
            "rank": rank,
            "chosen": mark,
            "specificity": round(c["specificity"], 3) if c.get("specificity") is not None else None,
            "score (centered)": round(c["score_cen"], 4) if c.get("score_cen") is not None else None,
            "score (raw)": round(c["score_raw"], 4),
            "compass f": round(comp["faithfulness"][i], 4) if comp else None,
            "candidate": c["text"] if c["text"].strip() else "(empty: whitespace or EOS only)",
        })
    return pd.DataFrame(rows, columns=CANDIDATE_COLUMNS)


def compass_markdown(result: dict[str, Any]) -> str:
    """The two reranks of the same K candidates side by side: the oracle (re-encode score, ★) and the
    compass (MiniLM cosine to the compass target, ◆), each with its own threshold and decision."""
    comp = result.get("compass")
    if not comp:
        return ("*Compass rerank: this card ships no compass, so only the oracle (re-encode) pick is shown.*"
                if not result.get("greedy") else "")
    cands = result["candidates"]
    name = comp.get("faith_model", "MiniLM").split("/")[-1]
    if len(cands) == 1:  # greedy: nothing to rerank; the compass is a second opinion on the one answer
        return (f"**Compass second opinion** ({name}): cosine {comp['conf']:.3f} vs τ {comp['tau']:.2f} → "
                f"{'hedged' if comp['hedged'] else 'confident'} (the oracle says {result['score']:.3f} vs τ "
                f"{result['tau']:.2f} → {'hedged' if result['hedged'] else 'confident'})")
    oracle_i, comp_i = result["best_index"], comp["best_index"]
    same = "the **same** candidate" if oracle_i == comp_i else "**different** candidates"
    def line(name: str, i: int, score: str, hedged: bool) -> str:
        text = " ".join(cands[i]["text"].split()) or "(empty)"
        return f"| {name} | {score} | {'hedged' if hedged else 'confident'} | {escape(text[:160]).replace('|', '&#124;')} |"
    return "\n".join([
        f"**Oracle rerank vs compass rerank** ({len(cands)} candidates; they pick {same}; "
        f"compass agreement {comp['agreement']:.3f})",
        "",
        "| rerank | score vs threshold | decision | pick |",
        "|---|---|---|---|",
        line("★ oracle (re-encode)", oracle_i, f"{result['score']:.3f} vs τ {result['tau']:.2f}", bool(result["hedged"])),
        line(f"◆ compass ({name})", comp_i,
             f"{comp['conf']:.3f} vs τ {comp['tau']:.2f} (cosine)", bool(comp["hedged"])),
    ])


def decoding_label(result: dict[str, Any]) -> str:
    """How a result was decoded, as the UI names it: ``greedy`` (one rollout; K does not apply),
    ``guided-16``, ``best-of-16``."""
    if result.get("greedy"):
        return "greedy"
    return f"{result.get('strategy', 'best-of-k').replace('best-of-k', 'best-of')}-{result['k']}"


def timings_markdown(result: dict[str, Any]) -> str:
    t = result.get("timings", {})
    parts = [f"{k.removesuffix('_s')} {v:.2f} s" for k, v in t.items()]
    head = (f"card `{result['card']}` · layer {result['layer']} · {decoding_label(result)} · T={result['temperature']} · "
            f"seed {result['seed']}")
    return head + ("  \ntimings: " + " · ".join(parts) if parts else "")


def score_plot(result: dict[str, Any], card: Card | None = None) -> Any:
    """A matplotlib Figure: the K scores (sorted), the τ line, and the card's floor and ceiling.

    Each anchor is drawn on its own scale only: ``random_floor_cen``/``ceiling_cen`` for centered fve
    scores, ``random_floor_conf``/``ceiling_conf`` for calibrated confidences.
    """
    from matplotlib.figure import Figure

    calibrated = result.get("criterion") == "confidence"
    centered = bool(result.get("centered")) and not calibrated  # the anchors are fve values: only on that scale
    key = "confidence" if calibrated else "score_cen" if centered else "score_raw"
    cands = result["candidates"]
    order = sorted(range(len(cands)), key=lambda i: _sort_key(cands[i], centered))
    scores = [float(cands[i][key]) for i in order]
    fig = Figure(figsize=(7.5, 3.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    colors = ["#4f46e5" if i == result["best_index"] else "#a5b4fc" for i in order]
    ax.bar(range(1, len(scores) + 1), scores, color=colors)
    ax.axhline(result["tau"], color="#dc2626", linestyle="--", linewidth=1.5, label=f"τ = {result['tau']:.2f}")
    anchors = card.anchors if card is not None else AnchorsSection()
    if centered:
        floor, ceiling, ceiling_name, floor_name = anchors.random_floor_cen, anchors.ceiling_cen, anchors.ceiling_name, "random floor"
    elif calibrated:
        floor, ceiling, ceiling_name, floor_name = anchors.random_floor_conf, anchors.ceiling_conf, anchors.ceiling_conf_name, "unrelated text"
    else:  # raw scores: the anchors are on other scales
        floor = ceiling = ceiling_name = floor_name = None
    if floor is not None:
        ax.axhline(floor, color="#6b7280", linestyle=":", linewidth=1.5, label=f"{floor_name} {floor:.2f}")
    if ceiling is not None:
        ax.axhline(ceiling, color="#059669", linestyle="-.", linewidth=1.5, label=f"ceiling {ceiling:.2f} ({ceiling_name or ''})")
    lo = min(scores + [result["tau"]] + ([floor] if centered and floor is not None else []))
    ax.set_ylim(0.0 if calibrated else max(0.0, min(0.5, lo - 0.05)), 1.0)
    ax.set_xlabel("candidate (sorted by score; dark = chosen)")
    ax.set_ylabel("confidence (calibrated)" if calibrated else f"fve_nrm ({'centered' if centered else 'raw'})")
    ax.set_xticks(range(1, len(scores) + 1) if len(scores) <= 32 else [1, len(scores)])
    ax.set_title(f"{len(scores)} candidate score(s), τ and the card's anchors", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


SWEEP_COLUMNS = ["layer", "depth %", "best verbalization", "score", "decision"]


def sweep_frame(results: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per swept layer (``LayerResult.to_dict()`` objects, in sweep order)."""
    rows = [{
        "layer": r["layer"],
        "depth %": r.get("depth_pct"),
        "best verbalization": best_text(r),
        "score": round(float(r["score"]), 4),
        "decision": "hedged" if r["hedged"] else "confident",
    } for r in results]
    return pd.DataFrame(rows, columns=SWEEP_COLUMNS)


def sweep_plot(results: list[dict[str, Any]]) -> Any:
    """A matplotlib Figure: the best score at each swept layer (by layer), hedged points in red, the τ line."""
    from matplotlib.figure import Figure

    pts = sorted(results, key=lambda r: r["layer"])
    xs = [int(r["layer"]) for r in pts]
    ys = [float(r["score"]) for r in pts]
    tau = float(results[0]["tau"])
    fig = Figure(figsize=(7.5, 3.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.plot(xs, ys, color="#a5b4fc", linewidth=1.5, zorder=1)
    ax.scatter(xs, ys, c=["#dc2626" if r["hedged"] else "#4f46e5" for r in pts], zorder=2, s=36)
    ax.axhline(tau, color="#dc2626", linestyle="--", linewidth=1.5, label=f"τ = {tau:.2f}")
    ax.set_ylim(max(0.0, min(0.5, min(ys + [tau]) - 0.05)), 1.0)
    ax.set_xticks(xs)
    if any(r.get("depth_pct") is not None for r in pts):
        ax.set_xticklabels([f"{r['layer']}\n{r['depth_pct']}%" if r.get("depth_pct") is not None else str(r["layer"]) for r in pts])
        ax.set_xlabel("layer (hidden_states index) and the prompt's depth")
    else:
        ax.set_xlabel("layer (hidden_states index)")
    ax.set_ylabel(f"best fve_nrm ({score_kind(results[0])})")
    ax.set_title(f"best-of-{results[0]['k']} score per layer (red = hedged, under τ)", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


#: The token maps' colour scale (the heat map's legend and the grid): −1 purple, 0 white, +1 red.
HEAT_NEGATIVE_RGB = (128, 90, 213)
HEAT_POSITIVE_RGB = (239, 68, 60)
GRID_LABEL_COLUMN = "layer"


def heat_css(value: float) -> str:
    """CSS for a grid cell of cosine ``value``: white blended toward purple (−1) or red (+1) by |value|,
    with a text colour that stays readable on it."""
    v = float(value)
    t = min(1.0, abs(v)) if math.isfinite(v) else 0.0  # not a number: white
    end = HEAT_POSITIVE_RGB if v > 0 else HEAT_NEGATIVE_RGB
    r, g, b = (round(255 + (c - 255) * t) for c in end)
    return f"background-color: rgb({r}, {g}, {b}); color: {'#ffffff' if t > 0.75 else '#111111'}"


def grid_row_labels(grid: dict[str, Any]) -> list[str]:
    """``L13 ★`` for the card's default layer, ``L8`` for the others, one per grid row."""
    return [f"L{x}" + (" ★" if x == grid.get("default_layer") else "") for x in grid["layers"]]


def grid_headers(tokens: list[str]) -> list[str]:
    """The label column, then one header per token: its index and its text (``␣`` for whitespace),
    unique even where a token repeats."""
    return [GRID_LABEL_COLUMN] + [f"{i} {t.strip() or '␣'}" for i, t in enumerate(tokens)]


def grid_frame(grid: dict[str, Any] | None) -> Any:
    """The token × layer grid (:func:`nla_space.ui.heat.token_layer_grid`) as a pandas Styler: one row per
    layer (label first), one column per token, each cell its cosine, shaded by :func:`heat_css`. No
    grid: an empty frame with the label column."""
    if not grid or not grid.get("layers"):
        return pd.DataFrame(columns=[GRID_LABEL_COLUMN])
    cols = grid_headers(grid["tokens"])
    rows = [[label, *vals] for label, vals in zip(grid_row_labels(grid), grid["values"])]
    df = pd.DataFrame(rows, columns=cols)
    return df.style.map(heat_css, subset=cols[1:]).format("{:.2f}", subset=cols[1:])


def best_text(result: dict[str, Any]) -> str:
    text = result["best"]["text"]
    return text if text.strip() else "(empty: the chosen candidate is whitespace or EOS only)"


def compare_summary(result: dict[str, Any]) -> str:
    return (f"**{decoding_label(result)}** · card `{result['card']}` · L{result['layer']} · T={result['temperature']} · seed {result['seed']}  \n"
            f"{score_kind(result)} score **{result['score']:.3f}** vs τ {result['tau']:.3f} → "
            f"{'hedged' if result['hedged'] else 'confident'} · {result['timings'].get('total_s', 0):.2f} s")


def escape(s: str) -> str:
    return html.escape(s, quote=True)
