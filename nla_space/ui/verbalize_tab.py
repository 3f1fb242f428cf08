"""The Verbalize tab: one text, one card, K candidates, the best one with its hedge badge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gradio as gr

from ..cards import ASSETS_DIR, find_card
from ..policy import DEFAULT_K
from . import engine, handlers, views

EXAMPLES_FILE = ASSETS_DIR / "examples.json"


#: The token maps' colour scale: Gradio shades a negative score purple and a positive one red, by its magnitude
#: (the heat map), and :func:`views.heat_css` shades the grid's cells the same way.
HEAT_LEGEND = (
    '<div class="heat-legend" style="display:flex;align-items:center;gap:.5em;font-size:.85em">'
    "<span>−1 opposite to v</span>"
    '<span style="flex:0 0 160px;height:.8em;border-radius:3px;'
    f'background:linear-gradient(to right,rgb{views.HEAT_NEGATIVE_RGB},white,rgb{views.HEAT_POSITIVE_RGB})"></span>'
    "<span>+1 same direction as v</span>"
    "<span style=\"opacity:.75\">· the token read is marked 1.0</span></div>"
)


def load_examples(path: Path = EXAMPLES_FILE) -> list[dict[str, str]]:
    """The curated examples (``nla_space/assets/examples.json``); an empty list if the file is missing."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    return [e for e in data.get("examples", []) if isinstance(e, dict) and isinstance(e.get("text"), str)]


def card_dropdown(elem_id: str, label: str = "Card") -> gr.Dropdown:
    opts = engine.card_options()
    return gr.Dropdown(choices=[(o.label, o.id) for o in opts], value=engine.default_card_id(), label=label,
                       elem_id=elem_id, scale=3, info="cards marked 'requires download' fetch a backbone from the Hub")


def settings(prefix: str, *, k: int = DEFAULT_K, greedy: bool = False, seed: int = 0, open_: bool = False) -> dict[str, Any]:
    """Card + layer pickers and the Advanced accordion; returns the components by name."""
    card = find_card(engine.default_card_id())
    with gr.Row():
        c = card_dropdown(f"{prefix}card")
        # choices follow the card picked (card_changed); a custom value lets an API call name another card's
        # layer in the same request, and the card itself refuses a layer it lacks (check_request)
        layer = gr.Dropdown(choices=list(card.layers), value=card.default_layer, label="Layer", scale=1,
                            elem_id=f"{prefix}layer", info="hidden_states index the card supports", allow_custom_value=True)
    with gr.Accordion("Advanced", open=open_):
        ks = gr.Slider(1, engine.APP_MAX_K, value=k, step=1, label="K (candidates to sample)", elem_id=f"{prefix}k",
                       info="used by best-of-K and guided decoding; greedy writes one candidate")
        tau = gr.Slider(0.0, 1.0, value=card.default_tau, step=0.01, label="τ (hedging threshold)", elem_id=f"{prefix}tau")
        temp = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Temperature", elem_id=f"{prefix}temperature")
        sd = gr.Number(value=seed, precision=0, minimum=0, label="Seed", elem_id=f"{prefix}seed")
        gr_ = gr.Checkbox(value=greedy, label="Greedy (one greedy candidate instead of best-of-K)", elem_id=f"{prefix}greedy")
        strat = gr.Radio(choices=[("card default", "default"), ("guided", "guided"), ("best-of-K", "best-of-k")], value="default",
                         label="Decoding", elem_id=f"{prefix}strategy",
                         info="guided: a search steered by how specifically each partial text points back to the activation")
    c.change(handlers.card_changed, c, [layer, tau], queue=False, api_visibility="private")
    return {"card": c, "layer": layer, "k": ks, "tau": tau, "temperature": temp, "seed": sd, "greedy": gr_, "strategy": strat}


