"""The Compare tab: the same text through two settings side by side (two cards or layers where the
cards allow; with one loadable card, e.g. best-of-K against greedy, or two seeds or temperatures)."""

from __future__ import annotations

from typing import Any

import gradio as gr

from . import handlers, views
from .verbalize_tab import settings


def _side(name: str, prefix: str, **defaults: Any) -> tuple[dict[str, Any], list[Any]]:
    with gr.Column():
        gr.Markdown(f"### {name}")
        s = settings(prefix, **defaults)
        badge = gr.HTML(elem_id=f"{prefix}badge")
        best = gr.Textbox(label=f"Best verbalization ({name})", elem_id=f"{prefix}best", lines=2, max_lines=6,
                          interactive=False)
        summary = gr.Markdown(elem_id=f"{prefix}summary")
        table = gr.Dataframe(headers=views.CANDIDATE_COLUMNS, label="Candidates", wrap=True, interactive=False,
                             max_height=300, elem_id=f"{prefix}candidates",
                             column_widths=["7%", "7%", "10%", "10%", "10%", "10%", "46%"])
    return s, [badge, best, summary, table]


def _outputs(result: dict[str, Any]) -> list[Any]:
    return [views.badge_html(result), views.best_text(result), views.compare_summary(result), views.candidates_frame(result)]


def build(concurrency: int) -> None:
    gr.Markdown("Run one text through two settings. Pick two cards or layers where the cards allow; with only "
                "the embedded card at hand, compare best-of-K with greedy, two seeds, or two temperatures.",
                elem_classes=["nla-chrome"])
    text = gr.Textbox(label="Input text", lines=2, elem_id="compare-text",
                      value="The Eiffel Tower is in Paris, the capital of France.")
    with gr.Row():
        a, out_a = _side("A", "a-", k=8, open_=True)
        b, out_b = _side("B", "b-", k=8, greedy=True, open_=True)
    with gr.Row():
        run = gr.Button("Compare", variant="primary", elem_id="compare-run")
        stop = gr.Button("Stop", variant="stop", elem_id="compare-stop")
    keys = ["card", "layer", "k", "tau", "temperature", "seed", "greedy", "strategy"]

    def on_compare(text: str, *vals: Any, progress: gr.Progress = gr.Progress()) -> list[Any]:
        pa = dict(zip(keys, vals[: len(keys)]))
        pb = dict(zip(keys, vals[len(keys):]))
        ra = handlers.run_checked(progress=progress, maps=False, text=text, k_is_slider=True, **pa).result
        rb = handlers.run_checked(progress=progress, maps=False, text=text, k_is_slider=True, **pb).result
        return _outputs(ra) + _outputs(rb)

    ev = run.click(on_compare, [text] + [a[k] for k in keys] + [b[k] for k in keys], out_a + out_b,
                   concurrency_id="model", concurrency_limit=concurrency, api_visibility="undocumented",
                   api_name="compare_ui", show_progress="full")
    stop.click(None, None, None, cancels=[ev], queue=False, api_visibility="private")
