"""The Leaderboard tab: published numbers beside reproduced ones, K-curves, bars, findings and the
per-layer curves (``layer_curves``: reading at every depth, with published per-layer numbers marked as
the different metric they are).

Reads :func:`nla_space.leaderboard.load_leaderboard` (imported lazily); native components only
(``gradio_leaderboard`` does not support Gradio 6: https://github.com/gradio-app/gradio/issues/12449).
"""

from __future__ import annotations

import logging
import math
import re
from typing import TYPE_CHECKING, Any

import gradio as gr
import pandas as pd

from ..cards import builtin_cards

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

ROW_COLUMNS = ["card", "backbone", "layer", "metric", "K", "M", "published", "ρ published", "reproduced",
               "ρ reproduced", "published source", "reproduced run", "metric key"]
FINDING_COLUMNS = ["card", "origin", "K-curve slope / doubling", "logp-rerank − greedy", "Spearman(logp, oracle)",
                   "NN-anchor rerank − greedy", "raw floor", "centered floor", "centering changes verdict",
                   "greedy − NN-retrieval"]
FINDING_KEYS = ["kcurve_slope_per_doubling", "logp_rerank_minus_greedy", "spearman_logp_oracle",
                "nn_anchor_rerank_minus_greedy", "raw_floor", "centered_floor", "centering_changes_verdict",
                "greedy_minus_nn_retrieval"]
DEFAULT_BAR_METRIC = "adapter_cen_bestofK_mean"
#: the per-layer table's columns around the reading metrics (whose labels are :data:`nla_space.leaderboard.LAYER_COLUMNS`)
LAYER_HEAD = ["card", "origin", "run / metric", "layer", "depth %"]
LAYER_TAIL = ["published value (not retrieval)", "n", "note", "source / run"]
#: edge colours of the published per-layer markers, one per published series
PUBLISHED_COLORS = ["#b45309", "#be185d", "#0f766e", "#6d28d9"]
NO_LAYER_RUNS = ("No per-layer runs yet: `python -m eval_harness reading-eval --card … --texts … --layers all` "
                 "writes them, and `python -m eval_harness leaderboard` adds them here.")
LAYER_INTRO = ("### Per layer: reading at every depth\nEach line is one card and decoding run of `reading-eval --layers` "
               "on the same texts at every layer: x is the depth (`hidden_states` index ÷ the backbone's blocks), y the "
               "1-in-40 retrieval (the re-encoded answer picks out its own activation among 40). Hollow diamonds are "
               "*published* per-layer numbers from the cards, a **different metric** (named in the legend), not this retrieval.")
ROW_WIDTHS = ["320px", "210px", "60px", "280px", "55px", "60px", "95px", "95px", "100px", "105px", "420px",
              "360px", "260px"]


def load() -> dict[str, Any]:
    """The leaderboard data; an empty one (with a logged reason) if it cannot be read."""
    try:
        from ..leaderboard import load_leaderboard

        data = load_leaderboard()
    except Exception as exc:  # the module or its file is broken: show an empty board, keep serving
        log.warning("leaderboard unavailable: %s", exc)
        return {"generated": None, "rows": [], "kcurves": [], "findings": [], "error": str(exc)}
    for key in ("rows", "kcurves", "findings", "layer_curves"):
        data.setdefault(key, [])
    return data


def _alias(card_id: str) -> str:
    for c in builtin_cards():
        if c.id == card_id:
            return c.aliases[0] if c.aliases else c.id
    return card_id


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _run_summary(meta: dict[str, Any] | None) -> str:
    if not meta:
        return ""
    keys = ("M", "K", "seed", "targets_split", "source", "trained", "device", "finished", "path")
    return ", ".join(f"{k}={meta[k]}" for k in keys if meta.get(k) is not None)


