"""Event handlers shared by the tabs and the API: check, run, turn errors into ``gr.Error``."""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr

from ..cards import find_card
from ..errors import NLAInputError
from . import engine, views

log = logging.getLogger(__name__)


def run_checked(progress: Any = None, **params: Any) -> tuple[dict[str, Any], list[tuple[str, float]]]:
    """Check and run one request. User errors become a visible ``gr.Error``; so do unexpected ones
    (logged with their traceback), so a failing request never takes the app down."""
    try:
        req = engine.check_request(**params)
        return engine.verbalize(req, progress=progress)
    except NLAInputError as exc:
        log.info("refused a request: %s", exc)
        raise gr.Error(str(exc), title="Cannot verbalize", print_exception=False) from None
    except gr.Error:
        raise
    except Exception as exc:  # a bug or an out-of-memory: keep serving the others
        log.exception("verbalize failed")
        raise gr.Error(f"internal error ({type(exc).__name__}: {exc}); the app is still running, try again",
                       title="Internal error", print_exception=False) from None


def card_changed(card_id: str) -> tuple[Any, Any]:
    """New card: offer only its layers, and its default τ."""
    try:
        card = find_card(card_id)
    except NLAInputError as exc:
        raise gr.Error(str(exc), print_exception=False) from None
    return (gr.update(choices=list(card.layers), value=card.default_layer),
            gr.update(value=card.default_tau))


def render(result: dict[str, Any], heat: list[tuple[str, float]]) -> tuple[Any, ...]:
    """All Verbalize-tab outputs for one result."""
    try:
        card = find_card(result["card"])
    except NLAInputError:
        card = None
    if not result.get("trained", False):
        gr.Warning("Untrained AV: the candidates are not readings of the activation yet.", duration=6)
    return (
        views.badge_html(result),
        views.best_text(result),
        views.notes_markdown(result),
        views.compass_markdown(result),
        heat,
        views.candidates_frame(result),
        views.score_plot(result, card),
        views.timings_markdown(result),
        engine.write_json(result),
        result,
    )
