"""Build the Gradio Blocks: Verbalize, Compare, Leaderboard and About tabs, plus the ``/verbalize`` and ``/sweep`` APIs.

``build_demo()`` returns a queued Blocks; ``launch_kwargs()`` carries what Gradio 6 takes at launch
(theme, CSS, the presentation-mode script, host and port from ``GRADIO_SERVER_NAME`` /
``GRADIO_SERVER_PORT``). ``app.py`` and the tests both use them.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Callable

import gradio as gr

from ..errors import NLAInputError
from . import about_tab, compare_tab, engine, handlers, leaderboard_tab, theme, verbalize_tab

log = logging.getLogger(__name__)

TITLE = "nla-space: read an activation as a sentence"


def api_verbalize(
    text: str,
    card: str = "embedded",
    layer: int | None = None,
    k: int | None = None,
    tau: float | None = None,
    temperature: float = 1.0,
    seed: int | None = 0,
    strategy: str | None = None,
    greedy: bool = False,
    max_new_tokens: int | None = None,
    position: int | None = None,
) -> dict[str, Any]:
    """Verbalize the activation of `text` at the card's layer (greedy, guided or best-of-K, with τ hedging).

    Args:
        text: the text whose last-token activation is verbalized.
        card: card id or alias (default: the embedded default card, Gemma-3-270M).
        layer: hidden_states index; default: the card's layer.
        k: candidates of best-of-K or guided decoding (null: 16); refused with greedy decoding, which
            writes one (greedy is the default card's default: pass strategy "best-of-k" or "guided" with k).
        tau: hedging threshold in [0, 1]; default: the card's.
        temperature: sampling temperature.
        seed: random seed (null: a fresh one).
        strategy: "guided", "best-of-k" or "greedy" (null: the card's default).
        greedy: one greedy candidate (same as strategy "greedy").
        max_new_tokens: rollout length (null: the card's default).
        position: the token whose state is read: 0 = the text's first token, negative counts from the end
            (null: the card's read position, the last token).

    Returns the same JSON object as `python -m nla_space verbalize --json`.
    """
    return handlers.run_checked(maps=False, text=text, card=card, layer=layer, k=k, tau=tau, temperature=temperature, seed=seed,
                                strategy=strategy, greedy=greedy, max_new_tokens=max_new_tokens, position=position).result


def api_sweep(
    text: str,
    card: str = "embedded",
    k: int | None = None,
    tau: float | None = None,
    temperature: float = 1.0,
    seed: int | None = 0,
    strategy: str | None = None,
) -> dict[str, Any]:
    """Verbalize `text` at every layer of the card with the same K, seed, τ and decoding (the layer sweep).

    Args:
        text: the text whose last-token activation is verbalized at each layer.
        card: card id or alias (default: the embedded default card, Gemma-3-270M); a single-layer card gives one entry.
        k: candidates per layer for a card whose decoding samples (null: 16; refused where it is greedy).
        tau: hedging threshold in [0, 1]; default: the card's.
        temperature: sampling temperature.
        seed: random seed, the same at every layer (null: a fresh one).
        strategy: "guided", "best-of-k" or "greedy" (null: the card's default).

    Returns the same JSON object as `python -m nla_space verbalize --layer all --json`:
    `{"sweep": [...]}`, one `/verbalize` object (plus `depth_pct`) per layer, in ascending layer order.
    """
    return {"sweep": handlers.sweep_checked(text=text, card=card, k=k, tau=tau, temperature=temperature, seed=seed,
                                            strategy=strategy)}


def _check_verbalize(text: Any, card: Any = "embedded", layer: Any = None, k: Any = None, tau: Any = None,
                     temperature: Any = 1.0, seed: Any = 0, strategy: Any = None, greedy: Any = False,
                     max_new_tokens: Any = None, position: Any = None) -> None:
    engine.check_request(text=text, card=card, layer=layer, k=k, tau=tau, temperature=temperature, seed=seed,
                         greedy=greedy, max_new_tokens=max_new_tokens, strategy=strategy, position=position)


def _check_sweep(text: Any, card: Any = "embedded", k: Any = None, tau: Any = None, temperature: Any = 1.0,
                 seed: Any = 0, strategy: Any = None) -> None:
    engine.check_request(text=text, card=card, k=k, tau=tau, temperature=temperature, seed=seed, strategy=strategy)


def refuse_before_queue(demo: gr.Blocks, api_name: str, check: Callable[..., None]) -> None:
    """Check requests to the endpoint ``api_name`` on arrival, before they take a queue slot.

    ``check`` takes the endpoint's parameters and raises :class:`NLAInputError`. Gradio runs the
    endpoint's *validator* when a request arrives and answers an invalid one at once (HTTP 422, the
    message attached to the input at fault), so it never waits behind valid requests. ``gr.api`` has
    no ``validator`` argument, so it is set on the endpoint's ``BlockFunction``: the field that
    ``Blocks.set_event_trigger(validator=…)`` fills. The validator returns one ``gr.validate`` per input.
    """
    fns = [fn for fn in demo.fns.values() if fn.api_name == api_name]
    if len(fns) != 1:
        raise RuntimeError(f"expected one endpoint named {api_name!r}, found {len(fns)}")
    names = list(inspect.signature(fns[0].fn).parameters)

    def validator(*args: Any) -> list[dict[str, Any]]:
        try:
            check(**dict(zip(names, args)))
        except NLAInputError as exc:
            at = names.index(exc.field) if exc.field in names else 0
            return [gr.validate(i != at, str(exc) if i == at else "") for i in range(len(names))]
        return [gr.validate(True, "") for _ in names]

    fns[0].validator = validator


def _on_load(request: gr.Request) -> tuple[Any, Any]:
    """Presentation mode from the URL (``?present=1``): hide the chrome (intro, footer via CSS)."""
    params = dict(request.query_params) if request is not None else {}
    present = theme.is_present(params.get("present"))
    return gr.update(visible=not present), present


def build_demo(concurrency: int | None = None, max_queue: int | None = None) -> gr.Blocks:
    """The whole app. ``concurrency``: model requests run at once (default ``NLA_SPACE_CONCURRENCY`` or 1)."""
    concurrency = concurrency or int(os.environ.get("NLA_SPACE_CONCURRENCY", "1"))
    max_queue = max_queue or int(os.environ.get("NLA_SPACE_QUEUE_SIZE", "32"))
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        present = gr.State(False)
        intro = gr.Markdown(
            "# Read an activation as a sentence\n"
            "Type a text: its hidden state at one layer of a frozen model is read at the last token, an "
            "**activation verbalizer** writes a sentence from it (greedy, or the best of K candidates), each is "
            "re-encoded and scored against the original state, and the best one is shown — **hedged** when its "
            "score is under τ. "
            "See the About tab for how it works and its limits.",
            elem_id="intro", elem_classes=["nla-chrome"])
        with gr.Tabs():
            with gr.Tab("Verbalize", id="verbalize"):
                verbalize_tab.build(concurrency)
            with gr.Tab("Compare", id="compare"):
                compare_tab.build(concurrency)
            with gr.Tab("Leaderboard", id="leaderboard"):
                leaderboard_tab.build()
            with gr.Tab("About", id="about"):
                about_tab.build()
        gr.api(api_verbalize, api_name="verbalize", concurrency_id="model", concurrency_limit=concurrency)
        gr.api(api_sweep, api_name="sweep", concurrency_id="model", concurrency_limit=concurrency)
        demo.load(_on_load, None, [intro, present], queue=False, api_visibility="private")
    refuse_before_queue(demo, "verbalize", _check_verbalize)
    refuse_before_queue(demo, "sweep", _check_sweep)
    demo.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    return demo


def launch_kwargs(**overrides: Any) -> dict[str, Any]:
    """Arguments for ``demo.launch``: theme/CSS/JS, host/port from the environment, never ``share``."""
    kw: dict[str, Any] = {
        "theme": theme.theme(),
        "css": theme.CSS,
        "js": theme.PRESENT_JS,
        "show_error": True,
        "footer_links": ["api", "gradio", "settings"],
        "share": False,
    }
    if os.environ.get("GRADIO_SERVER_NAME"):
        kw["server_name"] = os.environ["GRADIO_SERVER_NAME"]
    if os.environ.get("GRADIO_SERVER_PORT"):
        kw["server_port"] = int(os.environ["GRADIO_SERVER_PORT"])
    kw.update(overrides)
    if kw.get("share"):
        raise ValueError("share=True is not allowed: share links are public and need an outside tunnel")
    return kw


__all__ = ["build_demo", "launch_kwargs", "api_verbalize", "api_sweep", "engine"]