def rows_frame(lb: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for r in lb.get("rows", []):
        rows.append({
            "card": r.get("card"),
            "backbone": r.get("backbone"),
            "layer": r.get("layer"),
            "metric": r.get("label") or r.get("metric"),
            "K": r.get("K"),
            "M": r.get("M"),
            "published": _num(r.get("published")),
            "ρ published": _num(r.get("rho_published")),
            "reproduced": _num(r.get("reproduced")),
            "ρ reproduced": _num(r.get("rho_reproduced")),
            "published source": r.get("published_source") or "",
            "reproduced run": _run_summary(r.get("reproduced_meta")),
            "metric key": r.get("metric"),
        })
    df = pd.DataFrame(rows, columns=ROW_COLUMNS)
    for col in ("published", "ρ published", "reproduced", "ρ reproduced"):
        df[col] = pd.to_numeric(df[col], errors="coerce").round(3)
    return df


def filter_rows(df: pd.DataFrame, backbones: list[str] | None, cards: list[str] | None, metrics: list[str] | None) -> pd.DataFrame:
    """Rows matching every non-empty filter (an empty filter keeps everything)."""
    mask = pd.Series(True, index=df.index)
    if backbones:
        mask &= df["backbone"].isin(backbones)
    if cards:
        mask &= df["card"].isin(cards)
    if metrics:
        mask &= df["metric key"].isin(metrics)
    return df[mask].reset_index(drop=True)


def metric_choices(lb: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, key) for each metric, with the sample count written as K."""
    seen: dict[str, str] = {}
    for r in lb.get("rows", []):
        key = r.get("metric")
        if key and key not in seen:
            label = str(r.get("label") or key)
            seen[key] = re.sub(r"\b\d+\b", "K", label) if r.get("K") is not None else label
    return [(label, key) for key, label in seen.items()]


def bar_frame(lb: dict[str, Any], metric: str | None) -> pd.DataFrame:
    """One bar per (card, origin) for one metric: x is a unique series name, so bars never stack."""
    out = []
    for r in lb.get("rows", []):
        if r.get("metric") != metric:
            continue
        for origin in ("published", "reproduced"):
            v = _num(r.get(origin))
            if v is None:
                continue
            out.append({"series": f"{_alias(r['card'])} · {origin[:3]}.", "score": round(v, 4), "origin": origin,
                        "card": r["card"], "K": r.get("K"), "metric": r.get("label")})
    return pd.DataFrame(out, columns=["series", "score", "origin", "card", "K", "metric"])


def kcurve_frame(lb: dict[str, Any]) -> pd.DataFrame:
    out = []
    for c in lb.get("kcurves", []):
        K, s = c.get("K"), _num(c.get("score_cen"))
        if not isinstance(K, (int, float)) or K < 1 or s is None:
            continue
        out.append({"series": f"{_alias(c['card'])} ({c.get('origin')})", "log2 K": math.log2(K), "K": int(K),
                    "score_cen": round(s, 4), "card": c["card"]})
    return pd.DataFrame(out, columns=["series", "log2 K", "K", "score_cen", "card"])


def findings_frame(lb: dict[str, Any]) -> pd.DataFrame:
    out = []
    for f in lb.get("findings", []):
        row: dict[str, Any] = {"card": f.get("card"), "origin": f.get("origin")}
        for col, key in zip(FINDING_COLUMNS[2:], FINDING_KEYS):
            v = f.get(key)
            row[col] = ("yes" if v else "no") if isinstance(v, bool) else (round(v, 4) if _num(v) is not None else None)
        out.append(row)
    return pd.DataFrame(out, columns=FINDING_COLUMNS)


def layer_frame(lb: dict[str, Any]) -> pd.DataFrame:
    """The per-layer points as a table (:data:`LAYER_HEAD`, the reading metrics, :data:`LAYER_TAIL`):
    reproduced runs with their metrics, published points with their value, metric, note and source."""
    from ..leaderboard import LAYER_COLUMNS

    metrics = [label for _, label in LAYER_COLUMNS]
    out = []
    for p in lb.get("layer_curves", []):
        published = p.get("origin") == "published"
        row: dict[str, Any] = {"card": _alias(str(p.get("card"))), "origin": p.get("origin"),
                               "run / metric": p.get("metric") if published else p.get("run"), "layer": p.get("layer"),
                               "depth %": p.get("depth_pct"), "n": p.get("n"), "note": p.get("note") or "",
                               "published value (not retrieval)": _num(p.get("value")) if published else None,
                               "source / run": p.get("source") if published else _run_summary(p.get("meta"))}
        row.update({label: _num(p.get(key)) for key, label in LAYER_COLUMNS})
        out.append(row)
    df = pd.DataFrame(out, columns=LAYER_HEAD + metrics + LAYER_TAIL)
    for col in metrics + LAYER_TAIL[:1]:
        df[col] = pd.to_numeric(df[col], errors="coerce").round(3)
    for col in ("layer", "depth %", "n"):  # whole numbers, blank where a point has none
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    return df


def layer_series(lb: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """What the per-layer plot draws: series name → (depth %, y) points, sorted by depth. Reproduced
    series (``<card> · <run>``) carry the 1-in-40 retrieval; published ones are named by their point's
    label (which names their metric and says it is not retrieval). Points without a depth are left out."""
    series: dict[str, list[tuple[float, float]]] = {}
    for p in lb.get("layer_curves", []):
        x = _num(p.get("depth_pct"))
        published = p.get("origin") == "published"
        y = _num(p.get("value") if published else p.get("retrieval_top1_in40"))
        if x is None or y is None:
            continue
        name = str(p.get("label")) if published else f"{_alias(str(p.get('card')))} · {p.get('run')}"
        series.setdefault(name, []).append((x, y))
    return {k: sorted(v) for k, v in series.items()}


def layer_figure(lb: dict[str, Any]) -> Figure | None:
    """Depth % against 1-in-40 retrieval, one line per card and run; published per-layer points as
    separate hollow markers, one legend entry per metric. None when no point has a depth."""
    series = layer_series(lb)
    if not series:
        return None
    from matplotlib.figure import Figure

    published = {str(p.get("label")) for p in lb.get("layer_curves", []) if p.get("origin") == "published"}
    fig = Figure(figsize=(8.0, 4.4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    n_pub = 0
    for name, pts in series.items():
        xs, ys = [x for x, _ in pts], [y for _, y in pts]
        if name in published:
            color = PUBLISHED_COLORS[n_pub % len(PUBLISHED_COLORS)]
            n_pub += 1
            ax.scatter(xs, ys, marker="D", s=60, facecolors="none", edgecolors=color, linewidths=1.8, zorder=3, label=name)
        else:
            ax.plot(xs, ys, marker="o", linewidth=1.6, linestyle="--" if "guided" in name else "-", label=name)
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("depth % (hidden_states index ÷ blocks)")
    ax.set_ylabel("1-in-40 retrieval (lines)")
    ax.set_title("Per layer: reading at every depth (◇ = published, a different metric)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncols=2, fontsize=8, frameon=False)
    return fig


def build_layers(lb: dict[str, Any]) -> None:
    """The per-layer section: the intro, then the plot and the table; only the "no per-layer runs yet"
    line when there are no points (and that line above the published points when only they exist)."""
    points = lb.get("layer_curves", [])
    has_runs = any(p.get("origin") == "reproduced" for p in points)
    gr.Markdown(LAYER_INTRO + ("" if has_runs else "\n\n" + NO_LAYER_RUNS), elem_id="lb-layers-note")
    if not points:
        return
    fig = layer_figure(lb)
    if fig is not None:
        gr.Plot(value=fig, label="Per layer: reading at every depth", show_label=False, elem_id="lb-layers-plot")
    gr.Dataframe(value=layer_frame(lb), label="Per-layer points (published values are a different metric, see note)",
                 elem_id="lb-layers", interactive=False, wrap=True, max_height=420)


def build() -> None:
    lb = load()
    df = rows_frame(lb)
    gen = lb.get("generated")
    head = (f"Published numbers (from each card, with their source) beside the numbers this project reproduced "
            f"with `python -m eval_harness`. Scores are fve_nrm = ½(1+cos); ρ = (s − floor)/(ceiling − floor) with "
            f"the card's own floor and ceiling. Generated: {gen or 'n/a'}.")
    if lb.get("error"):
        head += f"\n\n⚠️ The leaderboard data could not be read: {lb['error']}"
    gr.Markdown(head, elem_classes=["nla-chrome"])
    from ..leaderboard import FINDINGS_NOTE

    gr.Markdown("### Findings\n" + FINDINGS_NOTE)
    gr.Dataframe(value=findings_frame(lb), label="Findings: our embedded backbones beside the published cards",
                 elem_id="lb-findings", interactive=False, wrap=True)
    with gr.Row():
        f_backbone = gr.Dropdown(sorted(df["backbone"].dropna().unique().tolist()), multiselect=True, label="Backbone",
                                 elem_id="lb-backbone")
        f_card = gr.Dropdown(sorted(df["card"].dropna().unique().tolist()), multiselect=True, label="Card",
                             elem_id="lb-card")
        f_metric = gr.Dropdown(metric_choices(lb), multiselect=True, label="Metric", elem_id="lb-metric")
    table = gr.Dataframe(value=df, label="Leaderboard rows (search with the filter box; scroll sideways for sources)",
                         elem_id="lb-table", interactive=False, wrap=False, show_search="filter", pinned_columns=1,
                         max_height=560, buttons=["fullscreen", "copy"], column_widths=ROW_WIDTHS)
    for comp in (f_backbone, f_card, f_metric):
        comp.change(lambda b, c, m: filter_rows(rows_frame(lb), b, c, m), [f_backbone, f_card, f_metric], table,
                    queue=False, api_visibility="private")
    with gr.Row():
        with gr.Column():
            choices = metric_choices(lb)
            keys = [k for _, k in choices]
            first = DEFAULT_BAR_METRIC if DEFAULT_BAR_METRIC in keys else (keys[0] if keys else None)
            bar_metric = gr.Dropdown(choices, value=first, label="Bar plot metric", elem_id="lb-bar-metric")
            bar = gr.BarPlot(value=bar_frame(lb, first), x="series", y="score", color="origin", y_lim=[0, 1],
                             x_title="card · origin", y_title="score", x_label_angle=-20,
                             label="One metric across cards (y fixed to [0, 1])", elem_id="lb-bar", sort="x",
                             tooltip=["card", "origin", "metric", "K", "score"])
            bar_metric.change(lambda m: bar_frame(lb, m), bar_metric, bar, queue=False, api_visibility="private")
        with gr.Column():
            gr.LinePlot(value=kcurve_frame(lb), x="log2 K", y="score_cen", color="series", y_lim=[0, 1],
                        x_title="log2 K (K = 1, 2, 4, …, 64 samples)", y_title="oracle best-of-K (centered)",
                        label="K-curves per card", elem_id="lb-kcurves", tooltip=["series", "K", "score_cen"])
    build_layers(lb)