def build(concurrency: int) -> dict[str, Any]:
    with gr.Row():
        with gr.Column(scale=5):
            text = gr.Textbox(label="Input text", lines=3, max_lines=12, elem_id="input-text",
                              placeholder="Type a sentence; its activation at the read position is verbalized.",
                              max_length=engine.MAX_TEXT_CHARS)
            s = settings("")
            several = len(find_card(engine.default_card_id()).layers) > 1
            with gr.Row():
                run = gr.Button("Verbalize", variant="primary", elem_id="run")
                sweep = gr.Button("Sweep all layers", variant="secondary", elem_id="sweep", visible=several)
                stop = gr.Button("Stop", variant="stop", elem_id="stop")
            examples = load_examples()
            if examples:
                gr.Examples(examples=[[e["text"]] for e in examples], inputs=[text], label="Examples",
                            example_labels=[e.get("label") or e["text"][:40] for e in examples],
                            cache_examples=False, examples_per_page=8)
        with gr.Column(scale=6):
            badge = gr.HTML(elem_id="badge")
            best = gr.Textbox(label="Best verbalization", elem_id="best", lines=2, max_lines=8, interactive=False,
                              buttons=["copy"])
            notes = gr.Markdown(elem_id="notes")
            compass = gr.Markdown(elem_id="compass")
            heat = gr.HighlightedText(label="Input tokens: cosine of each token's state to v, the state read (centered by μ, "
                                            "or by this text's mean state). Click a token to verbalize its state.",
                                      elem_id="heat", combine_adjacent=False, show_legend=False)
            gr.HTML(HEAT_LEGEND, elem_id="heat-legend")
            grid = gr.Dataframe(headers=[views.GRID_LABEL_COLUMN], elem_id="grid", interactive=False, max_height=360,
                                pinned_columns=1,
                                label="Token × layer: cosine of each token's state to v read at that layer (centered by μ "
                                      "where the card has one). Click a cell to verbalize that state.")
            grid_state = gr.State(None)  # the grid's data (token_layer_grid): which layer each row is
    with gr.Row():
        with gr.Column(scale=6):
            table = gr.Dataframe(headers=views.CANDIDATE_COLUMNS, label="Candidates (sorted by score; ★ = oracle pick, ◆ = compass pick)",
                                 elem_id="candidates", wrap=True, interactive=False, max_height=420,
                                 column_widths=["6%", "6%", "9%", "9%", "9%", "9%", "52%"],
                                 datatype=["number", "str", "number", "number", "number", "number", "str"])
        with gr.Column(scale=5):
            plot = gr.Plot(label="Scores of the K candidates, τ, and the card's floor and ceiling", show_label=False,
                           elem_id="score-plot")
    with gr.Row():
        timings = gr.Markdown(elem_id="timings")
        download = gr.File(label="Download the result (JSON)", elem_id="download", interactive=False)
    with gr.Accordion("Result JSON (same object as `python -m nla_space verbalize --json`)", open=False):
        raw = gr.JSON(elem_id="result-json")
    with gr.Column(visible=several, elem_id="sweep-box") as sweep_box:
        gr.Markdown("### Layer sweep\nThe same text, K, seed, τ and rollout length at every layer of the card "
                    "(the activation is read once); one best verbalization per layer.")
        with gr.Row():
            with gr.Column(scale=6):
                sweep_table = gr.Dataframe(headers=views.SWEEP_COLUMNS, label="Best verbalization per layer",
                                           elem_id="sweep-table", wrap=True, interactive=False, max_height=420,
                                           column_widths=["8%", "9%", "59%", "10%", "14%"],
                                           datatype=["number", "number", "str", "number", "str"])
            with gr.Column(scale=5):
                sweep_plot = gr.Plot(label="Best score per layer and τ", show_label=False, elem_id="sweep-plot")
        with gr.Accordion("Sweep JSON (same object as `python -m nla_space verbalize --layer all --json`)", open=False):
            sweep_raw = gr.JSON(elem_id="sweep-json")

    def on_run(text: str, card: str, layer: Any, k: Any, tau: Any, temperature: Any, seed: Any, greedy: bool,
               strategy: str = "default", progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:
        out = handlers.run_checked(progress=progress, text=text, card=card, layer=layer, k=k, k_is_slider=True, tau=tau,
                                   temperature=temperature, seed=seed, greedy=greedy, strategy=strategy)
        return handlers.render(*out)

    inputs = [text, s["card"], s["layer"], s["k"], s["tau"], s["temperature"], s["seed"], s["greedy"], s["strategy"]]
    outputs = [badge, best, notes, compass, heat, table, plot, timings, download, raw, grid, grid_state]
    ev = run.click(on_run, inputs, outputs, concurrency_id="model", concurrency_limit=concurrency,
                   api_visibility="undocumented", api_name="verbalize_ui", show_progress="full")
    ev2 = text.submit(on_run, inputs, outputs, concurrency_id="model", concurrency_limit=concurrency,
                      api_visibility="private", show_progress="full")

    def on_token(text: str, card: str, layer: Any, k: Any, tau: Any, temperature: Any, seed: Any, greedy: bool,
                 strategy: str, evt: gr.SelectData, progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:
        """A click on a heat-map token: verbalize the state at that token (its index among the text's tokens)."""
        out = handlers.run_checked(progress=progress, text=text, card=card, layer=layer, k=k, k_is_slider=True, tau=tau,
                                   temperature=temperature, seed=seed, greedy=greedy, strategy=strategy,
                                   position=int(evt.index))
        return handlers.render(*out)

    ev4 = heat.select(on_token, inputs, outputs, concurrency_id="model", concurrency_limit=concurrency,
                      api_visibility="private", show_progress="full")

    def on_cell(text: str, card: str, k: Any, tau: Any, temperature: Any, seed: Any, greedy: bool, strategy: str,
                grid_data: dict[str, Any] | None, evt: gr.SelectData, progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:
        """A click on a grid cell: verbalize that token's state at that row's layer (the label column: the
        card's read position there), and show that layer in the Layer picker."""
        out = handlers.grid_checked(grid_data, evt.index, progress=progress, text=text, card=card, k=k, k_is_slider=True,
                                    tau=tau, temperature=temperature, seed=seed, greedy=greedy, strategy=strategy)
        return (*handlers.render(*out), gr.update(value=out.result["layer"]))

    cell_inputs = [text, s["card"], s["k"], s["tau"], s["temperature"], s["seed"], s["greedy"], s["strategy"], grid_state]
    ev5 = grid.select(on_cell, cell_inputs, outputs + [s["layer"]], concurrency_id="model", concurrency_limit=concurrency,
                      api_visibility="private", show_progress="full")

    def on_sweep(text: str, card: str, k: Any, tau: Any, temperature: Any, seed: Any, greedy: bool, strategy: str,
                 progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:
        return handlers.sweep_ui(text, card, k, tau, temperature, seed, greedy, strategy, progress=progress)

    sweep_inputs = [text, s["card"], s["k"], s["tau"], s["temperature"], s["seed"], s["greedy"], s["strategy"]]
    ev3 = sweep.click(on_sweep, sweep_inputs, [sweep_table, sweep_plot, sweep_raw], concurrency_id="model",
                      concurrency_limit=concurrency, api_visibility="undocumented", api_name="sweep_ui", show_progress="full")

    def on_card(card: str) -> tuple[Any, Any]:
        shown = handlers.sweep_visibility(card)
        return shown, shown

    s["card"].change(on_card, s["card"], [sweep, sweep_box], queue=False, api_visibility="private")
    stop.click(None, None, None, cancels=[ev, ev2, ev3, ev4, ev5], queue=False, api_visibility="private")
    return {"text": text, "run": run, "sweep": sweep, "best": best, **s}
