"""The Verbalize tab's token maps: the heat map (one layer) and the token × layer grid (the card's layers).

Both shade a text token by the same quantity, cos(h_t − μ, v − μ) of its state h_t to the vector v
the card read, one layer at a time (:func:`token_heat`); the grid is that at every card layer, with v
read at the same position at each layer (:func:`token_layer_grid`). Plain data in, plain data out (no
Gradio): the GPU function :func:`nla_space.ui.engine.run_verbalize` calls these and returns their
result from the worker, and :func:`grid_cell` maps a click on the grid back to a request.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import NLAInputError

if TYPE_CHECKING:  # the opened-card interface, for annotations only (importing it loads the model stack)
    import torch

    from ..verbalizers.base import OpenedCard

log = logging.getLogger(__name__)

#: Most layers the grid shows: a card with more gets an evenly spaced subset (its default layer kept).
MAX_GRID_LAYERS = 24


def _heat_row(oc: OpenedCard, text: str, layer: int, v: torch.Tensor) -> list[tuple[str, float]]:
    """Per text token at ``layer``: cos(h_t − μ, v − μ), rounded to 3 decimals (see :func:`token_heat`)."""
    import torch

    pieces, states = oc.token_states(text, layer)
    v = v.float()[None]
    mu = oc.mu_at(layer)
    if mu is not None:
        center = mu.float()[None]
    elif len(pieces) > 1:
        center = states.mean(0, keepdim=True)
    else:
        center = torch.zeros_like(v)
    cos = torch.nn.functional.cosine_similarity(states - center, (v - center).expand_as(states), dim=-1)
    return [(p, round(float(c), 3)) for p, c in zip(pieces, cos.tolist())]


def token_heat(oc: OpenedCard, text: str, layer: int, position: int | None = None) -> list[tuple[str, float]]:
    """Per text token: cos(h_t − μ, v − μ) to the vector v the card read (at ``position``), in [−1, 1].

    The states are the card's own (:meth:`~nla_space.verbalizers.base.OpenedCard.token_states`: the
    text's tokens as the card reads them, BOS and template tokens left out) and μ is the card's μ at
    ``layer``. When the card has none there, the mean of this text's token states stands in for μ
    (raw cosines of hidden states are all high, so they would colour every token alike).
    """
    return _heat_row(oc, text, layer, oc.read(text, layer, position))


def grid_layers(layers: Sequence[int], default_layer: int, cap: int = MAX_GRID_LAYERS) -> list[int]:
    """``layers`` ascending, without repeats; more than ``cap`` of them: ``cap`` evenly spaced ones, the
    default layer among them (it replaces the nearest pick)."""
    ordered = sorted(set(int(x) for x in layers))
    if len(ordered) <= cap:
        return ordered
    n = len(ordered)
    picks = sorted({ordered[round(i * (n - 1) / (cap - 1))] for i in range(cap)})
    if default_layer in ordered and default_layer not in picks:
        nearest = min(picks, key=lambda x: abs(x - default_layer))
        picks = sorted(set(picks) - {nearest} | {default_layer})
    return picks


def token_layer_grid(oc: OpenedCard, text: str, layers: Sequence[int] | None = None,
                     position: int | None = None) -> dict[str, Any]:
    """The token × layer grid: row ℓ is :func:`token_heat` at layer ℓ, v read at ``position`` at each layer.

    ``layers`` (default: the card's) are checked by the card, then sorted; a card with more than
    :data:`MAX_GRID_LAYERS` gets an evenly spaced subset of that many (:func:`grid_layers`). Cost: one
    :meth:`~nla_space.verbalizers.base.OpenedCard.token_states` forward per layer, plus one
    :meth:`~nla_space.verbalizers.base.OpenedCard.read_layers` call for every v. Returns plain data:
    ``{"layers": [ℓ, ...], "default_layer": int, "tokens": [piece, ...], "values": [[cos, ...] per layer],
    "position": position}`` (``values[i][j]``: token j at ``layers[i]``, rounded to 3 decimals)."""
    wanted = oc.layers if layers is None else list(layers)
    rows = grid_layers([oc.check_layer(x) for x in wanted], oc.card.default_layer)
    vs = oc.read_layers(text, rows, position)
    heat = [_heat_row(oc, text, x, vs[x]) for x in rows]
    if len(rows) < len(set(wanted)):
        log.info("token grid of card %s: %d of its %d layers", oc.card.id, len(rows), len(set(wanted)))
    return {
        "layers": rows,
        "default_layer": int(oc.card.default_layer),
        "tokens": [p for p, _ in heat[0]] if heat else [],
        "values": [[h for _, h in r] for r in heat],
        "position": position,
    }


def grid_cell(grid: dict[str, Any] | None, row: Any, col: Any) -> tuple[int, int | None]:
    """A click on the grid's cell (``row``, ``col``) as the request it makes: ``(layer, position)``.

    Column 0 is the layer label: the card's read position at that row's layer (``position`` None);
    column j ≥ 1 is token j − 1. A click outside the grid raises :class:`NLAInputError`. The text
    itself is checked by the card (a grid drawn for a longer text gives a position it refuses)."""
    if not grid or not grid.get("layers"):
        raise NLAInputError("there is no token × layer grid yet: press Verbalize first", field="position")
    layers, n = grid["layers"], len(grid.get("tokens", []))
    try:
        r, c = int(row), int(col)
    except (TypeError, ValueError):
        raise NLAInputError(f"not a cell of the grid: ({row!r}, {col!r})", field="position") from None
    if not 0 <= r < len(layers):
        raise NLAInputError(f"row {r} is outside the grid, which has {len(layers)} layer row(s); press Verbalize "
                            "to redraw it", field="layer")
    if not 0 <= c <= n:
        raise NLAInputError(f"column {c} is outside the grid, which has {n} token column(s); press Verbalize "
                            "to redraw it", field="position")
    return int(layers[r]), (None if c == 0 else c - 1)
