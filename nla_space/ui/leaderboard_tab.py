"""The Leaderboard tab: published numbers beside reproduced ones, K-curves, bars and findings.

Reads :func:`nla_space.leaderboard.load_leaderboard` (imported lazily); native components only
(``gradio_leaderboard`` does not support Gradio 6: https://github.com/gradio-app/gradio/issues/12449).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import gradio as gr
import pandas as pd

from ..cards import builtin_cards

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
    for key in ("rows", "kcurves", "findings"):
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
