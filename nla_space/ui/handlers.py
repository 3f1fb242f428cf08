"""Event handlers shared by the tabs and the API: check, run, turn errors into ``gr.Error``."""

from __future__ import annotations

import logging
from typing import Any, Callable, TypeVar

import gradio as gr

from ..cards import find_card
from ..errors import NLAInputError
from . import engine, views
from .heat import grid_cell

log = logging.getLogger(__name__)


T = TypeVar("T")


def _guarded(call: Callable[[], T], title: str, what: str) -> T:
    """Run one request. User errors become a visible ``gr.Error`` titled ``title``; so do unexpected
    ones (logged with their traceback), so a failing request never takes the app down."""
    try:
        return call()
    except NLAInputError as exc:
        log.info("refused a %s request: %s", what, exc)
        raise gr.Error(str(exc), title=title, print_exception=False) from None
    except gr.Error:
        raise
    except Exception as exc:  # a bug or an out-of-memory: keep serving the others
        log.exception("%s failed", what)
        raise gr.Error(f"internal error ({type(exc).__name__}: {exc}); the app is still running, try again",
                       title="Internal error", print_exception=False) from None


def run_checked(progress: Any = None, maps: bool = True, **params: Any) -> engine.Verbalized:
    """Check and run one request (errors as :func:`_guarded` says); ``maps`` as :func:`engine.verbalize`."""
    return _guarded(lambda: engine.verbalize(engine.check_request(**params), progress=progress, maps=maps),
                    "Cannot verbalize", "verbalize")


def grid_checked(grid: dict[str, Any] | None, index: Any, progress: Any = None, **params: Any) -> engine.Verbalized:
    """A click on the token × layer grid's cell ``index`` ((row, column), as ``gr.SelectData`` gives it):
    verbalize that token's state at that row's layer (:func:`nla_space.ui.heat.grid_cell`; the label
    column: the card's read position at that layer). ``params`` as :func:`engine.check_request`, without
    ``layer`` and ``position``; errors as :func:`_guarded` says."""
    def call() -> engine.Verbalized:
        row, col = index if isinstance(index, (list, tuple)) and len(index) == 2 else (None, None)
        layer, position = grid_cell(grid, row, col)
        return engine.verbalize(engine.check_request(layer=layer, position=position, **params), progress=progress)

    return _guarded(call, "Cannot verbalize", "verbalize")


def sweep_checked(progress: Any = None, several_layers: bool = False, **params: Any) -> list[dict[str, Any]]:
    """Check and run a layer sweep of every card layer (``params`` as :func:`engine.check_request`;
    ``layer`` is not used). ``several_layers``: refuse a single-layer card (the Verbalize tab's button)."""
    def call() -> list[dict[str, Any]]:
        req = engine.check_request(**params)
        if several_layers:
            engine.check_several_layers(req.card)
        return engine.sweep(req, progress=progress)

    return _guarded(call, "Cannot sweep the layers", "sweep")


def sweep_ui(text: str, card: str, k: Any, tau: Any, temperature: Any, seed: Any, greedy: bool,
             strategy: str = "default", progress: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """The Verbalize tab's "Sweep all layers" button: the per-layer table, the score-vs-layer plot and
    the sweep JSON. A single-layer card is refused with a visible message (the button is hidden for it)."""
    results = sweep_checked(progress=progress, several_layers=True, text=text, card=card, k=k, k_is_slider=True, tau=tau,
                            temperature=temperature, seed=seed, greedy=greedy, strategy=strategy)
    return views.sweep_frame(results), views.sweep_plot(results), {"sweep": results}


def sweep_visibility(card_id: str) -> Any:
    """Show the sweep (button and results) only for a card with several layers."""
    try:
        several = len(find_card(card_id).layers) > 1
    except NLAInputError:
        several = False
    return gr.update(visible=several)


def card_changed(card_id: str) -> tuple[Any, Any]:
    """New card: offer only its layers, and its default τ."""
    try:
        card = find_card(card_id)
    except NLAInputError as exc:
        raise gr.Error(str(exc), print_exception=False) from None
    return (gr.update(choices=list(card.layers), value=card.default_layer),
            gr.update(value=card.default_tau))


def _read_at(result: dict[str, Any]) -> str:
    """A line naming the token read and its layer, when the request picked one (a click on the heat map or
    the grid, ``position``)."""
    pos = result.get("position")
    if pos is None or result.get("read_token") is None:
        return ""
    return (f"**Read at token {pos}** (“{result['read_token'].strip() or result['read_token']}”) at layer {result['layer']}; "
            "click another token or grid cell to read it.\n\n")


def render(result: dict[str, Any], heat: list[tuple[str, float]], grid: dict[str, Any] | None = None) -> tuple[Any, ...]:
    """All Verbalize-tab outputs for one result: ..., the result JSON, the grid table and the grid data (a ``gr.State``)."""
    try:
        card = find_card(result["card"])
    except NLAInputError:
        card = None
    if not result.get("trained", False):
        gr.Warning("Untrained AV: the candidates are not readings of the activation yet.", duration=6)
    return (
        views.badge_html(result),
        views.best_text(result),
        _read_at(result) + views.notes_markdown(result),
        views.compass_markdown(result),
        heat,
        views.candidates_frame(result),
        views.score_plot(result, card),
        views.timings_markdown(result),
        engine.write_json(result),
        result,
        views.grid_frame(grid),
        grid,
    )
